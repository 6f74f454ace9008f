"""The Hopper kernels (kernels/attention_hopper.py, attention_hopper_bwd.py) against the float64
reference.

On a CPU it runs through Triton's interpreter, where tensor descriptors work, forced with
attention.set_variant(kernel="hopper") (on a GPU the switch only takes effect on capability (9, 0)).
Every case asserts that the Hopper kernel really ran, so a routing slip to the portable kernel
cannot pass for it. The gradients come from the Hopper backward kernels
(attention_hopper_bwd.py), fed the forward's log-sum-exp.
The sm_90a compiles (wgmma, TMA, no spills) are checked in test_triton_compile.py.
"""
import pytest
import torch

from fuseformer import kernels as K
from fuseformer.kernels import _util
from fuseformer.kernels import attention as A
from fuseformer.kernels import attention_launchers as AL
from fuseformer.kernels import attention_hopper as HK
from fuseformer.kernels import attention_hopper_bwd as HKB
from test_attention import DEVICE, _bool_mask, _leaf, _make_mask, _qkv, _varlen_case, assert_varlen_parity, check_sdpa

pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and torch.cuda.get_device_capability() != (9, 0), reason="the Hopper kernel runs on sm_90 only"
)


# "device" and "host" in every test; "auto" (host ones, but for varlen) in
# test_auto_descriptors_are_made_on_the_host_but_for_varlen.
PLACES = ("device", "host")


@pytest.fixture(params=[(place, "pass") for place in PLACES] + [(place, "atomic") for place in PLACES],
                ids=lambda p: p[0] if p[1] == "pass" else f"{p[0]}-atomic_dq")
def launches(monkeypatch, request):
    """Force the Hopper kernels, their descriptors made on the host and on the device in
    turn, and the backward's dQ by its own pass and by the dK/dV pass's atomics
    (attention.VARIANTS); record each forward launch (its constexprs) and, in
    `backward_launches`, each backward one (and in `backward_passes`, its passes)."""
    place, dq_mode = request.param
    monkeypatch.setattr(_util, "_POISON", True)
    monkeypatch.setattr(AL, "AUTOTUNE", False)
    # Every forward through the launcher recorded below: no launch plan re-launching a repeated
    # call past it (plans exist on a GPU only; tests/test_launch.py checks them there).
    monkeypatch.setattr(AL._fwd_plans, "enabled", False)
    for setting, value in (("kernel", "hopper"), ("descriptors", place), ("dq", dq_mode)):
        monkeypatch.setitem(A.VARIANT, setting, value)
    seen = []
    launch, launch_bwd = HK.launch, HKB.launch

    def recording(grid, args, kwargs, key, autotune):
        seen.append(kwargs)
        return launch(grid, args, kwargs, key, autotune)

    def recording_bwd(which, *args):
        backward_passes.append(which)
        if which == "dkdv":  # the pass every Hopper backward runs (after its dQ pass): one entry a backward
            backward_launches.append(args[-3])
        return launch_bwd(which, *args)

    backward_launches.clear()
    backward_passes.clear()
    monkeypatch.setattr(HK, "launch", recording)
    monkeypatch.setattr(HKB, "launch", recording_bwd)
    return seen


backward_launches: list = []
backward_passes: list = []  # each backward pass launched, "dkdv" or "dq", in order


def _padding(kind, B, Lk):
    if kind == "holes":  # a key-padding row with masked keys inside its span
        m = _bool_mask((B, 1, 1, Lk), p_keep=0.6)
        m[0, ..., 0] = False
        return m
    return _make_mask(kind, B, 1, 1, Lk, torch.float16)


# (dtype, B, H, Lq, Lk, D, causal, mask). fp16 (bf16 upcast in the interpreter: one case);
# fp32 is routed to the portable kernel. Lengths 1, 17, 97, 257 and head dims 16..128 cross
# tile edges; 24/40/80 leave columns that TMA must zero-fill and clip on the store.
CASES = [
    (torch.float16, 3, 2, 1, 1, 16, False, None),
    (torch.float16, 3, 2, 17, 17, 40, True, None),
    (torch.float16, 2, 2, 97, 70, 80, False, None),
    (torch.float16, 1, 2, 257, 257, 128, True, None),
    (torch.float16, 2, 3, 70, 200, 24, True, None),  # Lk > Lq: causal top-left, longer keys
    (torch.float16, 2, 2, 128, 128, 64, False, "key_padding"),
    (torch.float16, 3, 2, 150, 150, 40, True, "short_padding"),  # the last batch: no key at all
    (torch.float16, 2, 2, 30, 200, 32, False, "left_padding"),  # span starts mid-tile
    (torch.float16, 2, 2, 97, 97, 40, True, "left_padding"),
    (torch.float16, 3, 2, 65, 70, 24, False, "float_key_padding"),
    (torch.float16, 3, 2, 97, 150, 32, True, "holes"),
    (torch.bfloat16, 2, 2, 70, 70, 40, True, None),
]


@pytest.mark.parametrize("dtype,B,H,Lq,Lk,D,causal,mask", CASES)
def test_parity(launches, dtype, B, H, Lq, Lk, D, causal, mask):
    q, k, v = _qkv(B, H, Lq, Lk, D)
    m = None if mask is None else _padding(mask, B, Lk)
    if m is not None and m.dtype != torch.bool:
        m = m.to(dtype)
    check_sdpa(q, k, v, m, causal=causal, dtype=dtype)
    assert len(launches) == 1 and len(backward_launches) == 1
    assert launches[0]["HOST_DESC"] == backward_launches[0]["HOST_DESC"] == (A.VARIANT["descriptors"] == "host")
    # Atomic dQ up to head dim 64 (BLOCK_D <= MAX_ATOMIC_BLOCK_D); above, dQ's own pass.
    atomic = A.VARIANT["dq"] == "atomic" and D <= HKB.MAX_ATOMIC_BLOCK_D
    assert backward_launches[0]["ATOMIC_DQ"] == atomic
    assert backward_passes == (["dkdv"] if atomic else ["dq", "dkdv"])  # the dQ pass makes delta first


@pytest.mark.parametrize("scale,mask", [(-0.4, None), (0.0, "key_padding"), (-0.2, "holes")])
def test_non_positive_scale(launches, scale, mask):
    """The Hopper forward also scales the row max after taking it: scale <= 0 arrives as a
    positive one on -q or 0 * q (attention._positive_scale)."""
    q, k, v = _qkv(2, 2, 40, 70, 32)
    check_sdpa(q, k, v, None if mask is None else _padding(mask, 2, 70), causal=True, scale=scale,
               dtype=torch.float16)
    assert len(launches) == 1 and len(backward_launches) == 1


@pytest.mark.parametrize("causal", [False, True])
def test_gqa(launches, causal):
    q, k, v = _qkv(2, 4, 50, 70, 64, Hk=2)
    check_sdpa(q, k, v, _padding("key_padding", 2, 70) if causal else None, causal=causal, gqa=True,
               dtype=torch.float16)
    assert len(launches) == 1 and len(backward_launches) == 1


def test_fused_qkv_views(launches):
    """q, k, v as strided views of one (B, L, 3, H, D) projection: row stride 3*H*D."""
    B, L, H, D = 2, 37, 3, 40
    qkv = torch.randn(B, L, 3, H, D, device=DEVICE)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    check_sdpa(q, k, v, causal=True, dtype=torch.float16, grad=False)
    assert len(launches) == 1


def test_varlen(launches):
    q, k, v, cu_q, cu_k, mq, mk = _varlen_case([70, 0, 5, 33], [70, 0, 9, 33], 4, 2, 64)
    ins = [_leaf(t, torch.float16) for t in (q, k, v)]
    out = K.varlen_attention(*ins, cu_q, cu_k, mq, mk, 0.0, True, backend="triton")
    assert len(launches) == 1 and launches[0]["VARLEN"]
    assert not launches[0]["HOST_DESC"]  # packed sequences need per-sequence bounds: device descriptors
    assert_varlen_parity(out, ins, (q, k, v), cu_q, cu_k, mq, mk, True, 0.0, None)
    assert len(backward_launches) == 1


@pytest.mark.parametrize("what", ["fp32", "dense", "dropout", "unaligned"])
def test_uncovered_cases_run_the_portable_kernel(launches, seeds, what):
    D = 20 if what == "unaligned" else 32  # 20 fp16 = 40 bytes per row: not a TMA stride
    q, k, v = _qkv(2, 2, 40, 40, D)
    dtype = torch.float32 if what == "fp32" else torch.float16
    mask = _bool_mask((2, 1, 40, 40)) if what == "dense" else None
    reason = A.hopper_reason(q.to(dtype), k.to(dtype), v.to(dtype), mask, 0.1 if what == "dropout" else 0.0)
    assert reason and {"fp32": "dtype", "dense": "dense", "dropout": "dropout", "unaligned": "aligned"}[what] in reason
    check_sdpa(q, k, v, mask, dtype=dtype, dropout_p=0.1 if what == "dropout" else 0.0, seeds=seeds)
    assert launches == [] and backward_launches == []


@pytest.fixture
def seeds(monkeypatch):
    drawn = []
    draw = A._draw_seed
    monkeypatch.setattr(A, "_draw_seed", lambda p, device: drawn.append(draw(p, device)) or drawn[-1])
    return drawn


def test_switch(launches, monkeypatch):
    monkeypatch.setitem(A.VARIANT, "kernel", "portable")
    q, k, v = _qkv(1, 1, 8, 8, 16)
    K.scaled_dot_product_attention(q.half(), k.half(), v.half(), backend="triton")
    assert launches == []  # the portable kernel
    assert A.set_variant(kernel="HOPPER ")["kernel"] == "portable" and A.VARIANT["kernel"] == "hopper"
    K.scaled_dot_product_attention(q.half(), k.half(), v.half(), backend="triton")
    assert len(launches) == 1
    with pytest.raises(ValueError, match="unknown kernel variant 'sm90'"):
        A.set_variant(kernel="sm90")
    assert A.VARIANT["kernel"] == "hopper"


def test_auto_takes_the_hopper_forward_only_where_it_was_measured_faster(launches, monkeypatch):
    """"auto" (the default): the Hopper forward from 4096 keys, from 1024 at head dim 128
    without causal and 2048 with it, from 1024 at head dim 64 (the H200's faster cases); the portable kernel elsewhere, and for the backward where its own rule says so
    (test_auto_takes_the_hopper_backward_only_where_it_was_measured_faster). The rule is
    checked as written, then the routing through it on small shapes."""
    assert A.VARIANTS["kernel"][0] == "auto"
    rule = AL._hopper_forward_measured_faster
    assert rule(64, 4096, False) and rule(64, 4096, True) and rule(128, 1024, False) and rule(128, 2048, True)
    assert rule(64, 2048, False) and rule(80, 4096, True) and rule(64, 1024, False) and rule(64, 1024, True)
    assert not rule(128, 1024, True) and not rule(128, 512, False) and not rule(80, 2048, False)
    assert not rule(64, 512, False) and not rule(64, 512, True)  # the BERT padding case: 0.75x there
    monkeypatch.setitem(A.VARIANT, "kernel", "auto")
    q, k, v = (t.half().requires_grad_(True) for t in _qkv(1, 1, 8, 8, 16))
    K.scaled_dot_product_attention(q, k, v, backend="triton")
    assert launches == []  # 8 keys: portable
    asked = []
    monkeypatch.setattr(AL, "_hopper_forward_measured_faster",
                        lambda head_dim, lk, is_causal: asked.append((head_dim, lk, is_causal)) or True)
    out = K.scaled_dot_product_attention(q, k, v, backend="triton")
    out.float().sum().backward()
    assert len(launches) == 1 and backward_launches == []  # the Hopper forward, the portable backward
    # The rule sees the shorter length: one query over 8 keys (a decoding step) is asked as 1.
    K.scaled_dot_product_attention(q[:, :, :1].detach(), k.detach(), v.detach(), backend="triton")
    assert asked == [(16, 8, False), (16, 1, False)]


def test_auto_takes_the_hopper_backward_only_where_it_was_measured_faster(launches, monkeypatch):
    """"auto": the Hopper backward at head dim 64 without causal from 2048 keys (1.347 against
    1.536 ms eagerly on the H200 at L2048), the portable one elsewhere (causal L2048: 1.057
    against 0.951; head dim 128 and longer causal spans unmeasured). The rule as written, then
    the routing through it, with parity, on a small shape."""
    rule = AL._hopper_backward_measured_faster
    assert rule(64, 2048, False) and rule(64, 16384, False)
    assert not rule(64, 2048, True) and not rule(64, 1024, False) and not rule(128, 4096, False)
    assert not rule(80, 4096, False)
    monkeypatch.setitem(A.VARIANT, "kernel", "auto")
    monkeypatch.setitem(A.VARIANT, "dq", "pass")
    q, k, v = _qkv(1, 2, 20, 24, 64)
    check_sdpa(q, k, v, dtype=torch.float16)
    assert launches == [] and backward_launches == []  # 24 keys: portable both ways
    monkeypatch.setattr(AL, "_hopper_backward_measured_faster", lambda head_dim, lk, is_causal: True)
    backward_passes.clear()
    check_sdpa(q, k, v, dtype=torch.float16)
    assert launches == [] and backward_passes == ["dq", "dkdv"]  # the portable forward, the Hopper backward
    assert [kw["HOST_DESC"] for kw in backward_launches] == [A.VARIANT["descriptors"] != "device"]


@pytest.mark.parametrize("varlen", [False, True])
def test_auto_descriptors_are_made_on_the_host_but_for_varlen(varlen, launches, monkeypatch):
    """descriptors="auto" (the default): the forward's and both backward passes' on the host
    (attention_hopper.DESCRIPTOR_PLACES says why); packed varlen sequences keep device
    descriptors. Parity on the way."""
    assert HK.DESCRIPTOR_PLACES[0] == "auto"
    monkeypatch.setitem(A.VARIANT, "descriptors", "auto")
    monkeypatch.setitem(A.VARIANT, "dq", "pass")
    backward_passes.clear()
    if varlen:
        q, k, v, cu_q, cu_k, mq, mk = _varlen_case([17, 40], [17, 40], 2, 2, 64)
        ins = [_leaf(t, torch.float16) for t in (q, k, v)]
        out = K.varlen_attention(*ins, cu_q, cu_k, mq, mk, 0.0, True, backend="triton")
        assert_varlen_parity(out, ins, (q, k, v), cu_q, cu_k, mq, mk, True, 0.0, None)
    else:
        q, k, v = _qkv(2, 2, 33, 40, 64)
        check_sdpa(q, k, v, causal=True, dtype=torch.float16)
    assert [kw["HOST_DESC"] for kw in launches] == [not varlen]
    assert [kw["HOST_DESC"] for kw in backward_launches] == [not varlen] and backward_passes == ["dq", "dkdv"]


def test_head_dim_above_128_runs_the_portable_backward(launches):
    """The Hopper forward takes head dim 160 (BLOCK_D 256); its backward does not (see
    attention_hopper_bwd.MAX_BLOCK_D): the portable one consumes the Hopper forward's lse."""
    q, k, v = _qkv(1, 1, 33, 33, 160)
    check_sdpa(q, k, v, causal=True, dtype=torch.float16)
    assert len(launches) == 1 and backward_launches == []


@pytest.mark.skipif(DEVICE == "cuda", reason="the interpreter's one-config autotuner; test_gpu_bf16_autotuned on a GPU")
def test_autotuned_path_fits_the_host_descriptor_boxes(launches, monkeypatch):
    """The autotuned launches of the forward and of both backward passes, first through
    Triton's Autotuner (its configs' pre_hook fits the host descriptors' boxes to each config)
    and then, the winner kept, straight to the kernel (the launcher fits the boxes itself). A
    box left at its placeholder would move 16 rows of every tile: the parity checks see it.
    The interpreter's autotuner has one config."""
    monkeypatch.setattr(AL, "AUTOTUNE", True)
    monkeypatch.setattr(AL, "interpreting", lambda: False)  # the launchers' autotune switch only
    monkeypatch.setattr(_util, "_tuned_configs", {})
    q, k, v = _qkv(2, 2, 150, 150, 64)
    for _ in range(2):
        check_sdpa(q, k, v, _padding("key_padding", 2, 150), causal=True, dtype=torch.float16)
    host = A.VARIANT["descriptors"] == "host"
    assert len(launches) == len(backward_launches) == 2
    assert all(kw["HOST_DESC"] == host for kw in launches + backward_launches)
    # forward, dK/dV and (not with atomic dQ) dQ: the second call took the kept configs
    assert len(_util._tuned_configs) == (2 if A.VARIANT["dq"] == "atomic" else 3)


@pytest.mark.skipif(DEVICE == "cuda", reason="checked on the CPU")
def test_zero_stride_views_take_device_descriptors(launches):
    """A host descriptor cannot describe a zero stride (keys expanded over the heads): such a
    call makes its descriptors in the kernel, with the same results."""
    q, k, v = (t.half() for t in _qkv(2, 3, 40, 40, 32, Hk=1))
    k_wide, v_wide = (t.expand(-1, 3, -1, -1) for t in (k, v))
    assert k_wide.stride(1) == 0
    out = K.scaled_dot_product_attention(q, k_wide, v_wide, is_causal=True, backend="triton")
    assert len(launches) == 1 and not launches[0]["HOST_DESC"]
    # The same keys copied out: host descriptors where the place is "host", the same bits.
    dense = K.scaled_dot_product_attention(q, k_wide.contiguous(), v_wide.contiguous(), is_causal=True,
                                           backend="triton")
    assert launches[1]["HOST_DESC"] == (A.VARIANT["descriptors"] == "host")
    assert torch.equal(out, dense)
    check_sdpa(q.float(), k_wide.float(), v_wide.float(), causal=True, dtype=torch.float16, grad=False)


@pytest.mark.gpu
@pytest.mark.parametrize("D,causal,mask", [(64, False, "key_padding"), (128, True, None), (64, True, "left_padding")])
def test_gpu_bf16_autotuned(launches, monkeypatch, D, causal, mask):
    """On an H100/H200: bf16 on the tensor cores, autotuned, at lengths that cross many tiles."""
    monkeypatch.setattr(AL, "AUTOTUNE", True)
    q, k, v = _qkv(2, 4, 1000, 1000, D)
    check_sdpa(q, k, v, _padding(mask, 2, 1000) if mask else None, causal=causal, dtype=torch.bfloat16)
    assert len(launches) == 1 and len(backward_launches) == 1


def test_bench_peer_runs_the_hopper_kernel_or_refuses(launches, monkeypatch):
    """`fuseformer bench`'s fuseformer-triton-hopper (and its -device and -atomic-dq variants): the
    Hopper kernels, forward and backward, inside the step the bench times (Impl.context wraps
    both: the backward reads the switches when autograd runs it, after the forward returned),
    every switch restored after; a refusal, not a portable-kernel timing, for a case it does
    not take."""
    from fuseformer.bench import core, ops
    from fuseformer.bench.core import Refused

    monkeypatch.setitem(A.VARIANT, "kernel", "portable")

    def call(inputs, backend):
        return K.scaled_dot_product_attention(inputs["q"], inputs["k"], inputs["v"], attn_mask=inputs["mask"],
                                              backend=backend)

    def step(impl, inputs):
        """What the bench times for a forward+backward case."""
        def fwd_bwd(inputs):
            out = impl.fn(inputs)
            return torch.autograd.grad(out, [inputs["q"], inputs["k"], inputs["v"]], torch.ones_like(out))
        return core._within(impl.context, fwd_bwd)(inputs)

    q, k, v = (t.half().requires_grad_() for t in _qkv(1, 2, 20, 20, 32))
    inputs = {"q": q, "k": k, "v": v, "mask": None}
    before = dict(A.VARIANT)
    # (implementation, the forward's and the backward's HOST_DESC, atomic dQ)
    for impl, host, host_bwd, atomic in ((ops._hopper_impl(call), True, True, False),
                                         (ops._hopper_impl(call, descriptors="device"), False, False, False),
                                         (ops._hopper_impl(call, dq="atomic"), True, True, True)):
        step(impl, inputs)
        assert launches[-1]["HOST_DESC"] == host and backward_launches[-1]["HOST_DESC"] == host_bwd, impl.name
        assert backward_launches[-1]["ATOMIC_DQ"] == atomic, impl.name
        assert A.VARIANT == before, impl.name  # restored after the step
    assert len(launches) == len(backward_launches) == 3
    assert [i.name for i in (ops._hopper_impl(call), ops._hopper_impl(call, descriptors="device"),
                             ops._hopper_impl(call, dq="atomic"))] == [
        "fuseformer-triton-hopper", "fuseformer-triton-hopper-device", "fuseformer-triton-hopper-atomic-dq"]
    # fuseformer-triton-portable: the portable kernels forward and backward, whatever the switch.
    monkeypatch.setitem(A.VARIANT, "kernel", "hopper")
    step(ops._portable_impl(call), inputs)
    assert len(launches) == len(backward_launches) == 3 and A.VARIANT["kernel"] == "hopper"
    monkeypatch.setitem(A.VARIANT, "kernel", "portable")
    with pytest.raises(Refused, match="does not take this case: dtype torch.float32"):
        step(ops._hopper_impl(call), {"q": q.float(), "k": k.float(), "v": v.float(), "mask": None})
    wide = [torch.randn(1, 2, 20, 80, dtype=torch.float16, requires_grad=True) for _ in range(3)]
    with pytest.raises(Refused, match="atomic dQ is for head dims up to 64 in the hopper kernels"):
        step(ops._hopper_impl(call, dq="atomic"), {"q": wide[0], "k": wide[1], "v": wide[2], "mask": None})
    assert len(launches) == 3


def test_atomic_dq_is_for_head_dims_up_to_64(monkeypatch):
    monkeypatch.setitem(A.VARIANT, "dq", "atomic")
    for kernels in ("portable", "hopper"):
        assert AL.atomic_dq(kernels, 16) and AL.atomic_dq(kernels, 64) and not AL.atomic_dq(kernels, 128)
    monkeypatch.setitem(A.VARIANT, "dq", "pass")
    assert not AL.atomic_dq("portable", 64) and not AL.atomic_dq("hopper", 64)
