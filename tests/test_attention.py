"""Triton flash attention against the float64 reference, by the parity rule (docs/design.md).

Runs the real kernels through Triton's interpreter on the CPU (conftest.py) and on the GPU
where there is one. Shapes are small and odd on purpose: the interpreter's cost grows with
programs x loop iterations, and odd lengths exercise every masked edge.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fuseformer.kernels import _util
from fuseformer import kernels as K
from fuseformer.kernels import attention as A
from fuseformer.kernels import attention_launchers as AL
from fuseformer.kernels import reference as R
from fuseformer.kernels.backends import BackendUnsupportedError
from fuseformer.kernels.parity import assert_parity

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    # Every output the launchers allocate starts as NaN: an element no kernel writes fails.
    monkeypatch.setattr(_util, "_POISON", True)  # what FUSEFORMER_POISON=1 sets at import
    # On a GPU, one config per case: autotuning every case would spend the suite compiling.
    # test_gpu_autotuned covers the tuned path.
    monkeypatch.setattr(AL, "AUTOTUNE", False)


@pytest.fixture
def seeds(monkeypatch):
    """Records the dropout seed each call draws, so the test can rebuild the keep-mask."""
    drawn = []
    draw = A._draw_seed

    def recording(p, device):
        seed = draw(p, device)
        drawn.append(seed)
        return seed

    monkeypatch.setattr(A, "_draw_seed", recording)
    return drawn


def _leaf(t, dtype):
    return t.detach().to(dtype).requires_grad_(True)


def _grads(out, inputs, dout):
    return torch.autograd.grad(out, inputs, dout, allow_unused=True)


def check_sdpa(q, k, v, mask=None, *, causal=False, dropout_p=0.0, scale=None, gqa=False, dtype=torch.float32,
               seeds=None, grad=True):
    """Run the triton backend and assert parity of the output and dq, dk, dv."""
    qd, kd, vd = (_leaf(t, dtype) for t in (q, k, v))
    out = K.scaled_dot_product_attention(qd, kd, vd, mask, dropout_p, causal, scale, gqa, backend="triton")
    keep = None
    if dropout_p > 0:
        B = math.prod(q.shape[:-3])
        keep = A.dropout_keep_mask(seeds[-1], B, q.shape[-3], q.shape[-2], k.shape[-2], dropout_p)
        keep = keep.reshape(*q.shape[:-1], k.shape[-2])
    assert not torch.isnan(out).any(), "an output element was never written"

    def ref(dt):
        m = mask if mask is None or mask.dtype == torch.bool else mask.to(dt)
        ins = [_leaf(t, dt) for t in (q, k, v)]
        return R.scaled_dot_product_attention(*ins, m, dropout_p, causal, scale, gqa, dropout_mask=keep), ins

    out64, ins64 = ref(torch.float64)
    outd, insd = ref(dtype)
    assert_parity(out, out64, outd, dtype, what="out")
    if not grad:
        return out
    dout = torch.randn_like(out64)
    g = _grads(out, (qd, kd, vd), dout.to(dtype))
    g64 = _grads(out64, ins64, dout)
    gd = _grads(outd, insd, dout.to(dtype))
    for name, a, b, c in zip(("dq", "dk", "dv"), g, g64, gd):
        assert_parity(a, b, c, dtype, what=name)
    return out


def _qkv(B, Hq, Lq, Lk, D, Hk=None):
    Hk = Hq if Hk is None else Hk
    return (torch.randn(B, Hq, Lq, D, device=DEVICE), torch.randn(B, Hk, Lk, D, device=DEVICE),
            torch.randn(B, Hk, Lk, D, device=DEVICE))


def _bool_mask(shape, p_keep=0.7, dead_rows=False):
    m = torch.rand(shape, device=DEVICE) < p_keep
    if dead_rows:
        m[..., 1, :] = False  # every key of query row 1 masked
    return m


# (dtype, B, H, Lq, Lk, D, causal, mask): seq 1, 17, 97, 128, 257; head dim 16, 40, 64, 80, 128.
CASES = [
    (torch.float32, 3, 2, 1, 1, 16, False, None),
    (torch.float16, 3, 2, 17, 17, 40, True, None),
    (torch.float32, 3, 2, 97, 97, 80, False, "bool"),
    (torch.float16, 2, 2, 128, 128, 64, False, "key_padding"),
    (torch.float32, 1, 1, 257, 257, 128, True, None),
    (torch.float16, 2, 2, 97, 17, 64, False, "float"),
    (torch.float32, 2, 2, 17, 97, 16, True, "bool"),
    (torch.float32, 3, 2, 33, 33, 40, False, "dead_rows"),
    (torch.float16, 2, 3, 40, 40, 80, True, "float_dead_rows"),
    (torch.float32, 3, 2, 65, 70, 24, False, "float_key_padding"),
    (torch.float16, 1, 2, 1, 257, 128, False, "key_padding"),
    (torch.float32, 3, 2, 70, 257, 16, False, "short_padding"),
    (torch.float16, 3, 1, 150, 150, 40, True, "short_padding"),
    (torch.float32, 2, 2, 30, 200, 32, False, "left_padding"),
    # GPT-2's prefill of a left-padded batch (models/layers.py: key-padding row + is_causal):
    # rows before a batch's first key attend nothing, later query blocks start past a diagonal.
    (torch.float16, 3, 2, 70, 70, 32, True, "left_padding"),
]


def _make_mask(kind, B, H, Lq, Lk, dtype):
    if kind is None:
        return None
    if kind == "bool":
        return _bool_mask((B, 1, Lq, Lk))  # heads broadcast: read through a stride-0 dim
    if kind == "dead_rows":
        return _bool_mask((B, H, Lq, Lk), dead_rows=True)
    if kind in ("key_padding", "short_padding", "left_padding"):
        lengths = torch.randint(1, Lk + 1, (B,), device=DEVICE)
        if kind == "short_padding":
            # Most key blocks hold only padding and are skipped; the last batch has no keys.
            lengths = torch.randint(1, min(Lk, 20) + 1, (B,), device=DEVICE)
            lengths[-1] = 0
        if B > 1:
            lengths[0] = Lk  # one batch with no padding at all
        pos = torch.arange(Lk, device=DEVICE)
        if kind == "left_padding":
            return (pos >= Lk - lengths[:, None]).view(B, 1, 1, Lk)
        return (pos < lengths[:, None]).view(B, 1, 1, Lk)
    if kind == "float_key_padding":
        m = torch.randn(B, 1, 1, Lk, device=DEVICE)
        m[:, :, :, -3:] = float("-inf")
        return m.to(dtype)
    m = torch.randn(Lq, Lk, device=DEVICE)  # (Lq, Lk): broadcast over batch and heads
    if kind == "float_dead_rows":
        m[2, :] = float("-inf")
    return m.to(dtype)


@pytest.mark.parametrize("dtype,B,H,Lq,Lk,D,causal,mask", CASES)
def test_parity(dtype, B, H, Lq, Lk, D, causal, mask):
    q, k, v = _qkv(B, H, Lq, Lk, D)
    check_sdpa(q, k, v, _make_mask(mask, B, H, Lq, Lk, dtype), causal=causal, dtype=dtype)


def test_fully_masked_rows_are_zero_with_zero_grad():
    q, k, v = _qkv(2, 2, 20, 30, 16)
    mask = _bool_mask((2, 2, 20, 30), dead_rows=True)
    q.requires_grad_(True)
    out = K.scaled_dot_product_attention(q, k, v, mask, backend="triton")
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    out.sum().backward()
    assert torch.equal(q.grad[:, :, 1], torch.zeros_like(q.grad[:, :, 1]))


@pytest.mark.parametrize("causal", [False, True])
def test_gqa(causal):
    q, k, v = _qkv(2, 4, 50, 50, 64, Hk=2)
    mask = None if causal else _bool_mask((2, 4, 50, 50), dead_rows=True)  # per query head
    check_sdpa(q, k, v, mask, causal=causal, gqa=True, dtype=torch.float16 if causal else torch.float32)


def test_bf16_through_interpreter_upcast():
    # bf16 tl.dot is wrong under the interpreter, so the kernels upcast there; on a GPU this
    # runs the bf16 tensor-core path instead.
    q, k, v = _qkv(2, 2, 70, 70, 40)
    check_sdpa(q, k, v, causal=True, dtype=torch.bfloat16)


def test_lse_is_natural_logsumexp():
    """The saved log-sum-exp is log sum_j exp(s_ij) (+inf on fully masked rows): the value
    every backend's backward may rely on."""
    q, k, v = _qkv(1, 2, 20, 30, 16)
    mask = _bool_mask((1, 2, 20, 30), dead_rows=True)
    _, lse = A.attention_fwd(q, k, v, mask, False, 0.25, 0.0, None, "triton")
    scores = (q.double() @ k.double().transpose(-1, -2) * 0.25).masked_fill(~mask, float("-inf"))
    expected = torch.logsumexp(scores, -1)
    live = ~torch.isneginf(expected)
    torch.testing.assert_close(lse.double()[live], expected[live], rtol=1e-5, atol=1e-5)
    assert torch.isposinf(lse[~live]).all() and (~live).any()


def test_scale_and_shapes_2d_3d_5d():
    q, k, v = (torch.randn(3, 19, 16, device=DEVICE) for _ in range(3))
    check_sdpa(q, k, v, scale=0.3)  # 3-D: (H, L, E)
    check_sdpa(q[0], k[0], v[0], causal=True)  # 2-D: (L, E)
    q5, k5, v5 = (torch.randn(2, 2, 2, 17, 16, device=DEVICE) for _ in range(3))
    mask = _bool_mask((2, 1, 1, 1, 17))  # key padding broadcast over two leading dims
    check_sdpa(q5, k5, v5, mask)


@pytest.mark.parametrize("scale", [-0.4, 0.0])
@pytest.mark.parametrize("causal,mask", [(False, None), (True, "key_padding"), (False, "float"), (True, "bool")])
def test_non_positive_scales(scale, causal, mask):
    """The kernels scale the softmax's row max after taking it, which needs scale > 0: a negative
    scale runs as -q with |scale|, scale 0 as 0 * q with 1 (attention._positive_scale). Values
    and all three gradients match the reference, masks and causal included."""
    q, k, v = _qkv(2, 2, 33, 40, 16)
    check_sdpa(q, k, v, _make_mask(mask, 2, 2, 33, 40, torch.float32), causal=causal, scale=scale)


def test_kernels_refuse_a_non_positive_scale():
    q, k, v = _qkv(1, 1, 4, 4, 16)
    with pytest.raises(ValueError, match="the attention kernels take scale > 0, got -0.5"):
        AL._forward(q, k, v, None, False, -0.5, 0.0, None)


def test_strided_head_dim():
    """A last dim with stride != 1 (q built transposed) is copied once, not misread."""
    q, k, v = (torch.randn(2, 2, 16, 23, device=DEVICE).transpose(-1, -2) for _ in range(3))
    assert q.stride(-1) != 1
    check_sdpa(q, k, v, causal=True)


def test_fused_qkv_views():
    """q, k, v as permuted, non-contiguous views of one fused projection output."""
    B, L, H, D = 2, 37, 3, 40
    x = torch.randn(B, L, 64, device=DEVICE)
    w = torch.randn(3 * H * D, 64, device=DEVICE) / 8
    for dtype in (torch.float32, torch.float16):
        qkv64 = (x.double() @ w.double().T).view(B, L, 3, H, D).requires_grad_(True)
        qkvd = qkv64.detach().to(dtype).requires_grad_(True)

        def run(t, backend):
            q, k, v = t.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, D), strides of (B, L, 3, H, D)
            return K.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend)

        q = qkvd.permute(2, 0, 3, 1, 4)[0]
        assert not q.is_contiguous()
        qkv = qkvd.detach().clone().requires_grad_(True)
        out, out64, outd = run(qkv, "triton"), run(qkv64, "torch"), run(qkvd, "torch")
        assert_parity(out, out64, outd, dtype, what="out")
        dout = torch.randn_like(out64)
        (g,), (g64,) = _grads(out, (qkv,), dout.to(dtype)), _grads(out64, (qkv64,), dout)
        (gd,) = _grads(outd, (qkvd,), dout.to(dtype))
        assert_parity(g, g64, gd, dtype, what="dqkv")


# ----------------------------------------------------------------------------- dropout


def test_dropout_keep_fraction_and_determinism():
    seed = torch.tensor([1234], device=DEVICE)
    keep = A.dropout_keep_mask(seed, 2, 2, 128, 96, 0.3)
    assert abs(keep.float().mean().item() - 0.7) < 0.02
    assert torch.equal(keep, A.dropout_keep_mask(seed, 2, 2, 128, 96, 0.3))
    assert not torch.equal(keep, A.dropout_keep_mask(seed + 1, 2, 2, 128, 96, 0.3))
    # Rows and heads draw independent bits, not one repeated pattern.
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0, 0], keep[0, 0, 1])


def test_dropout_bits_serve_four_keys_each_and_do_not_depend_on_the_tile():
    """Four consecutive keys share one Philox call, one word each (kernels/philox.py): each
    key position within a group of four keeps at 1 - p, neighbours agree only as often as
    independent draws, and the mask is the same whatever tile shape draws it (the kernels'
    configs differ from the helper's 64 x 64); a key count that is not a multiple of 4 too."""
    seed = torch.tensor([99], device=DEVICE)
    B, H, Lq, Lk, p = 1, 2, 64, 130, 0.5
    keep = A.dropout_keep_mask(seed, B, H, Lq, Lk, p)
    quads = keep[..., :128].reshape(B, H, Lq, 32, 4).float()
    for lane in range(4):
        assert abs(quads[..., lane].mean().item() - (1 - p)) < 0.04
    assert abs((quads[..., 0] == quads[..., 1]).float().mean().item() - 0.5) < 0.04
    for bm, bn in ((32, 16), (64, 128), (64, 32)):
        out = torch.empty(B * H, Lq, Lk, dtype=torch.uint8, device=DEVICE)
        AL.dropout_keep_kernel[(B * H, -(-Lq // bm), -(-Lk // bn))](out, seed, Lq, Lk, p, BLOCK_M=bm, BLOCK_N=bn)
        assert torch.equal(out.view(B, H, Lq, Lk).bool(), keep), (bm, bn)


def test_dropout_bits_follow_the_documented_formula():
    """attention.py's docstring: element (b, h, i, j) is kept iff word j % 4 of
    Philox4x32(seed, counter ((b*H + h)*Lq + i) * cdiv(Lk, 4) + j // 4), as tl.rand maps a
    word, is >= p. Written out here per element, apart from kernels/philox.py's tiles."""
    import triton
    import triton.language as tl

    @triton.jit
    def formula(OUT, SEED, LQ, LK, BLOCK: tl.constexpr):
        bh, i = tl.program_id(0), tl.program_id(1)
        j = tl.arange(0, BLOCK)
        counter = (bh.to(tl.int64) * LQ + i) * ((LK + 3) // 4) + j // 4
        lo = counter.to(tl.uint32)
        w0, w1, w2, w3 = tl.philox(tl.load(SEED), lo, (counter >> 32).to(tl.uint32), lo * 0, lo * 0)
        lane = j % 4
        word = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
        tl.store(OUT + (bh * LQ + i) * LK + j, tl.random.uint_to_uniform_float(word), mask=j < LK)

    seed, (B, H, Lq, Lk), p = torch.tensor([2024], device=DEVICE), (1, 2, 8, 70), 0.4
    u = torch.empty(B * H, Lq, Lk, device=DEVICE)
    formula[(B * H, Lq)](u, seed, Lq, Lk, BLOCK=128)
    assert torch.equal(A.dropout_keep_mask(seed, B, H, Lq, Lk, p), (u >= p).view(B, H, Lq, Lk))


def test_dropout_same_seed_same_output(seeds, monkeypatch):
    q, k, v = _qkv(1, 2, 40, 40, 16)
    out1 = K.scaled_dot_product_attention(q, k, v, dropout_p=0.5, backend="triton")
    fixed = seeds[-1]
    monkeypatch.setattr(A, "_draw_seed", lambda p, device: fixed)
    out2 = K.scaled_dot_product_attention(q, k, v, dropout_p=0.5, backend="triton")
    monkeypatch.setattr(A, "_draw_seed", lambda p, device: fixed + 7)
    out3 = K.scaled_dot_product_attention(q, k, v, dropout_p=0.5, backend="triton")
    assert torch.equal(out1, out2)
    assert not torch.allclose(out1, out3)


@pytest.mark.parametrize("causal,gqa,mask", [(False, False, None), (True, True, "key_padding")])
def test_dropout_parity(seeds, causal, gqa, mask):
    q, k, v = _qkv(2, 4, 45, 70, 32, Hk=2 if gqa else 4)
    check_sdpa(q, k, v, _make_mask(mask, 2, 4, 45, 70, torch.float32), causal=causal, dropout_p=0.25,
               gqa=gqa, seeds=seeds)


# ----------------------------------------------------------------------------- atomic dQ


@pytest.fixture
def atomic_dq(monkeypatch):
    """attention.VARIANT["dq"] "atomic": record each backward pass of the portable kernels as
    (kernel, ATOMIC_DQ)."""
    monkeypatch.setitem(A.VARIANT, "dq", "atomic")
    passes = []
    run = AL._run

    def recording(kind, tuned, plain, *args, **kwargs):
        if kind == "bwd":
            passes.append(("dkdv" if plain is AL.attn_bwd_dkdv else "dq", kwargs.get("ATOMIC_DQ")))
        return run(kind, tuned, plain, *args, **kwargs)

    monkeypatch.setattr(AL, "_run", recording)
    return passes


def _atomic_passes(head_dim):
    # Up to head dim 64 the dK/dV pass sums dQ and no dQ pass runs; wider, both passes (the dQ
    # pass first: it makes delta).
    return [("dkdv", True)] if head_dim <= 64 else [("dq", None), ("dkdv", False)]


@pytest.mark.parametrize("dtype,B,H,Lq,Lk,D,causal,mask", CASES)
def test_atomic_dq_parity(atomic_dq, dtype, B, H, Lq, Lk, D, causal, mask):
    test_parity(dtype, B, H, Lq, Lk, D, causal, mask)
    assert atomic_dq == _atomic_passes(D)


@pytest.mark.parametrize("causal,gqa,mask", [(False, False, None), (True, True, "key_padding")])
def test_atomic_dq_dropout_parity(atomic_dq, seeds, causal, gqa, mask):
    test_dropout_parity(seeds, causal, gqa, mask)
    assert atomic_dq == _atomic_passes(32)


def test_atomic_dq_gqa_and_varlen_parity(atomic_dq, seeds):
    test_gqa(True)
    test_varlen_parity(seeds, [70, 0, 5], [70, 0, 9], 4, 2, 40, True, 0.0, torch.float16)
    assert atomic_dq == _atomic_passes(40) * 2


# ----------------------------------------------------------------------------- one-kernel backward


@pytest.fixture
def fused_dq(monkeypatch):
    """attention.VARIANT["dq"] "fused": record each backward launch of the portable kernels, as
    ("one_pass", key block, ONE_PASS) for the one-kernel backward and (pass, ONE_PASS) else,
    the preprocess among them."""
    monkeypatch.setitem(A.VARIANT, "dq", "fused")
    passes = []
    run, plain_launch = AL._run, AL.launch

    def recording(kind, tuned, plain, *args, **kwargs):
        if kind != "fwd":
            name = ("one_pass", kind) if isinstance(kind, int) else "dkdv" if plain is AL.attn_bwd_dkdv else "dq"
            passes.append((name, kwargs.get("ONE_PASS")))
        return run(kind, tuned, plain, *args, **kwargs)

    def launching(fn, *args, **kwargs):
        if fn is AL.attn_bwd_preprocess:
            passes.append(("preprocess", None))
        return plain_launch(fn, *args, **kwargs)

    monkeypatch.setattr(AL, "_run", recording)
    monkeypatch.setattr(AL, "launch", launching)
    return passes


def _fused_passes(lk, head_dim):
    """One launch (the dK/dV kernel over all keys, 64 or 128 of them) where the keys fit one
    block and the head is at most 64 wide; elsewhere the two of "pass" (the dQ pass, which
    makes delta, then the dK/dV pass)."""
    if 1 <= lk <= 128 and head_dim <= 64:
        return [(("one_pass", 64 if lk <= 64 else 128), True)]
    return [("dq", None), ("dkdv", False)]


@pytest.mark.parametrize("dtype,B,H,Lq,Lk,D,causal,mask", CASES)
def test_fused_dq_parity(fused_dq, dtype, B, H, Lq, Lk, D, causal, mask):
    """Every case of test_parity (masks with dead rows and fully padded batches, causal, more
    or fewer queries than keys) with the one-kernel backward where it applies."""
    test_parity(dtype, B, H, Lq, Lk, D, causal, mask)
    assert fused_dq == _fused_passes(Lk, D)


@pytest.mark.parametrize("causal,gqa,mask", [(False, False, None), (True, True, "key_padding")])
def test_fused_dq_dropout_parity(fused_dq, seeds, causal, gqa, mask):
    test_dropout_parity(seeds, causal, gqa, mask)
    assert fused_dq == _fused_passes(70, 32)


def test_fused_dq_gqa_and_varlen_parity(fused_dq, seeds):
    """GQA (each kv program writes dQ for every query head of its group) and packed sequences,
    an empty one among them (its queries' dQ is written as zeros by the program of no keys)."""
    test_gqa(True)
    test_varlen_parity(seeds, [70, 0, 5], [70, 0, 9], 4, 2, 40, True, 0.0, torch.float16)
    test_varlen_parity(seeds, [9, 4], [0, 120], 2, 1, 16, False, 0.0, torch.float32)
    assert fused_dq == _fused_passes(50, 64) + _fused_passes(70, 40) + _fused_passes(120, 16)


def test_bench_peer_runs_the_one_kernel_backward_or_refuses(fused_dq, monkeypatch):
    """`fuseformer bench`'s fuseformer-triton-fused-dq: the one-kernel backward inside the step
    the bench times (its context holds the switch until autograd has run the backward), the
    switch restored after; a refusal, not a two-pass timing under its name, for keys past
    its block or a head past 64."""
    from fuseformer.bench import core, ops
    from fuseformer.bench.core import Refused

    monkeypatch.setitem(A.VARIANT, "dq", "pass")

    def call(inputs, backend):
        return K.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"], attn_mask=inputs["mask"],
                                              backend=backend)

    def step(impl, q, k, v):
        def fwd_bwd(inputs):
            out = impl.fn(inputs)
            return torch.autograd.grad(out, [inputs["q"], inputs["k"], inputs["v"]], torch.ones_like(out))
        return core._within(impl.context, fwd_bwd)({"q": q, "k": k, "v": v, "mask": None})

    impl = ops._fused_dq_impl(call)
    assert impl.name == "fuseformer-triton-fused-dq"
    step(impl, *(t.requires_grad_() for t in _qkv(1, 2, 30, 100, 32)))
    assert fused_dq == _fused_passes(100, 32) and A.VARIANT["dq"] == "pass"
    for lk, d, what in ((200, 32, "this case has 200 keys, head dim 32"), (20, 80, "this case has 20 keys, head dim 128")):
        with pytest.raises(Refused, match=what):
            step(ops._fused_dq_impl(call), *(t.requires_grad_() for t in _qkv(1, 2, 20, lk, d)))
    assert A.VARIANT["dq"] == "pass"


def _packed_qkv(H, L, D, live, seed):
    """q, k, v as views of one (B, L, 3, H, D) buffer (a fused block's qkv GEMM output), a
    key-padding mask keeping live[b] keys of batch b (B = len(live)), expanded to (B, H, L, L),
    and an output gradient."""
    B = len(live)
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, L, 3, H, D, generator=g).to(DEVICE)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    mask = (torch.arange(L)[None, :] < torch.tensor(live)[:, None]).to(DEVICE).view(B, 1, 1, L)
    dout = torch.randn(B, H, L, D, generator=g).to(DEVICE)
    return q, k, v, mask.expand(B, H, L, L), dout


def _nan_grad_views(dout):
    """A (B, L, 3, H, D) gradient buffer of NaN and its dq, dk, dv views, (B, H, L, D) each."""
    B, H, L, D = dout.shape
    dqkv = torch.full((B, L, 3, H, D), float("nan"), device=DEVICE)
    return dqkv, tuple(t.transpose(1, 2) for t in dqkv.unbind(2))


@pytest.mark.parametrize("causal", [False, True])
def test_fused_dq_equals_the_dq_pass(fused_dq, causal):
    """Same maths as the two passes, so the same gradients to float32 rounding (the one-pass
    dQ is one tile product, the pass's the same product), written into views of one qkv
    gradient buffer as the fused block hands them (a strided dQ, NaN until written), a batch
    with no key at all included."""
    L, D = 100, 32
    q, k, v, mask4, dout = _packed_qkv(2, L, D, live=(L, 61, 0), seed=5)  # the last batch: no key at all
    out, lse = AL._forward(q, k, v, mask4, causal, 0.25, 0.0, None)
    dqkv, views = _nan_grad_views(dout)
    got = AL._backward(dout, q, k, v, out, lse, mask4, causal, 0.25, 0.0, None, grads=views)
    assert fused_dq == _fused_passes(L, D) and not dqkv.isnan().any()
    with A.variant(dq="pass"):
        ref = AL._backward(dout, q, k, v, out, lse, mask4, causal, 0.25, 0.0, None)
    for name, a, b in zip(("dq", "dk", "dv"), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------- varlen


def _varlen_case(lens_q, lens_k, Hq, Hk, D):
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), device=DEVICE, dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), device=DEVICE, dtype=torch.int32)
    q = torch.randn(sum(lens_q), Hq, D, device=DEVICE)
    k = torch.randn(sum(lens_k), Hk, D, device=DEVICE)
    v = torch.randn(sum(lens_k), Hk, D, device=DEVICE)
    return q, k, v, cu_q, cu_k, max(lens_q), max(lens_k)


@pytest.mark.parametrize(
    "lens_q,lens_k,Hq,Hk,D,causal,dropout_p,dtype",
    [
        ([17, 0, 33, 1], [17, 0, 33, 1], 2, 2, 40, False, 0.0, torch.float32),
        ([70, 5], [70, 5], 4, 2, 64, True, 0.0, torch.float16),
        ([20, 9], [31, 4], 2, 1, 16, False, 0.2, torch.float32),
    ],
)
def test_varlen_parity(seeds, lens_q, lens_k, Hq, Hk, D, causal, dropout_p, dtype):
    q, k, v, cu_q, cu_k, mq, mk = _varlen_case(lens_q, lens_k, Hq, Hk, D)
    ins = [_leaf(t, dtype) for t in (q, k, v)]
    out = K.varlen_attention(*ins, cu_q, cu_k, mq, mk, dropout_p, causal, backend="triton")
    keep = None
    if dropout_p > 0:
        keep = A.varlen_dropout_keep_masks(seeds[-1], cu_q, cu_k, Hq, mq, mk, dropout_p)
    assert_varlen_parity(out, ins, (q, k, v), cu_q, cu_k, mq, mk, causal, dropout_p, keep)


def assert_varlen_parity(out, ins, qkv, cu_q, cu_k, mq, mk, causal, dropout_p, keep):
    """out = varlen_attention(*ins, ...) against the reference in float64 and in ins' dtype,
    given the same keep-masks; then dq, dk, dv. qkv: the float32 tensors ins were made from."""
    dtype = out.dtype
    assert not torch.isnan(out).any(), "an output element was never written"

    def ref(dt):
        r_ins = [_leaf(t, dt) for t in qkv]
        return R.varlen_attention(*r_ins, cu_q, cu_k, mq, mk, dropout_p, causal, dropout_mask=keep), r_ins

    (out64, ins64), (outd, insd) = ref(torch.float64), ref(dtype)
    assert_parity(out, out64, outd, dtype, what="out")
    dout = torch.randn_like(out64)
    for name, a, b, c in zip(("dq", "dk", "dv"), _grads(out, ins, dout.to(dtype)), _grads(out64, ins64, dout),
                             _grads(outd, insd, dout.to(dtype))):
        assert_parity(a, b, c, dtype, what=name)


def test_varlen_negative_scale(seeds):
    q, k, v, cu_q, cu_k, mq, mk = _varlen_case([9, 20], [9, 20], 2, 1, 16)
    ins = [_leaf(t, torch.float32) for t in (q, k, v)]
    out = K.varlen_attention(*ins, cu_q, cu_k, mq, mk, 0.0, True, -0.3, backend="triton")
    ref_ins = [_leaf(t, torch.float64) for t in (q, k, v)]
    ref = R.varlen_attention(*ref_ins, cu_q, cu_k, mq, mk, 0.0, True, -0.3)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)
    dout = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, ins, dout.float()), torch.autograd.grad(ref, ref_ins, dout)):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


def test_varlen_bad_input():
    q, k, v, cu_q, cu_k, mq, mk = _varlen_case([5, 6], [5, 6], 2, 2, 16)
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        K.varlen_attention(q, k, v, cu_q.float(), cu_k, mq, mk, backend="triton")
    short = cu_k.clone()
    short[-1] -= 1
    with pytest.raises(ValueError, match="cu_seqlens_k must end"):
        K.varlen_attention(q, k, v, cu_q, short, mq, mk, backend="triton")
    with pytest.raises(ValueError, match="never decrease"):
        K.varlen_attention(q, k, v, torch.tensor([0, 8, 6, 11], dtype=torch.int32, device=DEVICE),
                           torch.tensor([0, 5, 5, 11], dtype=torch.int32, device=DEVICE), 6, 6, backend="triton")
    with pytest.raises(ValueError, match="max_seqlen"):
        K.varlen_attention(q, k, v, cu_q, cu_k, 3, mk, backend="triton")
    with pytest.raises(ValueError, match="q heads"):
        K.varlen_attention(q[:, :1].repeat(1, 3, 1), k, v, cu_q, cu_k, mq, mk, backend="triton")
    with pytest.raises(ValueError, match="q must have 3"):
        K.varlen_attention(q[None], k, v, cu_q, cu_k, mq, mk, backend="triton")


def test_varlen_offsets_read_back_once_per_tensor_state(monkeypatch):
    """A packed model passes one cu_seqlens to every layer: its host read-back (a sync on a
    GPU) happens once, and again only after the tensor is modified in place."""
    q, k, v, cu_q, cu_k, mq, mk = _varlen_case([5, 6], [5, 6], 2, 2, 16)
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t) or tolist(t))
    for _ in range(3):
        K.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, backend="triton")
    assert sum(t is cu_q for t in reads) == 1 and sum(t is cu_k for t in reads) == 1
    cu_k[-1] -= 1  # in place: the next call must check it again, and refuse it
    with pytest.raises(ValueError, match="cu_seqlens_k must end"):
        K.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, backend="triton")


def test_varlen_under_inference_mode():
    # Inference tensors have no version counter (reading it raised); their offsets are
    # checked once per tensor instead, and the result is the same as outside the mode.
    q, k, v, cu_q, cu_k, mq, mk = _varlen_case([5, 6, 1], [5, 6, 1], 2, 2, 16)
    expected = K.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, backend="triton")
    with torch.inference_mode():
        cu_qi, cu_ki = cu_q.clone(), cu_k.clone()
        for _ in range(2):
            out = K.varlen_attention(q, k, v, cu_qi, cu_ki, mq, mk, backend="triton")
        bad = cu_ki.clone()
        bad[-1] -= 1
        with pytest.raises(ValueError, match="cu_seqlens_k must end"):
            K.varlen_attention(q, k, v, cu_qi, bad, mq, mk, backend="triton")
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- API edges


def _bad_calls():
    q, k, v = _qkv(2, 4, 8, 9, 16)
    sdpa = K.scaled_dot_product_attention
    return [
        ("rank", lambda: sdpa(q[0, 0, 0], k, v), ValueError, "query must have at least 2"),
        ("key rank", lambda: sdpa(q, k[0], v), ValueError, "key must have as many dimensions"),
        ("batch", lambda: sdpa(q, torch.cat([k, k[:1]]), torch.cat([v, v[:1]])), ValueError,
         r"key batch dims \(3,\) do not broadcast"),
        ("kv batch", lambda: sdpa(q, k, v[:1]), ValueError, "value batch dims"),
        ("heads", lambda: sdpa(q, k[:, :2], v[:, :2]), ValueError, "enable_gqa"),
        ("gqa ratio", lambda: sdpa(q, k[:, :3], v[:, :3], enable_gqa=True), ValueError, "multiple"),
        ("kv heads", lambda: sdpa(q, k, v[:, :2]), ValueError, "key has 4 heads but value has 2"),
        ("head dim", lambda: sdpa(q, k[..., :8], v), ValueError, "key head dim"),
        ("kv length", lambda: sdpa(q, k, v[:, :, :5]), ValueError, "value length"),
        ("dtype", lambda: sdpa(q, k.half(), v), TypeError, "key has dtype"),
        ("integer", lambda: sdpa(q.long(), k, v), TypeError, "query must have a floating dtype"),
        ("not tensor", lambda: sdpa(q, k.tolist(), v), TypeError, "key must be a torch.Tensor"),
        # Masks on q's device: a CPU mask next to CUDA q is refused for its device first.
        ("mask shape", lambda: sdpa(q, k, v, torch.ones(8, 8, dtype=torch.bool, device=DEVICE)), ValueError,
         "attn_mask of shape"),
        ("mask dtype", lambda: sdpa(q, k, v, torch.ones(8, 9, dtype=torch.int64, device=DEVICE)), TypeError,
         "attn_mask must be bool"),
        ("mask float dtype", lambda: sdpa(q, k, v, torch.ones(8, 9, dtype=torch.float64, device=DEVICE)), TypeError,
         "attn_mask"),
        ("mask device", lambda: sdpa(q, k, v, torch.ones(8, 9, dtype=torch.bool, device="meta")), ValueError,
         "attn_mask is on meta"),
        ("dropout", lambda: sdpa(q, k, v, dropout_p=1.5), ValueError, "dropout_p"),
        ("dropout bool", lambda: sdpa(q, k, v, dropout_p=True), ValueError, "dropout_p"),
        ("causal", lambda: sdpa(q, k, v, is_causal="yes"), TypeError, "is_causal must be a bool"),
        ("device", lambda: sdpa(q, k.to("meta"), v), ValueError, "key is on meta"),
        ("scale", lambda: sdpa(q, k, v, scale="0.5"), TypeError, "scale must be a float"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input(case):
    _, call, exc, msg = _bad_calls()[case]
    with pytest.raises(exc, match=msg):
        call()


def test_unsupported_head_dim_named_backend_raises():
    q = torch.randn(1, 1, 4, 512, device=DEVICE)
    with pytest.raises(BackendUnsupportedError, match="head dim 512 > 256"):
        K.scaled_dot_product_attention(q, q, q, backend="triton")
    with pytest.raises(BackendUnsupportedError, match="float64"):
        K.scaled_dot_product_attention(q[..., :16].double(), q[..., :16].double(), q[..., :16].double(),
                                       backend="triton")
    # torch runs it; `auto` on the CPU is torch too.
    assert K.scaled_dot_product_attention(q, q, q, backend="torch").shape == q.shape


def test_cases_only_torch_handles():
    q, k, v = _qkv(1, 2, 6, 7, 16)
    v32 = torch.randn(1, 2, 7, 32, device=DEVICE)
    with pytest.raises(BackendUnsupportedError, match="value head dim 32"):
        K.scaled_dot_product_attention(q, k, v32, backend="triton")
    with K.use_backend("auto"):  # on a GPU this warns once and falls back; on the CPU auto is torch
        out = K.scaled_dot_product_attention(q, k, v32)
    torch.testing.assert_close(out, R.scaled_dot_product_attention(q, k, v32))
    bias = torch.randn(6, 7, device=DEVICE, requires_grad=True)
    with pytest.raises(BackendUnsupportedError, match="attn_mask that requires grad"):
        K.scaled_dot_product_attention(q, k, v, bias, backend="triton")


def test_key_value_batch_broadcasts_as_in_torch():
    # torch's SDPA broadcasts k/v batch dims (here batch 1) against q's; so do we, forward
    # and backward (the gradient of a broadcast k sums over the batch).
    q = torch.randn(3, 2, 9, 16, device=DEVICE)
    k, v = torch.randn(1, 2, 7, 16, device=DEVICE), torch.randn(1, 2, 7, 16, device=DEVICE)
    mask = _bool_mask((3, 1, 1, 7))
    check_sdpa(q, k, v, mask, causal=False)
    qd, kd, vd = (t.double().requires_grad_(True) for t in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask)
    out = K.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask, backend="torch")
    torch.testing.assert_close(out, ref)


def test_dropout_one_drops_everything():
    q, k, v = (t.requires_grad_(True) for t in _qkv(2, 2, 5, 6, 16))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    for backend in ("triton", "torch"):
        out = K.scaled_dot_product_attention(q, k, v, dropout_p=1.0, backend=backend)
        assert torch.equal(out, torch.zeros_like(out)) and torch.equal(out, expected)
        dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(torch.equal(g, torch.zeros_like(g)) for g in (dq, dk, dv))


def test_head_dim_zero_matches_torch():
    q, k = torch.randn(2, 3, 5, 0, device=DEVICE), torch.randn(2, 3, 6, 0, device=DEVICE)
    v = torch.randn(2, 3, 6, 4, device=DEVICE)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)  # the mean of the values
    for backend in ("triton", "torch"):
        torch.testing.assert_close(K.scaled_dot_product_attention(q, k, v, backend=backend), expected)
    empty = torch.randn(2, 3, 5, 0, device=DEVICE)
    assert K.scaled_dot_product_attention(empty, empty, empty, backend="triton").shape == (2, 3, 5, 0)


@pytest.mark.parametrize("shape_q,shape_k", [((0, 2, 5, 16), (0, 2, 5, 16)), ((2, 2, 0, 16), (2, 2, 5, 16)),
                                             ((2, 2, 5, 16), (2, 2, 0, 16))])
def test_empty(shape_q, shape_k):
    q = torch.randn(shape_q, device=DEVICE, requires_grad=True)
    k = torch.randn(shape_k, device=DEVICE, requires_grad=True)
    v = torch.randn(shape_k, device=DEVICE, requires_grad=True)
    out = K.scaled_dot_product_attention(q, k, v, backend="triton")
    assert out.shape == shape_q
    assert torch.equal(out, torch.zeros_like(out))  # no keys at all: zeros, as torch gives
    out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape


def test_torch_compile_fullgraph():
    q, k, v = (t.requires_grad_(True) for t in _qkv(2, 2, 33, 33, 16))
    mask = _bool_mask((2, 1, 1, 33))

    def f(q, k, v, mask):
        return K.scaled_dot_product_attention(q, k, v, mask, is_causal=True, backend="triton")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, mask)
    dout = torch.randn_like(out)
    g = _grads(out, (q, k, v), dout)
    out_eager = f(q, k, v, mask)
    g_eager = _grads(out_eager, (q, k, v), dout)
    torch.testing.assert_close(out, out_eager, rtol=0, atol=0)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_torch_compile_fullgraph_dropout_and_varlen():
    """Dropout inside a compiled graph: the output and dq, dk, dv match the reference given
    the kernel's own keep-mask, and that mask keeps 1 - p of the scores."""
    p, H = 0.3, 2
    q, k, v, cu_q, cu_k, mq, mk = _varlen_case([9, 24], [9, 24], H, 1, 16)

    def f(q, k, v):
        return K.varlen_attention(q, k, v, cu_q, cu_k, mq, mk, dropout_p=p, is_causal=True, backend="triton")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    ins = [_leaf(t, torch.float32) for t in (q, k, v)]
    torch.manual_seed(21)
    out = compiled(*ins)
    # The graph drew its seed from torch's generator: the same draw, made again, gives the
    # seed, and the seed the mask.
    torch.manual_seed(21)
    keep = A.varlen_dropout_keep_masks(A._draw_seed(p, q.device), cu_q, cu_k, H, mq, mk, p)
    kept = torch.cat([m.flatten() for m in keep]).float().mean().item()
    assert abs(kept - (1 - p)) < 0.05, f"keep fraction {kept:.3f} for p = {p}"  # 1314 draws: 4 sigma
    assert_varlen_parity(out, ins, (q, k, v), cu_q, cu_k, mq, mk, True, p, keep)


# ----------------------------------------------------------------------------- fuzz


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    B=st.integers(1, 2),
    Hk=st.integers(1, 2),
    group=st.integers(1, 2),
    Lq=st.integers(1, 80),
    Lk=st.integers(1, 80),
    D=st.sampled_from([16, 24, 40, 64]),
    causal=st.booleans(),
    mask=st.sampled_from([None, "bool", "key_padding", "short_padding", "float"]),
    half=st.booleans(),
)
def test_fuzz(B, Hk, group, Lq, Lk, D, causal, mask, half):
    torch.manual_seed(Lq * 131 + Lk)
    dtype = torch.float16 if half else torch.float32
    q, k, v = _qkv(B, Hk * group, Lq, Lk, D, Hk=Hk)
    check_sdpa(q, k, v, _make_mask(mask, B, Hk * group, Lq, Lk, dtype), causal=causal, gqa=group > 1, dtype=dtype)


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("L,D,causal,mask", [(1024, 64, False, "key_padding"), (777, 128, True, None),
                                             (513, 96, False, "float"), (300, 256, True, "bool")])
def test_gpu_large(dtype, L, D, causal, mask):
    q, k, v = _qkv(2, 4, L, L, D)
    check_sdpa(q, k, v, _make_mask(mask, 2, 4, L, L, dtype), causal=causal, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("D,dtype", [(64, torch.bfloat16), (256, torch.float32)])
def test_gpu_autotuned(monkeypatch, D, dtype):
    monkeypatch.setattr(AL, "AUTOTUNE", True)
    q, k, v = _qkv(2, 4, 1000, 1000, D)
    check_sdpa(q, k, v, _make_mask("key_padding", 2, 4, 1000, 1000, dtype), causal=True, dtype=dtype)


@pytest.mark.gpu
def test_gpu_autotuned_atomic_dq(atomic_dq, monkeypatch):
    """Atomic dQ through the autotuner: its timed runs of each config add into the same
    accumulator, which it must zero before each and once more before the real launch
    (reset_to_zero); a missed zeroing multiplies dQ."""
    monkeypatch.setattr(AL, "AUTOTUNE", True)
    monkeypatch.setattr(_util, "_tuned_configs", {})
    q, k, v = _qkv(2, 4, 1000, 1000, 64)
    for _ in range(2):  # the tuning call, then the kept config
        check_sdpa(q, k, v, _make_mask("key_padding", 2, 4, 1000, 1000, torch.bfloat16), dtype=torch.bfloat16)
    assert atomic_dq == _atomic_passes(64) * 2


@pytest.mark.gpu
@pytest.mark.parametrize("L", [64, 128])
def test_gpu_autotuned_fused_dq(fused_dq, seeds, monkeypatch, L):
    """The one-kernel backward through its own tuners (every config of each holds L keys), at
    BERT's training shape: bf16, key padding with a fully padded batch, dropout, GQA; parity
    against float64 (same keep-masks) and the launches it makes, the tuning call and the kept
    config alike."""
    monkeypatch.setattr(AL, "AUTOTUNE", True)
    monkeypatch.setattr(_util, "_tuned_configs", {})
    q, k, v = _qkv(3, 4, L, L, 64, Hk=2)
    mask = torch.ones(3, 1, 1, L, dtype=torch.bool, device=DEVICE)
    mask[1, ..., L // 3:] = False
    mask[2] = False
    for _ in range(2):
        check_sdpa(q, k, v, mask, dropout_p=0.1, gqa=True, dtype=torch.bfloat16, seeds=seeds)
    assert fused_dq == _fused_passes(L, 64) * 2


@pytest.mark.gpu
def test_gpu_bf16_dropout_varlen(seeds):
    q, k, v = _qkv(2, 4, 300, 300, 64)
    check_sdpa(q, k, v, causal=True, dropout_p=0.1, dtype=torch.bfloat16, seeds=seeds)
    q, k, v, cu_q, cu_k, mq, mk = _varlen_case([100, 257, 3], [100, 257, 3], 4, 2, 80)
    for dropout_p in (0.0, 0.1):
        ins = [_leaf(t, torch.bfloat16) for t in (q, k, v)]
        out = K.varlen_attention(*ins, cu_q, cu_k, mq, mk, dropout_p, True, backend="triton")
        keep = A.varlen_dropout_keep_masks(seeds[-1], cu_q, cu_k, 4, mq, mk, dropout_p) if dropout_p else None
        assert_varlen_parity(out, ins, (q, k, v), cu_q, cu_k, mq, mk, True, dropout_p, keep)


# ----------------------------------------------------------------------------- GPU launch limits


class _GridRecorder:
    """Stands in for a Triton kernel: records the grid each launch asks for, runs nothing."""

    def __init__(self, name, grids):
        self.name, self.grids = name, grids

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            meta = {"BLOCK_M": 64, "BLOCK_N": 64, **kwargs}
            self.grids.append((self.name, tuple(grid(meta) if callable(grid) else grid)))

        return launch


@pytest.mark.parametrize("varlen", [False, True])
def test_grids_fit_cuda_limits_for_huge_batch_times_heads(monkeypatch, varlen):
    # CUDA caps grid dims 1 and 2 at 65535 (dim 0 at 2**31 - 1); the interpreter has no such
    # limit, so a grid of (blocks, B*H) passed every CPU test and failed to launch on a GPU
    # for B*H > 65535 (e.g. 5462 packed sequences x 12 heads). Meta tensors: nothing runs.
    grids = []
    for name in ("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq", "attn_bwd_preprocess", "dropout_keep_kernel"):
        monkeypatch.setattr(AL, name, _GridRecorder(name, grids))
    nseq, H, L, D = 6000, 12, 97, 64
    meta = dict(device="meta", dtype=torch.float16)
    # Every backward form: the dQ pass (default), and the atomic dQ, whose delta a preprocess makes.
    for dq in ("pass", "atomic"):
        with A.variant(dq=dq):
            if varlen:
                q = torch.empty(nseq * L, H, D, **meta)
                cu = torch.empty(nseq + 1, device="meta", dtype=torch.int32)
                seed = torch.empty(1, device="meta", dtype=torch.int64)
                out, lse = AL._varlen_forward(q, q, q, cu, cu, L, L, True, 0.125, 0.1, seed)
                AL._varlen_backward(out, q, q, q, out, lse, cu, cu, L, L, True, 0.125, 0.1, seed)
            else:
                q = torch.empty(nseq, H, L, D, **meta)
                out, lse = AL._forward(q, q, q, None, False, 0.125, 0.0, None)
                AL._backward(out, q, q, q, out, lse, None, False, 0.125, 0.0, None)
    A.dropout_keep_mask(torch.empty(1, device="meta", dtype=torch.int64), nseq, H, 2, 2, 0.1)
    assert {name for name, _ in grids} == {"attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq", "attn_bwd_preprocess",
                                           "dropout_keep_kernel"}
    for name, grid in grids:
        assert 1 <= len(grid) <= 3, (name, grid)
        assert grid[0] < 2**31, (name, grid)
        assert all(g <= 65535 for g in grid[1:]), f"{name}: grid {grid} exceeds CUDA's 65535 on axis 1/2"
        # Every (block, batch*head) pair still gets a program.
        assert math.prod(grid) >= nseq * H, (name, grid)


@pytest.mark.parametrize("causal", [False, True])
def test_backward_writes_into_the_gradient_views_it_is_given(causal):
    """`grads` (Impl.backward_extras; models/fused_block.py hands views of one (B, T, 3, H, D)
    buffer, the layout of its qkv GEMM): the launcher writes every element of each view (the
    buffer starts as NaN), exactly what it returns without `grads`, and returns the views."""
    q, k, v, mask4, dout = _packed_qkv(2, 19, 16, live=(19, 13), seed=3)
    out, lse = AL._forward(q, k, v, mask4, causal, 0.25, 0.0, None)
    ref = AL._backward(dout, q, k, v, out, lse, mask4, causal, 0.25, 0.0, None)
    dqkv, views = _nan_grad_views(dout)
    got = AL._backward(dout, q, k, v, out, lse, mask4, causal, 0.25, 0.0, None, grads=views)
    assert all(a is b for a, b in zip(got, views)) and not dqkv.isnan().any()
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    # Columns the kernels cannot address (a last stride other than 1), or another shape: refused.
    for bad in (views[0].transpose(2, 3).contiguous().transpose(2, 3), views[0][:, :, 1:]):
        with pytest.raises(ValueError, match="grads: dq must have q's shape"):
            AL._backward(dout, q, k, v, out, lse, mask4, causal, 0.25, 0.0, None, grads=(bad, *views[1:]))
