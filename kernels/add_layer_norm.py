"""Fused residual add + dropout + LayerNorm in Triton, forward and backward.

    stream = residual + dropout(x)              (residual optional)
    y      = (stream - mean) * rstd * weight + bias   over the last dim, statistics in fp32

Launcher contract (the "cuda" backend registers launchers with exactly these signatures),
all tensors 2-D contiguous (M, N), mean/rstd float32 (M,). The triton launchers below also
take contiguous tensors of any rank with last dim N (M = the product of the others), and
_run_forward/_run_backward hand them x as it comes; outputs then have x's shape:

    forward(x, residual, weight, bias, eps, dropout_p, seed, save_stream, save_stats=True)
        -> (y, stream or None, mean or None, rstd or None)
        residual/weight/bias may be None; seed is an int64 tensor of 1 element (None when
        dropout_p == 0); stream (dtype of x) is written only when save_stream is True, and
        mean/rstd only when save_stats is True (a launcher may return them regardless).
    backward(dy, dstream, stream, weight, bias, mean, rstd, dropout_p, seed, has_residual)
        -> (dx, dresidual or None, dweight or None, dbias or None)
        `stream` is the saved LayerNorm input (x itself when there is neither a residual
        nor dropout); dstream is the gradient flowing into the prenorm output, or None.
    unsupported(dtype, hidden, dropout_p, requires_grad) -> None or a reason string.

The kernels and their gradient maths: kernels/add_layer_norm_kernels.py.

Variants (VARIANT, read from FUSEFORMER_ADD_LN_FWD and FUSEFORMER_ADD_LN_BWD at import,
changed with set_variant(forward=, backward=) or the `variant` context; all run the same maths
and pass the same parity tests). The first of each is the default, the measured path:
forward
    "row"         one program per row (`_add_ln_fwd`): 16384 x 768 bf16 took 0.0253 ms on the
                  H200 and 0.0324 ms (79% of copy) on the H100, where "rows" (0.0430) and
                  "persistent" (0.0401, on the plan since corrected, see rows_plan) were
                  slower; all three were within 1% at 16384 x 4096 (99% of copy).
    "rows"        `_add_ln_fwd_rows`: several rows per program (ROWS x next_pow2(N) tile) for
                  rows of at most MAX_ROWS_BLOCK, weight/bias loaded once per program, one
                  program per tile.
    "persistent"  the same kernel on a grid of as many programs as fit on the SMs at once, each
                  looping over tiles and prefetching the next tile's inputs (PIPELINE_STAGES).
    Rows wider than MAX_ROWS_BLOCK always take "row" (a tile of one row gains nothing).
backward
    "loop"        `_add_ln_bwd` on 4 programs per SM, each walking its rows one after another:
                  every row's loads are issued only when the previous row is done.
    "pipelined"   the same kernel with its row loop software-pipelined (the next row's inputs
                  copied into shared memory while this one is reduced: Triton's fused-softmax
                  tutorial's technique), on no more programs than fit at once; the column
                  sums of its partials (kernels/reduce.py) pipelined the same way. H200
                  (bench/results/h200/, forward+backward, device time): 0.0788 against
                  0.0777 ms at 16384 x 768, 0.3549 against 0.3481 at x 4096: not the default.

The backward reduces its dweight/dbias partials with kernels/reduce.py (deterministic).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backends, reference
from ._util import as_rows, cdiv, device_guard, draw_seed, new_output, next_pow2, row_count, sm_count
from .launch import launch, plan_table
from .add_layer_norm_kernels import _add_ln_bwd, _add_ln_fwd, _add_ln_fwd_rows, _keep_mask_kernel  # noqa: F401
from .backends import Impl
from .checks import check_prob, check_same, check_tensor, same_floats
from .reduce import sum_rows

# Widest row kept in registers in one piece; wider rows are processed in chunks of this
# size with extra passes over memory. 16384 fp32 values over 16 warps is 32 per thread.
MAX_FUSED_BLOCK = 16384
# Chunk of the multi-pass paths, and the widest row the backward keeps in registers in one
# piece. The backward's single-block body holds ~7 fp32 values per element (weight, two
# partial sums, stream, dy, xhat, g): at 16384 over 16 warps ptxas spilled 2 KB, at 8192 in
# fp32 with dropout 296 B; the forward's chunk loop at 16384 with dropout spilled 28 B. At
# 4096 nothing spills (tests/test_triton_compile.py fails on any add+LN spill).
CHUNK = 4096
# Widest row the multi-row kernel takes: up to BERT-large's 1024 several rows share a program;
# wider rows already give one program enough work.
MAX_ROWS_BLOCK = 1024
# Elements per multi-row tile (ROWS = TILE_ELEMENTS // next_pow2(N)): 4 rows of 768.
TILE_ELEMENTS = 4096
FORWARD_VARIANTS = ("row", "rows", "persistent")
BACKWARD_VARIANTS = ("loop", "pipelined")
# Read once from the environment; the launchers read this dict per call.
VARIANT = backends.Variants("add_layer_norm", {"forward": FORWARD_VARIANTS, "backward": BACKWARD_VARIANTS},
                            {"forward": "FUSEFORMER_ADD_LN_FWD", "backward": "FUSEFORMER_ADD_LN_BWD"})
# Choose the kernels: forward=, backward= (see the module docstring); returns the previous
# settings. `variant(...)` does the same inside a block.
set_variant = VARIANT.set
variant = VARIANT.using
# Registers per thread the looping plans budget for (rows_plan, backward_plan): a grid
# of more programs than fit on the SMs at once would run in two waves, the second starting only
# as the first ends. tests/test_triton_compile.py holds the kernels to these figures.
# Compiled for sm_90 (triton 3.9 / 3.6): rows kernel at BERT's 768, 47-55 registers without
# dropout, 94-99 with; backward, pipelined with every flag, 125-128.
ROWS_REGS = 64  # `_add_ln_fwd_rows` without dropout (with dropout: DROPOUT_ROWS_REGS)
DROPOUT_ROWS_REGS = 128
BACKWARD_REGS = 128  # `_add_ln_bwd`, the single-block body, any flags
REGISTERS_PER_SM = 65536  # sm_80 and sm_90
# Tiles (rows) each program of a looping grid has in flight: the one it computes on and the
# next, copied into shared memory meanwhile.
PIPELINE_STAGES = 2


# ----------------------------------------------------------------------------- launchers


def _block(N: int) -> tuple[int, bool]:
    block = next_pow2(N)
    if block <= MAX_FUSED_BLOCK:
        return block, True
    return min(MAX_FUSED_BLOCK, CHUNK), False


def _bwd_block(N: int) -> tuple[int, bool]:
    block = next_pow2(N)
    limit = min(MAX_FUSED_BLOCK, CHUNK)
    return (block, True) if block <= limit else (limit, False)


def _num_warps(block: int) -> int:
    # A rule, not an autotuner (as Triton's tutorial 05): one warp per 256 elements of the
    # row, 8 fp32 values per thread (two 16-byte vectors), 1..16 warps. That stays inside 4..64
    # elements per thread, where nothing spills (one warp over 16384 spilled ~26 KB).
    return min(16, max(1, block // 256))


def _resident(warps: int, regs: int) -> int:
    """Programs of `warps` warps at `regs` registers per thread that fit on one SM at once
    (64 warps and REGISTERS_PER_SM registers per SM on sm_80 and sm_90)."""
    return max(1, min(64 // warps, REGISTERS_PER_SM // (regs * 32 * warps)))


def backward_plan(M: int, N: int, variant: str, device: torch.device) -> tuple[int, bool, int, int]:
    """(BLOCK, SINGLE, STAGES, programs) of `_add_ln_bwd` for an (M, N) backward."""
    block, single = _bwd_block(N)
    stages = PIPELINE_STAGES if variant == "pipelined" and single else 1
    if device is None or backends.interpreting() or device.type != "cuda":  # None: no grid wanted
        # Under the interpreter a program is as costly as a loop iteration: a few suffice.
        return block, single, stages, max(1, min(M, 4))
    # A few programs per SM, each summing many rows, keeps the partial buffers small. The
    # pipelined variant launches no more of them than fit at once (one wave: at N = 4096,
    # 16 warps of up to 128 registers, that is one per SM, not four).
    per_sm = 4 if stages == 1 else min(4, _resident(_num_warps(block), BACKWARD_REGS))
    return block, single, stages, max(1, min(M, per_sm * sm_count(device)))


def rows_plan(M: int, N: int, variant: str, device: torch.device, dropout: bool = False) -> tuple[int, ...]:
    """(ROWS, BLOCK, ALIGN, programs, STAGES) of `_add_ln_fwd_rows` for an (M, N) forward."""
    block = next_pow2(N)
    rows = max(1, min(128, TILE_ELEMENTS // block))
    tiles = cdiv(M, rows)
    align = 1
    while align < 16 and N % (align * 2) == 0:
        align *= 2
    if variant != "persistent":
        return rows, block, align, tiles, 1
    if backends.interpreting() or device.type != "cuda":
        return rows, block, align, max(1, min(tiles, 4)), PIPELINE_STAGES
    # As many programs as fit on the SMs at once, each looping over tiles: a 16384 x 768
    # batch (4096 tiles of 4 rows, 16 warps each) launches 2 per SM, not 4096. The H100 run
    # timed an earlier plan that assumed 4 per SM (64 warps at 32 registers) where ~50
    # registers fit 2, so half its programs could start only as the first half ended: the
    # likely reason it took 0.81x the speed of "row" there.
    per_sm = _resident(_num_warps(rows * block), DROPOUT_ROWS_REGS if dropout else ROWS_REGS)
    return rows, block, align, max(1, min(tiles, per_sm * sm_count(device))), PIPELINE_STAGES


# An absent tensor is passed as some other valid tensor: its constexpr flag keeps the kernel
# from ever reading it, and Triton needs a pointer in that slot.


# The row-wise kernels address row r at r * N whatever the rank, so the Triton launchers take
# a contiguous x as it comes: no reshape view in, none out (each costs ~3 µs of host time).


# Forward launch plans (kernels/launch.py's Bound, as attention's forward keeps them): per
# signature of what the launch's trailing arguments and grid derive from, the kernel, grid and
# those arguments as the fast launch last made them; a repeated call re-launches them with its
# tensors. Not under the interpreter (no fast launch there).
_fwd_plans = plan_table()
# The backward's, the same way (its partial sums are planned by kernels/reduce.py's own table).
_bwd_plans = plan_table()


def forward(x, residual, weight, bias, eps, dropout_p, seed, save_stream, save_stats=True):
    M, N = row_count(x), x.shape[-1]
    y = new_output(x.shape, x.dtype, x.device)
    stream = new_output(x.shape, x.dtype, x.device) if save_stream else None
    # Two allocations fewer per inference call: only the backward reads the statistics.
    mean = new_output((M,), torch.float32, x.device) if save_stats else None
    rstd = new_output((M,), torch.float32, x.device) if save_stats else None
    if M == 0 or N == 0:
        return y, stream, None if mean is None else mean.zero_(), None if rstd is None else rstd.zero_()
    dropout = dropout_p > 0.0
    pointers = (
        x,
        residual if residual is not None else x,
        weight if weight is not None else x,
        bias if bias is not None else x,
        y,
        stream if stream is not None else y,
        mean if save_stats else y,
        rstd if save_stats else y,
        seed if dropout else y,
    )
    key = None
    if _fwd_plans.active():
        key = (x.dtype, x.device, M, N, residual is None, weight is None, bias is None, eps, dropout_p,
               save_stream, save_stats, VARIANT["forward"])

    def full():
        flags = dict(HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None, DROPOUT=dropout,
                     SAVE_STREAM=stream is not None, SAVE_STATS=save_stats)
        variant = VARIANT["forward"]
        if variant != "row" and N <= MAX_ROWS_BLOCK:
            rows, block, align, programs, stages = rows_plan(M, N, variant, x.device, dropout)
            launch(_add_ln_fwd_rows, (programs,), *pointers, M, N, float(eps), float(dropout_p), **flags, ROWS=rows,
                   BLOCK=block, ALIGN=align, STAGES=stages, num_warps=_num_warps(rows * block))
        else:
            block, single = _block(N)
            launch(_add_ln_fwd, (M,), *pointers, N, float(eps), float(dropout_p), **flags, BLOCK=block,
                   SINGLE=single, num_warps=_num_warps(block))

    _fwd_plans.launch(key, ((_add_ln_fwd, pointers), (_add_ln_fwd_rows, pointers)), full)
    return y, stream, mean, rstd


def backward(dy, dstream, stream, weight, bias, mean, rstd, dropout_p, seed, has_residual, dx_sum=None):
    """dx_sum (Impl.backward_extras): a dtype, or None; given, a fifth output, dx summed over
    the rows in that dtype (the bias gradient of the linear layer whose output x was: a fused
    block's), from the kernel's partial sums, not a pass over dx of its own."""
    M, N = row_count(dy), dy.shape[-1]
    dx = new_output(dy.shape, stream.dtype, dy.device)
    dres = new_output(dy.shape, stream.dtype, dy.device) if has_residual else None
    if M == 0 or N == 0:
        dw = None if weight is None else torch.zeros_like(weight)
        db = None if bias is None else torch.zeros_like(bias)
        sums = () if dx_sum is None else (torch.zeros(N, dtype=dx_sum, device=dy.device),)
        return (dx, dres, dw, db, *sums)
    block, single, stages, programs = backward_plan(M, N, VARIANT["backward"], dy.device)
    dtypes = []  # of the sums, in the kernel's order of partials
    if weight is not None:
        dtypes.append(weight.dtype)
    if bias is not None:
        dtypes.append(bias.dtype)
    if dx_sum is not None:
        dtypes.append(dx_sum)
    groups = len(dtypes)
    part = None
    if groups:  # the chunked kernel adds into its partial rows: they start at zero
        alloc = new_output if single else (
            lambda shape, dtype, device: torch.zeros(size=shape, dtype=dtype, device=device))
        part = alloc((programs, groups, N), torch.float32, dy.device)
    dropout = dropout_p > 0.0
    pointers = (
        dy,
        dstream if dstream is not None else dy,
        stream,
        weight if weight is not None else dy,
        mean,
        rstd,
        seed if dropout else mean,
        dx,
        dres if dres is not None else dx,
        part if part is not None else mean,
    )
    key = None
    if _bwd_plans.active():
        key = (dy.dtype, stream.dtype, None if weight is None else weight.dtype, dy.device, M, N,
               dstream is not None, has_residual, bias is None, dx_sum is None, dropout_p, VARIANT["backward"])
    _bwd_plans.launch(key, ((_add_ln_bwd, pointers),), lambda: launch(
        _add_ln_bwd, (programs,), *pointers, M, N, float(dropout_p),
        HAS_DSTREAM=dstream is not None, HAS_RES=has_residual, HAS_W=weight is not None, HAS_B=bias is not None,
        DX_SUM=dx_sum is not None, DROPOUT=dropout, BLOCK=block, SINGLE=single, STAGES=stages,
        num_warps=_num_warps(block)))
    sums = ()
    if groups:  # one launch for every sum (kernels/reduce.py)
        sums = sum_rows(part if groups > 1 else part.view(programs, N), *dtypes, stages=stages)
        if groups == 1:
            sums = (sums,)
    dw = sums[0] if weight is not None else None
    db = sums[weight is not None] if bias is not None else None
    return (dx, dres, dw, db) if dx_sum is None else (dx, dres, dw, db, sums[-1])


def unsupported(dtype=None, hidden=None, dropout_p=0.0, requires_grad=False, **_):
    if dtype is not None and dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {dtype} (the kernels take float16, bfloat16, float32)"
    return None


backends.register_impl("add_layer_norm", "triton", Impl(forward, backward, unsupported,
                                                        backward_extras=frozenset({"dx_sum"})))


def dropout_mask(seed: torch.Tensor, shape, dropout_p: float) -> torch.Tensor:
    """The keep-mask (True = keep) the kernels draw for `seed` over an input of `shape`.

    Built by the same Triton code the kernels use, so tests can hand it to the reference.
    """
    N = shape[-1] if len(shape) else 1
    M = 1
    for d in shape[:-1]:
        M *= d
    out = torch.empty(M, N, dtype=torch.int8, device=seed.device)
    if M and N:
        block = min(next_pow2(N), 4096)
        _keep_mask_kernel[(M, cdiv(N, block))](seed, out, N, float(dropout_p), BLOCK=block)
    return out.bool().reshape(shape=shape)


# ----------------------------------------------------------------------------- shared by both paths


def _run_forward(backend, x, residual, weight, bias, eps, dropout_p, seed, save_stream, save_stats=True):
    """The launcher of `backend` on (rows, N) views; outputs back in x's shape. The kernels
    address rows as row * N: one contiguous copy of a strided view costs one pass over memory,
    cheaper than strided (uncoalesced) loads in every pass that follows."""
    impl = backends.get_impl("add_layer_norm", backend)
    if backend == "triton":  # its launchers take any rank (see forward)
        with device_guard(x):
            return impl.forward(x.contiguous(), None if residual is None else residual.contiguous(), weight, bias,
                                eps, dropout_p, seed, save_stream, save_stats)
    shape = x.shape
    x2 = as_rows(x).contiguous()
    r2 = None if residual is None else as_rows(residual).contiguous()
    with device_guard(x):
        y, stream, mean, rstd = impl.forward(x2, r2, weight, bias, eps, dropout_p, seed, save_stream, save_stats)
    return y.view(size=shape), None if stream is None else stream.view(size=shape), mean, rstd


def _run_backward(backend, dy, dstream, stream, weight, bias, mean, rstd, dropout_p, seed, has_residual,
                  dx_sum=None):
    """dx_sum: None, or a dtype: then a fifth output, dx summed over the rows in it (by the
    kernel where the launcher takes `dx_sum`, else by torch)."""
    impl = backends.get_impl("add_layer_norm", backend)
    fold = dx_sum is not None and "dx_sum" in impl.backward_extras
    if backend == "triton":  # any rank, as in _run_forward
        args = (dy.contiguous(), None if dstream is None else dstream.contiguous(), stream.contiguous(), weight, bias,
                mean, rstd, dropout_p, seed, has_residual)
        with device_guard(dy):
            out = impl.backward(*args, dx_sum=dx_sum) if fold else impl.backward(*args)
    else:
        shape = stream.shape
        ds2 = None if dstream is None else as_rows(dstream).contiguous()
        with device_guard(dy):
            dx, dres, dw, db = impl.backward(as_rows(dy).contiguous(), ds2, as_rows(stream).contiguous(), weight,
                                             bias, mean, rstd, dropout_p, seed, has_residual)
        out = dx.view(size=shape), None if dres is None else dres.view(size=shape), dw, db
    if dx_sum is not None and not fold:
        # One reduction kernel: torch accumulates half types in fp32 and rounds once into dx_sum.
        out = (*out, as_rows(out[0]).sum(0, dtype=dx_sum))
    return out


def _shared_grad(has_residual: bool, dropout_p: float) -> bool:
    """Is d residual the same tensor as d x? Without dropout h = x + residual, so the two
    gradients are equal: the backward writes one (one of its four M x N passes over memory
    fewer) and hands it to both inputs, as torch's add does. With dropout dx = dh * keep /
    (1 - p) and d residual = dh differ."""
    return has_residual and dropout_p == 0.0


def _run_backward_both(backend, dy, dstream, stream, weight, bias, mean, rstd, dropout_p, seed, has_residual,
                       dx_sum=None):
    """(d x, d residual, dw, db), d residual the very tensor d x where they are equal
    (_shared_grad) and None without a residual: the eager Function's backward, and a fused
    block's (models/fused_block.py), which may ask for dx_sum (a dtype: a fifth output, see
    _run_backward)."""
    shared = _shared_grad(has_residual, dropout_p)
    out = _run_backward(backend, dy, dstream, stream, weight, bias, mean, rstd, dropout_p, seed,
                        has_residual and not shared, dx_sum)
    return (out[0], out[0] if shared else out[1], *out[2:])


# ----------------------------------------------------------------------------- eager path


class AddLayerNormFunction(torch.autograd.Function):
    """Autograd of the eager path: the launchers called directly, no dispatcher in between."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, dropout_p, prenorm, backend):
        seed = draw_seed(x.device) if dropout_p > 0.0 else None
        # Without a residual or dropout the LayerNorm input is x itself: nothing to write.
        save_stream = prenorm or residual is not None or dropout_p > 0.0
        y, stream, mean, rstd = _run_forward(backend, x, residual, weight, bias, eps, dropout_p, seed, save_stream)
        ctx.save_for_backward(stream if save_stream else x, weight, bias, mean, rstd, seed)
        ctx.dropout_p, ctx.has_residual, ctx.prenorm, ctx.backend = dropout_p, residual is not None, prenorm, backend
        return (y, stream) if prenorm else y

    @staticmethod
    def backward(ctx, dy, dstream=None):
        stream, weight, bias, mean, rstd, seed = ctx.saved_tensors
        dx, dres, dw, db = _run_backward_both(ctx.backend, dy, dstream if ctx.prenorm else None, stream, weight, bias,
                                              mean, rstd, ctx.dropout_p, seed, ctx.has_residual)
        return dx, dres, dw, db, None, None, None, None


# ----------------------------------------------------------------------------- compiled path
# torch.compile cannot trace into a launcher; it sees these custom ops, their fake
# implementations and their autograd, which call the very launchers the eager path calls.
# Each op has a fixed set of outputs, all real: which outputs a call needs (the stream for
# prenorm or for the backward, the statistics for the backward) picks the op, so inference
# under torch.compile writes no statistics, and nothing returns a 0-element stand-in.

_FWD_SCHEMA = ("(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, float dropout_p, "
               "Tensor? seed, bool prenorm, str backend) -> ")


def _forward_op(name: str, stream: bool, stats: bool):
    """The custom op `fuseformer::<name>`: y, then the stream if `stream`, then mean and rstd
    if `stats`. `prenorm` only tells the autograd whether a stream gradient flows back."""
    outputs = 1 + stream + 2 * stats
    schema = _FWD_SCHEMA + ("Tensor" if outputs == 1 else "(" + ", ".join(["Tensor"] * outputs) + ")")

    def pick(y, s, mean, rstd):
        got = (y,) + ((s,) if stream else ()) + ((mean, rstd) if stats else ())
        return got if outputs > 1 else y

    def impl(x, residual, weight, bias, eps, dropout_p, seed, prenorm, backend):
        return pick(*_run_forward(backend, x, residual, weight, bias, eps, dropout_p, seed, stream, stats))

    def fake(x, residual, weight, bias, eps, dropout_p, seed, prenorm, backend):
        M = as_rows(x).shape[0]
        return pick(x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(M, dtype=torch.float32),
                    x.new_empty(M, dtype=torch.float32))

    op = torch.library.custom_op(f"fuseformer::{name}", impl, mutates_args=(), schema=schema)
    op.register_fake(fake)
    return op


_add_ln_op = _forward_op("add_layer_norm", stream=False, stats=False)  # inference
_add_ln_prenorm_op = _forward_op("add_layer_norm_prenorm", stream=True, stats=False)  # inference, prenorm
_add_ln_train_op = _forward_op("add_layer_norm_train", stream=True, stats=True)  # residual, dropout or prenorm
_ln_train_op = _forward_op("layer_norm_train", stream=False, stats=True)  # the input is the stream


@torch.library.custom_op("fuseformer::add_layer_norm_backward", mutates_args=())
def _add_ln_bwd_op(
    dy: torch.Tensor,
    dstream: Optional[torch.Tensor],
    stream: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dropout_p: float,
    seed: Optional[torch.Tensor],
    has_residual: bool,
    backend: str,
) -> list[torch.Tensor]:
    """The gradients of the inputs that exist, in order: x, then residual, weight, bias when given."""
    grads = _run_backward(backend, dy, dstream, stream, weight, bias, mean, rstd, dropout_p, seed, has_residual)
    return [g for g in grads if g is not None]


@_add_ln_bwd_op.register_fake
def _(dy, dstream, stream, weight, bias, mean, rstd, dropout_p, seed, has_residual, backend):
    present = [stream] * (1 + has_residual) + [t for t in (weight, bias) if t is not None]
    return [t.new_empty(t.shape) for t in present]


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, dropout_p, seed, prenorm, backend = inputs
    stream = output[1] if len(output) == 4 else x
    ctx.save_for_backward(stream, weight, bias, output[-2], output[-1], seed)
    ctx.dropout_p, ctx.has_residual, ctx.prenorm, ctx.backend = dropout_p, residual is not None, prenorm, backend


def _backward(ctx, dy, *grads):
    # grads: (dstream, dmean, drstd) or (dmean, drstd); the statistics take no gradient.
    stream, weight, bias, mean, rstd, seed = ctx.saved_tensors
    dstream = grads[0] if ctx.prenorm else None
    # The op returns no aliased outputs: a shared gradient comes back once, handed out here.
    shared = _shared_grad(ctx.has_residual, ctx.dropout_p)
    has_dres = ctx.has_residual and not shared
    got = iter(_add_ln_bwd_op(dy, dstream, stream, weight, bias, mean, rstd, ctx.dropout_p, seed, has_dres,
                              ctx.backend))
    dx = next(got)
    dres, dw, db = (next(got) if present else None for present in (has_dres, weight is not None, bias is not None))
    return dx, dx if shared else dres, dw, db, None, None, None, None, None


for _op in (_add_ln_train_op, _ln_train_op):
    _op.register_autograd(_backward, setup_context=_setup_context)


def _compiled(x, residual, weight, bias, eps, dropout_p, prenorm, requires_grad, backend):
    seed = draw_seed(x.device) if dropout_p > 0.0 else None
    args = (x, residual, weight, bias, eps, dropout_p, seed, prenorm, backend)
    if not requires_grad:
        return _add_ln_prenorm_op(*args) if prenorm else _add_ln_op(*args)
    if prenorm or residual is not None or dropout_p > 0.0:
        y, stream, _, _ = _add_ln_train_op(*args)
        return (y, stream) if prenorm else y
    y, _, _ = _ln_train_op(*args)
    return y


# ----------------------------------------------------------------------------- public op


def _check(x, residual, weight, bias, eps, dropout_p):
    if not (same_floats(x, residual, weight, bias) and x.dim() >= 1):
        check_tensor("x", x, min_dim=1)
        for name, t in (("residual", residual), ("weight", weight), ("bias", bias)):
            if t is not None:
                check_tensor(name, t)
                check_same(name, t, "x", x)
    N = x.shape[-1]
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != (N,):
            raise ValueError(f"{name} must have shape ({N},) (the last dim of x), got {tuple(t.shape)}")
    if eps.__class__ is not float and (isinstance(eps, bool) or not isinstance(eps, (int, float))):
        raise ValueError(f"eps must be a float > 0, got {eps!r}")
    if not eps > 0:
        raise ValueError(f"eps must be a float > 0, got {eps!r}")
    return check_prob("dropout_p", dropout_p)


def add_layer_norm(x, residual, weight, bias, eps=1e-5, dropout_p=0.0, prenorm=False, *, backend=None):
    """y = layer_norm(residual + dropout(x)) over the last dim (docs/design.md).

    residual, weight and bias may each be None. With prenorm=True returns
    (y, residual + dropout(x)), the pre-LN block's new residual stream.
    """
    dropout_p = _check(x, residual, weight, bias, eps, dropout_p)
    requires_grad = torch.is_grad_enabled() and (
        x.requires_grad
        or (residual is not None and residual.requires_grad)
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    )
    name = backends.resolve(
        "add_layer_norm", x.device, backend, dtype=x.dtype, hidden=x.shape[-1], dropout_p=dropout_p,
        requires_grad=requires_grad,
    )
    if name == "torch":
        return reference.add_layer_norm(x, residual, weight, bias, eps, dropout_p, prenorm)
    eps = float(eps)
    if torch.compiler.is_compiling():
        return _compiled(x, residual, weight, bias, eps, dropout_p, prenorm, requires_grad, name)
    if requires_grad:
        return AddLayerNormFunction.apply(x, residual, weight, bias, eps, dropout_p, prenorm, name)
    # Inference: no autograd node, no statistics kept beyond the launch.
    seed = draw_seed(x.device) if dropout_p > 0.0 else None
    y, stream, _, _ = _run_forward(name, x, residual, weight, bias, eps, dropout_p, seed, prenorm, False)
    return (y, stream) if prenorm else y
