"""Backend selection: set/get/use_backend, FUSEFORMER_BACKEND, availability and the
fallback rules of docs/design.md ("Backends"), exercised through add_layer_norm and linear_gelu."""
import os
import subprocess
import sys
import warnings

import pytest
import torch

from fuseformer import kernels as K
from fuseformer.kernels import backends, reference
from fuseformer.kernels.backends import Impl

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _restore_default():
    before = backends._default
    backends.clear_plans()  # tests swap implementations: no decision may outlive one
    yield
    backends._default = before
    backends.clear_plans()


@pytest.fixture
def calls(monkeypatch):
    """Records which implementation ran: 'triton' (the registered impl) or 'torch' (reference)."""
    seen = []
    for op in ("linear_gelu", "add_layer_norm"):
        orig = backends.get_impl(op, "triton")

        def spy(*args, _orig=orig, **kwargs):
            seen.append("triton")
            return _orig.forward(*args, **kwargs)

        monkeypatch.setitem(backends._IMPLS, (op, "triton"), Impl(spy, orig.backward, orig.unsupported))
        ref = getattr(reference, op)

        def ref_spy(*args, _ref=ref, **kwargs):
            seen.append("torch")
            return _ref(*args, **kwargs)

        monkeypatch.setattr(reference, op, ref_spy)
    return seen


def _lg_inputs(device="cpu", dtype=torch.float32):
    return torch.randn(3, 8, device=device, dtype=dtype), torch.randn(5, 8, device=device, dtype=dtype)


def test_set_get_backend():
    K.set_backend("torch")
    assert K.get_backend() == "torch"
    K.set_backend("TRITON")  # names are case-insensitive
    assert K.get_backend() == "triton"
    K.set_backend("auto")
    assert K.get_backend() == "auto"


def test_use_backend_nests_and_restores():
    K.set_backend("auto")
    with K.use_backend("torch"):
        assert K.get_backend() == "torch"
        with K.use_backend("triton"):
            assert K.get_backend() == "triton"
        assert K.get_backend() == "torch"
    assert K.get_backend() == "auto"
    with pytest.raises(RuntimeError, match="boom"):
        with K.use_backend("torch"):
            raise RuntimeError("boom")
    assert K.get_backend() == "auto"


@pytest.mark.parametrize("bad", ["fast", "", "cudnn", None, 3])
def test_invalid_names_rejected(bad):
    with pytest.raises(ValueError, match="backend must be one of"):
        K.set_backend(bad)
    with pytest.raises(ValueError, match="backend must be one of"):
        with K.use_backend(bad):
            pass
    if bad is not None:  # backend=None on an op means "the backend in force"
        x, w = _lg_inputs()
        with pytest.raises(ValueError, match="backend must be one of"):
            K.linear_gelu(x, w, backend=bad)


def _run_python(code, **env):
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=120)


def test_env_var_sets_default_at_import():
    res = _run_python("from fuseformer import kernels as K; print(K.get_backend())", FUSEFORMER_BACKEND="torch")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "torch"


def test_env_var_invalid_value_is_a_clear_error():
    res = _run_python("import fuseformer.kernels", FUSEFORMER_BACKEND="warp-speed")
    assert res.returncode != 0
    assert "FUSEFORMER_BACKEND must be one of" in res.stderr and "warp-speed" in res.stderr


def test_kernel_variant_settings_read_once_from_the_environment():
    """backends.Variants, the switches of the ops' opt-in kernels: each read at import (any
    case, spaces around), a bad value refused there naming the variable and the choices."""
    # importlib: the package's add_layer_norm and linear_gelu are the functions, not the modules.
    code = ("import importlib; m = lambda name: importlib.import_module('fuseformer.kernels.' + name); "
            "print(m('add_layer_norm').VARIANT, m('linear_gelu').VARIANT['gelu'], m('linear_gelu').VARIANT['tanh'], "
            "m('attention').VARIANT, "
            "m('cuda_backend').VARIANT)")
    res = _run_python(code, FUSEFORMER_ADD_LN_BWD=" Pipelined ", FUSEFORMER_LINEAR_GELU_MATH=" Exact",
                      FUSEFORMER_LINEAR_GELU_TANH="Triton ",
                      FUSEFORMER_ATTENTION_KERNEL="HOPPER", FUSEFORMER_ATTENTION_DQ="atomic",
                      FUSEFORMER_HOPPER_DESCRIPTORS="host", FUSEFORMER_CUDA_ATTENTION="CuTe",
                      FUSEFORMER_CUDA_ATTENTION_BACKWARD="SM90 ", FUSEFORMER_CUDA_LINEAR_GELU=" cutlass")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\n")[0] == (
        "{'forward': 'row', 'backward': 'pipelined'} exact triton "
        "{'kernel': 'hopper', 'dq': 'atomic', 'descriptors': 'host'} "
        "{'attention': 'cute', 'attention_backward': 'sm90', 'linear_gelu': 'cutlass'}")
    for variable, bad, good in (("FUSEFORMER_ADD_LN_BWD", "prefetch", "pipelined"),
                                ("FUSEFORMER_ATTENTION_KERNEL", "sm90", "hopper"),
                                ("FUSEFORMER_CUDA_ATTENTION_BACKWARD", "wmma", "cute"),
                                ("FUSEFORMER_CUDA_LINEAR_GELU", "cudnn", "cublaslt")):
        res = _run_python("import fuseformer.kernels", **{variable: bad})
        assert res.returncode != 0
        assert f"{variable}: unknown" in res.stderr and f"'{bad}'" in res.stderr and f"'{good}'" in res.stderr


def test_kernel_variant_settings_set_and_restore():
    variants = backends.Variants("op", {"a": ("x", "y"), "b": ("p", "q")}, {"a": "FUSEFORMER_TEST_UNSET_A",
                                                                             "b": "FUSEFORMER_TEST_UNSET_B"})
    assert variants == {"a": "x", "b": "p"}  # the first option of each: the default
    with variants.using(b="Q"):
        assert variants == {"a": "x", "b": "q"}
        assert variants.set(a="y") == {"a": "x", "b": "q"}  # returns every previous setting
    assert variants == {"a": "x", "b": "p"}  # the block restores what it found
    with pytest.raises(ValueError, match="unknown setting 'c'"):
        variants.set(c="x")
    with pytest.raises(ValueError, match="expected one of"):
        variants.set(a="z")
    assert variants == {"a": "x", "b": "p"}  # a refused call changes nothing


def test_available_backends():
    avail = K.available_backends()
    assert "torch" in avail
    assert K.unavailable_reason("torch") is None
    if not HAS_CUDA:
        assert backends.interpreting()
        assert "triton" in avail
    if "cuda" not in avail:
        reason = K.unavailable_reason("cuda")
        assert isinstance(reason, str) and reason


def test_cuda_by_name_raises_with_reason():
    # Asked here, not in a skipif at import: on a GPU machine that would build csrc/ while
    # pytest collects (bench/gpu_session.sh runs the gpu-marked tests beside that build).
    if "cuda" in K.available_backends():
        pytest.skip("the cuda backend is available here")
    x, w = _lg_inputs()
    with pytest.raises(K.BackendUnsupportedError, match="backend 'cuda' cannot run linear_gelu") as err:
        K.linear_gelu(x, w, backend="cuda")
    assert K.unavailable_reason("cuda") in str(err.value) or "cuda" in str(err.value)
    if not torch.cuda.is_available():
        # A global choice that can run nothing here is refused where it is made.
        with pytest.raises(K.BackendUnsupportedError, match="backend 'cuda' cannot run anything here"):
            K.set_backend("cuda")
        with pytest.raises(K.BackendUnsupportedError, match="backend 'cuda' cannot run anything here"):
            with K.use_backend("cuda"):
                pass
        assert K.get_backend() != "cuda"


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU rule")
def test_auto_on_cpu_runs_torch_without_warning(calls):
    x, w = _lg_inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with K.use_backend("auto"):
            out = K.linear_gelu(x, w)
            y = K.add_layer_norm(x, None, None, None)
    assert calls == ["torch", "torch"]
    torch.testing.assert_close(out, torch.nn.functional.gelu(x @ w.t()))
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x, (8,)))


def test_explicit_backend_argument_overrides_the_one_in_force(calls, device):
    x, w = _lg_inputs(device)
    with K.use_backend("torch"):
        a = K.linear_gelu(x, w, backend="triton")
        b = K.linear_gelu(x, w)
    assert calls == ["triton", "torch"]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_global_triton_runs_triton(calls, device):
    x, w = _lg_inputs(device)
    K.set_backend("triton")
    K.add_layer_norm(x, None, None, None)
    K.linear_gelu(x, w)
    assert calls == ["triton", "triton"]


def test_unsupported_case_named_explicitly_raises(device):
    x, w = _lg_inputs(device, torch.float64)
    with pytest.raises(K.BackendUnsupportedError, match="triton.*float64"):
        K.linear_gelu(x, w, backend="triton")
    with pytest.raises(K.BackendUnsupportedError, match="triton.*float64"):
        K.add_layer_norm(x, None, None, None, backend="triton")


def test_auto_falls_back_with_one_warning_on_cuda(monkeypatch):
    # resolve() only needs the device type, so the CUDA rule can be checked on any machine.
    monkeypatch.setattr(backends, "_warned", set())
    case = dict(dtype=torch.float64, in_features=8, out_features=5, approximate="none", requires_grad=False)
    with pytest.warns(UserWarning, match="linear_gelu falls back to the torch backend.*float64"):
        assert backends.resolve("linear_gelu", torch.device("cuda"), "auto", **case) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason again: no second warning
        assert backends.resolve("linear_gelu", torch.device("cuda"), "auto", **case) == "torch"


def test_auto_picks_triton_on_cuda_for_a_supported_case():
    case = dict(dtype=torch.float16, hidden=768, dropout_p=0.1, requires_grad=True)
    if backends.unavailable_reason("triton") is None:
        assert backends.resolve("add_layer_norm", torch.device("cuda"), "auto", **case) == "triton"


def test_registering_for_an_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="'triton' or 'cuda'"):
        backends.register_impl("linear_gelu", "torch", Impl(lambda *a: None, None))


@pytest.mark.skipif(HAS_CUDA, reason="checks the rule for a machine without CUDA")
def test_triton_without_interpreter_or_gpu_is_refused_at_set_backend():
    code = ("from fuseformer import kernels as K\n"
            "try:\n    K.set_backend('triton')\nexcept K.BackendUnsupportedError as e:\n    print('refused:', e)\n")
    res = _run_python(code, TRITON_INTERPRET="0")
    assert res.returncode == 0, res.stderr
    assert "refused: backend 'triton' cannot run anything here" in res.stdout


def test_env_var_empty_means_unset():
    res = _run_python("from fuseformer import kernels as K; print(K.get_backend())", FUSEFORMER_BACKEND="")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "auto"


@pytest.mark.parametrize("value,expected", [("1", True), ("true", True), ("On", True), ("0", False),
                                            ("false", False), ("", False), ("no", False)])
def test_triton_interpret_is_read_as_triton_reads_it(value, expected):
    code = "from fuseformer.kernels import backends; print(backends.interpreting())"
    res = _run_python(code, TRITON_INTERPRET=value)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(expected)


def test_decisions_are_cached_per_case(monkeypatch, device):
    """The eager path asks `unsupported` once per (op, device, backend, case), not per call."""
    orig = backends.get_impl("linear_gelu", "triton")
    asked = []

    def unsupported(**case):
        asked.append(case)
        return orig.unsupported(**case)

    monkeypatch.setitem(backends._IMPLS, ("linear_gelu", "triton"), Impl(orig.forward, orig.backward, unsupported))
    backends.clear_plans()
    x, w = _lg_inputs(device)
    for _ in range(3):
        K.linear_gelu(x, w, backend="triton")
    assert len(asked) == 1
    K.linear_gelu(x.double(), w.double(), backend="torch")  # another case: asked again only if fused
    with pytest.raises(K.BackendUnsupportedError):
        K.linear_gelu(x.double(), w.double(), backend="triton")
    with pytest.raises(K.BackendUnsupportedError):  # errors are never cached away
        K.linear_gelu(x.double(), w.double(), backend="triton")
    assert len(asked) == 3


def test_backend_version_moves_with_every_change():
    v0 = backends.backend_version()
    K.set_backend("torch")
    v1 = backends.backend_version()
    with K.use_backend("auto"):
        v2 = backends.backend_version()
    assert v0 < v1 < v2 < backends.backend_version()


def test_auto_asks_the_cuda_backend_its_measured_cases_before_anything_that_builds():
    # `auto` must not start csrc/'s JIT build from inside a forward: wherever the cuda backend
    # is an `auto` candidate, its Impl answers `auto_unsupported` first.
    from fuseformer.kernels import cuda_backend  # noqa: F401 - registers the cuda impls

    for op, order in backends.AUTO_ORDER.items():
        if "cuda" in order:
            assert backends.get_impl(op, "cuda").auto_unsupported is not None, op


ATTN_D128 = dict(dtype=torch.bfloat16, head_dim=128, mask_kind="none", dropout_p=0.0, requires_grad=False,
                 is_causal=False, gqa=False, lq_multiple_of_8=True)


@pytest.fixture
def cuda_auto(monkeypatch):
    """A process where the csrc/ module looks loaded with its sm_90a kernels on a 9.0 device,
    so `auto` can be decided for a CUDA device on any machine (nothing launches)."""
    from fuseformer.kernels import cuda_backend

    class FakeModule:
        def attention_sm90_built(self):
            return True

    monkeypatch.setattr(cuda_backend, "_module", FakeModule())
    monkeypatch.setitem(cuda_backend.VARIANT, "attention", "sm90")
    monkeypatch.setattr(cuda_backend, "unavailable_reason", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    if backends.unavailable_reason("triton") is not None:
        pytest.skip("triton unavailable here")
    return cuda_backend


@pytest.mark.parametrize("change, expected", [
    ({}, "cuda"),  # head dim 128 inference: 1.39x triton on the H100
    ({"dtype": torch.float16}, "cuda"),
    ({"head_dim": 64}, "triton"),  # d64: the triton kernel was faster
    ({"is_causal": True}, "triton"),
    ({"requires_grad": True}, "triton"),  # the CuTe backward is slower than triton's
    ({"mask_kind": "key_padding"}, "triton"),  # sm_90a takes no mask: it would run cute
    ({"gqa": True}, "triton"),
    ({"lq_multiple_of_8": False}, "triton"),
    ({"dtype": torch.float32}, "triton"),
])
def test_auto_takes_the_cuda_attention_only_where_it_was_measured_faster(cuda_auto, change, expected):
    case = {**ATTN_D128, **change}
    assert backends.resolve("attention", torch.device("cuda"), "auto", **case) == expected


LN_TRAIN = dict(dtype=torch.bfloat16, hidden=768, dropout_p=0.0, requires_grad=True)


@pytest.mark.parametrize("change, expected", [
    ({}, "cuda"),  # training at 768: forward+backward 1.19x triton eagerly on the H200 (1.17x in a graph)
    ({"hidden": 4096}, "cuda"),  # 1.32x
    ({"dtype": torch.float16}, "cuda"),
    ({"requires_grad": False}, "triton"),  # inference: triton's forward was the faster
    ({"dropout_p": 0.1}, "triton"),  # the cuda kernels have no dropout
    ({"hidden": 512}, "triton"),  # outside the measured 768..4096
    ({"hidden": 8192}, "triton"),
    ({"dtype": torch.float32}, "triton"),
])
def test_auto_takes_the_cuda_add_layer_norm_only_where_it_was_measured_faster(cuda_auto, change, expected):
    case = {**LN_TRAIN, **change}
    assert backends.resolve("add_layer_norm", torch.device("cuda"), "auto", **case) == expected


def test_auto_keeps_triton_add_layer_norm_without_the_loaded_module_or_off_hopper(cuda_auto, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert backends.resolve("add_layer_norm", torch.device("cuda"), "auto", **LN_TRAIN) == "triton"
    backends.clear_plans()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(cuda_auto, "_module", None)
    monkeypatch.setattr(cuda_auto, "_tried", True)
    monkeypatch.setattr(cuda_auto, "_jit_build", lambda: pytest.fail("auto started the JIT build"))
    assert backends.resolve("add_layer_norm", torch.device("cuda"), "auto", **LN_TRAIN) == "triton"
    assert "not loaded" in cuda_auto._add_layer_norm_auto_unsupported(torch.device("cuda"), **LN_TRAIN)


def test_auto_keeps_triton_when_the_cuda_module_is_not_loaded_and_never_builds_it(cuda_auto, monkeypatch):
    monkeypatch.setattr(cuda_auto, "_module", None)
    monkeypatch.setattr(cuda_auto, "_tried", True)  # a process where loading was tried and failed
    monkeypatch.setattr(cuda_auto, "_jit_build", lambda: pytest.fail("auto started the JIT build"))
    assert backends.resolve("attention", torch.device("cuda"), "auto", **ATTN_D128) == "triton"
    reason = cuda_auto._attention_auto_unsupported(torch.device("cuda"), **ATTN_D128)
    assert "not loaded" in reason


def test_auto_keeps_triton_off_hopper_or_without_the_sm90a_build(cuda_auto, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert backends.resolve("attention", torch.device("cuda"), "auto", **ATTN_D128) == "triton"
    backends.clear_plans()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(cuda_auto._module.__class__, "attention_sm90_built", lambda self: False)
    assert backends.resolve("attention", torch.device("cuda"), "auto", **ATTN_D128) == "triton"
    backends.clear_plans()
    monkeypatch.setitem(cuda_auto.VARIANT, "attention", "cute")  # the sm_90a kernels switched off
    monkeypatch.setattr(cuda_auto._module.__class__, "attention_sm90_built", lambda self: True)
    assert backends.resolve("attention", torch.device("cuda"), "auto", **ATTN_D128) == "triton"
