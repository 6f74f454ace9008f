"""The `ops` suite: declarations only (runner.py runs them).

GPU shapes follow the performance targets in docs/design.md (16k tokens per batch, BERT and GPT
widths); CPU shapes are small and odd, because there the only fused code that runs is the
Triton interpreter, whose cost grows with programs x loop iterations: the CPU suite is a
parity suite, not a speed one.
"""
from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

from fuseformer import kernels as K
from fuseformer.kernels import reference

from .core import OURS, Impl, OpCase, Refused

CPU_NOTE = "CPU: fused kernels run in Triton's interpreter here; timing them would measure the interpreter"


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _randn(shape, device, dtype, gen, scale=1.0, grad=False):
    t = torch.randn(shape, device=device, dtype=torch.float32, generator=gen).mul_(scale).to(dtype)
    return t.requires_grad_(grad)


def _fused_backends(device_type: str) -> tuple[str, ...]:
    # On the CPU only the interpreter can run a fused kernel; the cuda backend cannot.
    return ("triton", "cuda") if device_type == "cuda" else ("triton",)


def _ours(device_type: str, call) -> list[Impl]:
    return [
        Impl(
            f"fuseformer-{b}",
            (lambda inputs, b=b: call(inputs, b)),
            kind=OURS,
            available=(lambda b=b: K.unavailable_reason(b)),
            timed_on_cpu=False,
        )
        for b in _fused_backends(device_type)
    ]


def _compiled(fn):
    return torch.compile(fn, dynamic=False)


# --- attention --------------------------------------------------------------------------


def _sdpa_backends() -> dict[str, object]:
    from torch.nn.attention import SDPBackend

    names = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
    return {short: getattr(SDPBackend, attr) for short, attr in names.items() if hasattr(SDPBackend, attr)}


def _sdpa_impls(call) -> list[Impl]:
    from torch.nn.attention import sdpa_kernel

    impls = []
    for short, backend in _sdpa_backends().items():

        def fn(inputs, backend=backend):
            # One backend only: a refusal raises instead of silently running another kernel.
            with sdpa_kernel([backend]):
                return call(inputs)

        impls.append(Impl(f"sdpa-{short}", fn))
    return impls


def _hopper_unavailable() -> str | None:
    reason = K.unavailable_reason("triton")
    if reason:
        return reason
    if not torch.cuda.is_available():
        return "no CUDA device: the Hopper kernel runs on capability (9, 0) GPUs"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) != (9, 0):
        return f"the Hopper kernel runs on capability (9, 0) GPUs; this one is ({major}, {minor})"
    return None


def _hopper_impl(call, varlen: bool = False, descriptors: str = "auto", dq: str = "pass") -> Impl:
    """Our Triton backend with the Hopper kernels (kernels/attention_hopper*.py) for every call
    they take, forward and backward, instead of the portable ones or the `auto` mix, so one run
    times them side by side. A case the
    Hopper kernel does not take (it would run the portable kernel) is refused, never timed
    under this name. descriptors: where the TMA descriptors are made
    (attention_hopper.DESCRIPTOR_PLACES): "auto", the default (host descriptors), is
    fuseformer-triton-hopper; "device" is timed as fuseformer-triton-hopper-device (the
    default until the H200 runs of 2026-11-27; the host ones were timed as -hopper-host until
    they became the default for the backward too). dq: how the backward
    makes dQ (attention.VARIANTS);
    "atomic" is fuseformer-triton-hopper-atomic-dq, for cases with a backward. The variant is
    held over the whole timed step (Impl.context): the backward reads it when autograd runs
    it, after the forward's call has returned."""
    from fuseformer.kernels import attention_launchers as A

    checked = []  # the verdict depends on dtype, mask kind and alignment: the same for every copy

    def fn(inputs):
        if not checked:
            if varlen:  # packed (T, H, D) tensors, seen as the kernels see them: (1, H, T, D)
                reason = A.hopper_reason(*(A._as4d(inputs[n]) for n in ("q", "k", "v")))
            else:
                reason = A.hopper_reason(inputs["q"], inputs["k"], inputs["v"], inputs["mask"])
            if reason:
                raise Refused(f"the Hopper kernel does not take this case: {reason}")
            if dq == "atomic":
                _refuse_wide_atomic_dq(inputs["q"], "hopper")
            checked.append(True)
        return call(inputs, "triton")

    context = lambda: A.variant(kernel="hopper", descriptors=descriptors, dq=dq)  # noqa: E731
    if dq == "atomic":
        return Impl("fuseformer-triton-hopper-atomic-dq", fn, kind=OURS, available=_hopper_unavailable,
                    timed_on_cpu=False, context=context,
                    note="the Hopper kernels, dQ summed by the dK/dV pass in fp32 atomics")
    if descriptors == "device":
        return Impl("fuseformer-triton-hopper-device", fn, kind=OURS, available=_hopper_unavailable,
                    timed_on_cpu=False, context=context,
                    note=f"the Hopper kernels, every TMA descriptor made on the {descriptors}")
    return Impl("fuseformer-triton-hopper", fn, kind=OURS, available=_hopper_unavailable, timed_on_cpu=False,
                context=context, note="TMA + wgmma kernels (attention_hopper*.py) for every call they take")


def _refuse_wide_atomic_dq(q, kernels: str) -> None:
    """Atomic dQ is for head dims up to a limit (attention_launchers._ATOMIC_MAX_BLOCK_D); wider ones
    would run the dQ pass: refused rather than timed under the atomic name."""
    from fuseformer.kernels import attention_launchers as A

    limit = A._ATOMIC_MAX_BLOCK_D[kernels]
    if A._flags(q)["BLOCK_D"] > limit:
        raise Refused(f"atomic dQ is for head dims up to {limit} in the {kernels} kernels; "
                      "wider ones make dQ by its pass")


def _atomic_dq_impl(call) -> Impl:
    """fuseformer-triton with atomic dQ (attention.VARIANTS): the default kernel choice, whose
    backward is the portable one, its dK/dV pass summing dQ."""
    def fn(inputs):
        _refuse_wide_atomic_dq(inputs["q"], "portable")
        return call(inputs, "triton")

    return Impl("fuseformer-triton-atomic-dq", fn, kind=OURS, available=lambda: K.unavailable_reason("triton"),
                timed_on_cpu=False, context=lambda: K.attention.variant(dq="atomic"),
                note="dQ summed by the portable dK/dV pass in fp32 atomics, no dQ pass")


def _fused_dq_impl(call) -> Impl:
    """fuseformer-triton with the one-kernel backward (attention.VARIANTS dq "fused"): for the
    cases whose keys fit one block of it and whose heads it takes; refused elsewhere, where it
    would time the two-pass backward under its name."""
    from fuseformer.kernels import attention_launchers as A

    checked = []  # the same verdict for every copy of the inputs

    def fn(inputs):
        if not checked:
            lk, block_d = inputs["k"].shape[-2], A._flags(inputs["q"])["BLOCK_D"]
            with A.variant(dq="fused"):
                if not A.one_pass_keys(lk, block_d):
                    raise Refused(f"the one-kernel backward takes up to {A.ONE_PASS_BLOCKS[-1]} keys and head dims "
                                  f"up to {A._ATOMIC_MAX_BLOCK_D['portable']}; this case has {lk} keys, head dim "
                                  f"{block_d}")
            checked.append(True)
        return call(inputs, "triton")

    return Impl("fuseformer-triton-fused-dq", fn, kind=OURS, available=lambda: K.unavailable_reason("triton"),
                timed_on_cpu=False, context=lambda: K.attention.variant(dq="fused"),
                note="the portable backward as one kernel: dK, dV, dQ and delta with every key in one block")


def _portable_impl(call) -> Impl:
    """Our Triton backend with the portable attention kernels only (the default before the
    H100 run; "auto" now takes the Hopper forward for long sequences)."""
    return Impl("fuseformer-triton-portable", lambda inputs: call(inputs, "triton"), kind=OURS,
                available=lambda: K.unavailable_reason("triton"), timed_on_cpu=False,
                context=lambda: K.attention.variant(kernel="portable"), note="attention_kernels.py on every call")


def _cuda_cutlass_impl(call) -> Impl:
    """The cuda backend with csrc/'s CUTLASS Linear+GELU forward for every GELU
    (FUSEFORMER_CUDA_LINEAR_GELU=cutlass) beside `fuseformer-cuda` (the default `auto`: CUTLASS
    for erf, cuBLASLt's epilogue for tanh), so one GPU run times both against `cublaslt-gelu`
    and the Triton kernel. Its availability check builds the separate CUTLASS module (a minute or two at the first
    use on a machine: sm_90a's CUTLASS 3 instantiations). Cases the CUTLASS kernels do not take (fp32,
    K or N not a multiple of 8) would run cuBLASLt: refused instead of timed under this name."""
    from fuseformer.kernels import cuda_backend

    checked = []  # dtype, sizes and alignment are the same for every rotated copy of the inputs

    def fn(inputs):
        if not checked:
            x = inputs["x"]
            reason = cuda_backend.cutlass_linear_gelu_reason(x.reshape(-1, x.shape[-1]), inputs["weight"], inputs["bias"])
            if reason:
                raise Refused(f"the CUTLASS Linear+GELU does not take this case: {reason}")
            checked.append(True)
        return call(inputs, "cuda")

    return Impl("fuseformer-cuda-cutlass", fn, kind=OURS,
                available=(lambda: K.unavailable_reason("cuda") or cuda_backend.gemm_unavailable_reason()),
                timed_on_cpu=False, context=(lambda: cuda_backend.variant(linear_gelu="cutlass")),
                note="csrc/linear_gelu_cutlass.cu: CUTLASS GEMM, bias + GELU (+ pre-activation) in its epilogue")


def _cuda_cublaslt_impl(call) -> Impl:
    """The cuda backend's Linear+GELU on cuBLASLt alone (FUSEFORMER_CUDA_LINEAR_GELU=cublaslt:
    the epilogue for tanh, GEMM + bias and gelu.cu for erf), the default until the H200 run of
    2026-11-27 measured the CUTLASS kernel faster for erf: kept timing beside `auto`."""
    return _cuda_variant_impl(call, "fuseformer-cuda-cublaslt", "cuBLASLt: GELU epilogue (tanh), GEMM + gelu.cu (erf)",
                              linear_gelu="cublaslt")


def _cuda_variant_impl(call, name: str, note: str, **switch) -> Impl:
    """The cuda backend under one of its kernel switches (cuda_backend.variant(**switch)),
    timed beside fuseformer-cuda, which runs the defaults."""
    from fuseformer.kernels import cuda_backend

    return Impl(name, lambda inputs: call(inputs, "cuda"), kind=OURS, available=(lambda: K.unavailable_reason("cuda")),
                timed_on_cpu=False, context=(lambda: cuda_backend.variant(**switch)), note=note)


def _cuda_cute_impl(call, head_dim: int) -> Impl:
    """The cuda backend with csrc/'s CuTe attention kernels (FUSEFORMER_CUDA_ATTENTION=cute:
    attention_cute.cu forward, attention_cute_backward.cu backward) beside `fuseformer-cuda`
    (the default, sm90: the sm_90a forward where it fits, these CuTe kernels elsewhere), so one
    GPU run times both. Head dims the CuTe kernels lack would run the WMMA ones: refused
    instead of timed under this name."""
    from fuseformer.kernels import cuda_backend

    def fn(inputs):
        if head_dim not in cuda_backend.CUTE_HEAD_DIMS:
            raise Refused(f"the CuTe attention kernel takes head dims {cuda_backend.CUTE_HEAD_DIMS}, not {head_dim}")
        return call(inputs, "cuda")

    return Impl("fuseformer-cuda-cute", fn, kind=OURS, available=(lambda: K.unavailable_reason("cuda")),
                timed_on_cpu=False, context=(lambda: cuda_backend.variant(attention="cute")),
                note="csrc/attention_cute{,_backward}.cu: FA2 structure on CuTe")


def _cuda_wmma_impl(call) -> Impl:
    """The cuda backend with csrc/'s first attention kernels (FUSEFORMER_CUDA_ATTENTION=wmma:
    WMMA fragments, scores through shared memory), the default until the H100 run of
    2026-11-26 measured them 2.5-17x slower than cute and sm90: kept in the benchmark as the
    record of that gap."""
    return _cuda_variant_impl(call, "fuseformer-cuda-wmma", "csrc/attention_forward.cu, attention_backward.cu: WMMA",
                              attention="wmma")


def _cuda_sm90_backward_impl(call) -> Impl:
    """The cuda backend with csrc/'s Hopper backward (FUSEFORMER_CUDA_ATTENTION_BACKWARD=sm90:
    CUTLASS's FMHA backward collective, wgmma, TMA, dQ by TMA reduce-add) behind the default
    sm90 forward, beside `fuseformer-cuda` (the same forward, the CuTe backward): opt-in until
    this comparison says which backward is faster. Calls its kernels do not fit (masks, GQA,
    other GPUs) run the CuTe backward under this name too."""
    return _cuda_variant_impl(call, "fuseformer-cuda-sm90-bwd",
                              "csrc/attention_sm90_backward.cuh: CUTLASS Hopper FMHA backward (wgmma, TMA)",
                              attention="sm90", attention_backward="sm90")


def _fa4_unavailable() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    try:
        import flash_attn.cute  # noqa: F401
    except Exception as err:  # noqa: BLE001 - any import failure is a reason, reported as such
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return f"flash-attn-4 is not importable (pip install --pre flash-attn-4): {first}"
    return None


def _fa4_call(fn, *args, **kwargs):
    """Call flash-attn-4; what it declines (asserts, NotImplementedError, a signature this
    release does not have) becomes a one-line refusal."""
    try:
        out = fn(*args, **kwargs)
    except (AssertionError, NotImplementedError, ValueError, TypeError) as err:
        raise Refused("flash-attn-4: " + ((str(err).strip().splitlines() or [type(err).__name__])[0])) from err
    return out[0] if isinstance(out, tuple) else out  # (out, lse) in some releases


def _fa4_varlen_impl(Lmax: int) -> Impl:
    def fn(inputs):
        from flash_attn.cute import flash_attn_varlen_func

        return _fa4_call(flash_attn_varlen_func, inputs["q"], inputs["k"], inputs["v"], cu_seqlens_q=inputs["cu"],
                         cu_seqlens_k=inputs["cu"], max_seqlen_q=Lmax, max_seqlen_k=Lmax)

    return Impl("flash-attn-4", fn, available=_fa4_unavailable, note="flash_attn.cute.flash_attn_varlen_func")


def _fa4_impl(causal: bool, gqa: bool) -> Impl:
    """FlashAttention-4 (CuTe DSL; Hopper and Blackwell) as a peer, when it is installed. Its
    flash_attn_func takes (B, L, H, D) and no attention mask; what it declines (its asserts and
    NotImplementedErrors on dtype, head dim, architecture) is reported as a refusal with its
    first line, as SDPA backends' reasons are."""

    def fn(inputs):
        if inputs["mask"] is not None:
            raise Refused("flash-attn-4's flash_attn_func takes no attention mask (key padding needs its varlen API)")
        from flash_attn.cute import flash_attn_func

        q, k, v = (inputs[n].transpose(1, 2) for n in ("q", "k", "v"))  # (B, L, H, D) views
        return _fa4_call(flash_attn_func, q, k, v, causal=causal).transpose(1, 2)

    return Impl("flash-attn-4", fn, available=_fa4_unavailable,
                note="FlashAttention-4 (CuTe DSL), flash_attn.cute.flash_attn_func" + (", GQA native" if gqa else ""))


def attention_case(name, *, B, H, L, D, Hk=None, Lk=None, causal=False, pad=0.0, grad=False,
                   device_type="cuda", quick=False, quadratic_baselines=True, qkv_view=False) -> OpCase:
    """quadratic_baselines=False leaves out the baselines that hold L x L scores (eager,
    compile, SDPA math): at L=16384 they need tens of GiB and are not what is measured.
    qkv_view=True passes q, k, v as the strided views of one fused (B, L, 3, H, D)
    projection that a model produces, instead of contiguous (B, H, L, D) tensors."""
    Hk = Hk or H
    Lk = Lk or L
    gqa = Hk != H
    if qkv_view and (gqa or Lk != L or grad):
        raise ValueError("qkv_view needs self-attention without GQA, forward only")

    def make(device, dtype, gen):
        if qkv_view:
            qkv = _randn((B, L, 3, H, D), device, dtype, gen)
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, L, D), strided
        else:
            q = _randn((B, H, L, D), device, dtype, gen, grad=grad)
            k = _randn((B, Hk, Lk, D), device, dtype, gen, grad=grad)
            v = _randn((B, Hk, Lk, D), device, dtype, gen, grad=grad)
        inputs = {"q": q, "k": k, "v": v, "mask": None}
        if pad:
            # Lengths spread over [1 - 2*pad, 1] of L, so the mean padded fraction is `pad`.
            lo = max(1, int(round(Lk * (1 - 2 * pad))))
            lengths = torch.randint(lo, Lk + 1, (B,), device=device, generator=gen)
            keep = torch.arange(Lk, device=device)[None, :] < lengths[:, None]
            inputs["mask"] = keep[:, None, None, :]  # (B, 1, 1, Lk): the key-padding fast path
        if grad:
            inputs["grad_out"] = _randn((B, H, L, D), device, dtype, gen)
        return inputs

    def ref(inputs):
        return reference.scaled_dot_product_attention(
            inputs["q"], inputs["k"], inputs["v"], attn_mask=inputs["mask"], is_causal=causal, enable_gqa=gqa
        )

    def ours(inputs, backend):
        return K.scaled_dot_product_attention(
            inputs["q"], inputs["k"], inputs["v"], attn_mask=inputs["mask"], is_causal=causal, enable_gqa=gqa,
            backend=backend,
        )

    def torch_sdpa(inputs):
        kwargs = {"enable_gqa": True} if gqa else {}
        return F.scaled_dot_product_attention(
            inputs["q"], inputs["k"], inputs["v"], attn_mask=inputs["mask"], is_causal=causal, **kwargs
        )

    impls = _ours(device_type, ours)
    if device_type == "cuda":
        impls += [_cuda_cute_impl(ours, D), _cuda_wmma_impl(ours), _hopper_impl(ours),
                  _hopper_impl(ours, descriptors="device"),
                  _portable_impl(ours)]
        if grad:
            impls += [_atomic_dq_impl(ours), _hopper_impl(ours, dq="atomic"), _fused_dq_impl(ours),
                      _cuda_sm90_backward_impl(ours)]
        sdpa = _sdpa_impls(torch_sdpa) + [_fa4_impl(causal, gqa)]
        if quadratic_baselines:
            impls += [Impl("torch-eager", ref, note="reference.py: matmul, softmax, matmul")]
            impls += sdpa
            impls += [Impl("torch-compile", ref, build=_compiled, note="torch.compile of the eager code")]
        else:
            impls += [i for i in sdpa if i.name != "sdpa-math"]

    def where(inputs):
        if inputs["mask"] is None or L != Lk:
            return None
        return inputs["mask"][:, :, 0, :, None]  # (B, 1, L, 1): query rows that are real tokens

    fwd_flops = 4.0 * B * H * L * Lk * D * ((L + 1) / (2 * L) if causal else 1.0)
    qo, kv = B * H * L * D, B * Hk * Lk * D
    moved = (2 * qo + 2 * kv) if not grad else (4 * qo + 4 * kv)  # fwd: q,k,v,o; +bwd: do,o,dq,dk,dv re-read
    return OpCase(
        name=name,
        suite="ops",
        group=("attn_fwd_bwd" if grad else "attn_fwd") + ("_causal" if causal else "") + ("_pad" if pad else "")
        + ("_gqa" if gqa else "") + ("_qkv_view" if qkv_view else "") + f"_d{D}",
        params={"B": B, "H": H, "Hk": Hk, "L": L, "Lk": Lk, "D": D, "causal": causal, "pad": pad, "grad": grad,
                "layout": "qkv-view" if qkv_view else "contiguous"},
        flops=fwd_flops * (3.5 if grad else 1.0),  # backward = 2.5 x forward (FlashAttention's count)
        elements=moved,
        x="L",
        quick=quick,
        cpu_note=CPU_NOTE,
        note="FLOPs are the dense count; a padding mask lets a kernel skip work" if pad else "",
        make_inputs=make,
        reference=ref,
        impls=impls,
        grad_inputs=("q", "k", "v") if grad else (),
        where=where,
        batch_keys=("q", "k", "v", "mask") if device_type == "cuda" else (),
    )


def varlen_case(name, *, lengths, H, D, device_type="cuda", quick=False) -> OpCase:
    B, Lmax, T = len(lengths), max(lengths), sum(lengths)

    def make(device, dtype, gen):
        cu = torch.tensor([0] + list(lengths), device=device, dtype=torch.int32).cumsum(0).to(torch.int32)
        pos = torch.cat([torch.arange(n, device=device) + b * Lmax for b, n in enumerate(lengths)])
        keep = torch.arange(Lmax, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
        return {
            "q": _randn((T, H, D), device, dtype, gen),
            "k": _randn((T, H, D), device, dtype, gen),
            "v": _randn((T, H, D), device, dtype, gen),
            "cu": cu,
            "token_index": pos,
            "mask": keep[:, None, None, :],
        }

    def ref(inputs):
        return reference.varlen_attention(inputs["q"], inputs["k"], inputs["v"], inputs["cu"], inputs["cu"], Lmax, Lmax)

    def ours(inputs, backend):
        return K.varlen_attention(inputs["q"], inputs["k"], inputs["v"], inputs["cu"], inputs["cu"], Lmax, Lmax,
                                  backend=backend)

    def padded_sdpa(inputs):
        # What a padded model does instead: scatter into (B, H, Lmax, D), mask, gather back.
        idx = inputs["token_index"]

        def pad(t):
            return t.new_zeros(B * Lmax, H, D).index_copy_(0, idx, t).view(B, Lmax, H, D).transpose(1, 2)

        out = F.scaled_dot_product_attention(pad(inputs["q"]), pad(inputs["k"]), pad(inputs["v"]), attn_mask=inputs["mask"])
        return out.transpose(1, 2).reshape(B * Lmax, H, D)[idx]

    impls = [i for i in _ours(device_type, ours) if i.name == "fuseformer-triton"]
    if device_type == "cuda":
        impls.append(_hopper_impl(ours, varlen=True))
        impls += [Impl("sdpa-padded", padded_sdpa, note="pad, torch SDPA with the padding mask, unpad"),
                  _fa4_varlen_impl(Lmax)]
    moved = 4 * T * H * D
    return OpCase(
        name=name, suite="ops", group=f"varlen_fwd_d{D}",
        params={"B": B, "H": H, "D": D, "Lmax": Lmax, "tokens": T},
        flops=4.0 * H * D * sum(n * n for n in lengths), elements=moved, quick=quick, cpu_note=CPU_NOTE,
        make_inputs=make, reference=ref, impls=impls,
    )


# --- add + LayerNorm ------------------------------------------------------------------


def _on_cuda_only(peer: str, fn):
    """A peer library's kernel: refused (never run) on CPU tensors, where Triton's interpreter
    cannot run it (Liger's LayerNorm raised there) and a timing would mean nothing."""
    def run(inputs):
        if not inputs["x"].is_cuda:
            raise Refused(f"{peer}'s kernels run on CUDA tensors only")
        return fn(inputs)

    return run


def _liger_layer_norm():
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
    except ImportError:
        return None
    return LigerLayerNormFunction


def _quack_layer_norm():
    """(fn(h, weight, bias, eps) -> y on 2-D rows, note) for QuACK's (quack-kernels) CuTe-DSL
    LayerNorm forward where installed, else None. Its API moves: 0.6 has
    quack.rmsnorm.layernorm_fwd (fp32 weight and bias), earlier versions quack.layernorm.layernorm
    (fp32 weight, no bias: the bias is then a torch add). Forward only: neither has an autograd
    path for LayerNorm."""
    if importlib.util.find_spec("quack") is None:
        return None
    try:  # an import that needs a GPU stack it lacks counts as "not installed"
        from quack.rmsnorm import layernorm_fwd
    except Exception:  # noqa: BLE001
        layernorm_fwd = None
    if layernorm_fwd is not None:
        return ((lambda h, w, b, eps: layernorm_fwd(h, w.float(), b.float(), eps)),
                "torch add, QuACK's layernorm_fwd (fp32 weight and bias)")
    try:
        from quack.layernorm import layernorm
    except Exception:  # noqa: BLE001
        return None
    return ((lambda h, w, b, eps: layernorm(h, w.float(), eps) + b),
            "torch add, QuACK's layernorm (fp32 weight, no bias: the bias is a torch add)")


def _variant_impls(call, variants) -> list[Impl]:
    """Our not-yet-default kernels beside `fuseformer-triton`, so one GPU run times both:
    (suffix, context factory that selects the variant, note) -> fuseformer-triton-<suffix>."""
    return [
        Impl(f"fuseformer-triton-{suffix}", (lambda inputs: call(inputs, "triton")), kind=OURS,
             available=(lambda: K.unavailable_reason("triton")), timed_on_cpu=False, context=context, note=note)
        for suffix, context, note in variants
    ]


def add_ln_case(name, *, M, N, grad=False, device_type="cuda", quick=False) -> OpCase:
    eps = 1e-5

    def make(device, dtype, gen):
        inputs = {
            "x": _randn((M, N), device, dtype, gen, grad=grad),
            "residual": _randn((M, N), device, dtype, gen, grad=grad),
            "weight": (1 + 0.1 * torch.randn(N, device=device, generator=gen)).to(dtype).requires_grad_(grad),
            "bias": _randn((N,), device, dtype, gen, 0.1, grad),
        }
        if grad:
            inputs["grad_out"] = _randn((M, N), device, dtype, gen)
        return inputs

    def ref(i):
        return reference.add_layer_norm(i["x"], i["residual"], i["weight"], i["bias"], eps)

    def ours(i, backend):
        return K.add_layer_norm(i["x"], i["residual"], i["weight"], i["bias"], eps, backend=backend)

    def eager(i):
        return F.layer_norm(i["x"] + i["residual"], (N,), i["weight"], i["bias"], eps)

    aln = importlib.import_module("fuseformer.kernels.add_layer_norm")
    variants = [
        ("rows", lambda: aln.variant(forward="rows"), "forward: several rows per program"),
        ("persistent", lambda: aln.variant(forward="persistent"),
         "forward: several rows per program, as many programs as fit on the SMs, next tile prefetched"),
    ]
    if grad:
        variants.append(("bwd-pipelined", lambda: aln.variant(backward="pipelined"),
                         "backward: next row prefetched (software-pipelined row loop)"))
    impls = _ours(device_type, ours) + _variant_impls(ours, variants)
    if device_type == "cuda":
        impls += [Impl("torch-eager", eager, note="x + residual, then F.layer_norm"),
                  Impl("torch-compile", eager, build=_compiled)]
        liger = _liger_layer_norm()
        if liger is not None:
            impls.append(Impl("liger", _on_cuda_only(
                "Liger-Kernel", lambda i: liger.apply(i["x"] + i["residual"], i["weight"], i["bias"], eps)),
                note="torch add, then Liger-Kernel's LayerNorm"))
        quack = None if grad else _quack_layer_norm()
        if quack is not None:
            fn, note = quack
            impls.append(Impl("quack", _on_cuda_only(
                "QuACK", lambda i: fn(i["x"] + i["residual"], i["weight"], i["bias"], eps)), note=note))
    return OpCase(
        name=name, suite="ops", group="add_ln_fwd_bwd" if grad else "add_ln_fwd",
        params={"M": M, "N": N, "grad": grad},
        flops=None,
        # fwd: x, residual in, y out; fwd+bwd also: the stream h = x + residual out (or x and
        # residual read again), dy and h in, dx out (d residual is the same tensor: no dropout here)
        elements=(7 if grad else 3) * M * N,
        x="N", quick=quick, cpu_note=CPU_NOTE, make_inputs=make, reference=ref, impls=impls,
        grad_inputs=("x", "residual", "weight", "bias") if grad else (),
    )


# --- Linear + GELU --------------------------------------------------------------------


def linear_gelu_case(name, *, M, K_in, N, approximate="none", grad=False, device_type="cuda", quick=False) -> OpCase:
    def make(device, dtype, gen):
        inputs = {
            "x": _randn((M, K_in), device, dtype, gen, grad=grad),
            "weight": _randn((N, K_in), device, dtype, gen, 1 / math.sqrt(K_in), grad),
            "bias": _randn((N,), device, dtype, gen, 0.1, grad),
        }
        if grad:
            inputs["grad_out"] = _randn((M, N), device, dtype, gen)
        return inputs

    def ref(i):
        return reference.linear_gelu(i["x"], i["weight"], i["bias"], approximate)

    def ours(i, backend):
        return K.linear_gelu(i["x"], i["weight"], i["bias"], approximate, backend=backend)

    def eager(i):
        return F.gelu(F.linear(i["x"], i["weight"], i["bias"]), approximate=approximate)

    lg = importlib.import_module("fuseformer.kernels.linear_gelu")
    # The fast GELU maths is the default since the H200 run (2026-11-27); the exact one keeps
    # being timed against it.
    exact_gelu = ("exact-gelu", lambda: lg.variant(gelu="exact"),
                  "libdevice's erf, sigmoid by an IEEE division (the default before the H200 run)")
    variants = [("tma", lambda: lg.variant(forward="tma"), "persistent TMA + wgmma GEMM (sm_90)"),
                ("portable", lambda: lg.variant(forward="portable"),
                 "one program per tile (the default before the H100 run)"),
                exact_gelu]
    if approximate == "tanh":
        # The default takes cuBLASLt's GELU epilogue for tanh inference on a GPU: our kernel
        # keeps being timed against it.
        variants.append(("fused-tanh", lambda: lg.variant(tanh="triton"),
                         "our kernel (the default: cuBLASLt's tanh GELU epilogue, since the H200 run)"))
    if grad:
        # Each change on its own against the default, and the two together against "tma" (the
        # H100 run timed only the pair, 0.93x, and could not say which of the two lost).
        variants = [
            ("tma", lambda: lg.variant(forward="tma"), "persistent TMA GEMM forward, pre stored"),
            ("tma-fused-db", lambda: lg.variant(forward="tma", dgelu="fused_db"),
             "persistent TMA GEMM; dgelu and db in one pass"),
            ("fused-db", lambda: lg.variant(dgelu="fused_db"), "portable GEMM; dgelu and db in one pass"),
            exact_gelu,
            ("tma-recompute", lambda: lg.variant(forward="tma", preact="recompute"),
             "pre not saved (N * 2 bytes per token less in bf16): the backward runs the GEMM again"),
        ]
    impls = _ours(device_type, ours) + _variant_impls(ours, variants)
    if device_type == "cuda":
        impls += [_cuda_cutlass_impl(ours), _cuda_cublaslt_impl(ours)]
        impls += [Impl("torch-eager", eager, note="F.linear, then F.gelu"), Impl("torch-compile", eager, build=_compiled)]
        if not grad:
            # cuBLASLt's GELU epilogue is the tanh approximation: checked only where that is the op.
            impls.append(Impl(
                "cublaslt-gelu",
                lambda i: torch._addmm_activation(i["bias"], i["x"], i["weight"].t(), use_gelu=True),
                check=approximate == "tanh",
                note="" if approximate == "tanh" else "computes tanh GELU, not erf: timed, not parity-checked",
            ))
    return OpCase(
        name=name, suite="ops",
        group=("linear_gelu_fwd_bwd" if grad else "linear_gelu_fwd") + ("_erf" if approximate == "none" else "_tanh"),
        params={"M": M, "K": K_in, "N": N, "approximate": approximate, "grad": grad},
        flops=2.0 * M * N * K_in * (3 if grad else 1),
        elements=(M * K_in + N * K_in + M * N + N) * (2 if grad else 1),
        x="N", quick=quick, cpu_note=CPU_NOTE, make_inputs=make, reference=ref, impls=impls,
        grad_inputs=("x", "weight", "bias") if grad else (),
    )


# --- cross-entropy ------------------------------------------------------------------------


def cross_entropy_case(name, *, M, V, ignored=0.0, padded=False, device_type="cuda", quick=False) -> OpCase:
    """The loss of a language-model head and its gradient: mean cross-entropy of M rows of V
    class scores, a share `ignored` of the rows labelled -100 (masked LM: 85%). `padded`: the
    models' layout (models/layers.py VocabLogits), rows of V rounded up to a multiple of 64,
    the extra columns -inf, ours told the real V (`classes`); every implementation gets the
    same padded logits."""
    width = -(-V // 64) * 64 if padded else V

    def make(device, dtype, gen):
        labels = torch.randint(0, V, (M,), device=device, generator=gen)
        if ignored:
            labels[torch.rand(M, device=device, generator=gen) < ignored] = -100
        logits = _randn((M, width), device, dtype, gen, 2.0)
        logits[:, V:] = float("-inf")
        return {"logits": logits.requires_grad_(True), "labels": labels,
                "grad_out": torch.ones((), device=device, dtype=torch.float32)}

    def ref(i):
        return reference.cross_entropy(i["logits"], i["labels"])

    def ours(i, backend):
        return K.cross_entropy(i["logits"], i["labels"], classes=V, backend=backend)

    def upcast(i):
        return F.cross_entropy(i["logits"].float(), i["labels"])

    impls = [i for i in _ours(device_type, ours) if i.name == "fuseformer-triton"]  # csrc/ has none
    if device_type == "cuda":
        impls += [
            Impl("torch-eager-fp32", upcast, note="F.cross_entropy on fp32 logits (what our models ran before)"),
            Impl("torch-eager", lambda i: F.cross_entropy(i["logits"], i["labels"]),
                 note="F.cross_entropy in the logits' dtype (Hugging Face's heads): half-precision "
                      "log-probabilities, so its loss may fall outside the parity bound"),
            Impl("torch-compile", upcast, build=_compiled, note="F.cross_entropy on fp32 logits, compiled"),
        ]
    labelled = 1.0 - ignored
    return OpCase(
        name=name, suite="ops", group="cross_entropy_fwd_bwd",
        params={"M": M, "V": V, "width": width, "ignored": ignored, "grad": True},
        flops=None,
        # The labelled rows' logits read (twice by ours: forward, backward), every row's
        # gradient written: the least any implementation must move is one read and one write.
        elements=(labelled + 1.0) * M * width,
        x="V", quick=quick, cpu_note=CPU_NOTE, make_inputs=make, reference=ref, impls=impls,
        grad_inputs=("logits",),
    )


# --- the suite ----------------------------------------------------------------------------


def gpu_cases() -> list[OpCase]:
    """The full run; `quick=True` marks the subset `--quick` runs (CI's gate, <= 3 minutes on
    an H100 with the model suite's quick case): one case for each kind of kernel."""
    d = "cuda"
    cases = []
    for L in (512, 1024, 2048, 4096):
        B = 16384 // L
        cases.append(attention_case(f"attn_fwd_d64_L{L}", B=B, H=16, L=L, D=64, device_type=d, quick=L == 4096))
    for L in (1024, 2048, 4096):
        cases.append(attention_case(f"attn_fwd_causal_d64_L{L}", B=16384 // L, H=16, L=L, D=64, causal=True, device_type=d))
    for L in (1024, 4096):
        cases.append(attention_case(f"attn_fwd_d128_L{L}", B=16384 // L, H=8, L=L, D=128, device_type=d))
    # The same work as the series above at L=16384 (16 x 1 heads rather than 1 x 16: the float64
    # reference runs one batch element at a time), and the O(L) memory check.
    cases.append(attention_case("attn_fwd_d64_L16384", B=16, H=1, L=16384, D=64, device_type=d,
                                quadratic_baselines=False))
    cases.append(attention_case("attn_fwd_pad_d64_L512", B=32, H=12, L=512, D=64, pad=0.3, device_type=d, quick=True))
    cases.append(attention_case("attn_fwd_pad_qkv_view_d64_L512", B=32, H=12, L=512, D=64, pad=0.3, qkv_view=True,
                                device_type=d))
    cases.append(attention_case("attn_fwd_causal_gqa_d128_L2048", B=4, H=32, Hk=8, L=2048, D=128, causal=True, device_type=d))
    cases.append(attention_case("attn_fwd_bwd_d64_L2048", B=8, H=16, L=2048, D=64, grad=True, device_type=d, quick=True))
    cases.append(attention_case("attn_fwd_bwd_causal_d64_L2048", B=8, H=16, L=2048, D=64, causal=True, grad=True, device_type=d))
    # BERT-base pre-training's attention (B32 L128, 30% padded keys): the short-sequence
    # backward, two launches a layer by default, one with the fused dQ variant.
    cases.append(attention_case("attn_fwd_bwd_pad_d64_L128", B=32, H=12, L=128, D=64, pad=0.3, grad=True,
                                device_type=d, quick=True))
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(154, 513, (32,), generator=gen).tolist()  # BERT L=512, ~30% padding
    cases.append(varlen_case("varlen_fwd_d64_L512", lengths=lengths, H=12, D=64, device_type=d))
    for N in (768, 1024, 2048, 4096):
        cases.append(add_ln_case(f"add_ln_fwd_16384x{N}", M=16384, N=N, device_type=d, quick=N == 768))
    for N in (768, 4096):
        cases.append(add_ln_case(f"add_ln_fwd_bwd_16384x{N}", M=16384, N=N, grad=True, device_type=d, quick=N == 768))
    cases.append(linear_gelu_case("linear_gelu_fwd_erf_16384x768x3072", M=16384, K_in=768, N=3072, device_type=d, quick=True))
    cases.append(linear_gelu_case("linear_gelu_fwd_erf_16384x1024x4096", M=16384, K_in=1024, N=4096, device_type=d))
    # BERT-base's FFN at B32 L128, the models suite's inference case: there the kernel took 59.8 µs a
    # call on the H200 (717 µs of the forward's 2650 over 12 calls, profile_calls.txt), 323 TFLOP/s,
    # where cuBLAS ran the same-sized FFN output GEMM at 748.
    cases.append(linear_gelu_case("linear_gelu_fwd_erf_4096x768x3072", M=4096, K_in=768, N=3072, device_type=d))
    cases.append(linear_gelu_case("linear_gelu_fwd_tanh_16384x768x3072", M=16384, K_in=768, N=3072, approximate="tanh",
                                  device_type=d))
    cases.append(linear_gelu_case("linear_gelu_fwd_bwd_erf_16384x768x3072", M=16384, K_in=768, N=3072, grad=True, device_type=d))
    # The heads' losses: BERT's masked LM at B32 L128 (85% of rows unlabelled) in the models'
    # padded layout, GPT-2's causal LM at B8 L512 on raw (unaligned) logits.
    cases.append(cross_entropy_case("cross_entropy_fwd_bwd_mlm_padded_4096x30522", M=4096, V=30522, ignored=0.85,
                                    padded=True, device_type=d))
    cases.append(cross_entropy_case("cross_entropy_fwd_bwd_lm_4096x50257", M=4096, V=50257, device_type=d))
    # A sequence-classification head's loss (B32, 3 classes): a small problem, one forward launch
    # (kernels/cross_entropy.py SMALL_SCORES) where F.cross_entropy on upcast logits makes three.
    cases.append(cross_entropy_case("cross_entropy_fwd_bwd_cls_32x3", M=32, V=3, device_type=d))
    return cases


def cpu_cases() -> list[OpCase]:
    d = "cpu"
    return [
        attention_case("attn_fwd_d16_L17", B=2, H=2, L=17, D=16, device_type=d, quick=True),
        attention_case("attn_fwd_causal_d40_L97", B=1, H=2, L=97, D=40, causal=True, device_type=d),
        attention_case("attn_fwd_pad_d64_L64", B=3, H=2, L=64, D=64, pad=0.3, device_type=d, quick=True),
        attention_case("attn_fwd_gqa_d32_L33", B=1, H=4, Hk=2, L=33, D=32, device_type=d),
        attention_case("attn_fwd_d128_L1", B=3, H=2, L=1, D=128, device_type=d),
        attention_case("attn_fwd_d80_L257", B=1, H=2, L=257, D=80, device_type=d),
        attention_case("attn_fwd_pad_qkv_view_d40_L97", B=3, H=2, L=97, D=40, pad=0.3, qkv_view=True, device_type=d),
        attention_case("attn_fwd_bwd_pad_d40_L33", B=3, H=2, L=33, D=40, pad=0.3, grad=True, device_type=d),
        attention_case("attn_fwd_bwd_d32_L65", B=1, H=2, L=65, D=32, grad=True, device_type=d, quick=True),
        varlen_case("varlen_fwd_d32_L40", lengths=[17, 40, 5], H=2, D=32, device_type=d),
        add_ln_case("add_ln_fwd_51x100", M=51, N=100, device_type=d, quick=True),
        add_ln_case("add_ln_fwd_8x1023", M=8, N=1023, device_type=d),
        add_ln_case("add_ln_fwd_3x1", M=3, N=1, device_type=d),
        add_ln_case("add_ln_fwd_bwd_17x768", M=17, N=768, grad=True, device_type=d, quick=True),
        linear_gelu_case("linear_gelu_fwd_erf_17x100x257", M=17, K_in=100, N=257, device_type=d, quick=True),
        linear_gelu_case("linear_gelu_fwd_tanh_33x64x128", M=33, K_in=64, N=128, approximate="tanh", device_type=d),
        linear_gelu_case("linear_gelu_fwd_bwd_erf_17x40x80", M=17, K_in=40, N=80, grad=True, device_type=d, quick=True),
        # Small problems (one forward launch), and rows past SMALL_SCORES (a program per row first).
        cross_entropy_case("cross_entropy_fwd_bwd_17x97", M=17, V=97, ignored=0.3, device_type=d, quick=True),
        cross_entropy_case("cross_entropy_fwd_bwd_padded_9x50", M=9, V=50, ignored=0.3, padded=True, device_type=d),
        cross_entropy_case("cross_entropy_fwd_bwd_70x200", M=70, V=200, ignored=0.3, device_type=d),
    ]


def cases(device_type: str) -> list[OpCase]:
    return gpu_cases() if device_type == "cuda" else cpu_cases()
