"""Hopper (sm_90) forward kernel of flash attention: TMA tensor-descriptor loads, pipelined K/V.

Run by attention_launchers.py's "auto" setting (the default) where the H100 measured it faster than the
portable kernel of attention_kernels.py (long sequences; see attention.VARIANTS), and
everywhere it can under "hopper"; used only on a device of capability (9, 0), and under
Triton's interpreter when a test forces it.

What differs from the portable forward (same maths, same outputs: o and a natural-log lse, +inf
on a row with no attended key, so the portable backward kernels consume it unchanged):
- Q, K, V are read and O written through tensor descriptors: on sm_90 a TMA copy
  (cp.async.bulk.tensor) per tile, issued by one thread, asynchronous to the math warps. Made
  in the kernel (tl.make_tensor_descriptor, the default), each spans one (batch, head) or one
  packed varlen sequence, [length, HEAD_D]; made on the host (HOST_DESC, see DESCRIPTOR_PLACES
  below), each spans the whole (B, H, L, D) tensor and a tile is the box [1, 1, rows, BLOCK_D]
  at (b, h, row, 0). Either way the hardware zero-fills rows past the sequence and columns past
  HEAD_D and drops out-of-range rows on the store, so odd lengths and head dims (40, 80) need
  no load/store masks at all.
- The K/V loop is software-pipelined (num_stages buffers in shared memory) and its dots lower
  to wgmma; BLOCK_M = 128 with 8 warps gives two warpgroups of 64 query rows each.
- exp2 with the softmax scale folded into one multiply per score.
- Interior tiles (whole, not on the causal diagonal, inside the attended key span) do no
  per-element select; only the first/last tile of the span and the diagonal tiles do.
- A boolean key-padding mask is read once per program: the span [first, last] of attended
  keys, and whether it has holes. Without holes (every padded BERT batch) no mask is read in
  the loop at all and tiles outside the span are never loaded; with holes, or a float mask,
  every tile of the span reads its mask slice (the portable kernel's way, through _scores).
- Causal: query blocks run longest first (the diagonal's last block first), so the heavy
  programs do not form the tail of the grid.

Not covered here, routed to the portable kernel by the launcher (attention_launchers._hopper_reason):
fp32 (needs IEEE dots, not wgmma), dropout, dense masks, and tensors whose base or strides are
not 16-byte aligned (a TMA requirement). The backward: attention_hopper_bwd.py up to head dim
128, the portable kernels above it.

No warp specialization: Triton 3.6 and 3.9 accept tl.range(..., warp_specialize=True) and run
a Hopper pass (add_hopper_warpspec), but compiled for sm_90a this loop came out the same with
and without it (the tt.warp_specialize hint survives into TTGIR, yet no ttg.warp_specialize
partitions, no setmaxnreg, same registers and shared memory); those releases document it for
Blackwell. So the producer is TMA itself (one thread issues each copy) and both warpgroups
compute; tests/test_triton_compile.py notes it should a newer Triton start specializing.
Nor FlashAttention-3's overlap of one tile's softmax with the next tile's QK^T inside a
warpgroup: written out by hand (the next QK^T issued before this tile's softmax, its result
carried to the next iteration), triton 3.9 still waited for that wgmma right after issuing it
(warp_group_dot_wait pendings=0 in the TTGIR: it keeps a wgmma in flight only when its result
is a loop-carried accumulator, as P @ V's is), so the tensor cores would idle during the
softmax either way.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._util import ensure_tma_allocator, launch_tuned, sm_count, tuned_config
from .launch import launch as launch_plain, new_descriptor
from .attention_kernels import _key_range, _program_bounds, _prune, _scores
from .backends import interpreting
from .precompile import autotune


@triton.jit
def _key_span(mask_row, stride_mn, k_len, BLOCK_N: tl.constexpr):
    """(first, end, holes) of a boolean key-padding row: keys [first, end) hold every attended
    key; holes is true when some key inside that span is masked. _key_range (the portable
    kernel's) floors first to a tile and does not count; this one also counts live keys so a
    prefix/suffix mask (BERT padding) can skip the per-tile mask reads."""
    first = tl.program_id(0) * 0 + k_len
    last = tl.program_id(0) * 0 - 1
    live_n = tl.program_id(0) * 0
    for start in range(0, k_len, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        live = tl.load(mask_row + cols * stride_mn, mask=cols < k_len, other=0) != 0
        first = tl.minimum(first, tl.min(tl.where(live, cols, k_len), 0))
        last = tl.maximum(last, tl.max(tl.where(live, cols, -1), 0))
        live_n += tl.sum(live.to(tl.int32), 0)
    end = tl.maximum(last + 1, first)  # no live key: an empty span [k_len, k_len)
    return first, end, live_n != end - first


@triton.jit
def _seq_desc(base, b64, h64, row0, stride_b, stride_h, stride_row, rows, HEAD_D: tl.constexpr,
              BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """A device descriptor over rows [row0, row0 + rows) of one (batch, head) of a (B, H, L, D)
    tensor, boxed [BLOCK, BLOCK_D]: bounds that are the sequence's own (packed varlen)."""
    return tl.make_tensor_descriptor(base + b64 * stride_b + h64 * stride_h + row0 * stride_row, [rows, HEAD_D],
                                     [stride_row, 1], [BLOCK, BLOCK_D])


@triton.jit
def _tile(desc, b, h, row, HOST_DESC: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows [row, row + ROWS) of one (batch, head): a host descriptor spans the whole 4-D
    (B, H, L, D) tensor (its box [1, 1, ROWS, BLOCK_D]; the reshape drops the unit dims and
    moves no data), a device one the (L, D) slice of that (batch, head) alone."""
    if HOST_DESC:
        tile = desc.load([b, h, row, 0]).reshape(ROWS, BLOCK_D)
    else:
        tile = desc.load([row, 0])
    return tile


@triton.jit
def _store_tile(desc, b, h, row, tile, HOST_DESC: tl.constexpr):
    """_tile's store: rows past the descriptor's bounds are dropped."""
    if HOST_DESC:
        desc.store([b, h, row, 0], tile.reshape(1, 1, tile.shape[0], tile.shape[1]))
    else:
        desc.store([row, 0], tile)


@triton.jit
def _hopper_tiles(
    acc, l_i, m_i, q, k_desc, v_desc, kv_b, kv_h, rows, lo, hi, col_lo, col_hi, k_len, mask_row, stride_mn, qk_scale,
    HOST_DESC: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_TILES: tl.constexpr,  # read the key-padding mask slice of every tile (holes or float)
    MASK_FLOAT: tl.constexpr,
    BOUNDARY: tl.constexpr,  # tiles may hold keys outside [col_lo, col_hi) or above the diagonal
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Online softmax over the key tiles starting in [lo, hi), in base 2."""
    for start_n in range(lo, hi, BLOCK_N):
        k = _tile(k_desc, kv_b, kv_h, start_n, HOST_DESC, BLOCK_N, BLOCK_D)
        v = _tile(v_desc, kv_b, kv_h, start_n, HOST_DESC, BLOCK_N, BLOCK_D)
        if UPCAST:  # the interpreter's bf16 dots are wrong: fp32 there (docs: the interpreter)
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        cols = start_n + tl.arange(0, BLOCK_N)
        # Scores times to_scale (see attention_kernels._scores): the row max is scaled after,
        # and exp2's argument scales and shifts each score in one FMA.
        if MASK_TILES:
            s, to_scale = _scores(q, k, rows, cols, rows >= 0, cols < k_len, mask_row, 0, stride_mn, qk_scale,
                                  CAUSAL, 1, MASK_FLOAT, False, True, BLOCK_M, BLOCK_N)
        else:
            s = tl.dot(q, tl.trans(k))
            to_scale = qk_scale
            if BOUNDARY:
                allowed = ((cols >= col_lo) & (cols < col_hi))[None, :] & (rows >= 0)[:, None]
                if CAUSAL:
                    allowed = allowed & (cols[None, :] <= rows[:, None])
                s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * to_scale)
        if BOUNDARY:
            # A row that has seen only masked keys keeps max -inf: subtract 0 instead, so
            # exp2 gives exactly 0, not NaN (-inf - -inf). Interior tiles have no -inf score.
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        p = tl.exp2(s * to_scale - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _causal_end(col_hi, start_m, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """End of the key tiles a query block visits: tiles wholly above the diagonal never are."""
    if CAUSAL:
        col_hi = tl.minimum(col_hi, start_m + BLOCK_M)
    return col_hi


@triton.jit
def _span_tiles(acc, l_i, m_i, q, k_desc, v_desc, kv_b, kv_h, rows, start_m, col_lo, col_hi, qk_scale,
                HOST_DESC: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Every key in [col_lo, col_hi) attended (up to the diagonal). Tiles starting in
    [full_lo, full_hi) lie wholly inside the span and on or below the diagonal: no select.
    Before them at most one tile (a span starting mid-tile), after them the span's ragged
    end and the diagonal tiles take the checked path."""
    hi = _causal_end(col_hi, start_m, CAUSAL, BLOCK_M)
    lo = (col_lo // BLOCK_N) * BLOCK_N
    full_lo = tl.cdiv(col_lo, BLOCK_N) * BLOCK_N
    full_end = col_hi
    if CAUSAL:
        full_end = tl.minimum(full_end, start_m + 1)
    full_hi = tl.maximum((full_end // BLOCK_N) * BLOCK_N, full_lo)
    head_end = tl.minimum(full_lo, hi)
    # No mask is read here: (col_hi, q, 0) fill the unused (k_len, mask_row, stride_mn).
    acc, l_i, m_i = _hopper_tiles(acc, l_i, m_i, q, k_desc, v_desc, kv_b, kv_h, rows, lo, head_end, col_lo, col_hi,
                                  col_hi, q, 0, qk_scale, HOST_DESC, CAUSAL, False, False, True, UPCAST,
                                  BLOCK_M, BLOCK_N, BLOCK_D)
    acc, l_i, m_i = _hopper_tiles(acc, l_i, m_i, q, k_desc, v_desc, kv_b, kv_h, rows, full_lo, full_hi, col_lo, col_hi,
                                  col_hi, q, 0, qk_scale, HOST_DESC, CAUSAL, False, False, False, UPCAST,
                                  BLOCK_M, BLOCK_N, BLOCK_D)
    acc, l_i, m_i = _hopper_tiles(acc, l_i, m_i, q, k_desc, v_desc, kv_b, kv_h, rows, tl.maximum(full_hi, head_end), hi,
                                  col_lo, col_hi, col_hi, q, 0, qk_scale, HOST_DESC, CAUSAL, False, False, True, UPCAST,
                                  BLOCK_M, BLOCK_N, BLOCK_D)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_hopper(
    Q, K, V, O,  # as _attn_fwd's (base and strides 16-byte aligned: TMA); with HOST_DESC 4-D host descriptors
    LSE,
    MASK,  # key-padding row per batch (uint8 or float), read through stride_mb/stride_mn
    CU_Q, CU_K,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh,
    stride_mb, stride_mn,
    H, GROUP, LQ, LK,
    TUNE_BUCKET,  # autotune key only: (length bucket, batch*heads bucket), see attention_launchers._bucket
    qk_scale,  # softmax scale * log2(e)
    HEAD_D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,  # 0 none, 1 key padding (dense masks take the portable kernel)
    MASK_FLOAT: tl.constexpr,
    VARLEN: tl.constexpr,
    UPCAST: tl.constexpr,
    HOST_DESC: tl.constexpr,  # Q, K, V, O are TensorDescriptors made on the host (never with VARLEN)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m, b, h, q0, q_len, k0, k_len = _program_bounds(CU_Q, CU_K, H, LQ, LK, LQ, VARLEN, BLOCK_M)
    if CAUSAL:
        # Longest first: with causal masking the last query block has the most key tiles.
        start_m = (tl.cdiv(LQ, BLOCK_M) - 1) * BLOCK_M - start_m
    if start_m >= q_len:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    hk = h // GROUP
    if HOST_DESC:
        # Made once per call on the host: the kernel starts loading at once. The 4-D bounds
        # (B, H, L, D) do per (batch, head) what the device descriptors' own bounds do below.
        q_desc, k_desc, v_desc, o_desc = Q, K, V, O
    else:
        # One descriptor per (sequence, head), written by each program into global scratch
        # and fenced before its first use: bounds are the sequence's own, which a packed
        # varlen batch needs. A zero-length key sequence gets a 1-row descriptor that no
        # tile reads (the loops below are empty).
        hk64 = hk.to(tl.int64)
        kv_rows = tl.maximum(k_len, 1)
        q_desc = _seq_desc(Q, b64, h64, q0, stride_qb, stride_qh, stride_qm, q_len, HEAD_D, BLOCK_M, BLOCK_D)
        k_desc = _seq_desc(K, b64, hk64, k0, stride_kb, stride_kh, stride_kn, kv_rows, HEAD_D, BLOCK_N, BLOCK_D)
        v_desc = _seq_desc(V, b64, hk64, k0, stride_vb, stride_vh, stride_vn, kv_rows, HEAD_D, BLOCK_N, BLOCK_D)
        o_desc = _seq_desc(O, b64, h64, q0, stride_ob, stride_oh, stride_om, q_len, HEAD_D, BLOCK_M, BLOCK_D)
    q = _tile(q_desc, b, h, start_m, HOST_DESC, BLOCK_M, BLOCK_D)
    out_ty = q.dtype
    if UPCAST:
        q = q.to(tl.float32)
    rows = start_m + tl.arange(0, BLOCK_M)
    mask_row = MASK + b64 * stride_mb

    # The attended key span [col_lo, col_hi): every key, or a key-padding row's live span.
    col_lo = tl.program_id(0) * 0
    col_hi = k_len
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if MASK_KIND == 1 and MASK_FLOAT:
        # A float mask adds its values: every tile of the span reads its slice.
        col_lo, col_hi = _key_range(mask_row, stride_mn, k_len, True, BLOCK_N)
        acc, l_i, m_i = _hopper_tiles(acc, l_i, m_i, q, k_desc, v_desc, b, hk, rows, col_lo,
                                      _causal_end(col_hi, start_m, CAUSAL, BLOCK_M), col_lo, col_hi, k_len, mask_row,
                                      stride_mn, qk_scale, HOST_DESC, CAUSAL, True, True, True, UPCAST,
                                      BLOCK_M, BLOCK_N, BLOCK_D)
    elif MASK_KIND == 1:
        col_lo, col_hi, holes = _key_span(mask_row, stride_mn, k_len, BLOCK_N)
        if holes:
            acc, l_i, m_i = _hopper_tiles(acc, l_i, m_i, q, k_desc, v_desc, b, hk, rows,
                                          (col_lo // BLOCK_N) * BLOCK_N, _causal_end(col_hi, start_m, CAUSAL, BLOCK_M),
                                          col_lo, col_hi, k_len, mask_row, stride_mn, qk_scale, HOST_DESC, CAUSAL,
                                          True, False, True, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
        else:
            acc, l_i, m_i = _span_tiles(acc, l_i, m_i, q, k_desc, v_desc, b, hk, rows, start_m, col_lo, col_hi,
                                        qk_scale, HOST_DESC, CAUSAL, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)
    else:
        acc, l_i, m_i = _span_tiles(acc, l_i, m_i, q, k_desc, v_desc, b, hk, rows, start_m, col_lo, col_hi, qk_scale,
                                    HOST_DESC, CAUSAL, UPCAST, BLOCK_M, BLOCK_N, BLOCK_D)

    dead = l_i == 0.0
    l_safe = tl.where(dead, 1.0, l_i)
    _store_tile(o_desc, b, h, start_m, (acc / l_safe[:, None]).to(out_ty), HOST_DESC)
    lse = tl.where(dead, float("inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(LSE + b64 * stride_lb + h64 * stride_lh + (q0 + rows), lse, mask=rows < q_len)


# (BLOCK_M, BLOCK_N, num_warps, num_stages). 128-row tiles over 8 warps (two
# warpgroups) for long sequences; 64-row tiles over 4 warps so a small batch*heads still gives
# enough programs for 132 SMs (the key's batch*heads bucket tells the cases apart); 32-key
# tiles for head dim 256, where a 64-key tile and its stages do not fit shared memory.
_FWD_HOPPER_GPU = [
    (128, 128, 8, 2), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4),
    (64, 64, 4, 3), (64, 128, 4, 2),
    (128, 32, 8, 2), (64, 32, 4, 2),
]
_KEY = ["HEAD_D", "TUNE_BUCKET", "CAUSAL", "MASK_KIND", "VARLEN", "HOST_DESC"]


# Which tile each descriptor parameter of the forward and backward kernels moves.
_QUERY_ROWS = ("Q", "O", "DO", "DQ")  # BLOCK_M rows
_KEY_ROWS = ("K", "V", "DK", "DV")  # BLOCK_N rows


def set_boxes(args: dict) -> None:
    """Fit host descriptors' boxes to a config's tiles: the query-side tensors' to BLOCK_M
    rows, the key-side ones' to BLOCK_N (the autotuner calls this before it times or
    launches each config; the launchers call it for a config they launch directly). Device
    descriptors need nothing."""
    if not isinstance(args["Q"], TensorDescriptor):
        return
    d = args["BLOCK_D"]
    for names, rows in ((_QUERY_ROWS, args["BLOCK_M"]), (_KEY_ROWS, args["BLOCK_N"])):
        for name in names:
            if name in args:
                args[name].block_shape = [1, 1, rows, d]


def boxes_for(names, args, kwargs, config) -> None:
    """set_boxes for a launch given as positional args named `names`, keyword args and a config."""
    set_boxes(dict(zip(names, args), **kwargs, **config))


def _configs():
    if interpreting():  # one config (the interpreter cannot autotune), big enough to be quick
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1, pre_hook=set_boxes)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s, pre_hook=set_boxes)
            for m, n, w, s in _FWD_HOPPER_GPU]


attn_fwd_hopper = _attn_fwd_hopper
attn_fwd_hopper_tuned = autotune(_configs(), _KEY, prune_configs_by={"early_config_prune": _prune})(_attn_fwd_hopper)


def default_config(block_d: int, itemsize: int, few_programs: bool = False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) without autotuning: under the interpreter,
    and with FUSEFORMER_AUTOTUNE=0. All fit sm_90 shared memory (tests/triton_compile_check.py).
    few_programs: 128-row tiles would leave SMs idle (a short sequence, a small batch*heads),
    so 64-row tiles, twice the programs."""
    if interpreting():
        return 64, 64, 4, 1
    if block_d * itemsize > 256:
        return (64, 32, 4, 2) if few_programs else (128, 32, 8, 2)
    return (64, 64, 4, 3) if few_programs else (128, 64, 8, 3)


# ----------------------------------------------------------------------------- host side

_capabilities: dict = {}


def _is_sm90(device) -> bool:
    cap = _capabilities.get(device)
    if cap is None:
        cap = _capabilities[device] = torch.cuda.get_device_capability(device)
    return cap == (9, 0)


def unsupported_reason(q, k, v, out, mask_kind: str, dropout_p: float, *more) -> Optional[str]:
    """Why the Hopper kernels cannot run a call (the portable ones then do), or None.
    q, k, v, out (B, H, L, D) views with unit last stride, as the launchers get them; `more`:
    further tensors read or written through descriptors (the backward's dout, dq, dk, dv)."""
    if not interpreting() and not (q.is_cuda and _is_sm90(q.device)):
        return "not a capability (9, 0) GPU"  # under the interpreter tests force it on a CPU
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype}: the Hopper kernel is fp16/bf16 (fp32 needs IEEE dots, not wgmma)"
    if dropout_p > 0.0:
        return "dropout"
    if mask_kind == "dense":
        return "a dense mask (only key-padding masks, (B, 1, 1, Lk) broadcast)"
    size = q.element_size()
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out), *(("gradient", t) for t in more)):
        # TMA: a 16-byte aligned base, and every stride but the last a multiple of 16 bytes.
        if t.data_ptr() % 16 or any(s * size % 16 for s in t.stride()[:-1]):
            return f"{name} is not 16-byte aligned in its base or strides (head dim {q.shape[-1]})"
    return None


# Where the Hopper kernels' tensor descriptors are made (forward, and both backward passes):
# "auto" (the default): on the host, as "host", by the H200 runs of 2026-11-27
#     (bench/results/h200/2026-11-27-a3eeca9/ and 2026-11-27-5e53e2b/):
#     - forward: host descriptors were faster on the device in 12 of 15 cases (CUDA-graph
#       geomean 1.15x over device ones; d128 L4096 0.491 against 0.512 ms, GQA d128 causal L2048
#       0.308 against 0.365), and eagerly in every case where kernel="auto" takes the Hopper
#       forward (0.615 against 0.651 ms at d64 L4096);
#     - backward: faster on the device in both runs (graph 1.357 against 1.549 ms at d64
#       L2048, 0.807 against 0.891 causal, in the evening's). The morning's run sent
#       host-descriptor launches through Triton's JITFunction.run and its eager causal step
#       lost (1.374 against 0.925 ms), so the backward kept device descriptors; since then the
#       fast launch and its plans take them (launch.DescriptorBound: new descriptors per call,
#       ~56 µs a forward+backward of host time on this project's CPU against ~38 with device
#       ones), and eagerly the evening's run measured 1.347 against 1.552 ms (non-causal) and
#       1.057 against 1.023 (causal).
# "device": every program writes its own into global scratch (tl.make_tensor_descriptor) and
#     fences them for the TMA unit (4 fence.proxy.tensormap per forward program, 6 per dK/dV and
#     5 per dQ program in the sm_90a PTX) before using them. Packed varlen sequences, whose
#     bounds are per sequence, always take it.
# "host": one 4-D (B, H, L, D) TensorDescriptor per tensor per call (~5 µs of host time for the
#     forward's four on this project's CPU), passed as kernel parameters, so a program's first
#     instruction can be its Q load: FlashAttention-3's and the Triton tutorial's way.
# The setting is attention.VARIANT["descriptors"]; the bench times the default
# (fuseformer-triton-hopper) and device descriptors (-hopper-device).
DESCRIPTOR_PLACES = ("auto", "device", "host")  # [0] is the default


def host_descriptors(tensors, block_d: int):
    """One 4-D (B, H, L, D) descriptor per tensor, or None where the host cannot describe
    them: an empty dim (TMA needs positive sizes) or a zero stride (an expanded view)."""
    out = []
    for t in tensors:
        if 0 in t.shape or 0 in t.stride():
            return None
        # unsupported_reason has checked what TensorDescriptor's constructor would. The box is
        # a placeholder until set_boxes fits it to the config.
        out.append(new_descriptor(t, t.shape, t.stride(), [1, 1, 16, block_d]))
    return out


_FWD_DESCS = ("Q", "K", "V", "O")  # the forward's leading parameters


def launch(grid, args, kwargs, key, autotune: bool) -> None:
    """Launch the kernel: autotuned once per `key` (then the winner directly), or with the
    default config (the interpreter, FUSEFORMER_AUTOTUNE=0)."""
    q = args[0]
    host = kwargs["HOST_DESC"]
    base = q.base if host else q
    if base.is_cuda and not host:
        ensure_tma_allocator()
    if autotune:
        config = tuned_config(attn_fwd_hopper_tuned, key) if host else None
        if config is not None:  # launched directly, no pre_hook: fit the boxes here
            boxes_for(_FWD_DESCS, args, kwargs, config)
        launch_tuned(attn_fwd_hopper_tuned, attn_fwd_hopper, key, grid, *args, **kwargs)
    else:
        few = base.is_cuda and grid({"BLOCK_M": 128})[0] < sm_count(base.device)
        m, n, w, s = default_config(kwargs["BLOCK_D"], base.element_size(), few)
        if host:
            boxes_for(_FWD_DESCS, args, kwargs, dict(BLOCK_M=m, BLOCK_N=n))
        launch_plain(attn_fwd_hopper, grid, *args, **kwargs, BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
