"""kernels/launch.py, the fast launch path (the default; FUSEFORMER_FAST_LAUNCH=0 turns it off),
without a GPU.

A launch needs a CUDA driver, so these tests drive `launch()` with a stand-in kernel that records
whether a call took Triton's path (`fn[grid](...)`, which compiles and returns the kernel) or
the fast one (`compiled.run(...)`, and with which arguments). What they pin down is the part a
GPU run cannot show when it goes wrong quietly: every argument Triton specializes on (dtype,
16-byte alignment, an int's value 1 / divisibility by 16 / width, a constexpr's value) yields a
new kernel through Triton's path, never a kept one; and everything the fast path does not know
takes Triton's path. tests/offline_launch_check.py runs every real launcher of ours through
Triton's own JIT path with a stand-in driver and compares what both paths hand the launcher;
the GPU tests compare the outputs bit for bit.
"""
import inspect
import os
import subprocess
import sys
import warnings

import pytest
import torch

from fuseformer.kernels import launch as L


class FakeParam:
    def __init__(self, name, constexpr=False, default=inspect.Parameter.empty):
        self.name, self.is_constexpr, self.default = name, constexpr, default
        self.has_default = default is not inspect.Parameter.empty


class FakeCompiled:
    function, packed_metadata = "FUNCTION", "METADATA"

    def __init__(self, log, fail=False):
        self.log, self.fail = log, fail

    def run(self, *args):
        if self.fail:
            raise TypeError("the launcher refused an argument")
        self.log.append(("fast", args))


class FakeKernel:
    """A kernel (x_ptr, y_ptr, n, eps, MODE: constexpr, BLOCK: constexpr = 64)."""

    __name__ = "fake_kernel"

    def __init__(self, fail=False):
        self.log, self.fail = [], fail
        self.params = [FakeParam("x_ptr"), FakeParam("y_ptr"), FakeParam("n"), FakeParam("eps"),
                       FakeParam("MODE", constexpr=True), FakeParam("BLOCK", constexpr=True, default=64)]

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("triton", grid, args, kwargs))
            return FakeCompiled(self.log, self.fail)

        return run

    def paths(self):
        return [entry[0] for entry in self.log]


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(L, "_ENABLED", True)
    monkeypatch.setattr(L, "_INTERPRET", False)
    monkeypatch.setattr(L, "_is_jit", lambda fn: isinstance(fn, FakeKernel))
    monkeypatch.setattr(L, "_hooks_idle", lambda: True)
    monkeypatch.setattr(L, "_driver", (lambda: 0, lambda device: 1234))
    L.clear()
    yield
    L.clear()


def _tensors(dtype=torch.float32):
    x = torch.zeros(64, dtype=dtype)
    return x, torch.zeros(64, dtype=dtype)


def test_the_second_call_of_a_specialization_goes_straight_to_the_kept_kernel(fast):
    k = FakeKernel()
    x, y = _tensors()
    L.launch(k, (3,), x, y, 64, 1e-5, MODE=2, num_warps=4)
    L.launch(k, (3,), x, y, 80, 2e-5, MODE=2, num_warps=4)  # 80: divisible by 16 too, not 1
    assert k.paths() == ["triton", "fast"]
    _, args = k.log[1]
    # grid padded to 3-D, the current stream, the kept kernel's handle and metadata, no launch
    # metadata and no hooks, then every parameter in signature order, the default BLOCK
    # included; each tensor as its data pointer (an int: no driver query of the address).
    assert args == (3, 1, 1, 1234, "FUNCTION", "METADATA", None, None, None, x.data_ptr(), y.data_ptr(), 80, 2e-5,
                    2, 64)
    assert k.log[0][2][:2] == (x, y)  # Triton's path got the tensors themselves


def test_the_fast_path_passes_each_tensor_as_its_own_address(fast):
    """Tensors at other positions of the same kernel (a None first, then a view at an offset),
    each passed as its own data pointer, in its own place; the rest as given."""
    k = FakeKernel()
    x, y = _tensors()
    L.launch(k, (2,), None, y, 64, 1e-5, MODE=1)
    L.launch(k, (2,), None, x, 64, 1e-5, MODE=1)
    assert k.log[1][0] == "fast" and k.log[1][1][9:11] == (None, x.data_ptr())
    L.launch(k, (2,), x, y, 64, 1e-5, MODE=1)  # a tensor where None was: Triton's path again
    a, b = torch.zeros(32), torch.zeros(48)[16:]  # b: 64 bytes into its storage, still aligned
    L.launch(k, (2,), b, a, 64, 1e-5, MODE=1)
    assert k.paths() == ["triton", "fast", "triton", "fast"]
    assert k.log[3][1][9:13] == (b.data_ptr(), a.data_ptr(), 64, 1e-5)
    assert b.data_ptr() == b.untyped_storage().data_ptr() + 64


@pytest.mark.parametrize("change", [
    "dtype", "unaligned pointer", "int not divisible by 16", "int equal to 1", "int past 32 bits",
    "constexpr keyword", "positional constexpr", "num_warps", "None for a tensor",
])
def test_anything_triton_specializes_on_takes_triton_s_path_again(fast, change):
    k = FakeKernel()
    x, y = _tensors()
    base = dict(args=[x, y, 64, 1e-5], kwargs=dict(MODE=2, num_warps=4))
    L.launch(k, (1,), *base["args"], **base["kwargs"])
    args, kwargs = list(base["args"]), dict(base["kwargs"])
    if change == "dtype":
        args[0] = x.half()
    elif change == "unaligned pointer":
        args[0] = torch.zeros(65)[1:]  # 4 bytes past a 16-byte boundary
    elif change == "int not divisible by 16":
        args[2] = 65
    elif change == "int equal to 1":
        args[2] = 1
    elif change == "int past 32 bits":
        args[2] = 2 ** 32
    elif change == "constexpr keyword":
        kwargs["MODE"] = 3
    elif change == "positional constexpr":
        L.launch(k, (1,), x, y, 64, 1e-5, 2, num_warps=4)  # MODE=2 positionally: its own entry
        L.launch(k, (1,), x, y, 64, 1e-5, 3, num_warps=4)
        assert k.paths() == ["triton", "triton", "triton"]
        return
    elif change == "num_warps":
        kwargs["num_warps"] = 8
    elif change == "None for a tensor":
        args[1] = None
    L.launch(k, (1,), *args, **kwargs)
    assert k.paths() == ["triton", "triton"], change
    L.launch(k, (1,), *args, **kwargs)  # the new specialization is kept in turn
    assert k.paths() == ["triton", "triton", "fast"]


def test_what_the_fast_path_does_not_know_takes_triton_s_path(fast, monkeypatch):
    k = FakeKernel()
    x, y = _tensors()
    for _ in range(2):
        L.launch(k, lambda meta: (meta["n"],), x, y, 64, 1e-5, MODE=2)  # a grid reading a positional argument
        L.launch(k, (1,), x, object(), 64, 1e-5, MODE=2)  # an argument of unknown type
    assert k.paths() == ["triton"] * 4
    monkeypatch.setattr(L, "_hooks_idle", lambda: False)  # a profiler's launch hook installed
    for _ in range(2):
        L.launch(k, (1,), x, y, 64, 1e-5, MODE=2)
    assert k.paths() == ["triton"] * 6


def test_off_or_interpreted_means_triton_s_path_every_time(fast, monkeypatch):
    k = FakeKernel()
    x, y = _tensors()
    with L.use_fast_launch(False):
        for _ in range(3):
            L.launch(k, (1,), x, y, 64, 1e-5, MODE=2)
    assert L.fast_launch_enabled()  # restored
    monkeypatch.setattr(L, "_INTERPRET", True)
    for _ in range(3):
        L.launch(k, (1,), x, y, 64, 1e-5, MODE=2)
    assert k.paths() == ["triton"] * 6


def test_a_launcher_that_refuses_the_arguments_sends_that_kernel_to_triton_s_path_for_good(fast):
    k = FakeKernel(fail=True)
    x, y = _tensors()
    L.launch(k, (1,), x, y, 64, 1e-5, MODE=2)
    with pytest.warns(UserWarning, match="fast launch of fake_kernel failed"):
        L.launch(k, (1,), x, y, 64, 1e-5, MODE=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        L.launch(k, (1,), x, y, 64, 1e-5, MODE=2)
    assert k.paths() == ["triton", "triton", "triton"]


def test_a_missing_parameter_is_an_error_not_a_guess(fast):
    k = FakeKernel()
    x, y = _tensors()
    with pytest.raises(TypeError, match="no value for parameter 'MODE'"):
        L.launch(k, (1,), x, y, 64, 1e-5)


def _bound(k, x, y):
    """A launcher's plan as attention's forward builds one: a Triton-path call, then a fast one
    after request_bind, bound with its two leading tensors."""
    L.launch(k, (3,), x, y, 64, 1e-5, MODE=2)
    L.request_bind()
    L.launch(k, (3,), x, y, 64, 1e-5, MODE=2)
    return L.bind_last((k, (x, y)))


def test_a_plan_relaunches_the_bound_call_with_new_leading_tensors(fast):
    k = FakeKernel()
    x, y = _tensors()
    i, bound = _bound(k, x, y)
    assert i == 0 and k.paths() == ["triton", "fast"]
    x2, y2 = _tensors()
    assert bound(x2, y2)
    _, args = k.log[-1]
    assert args == (3, 1, 1, 1234, "FUNCTION", "METADATA", None, None, None, x2.data_ptr(), y2.data_ptr(), 64, 1e-5,
                    2, 64)
    assert args[11:] == k.log[1][1][11:]  # all but the tensors as bound


def test_a_plan_launches_nothing_where_the_fast_path_would_not_be_taken(fast, monkeypatch):
    k = FakeKernel()
    x, y = _tensors()
    _, bound = _bound(k, x, y)
    launched = len(k.log)
    assert not bound(*_tensors(torch.float16))  # another dtype: another kernel
    assert not bound(x)  # not as many leading tensors as bound
    assert not bound(x[1:], y[1:])  # 4 bytes off: another alignment class
    with L.use_fast_launch(False):
        assert not bound(x, y)
    monkeypatch.setattr(L, "_driver", (lambda: 1, lambda device: 1234))  # another current device
    assert not bound(x, y)
    monkeypatch.setattr(L, "_driver", (lambda: 0, lambda device: 1234))
    monkeypatch.setattr(L, "_hooks_idle", lambda: False)  # a profiler's launch hook
    assert not bound(x, y)
    assert len(k.log) == launched


def test_bind_last_binds_only_what_it_is_told_was_launched(fast):
    k, other = FakeKernel(), FakeKernel()
    x, y = _tensors()
    L.launch(k, (3,), x, y, 64, 1e-5, MODE=2)
    L.launch(k, (3,), x, y, 64, 1e-5, MODE=2)  # a fast launch, but no request_bind before it
    assert L.bind_last((k, (x, y))) is None
    L.request_bind()
    L.launch(k, (3,), x, y, 64, 1e-5, MODE=2)
    assert L.bind_last((other, (x, y)), (k, (y, x))) is None  # another kernel; other tensors
    L.request_bind()
    L.launch(k, (3,), x, y, 64, 1e-5, MODE=2)
    assert L.bind_last((k, (x.view(64), y)))[0] == 0  # a view of the same memory, shape and strides
    L.request_bind()
    L.launch(k, (3,), x, y, 64, 1e-5, MODE=2)
    assert L.bind_last((k, (x[:32], y))) is None  # a different shape
    L.request_bind()
    L.launch(k, (3,), x, y, 64, 1e-5, MODE=2)
    assert L.bind_last((k, (x, y))) is not None and L.bind_last((k, (x, y))) is None  # forgotten once bound


def test_bind_last_refuses_tensors_among_the_bound_arguments(fast):
    k = FakeKernel()
    x, y = _tensors()
    L.launch(k, (3,), x, y, 64, 1e-5, MODE=2)
    L.request_bind()
    L.launch(k, (3,), x, y, 64, 1e-5, MODE=2)
    assert L.bind_last((k, (x,))) is None  # y would be bound for good
    L.request_bind()
    L.launch(k, (3,), x, _descriptor(y), 64, 1e-5, MODE=2)
    assert L.bind_last((k, (x,))) is None  # nor a descriptor of y


def _descriptor(t, box=(1, 16), padding="zero"):
    """A host TensorDescriptor over t (2-D view), as attention_hopper.host_descriptors makes them."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    t = t.view(4, -1)
    return TensorDescriptor(t, list(t.shape), list(t.stride()), list(box), padding)


def test_a_plan_over_host_descriptors_makes_new_ones_over_the_new_tensors(fast):
    """A launch that took a leading tensor through a host descriptor binds a DescriptorBound:
    each re-launch passes a new descriptor over the new tensor, with the bound one's shape,
    strides, box and padding (a descriptor holds its call's tensor: the bound one must never
    be passed again), and refuses a tensor of another shape or strides."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    k = FakeKernel()
    x, y = torch.zeros(4, 16), torch.zeros(64)
    L.launch(k, (3,), TensorDescriptor(x, [4, 16], [16, 1], [2, 16]), y, 64, 1e-5, MODE=2)  # Triton's path
    L.request_bind()
    first = TensorDescriptor(x, [4, 16], [16, 1], [2, 16])
    L.launch(k, (3,), first, y, 64, 1e-5, MODE=2)
    i, bound = L.bind_last((k, (x, y)))
    assert i == 0 and isinstance(bound, L.DescriptorBound)
    x2, y2 = torch.zeros(4, 16), torch.zeros(64)
    assert bound(x2, y2)
    assert k.paths() == ["triton", "fast", "fast"]
    _, args = k.log[-1]
    passed = args[9]
    assert passed is not first and passed.base is x2 and args[10] == y2.data_ptr()
    assert (passed.shape, passed.strides, passed.block_shape, passed.padding) == ([4, 16], [16, 1], [2, 16], "zero")
    assert not bound(torch.zeros(2, 32), y2)  # another shape
    assert not bound(torch.zeros(16, 4).t(), y2)  # the same shape, other strides
    assert k.paths() == ["triton", "fast", "fast"]  # neither launched


@pytest.mark.parametrize("change", [None, "dtype", "box", "padding", "another tensor, same kind"])
def test_host_descriptors_are_keyed_on_what_triton_specializes_them_on(fast, change):
    """A TensorDescriptor argument takes the fast path, keyed on its tensor's dtype, its box
    (Triton's "tensordesc<bf16[1, 16]>") and its padding; another tensor of the same kind, with
    other shape and strides (launch arguments to the launcher), reuses the kept kernel, and the
    descriptor itself is what the launcher gets."""
    k = FakeKernel()
    x, y = _tensors()
    L.launch(k, (1,), _descriptor(x), y, 64, 1e-5, MODE=2)
    other = {None: _descriptor(x), "dtype": _descriptor(x.half()), "box": _descriptor(x, box=(2, 16)),
             "padding": _descriptor(x, padding="nan"),
             "another tensor, same kind": _descriptor(torch.zeros(128), box=(1, 16))}[change]
    L.launch(k, (1,), other, y, 64, 1e-5, MODE=2)
    if change in (None, "another tensor, same kind"):
        assert k.paths() == ["triton", "fast"]
        assert k.log[1][1][9] is other
    else:
        assert k.paths() == ["triton", "triton"], change


# ----------------------------------------------------------------------------- triton 3.6's descriptor wrapper
# DescriptorBound's direct path (_TmaDirect): on triton 3.6 the launcher beneath the Python
# wrapper that expands host descriptors (wrap_handle_tensordesc's `inner`), called with the
# expansion done here and kept per data pointer. Below: a launcher shaped as 3.6's
# CudaLauncher (no scratch), whose `launch` is 3.6's own wrapper where triton 3.6 is installed
# (the GPU machines; torch 2.11 pins it), else a wrapper of the same shape made here, so that
# CI (a newer triton) checks the plumbing too.

_BASE_ARGS_FORMAT_LEN = 13  # read by the wrapper made here, through its globals, as 3.6's


def make_tensordesc_arg(arg, metadata):
    """The expansion of the wrapper made here: a token of what 3.6's encodes (its fill_tma_descriptor
    arguments), then shape and strides."""
    return [("MAP", arg.base.data_ptr(), metadata["block_size"], tuple(arg.shape), tuple(arg.strides)),
            *arg.shape, *arg.strides]


def _wrap_like_triton_3_6(launcher, tensordesc_indices, tensordesc_meta):
    def inner(*args):  # 3.6's wrapper, in outline: every kernel argument looked at, descriptors expanded
        final_args = list(args[:_BASE_ARGS_FORMAT_LEN])
        k = 0
        for i, arg in enumerate(args[_BASE_ARGS_FORMAT_LEN:]):
            if i in tensordesc_indices:
                final_args.extend(make_tensordesc_arg(arg, tensordesc_meta[k]))
                k += 1
            else:
                final_args.append(arg)
        return launcher(*final_args)

    return inner


class _Launcher36:
    """triton 3.6's CudaLauncher for a kernel without scratch: __call__ as 3.6's."""

    global_scratch_size = profile_scratch_size = 0
    launch_cooperative_grid, launch_pdl = False, True

    def __init__(self, launch):
        self.launch = launch

    def __call__(self, gx, gy, gz, stream, function, *args):
        self.launch(gx, gy, gz, stream, function, self.launch_cooperative_grid, self.launch_pdl, None, None, *args)


def _triton_36_wrapper(raw, fills, monkeypatch):
    """3.6's own wrap_handle_tensordesc over `raw`, its fill_tma_descriptor recording into fills
    and returning a token of its arguments; None on another triton."""
    import triton

    try:
        from triton.backends.nvidia import driver as nvidia
    except ImportError:
        return None
    if getattr(nvidia, "_BASE_ARGS_FORMAT_LEN", None) != 13 or not hasattr(nvidia, "wrap_handle_tensordesc"):
        return None

    class Utils:
        def fill_tma_descriptor(self, *args):
            fills.append(args)
            return ("MAP", args[0], tuple(args[4]), tuple(args[5]), tuple(args[6]))

    class Active:
        utils = Utils()

    monkeypatch.setattr(triton.runtime.driver, "_active", Active())  # restored after the test
    signature = {"X": "tensordesc<fp32[2, 16]>", "Y": "*fp32", "Z": "tensordesc<fp32[2, 16]>", "n": "i32"}
    meta = [dict(swizzle=64, elem_size=4, elem_type=7, block_size=[2, 16], fp4_padded=False)] * 2
    return nvidia.wrap_handle_tensordesc(raw, signature, meta)


@pytest.fixture(params=["triton 3.6's wrapper", "a wrapper shaped as 3.6's"])
def launcher36(request, fast, monkeypatch):
    """(a DescriptorBound over a kernel (X: descriptor, Y: pointer, Z: descriptor, n), the raw
    launcher's log, the encodings made) with either wrapper."""
    log, fills = [], []

    def raw(*args):
        log.append(args)

    if request.param == "triton 3.6's wrapper":
        inner = _triton_36_wrapper(raw, fills, monkeypatch)
        if inner is None:
            pytest.skip("triton 3.6 is not installed")
    else:
        meta = dict(swizzle=64, elem_size=4, elem_type=7, block_size=[2, 16], fp4_padded=False)
        saved = make_tensordesc_arg

        def recording(arg, metadata):
            fills.append(arg.base.data_ptr())
            return saved(arg, metadata)

        globals()["make_tensordesc_arg"] = recording
        inner = _wrap_like_triton_3_6(raw, {0, 2}, [meta, meta])
    compiled = FakeCompiled([])
    compiled.run = _Launcher36(inner)
    template = ([4, 16], [16, 1], [2, 16], "zero")
    bound = L.DescriptorBound((3, 1, 1), 0, compiled, (64,), ("TAIL",), ((torch.float32, 0),) * 3,
                              (template, None, template))
    yield bound, log, fills
    if request.param != "triton 3.6's wrapper":
        globals()["make_tensordesc_arg"] = saved


def test_direct_descriptor_launch_hands_the_launcher_what_the_wrapper_would(launcher36):
    """The direct path and the path through the wrapper give the raw launcher the same
    arguments; a repeated call with tensors at the same addresses encodes nothing, one at a
    new address encodes its descriptors once."""
    bound, log, fills = launcher36
    assert bound.direct is not None
    x, y, z = torch.zeros(4, 16), torch.zeros(64), torch.zeros(4, 16)
    assert bound(x, y, z)
    direct = log.pop()
    encoded = len(fills)
    assert encoded == 2
    saved, bound.direct = bound.direct, None
    assert bound(x, y, z)  # through the wrapper, as on triton 3.6 before
    assert log.pop() == direct
    bound.direct = saved
    fills.clear()
    assert bound(x, y, z) and log.pop() == direct and fills == []  # kept: nothing encoded again
    x2 = torch.zeros(4, 16)
    assert bound(x2, y, z) and len(fills) == 1
    again = log.pop()
    bound.direct = None
    assert bound(x2, y, z) and log.pop() == again
    assert not bound(torch.zeros(2, 32), y, z) and log == []  # another shape: refused, nothing launched


def test_direct_descriptor_launch_keeps_a_bounded_number_of_encodings(launcher36, monkeypatch):
    bound, log, fills = launcher36
    monkeypatch.setattr(L._TmaDirect, "KEEP", 3)
    y, z = torch.zeros(64), torch.zeros(4, 16)
    xs = [torch.zeros(4, 16) for _ in range(5)]
    for x in xs:
        assert bound(x, y, z)
    assert len(bound.direct.known[0]) <= 3 and len(bound.direct.known[2]) == 1


def test_direct_descriptor_launch_only_where_the_wrapper_is_as_expected(fast):
    """No direct path where the launcher is not triton 3.6's (triton 3.9 expands descriptors in
    C++; the stand-in drivers of the tests have no wrapper), where it would allocate scratch, where
    a descriptor has no metadata (the frontend decomposed it), or where the kernel takes a
    descriptor the bound call's leading tensors do not give."""
    meta = dict(swizzle=64, elem_size=4, elem_type=7, block_size=[2, 16], fp4_padded=False)
    template = ([4, 16], [16, 1], [2, 16], "zero")
    templates = (template, None, template)

    def direct(indices=(0, 2), metas=(meta, meta), scratch=0, templates=templates):
        compiled = FakeCompiled([])
        compiled.run = _Launcher36(_wrap_like_triton_3_6(lambda *a: None, set(indices), list(metas)))
        compiled.run.global_scratch_size = scratch
        return L._TmaDirect.of(compiled, templates)

    assert direct() is not None
    assert direct(scratch=128) is None
    assert direct(metas=(meta, None)) is None
    assert direct(indices=(0, 2, 3), metas=(meta, meta, meta)) is None
    assert direct(templates=(template, None, None)) is None
    assert L._TmaDirect.of(FakeCompiled([]), templates) is None  # a launcher without the wrapper


def test_a_launch_site_through_its_table(fast):
    """PlanTable.launch, as the backward launchers call it per site: the full launch (Triton's
    path, then the fast one, which it binds), then the plan; no key or plans off: the full
    launch every time."""
    k = FakeKernel()
    table = L.plan_table()
    x, y = _tensors()

    def site(key, x, y):
        table.launch(key, ((k, (x, y)),), lambda: L.launch(k, (3,), x, y, 64, 1e-5, MODE=2))

    for _ in range(3):
        site("key", x, y)
    assert k.paths() == ["triton", "fast", "fast"] and list(table) == ["key"]
    x2, y2 = _tensors()
    site("key", x2, y2)
    assert k.log[-1][1][9:11] == (x2.data_ptr(), y2.data_ptr()) and k.log[-1][1][11:] == k.log[1][1][11:]
    site(None, x, y)
    with L.use_fast_launch(False):
        site("key", x, y)
    assert k.paths()[-2:] == ["fast", "triton"] and list(table) == ["key"]
    launched = len(k.log)
    site("key", *_tensors(torch.float16))  # refused by the plan: the full launch, not kept again
    assert k.paths()[launched:] == ["triton"] and list(table) == ["key"]


def test_clear_empties_the_plan_tables_and_a_full_one_starts_over(fast, monkeypatch):
    table = L.plan_table()
    table["key"] = "plan"
    L.clear()
    assert table == {}
    monkeypatch.setattr(table, "LIMIT", 3)
    for i in range(4):
        table[i] = i
    assert table == {3: 3}


def test_real_triton_parameters_hooks_and_environment(tmp_path):
    """Against the installed triton, outside the interpreter (a subprocess: this one has
    TRITON_INTERPRET set): which parameters are constexprs, the tail of defaults, the hook test
    on triton's own knobs, and FUSEFORMER_FAST_LAUNCH read at import (on when unset, off for
    0/false/no/off)."""
    code = r'''
import triton, triton.language as tl
from triton import knobs
from fuseformer.kernels import launch as L

@triton.jit
def k(x_ptr, n, eps, MODE: tl.constexpr, BLOCK: tl.constexpr = 128):
    pass

assert L._is_jit(k), type(k)
assert L._constexprs_at(k) == (3, 4), L._constexprs_at(k)
assert L._tail(k, 3, {"MODE": 7, "num_warps": 4}) == (7, 128)
assert L._hooks_idle()
hook = lambda metadata: None
chain = knobs.runtime.launch_enter_hook
if chain is None:
    knobs.runtime.launch_enter_hook = hook
else:
    chain.add(hook)
assert not L._hooks_idle()
import os
assert L.fast_launch_enabled() == (os.environ.get("EXPECT") == "on"), os.environ.get("FUSEFORMER_FAST_LAUNCH")
print("OK")
'''
    script = tmp_path / "real_triton.py"  # @triton.jit needs its source in a file
    script.write_text(code)
    for value, expect in ((None, "on"), ("1", "on"), (" Off ", "off"), ("0", "off")):
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSEFORMER_FAST_LAUNCH")}
        env["EXPECT"] = expect
        if value is not None:
            env["FUSEFORMER_FAST_LAUNCH"] = value
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
        assert result.returncode == 0 and "OK" in result.stdout, (value, result.stdout + result.stderr)


@pytest.mark.gpu
@pytest.mark.parametrize("attention_kernel", ["auto", "hopper"])
def test_gpu_fast_launch_gives_the_same_bits_as_triton_s_launch(attention_kernel):
    """On a GPU the fast path launches the very kernels Triton's path compiled: forward and
    backward of every op, three times (the second call is the fast one, which binds each
    launch site's plan; the third re-launches by those plans), equal bit for bit to the same
    calls on Triton's path, with the fast path and the plans taken. The attention runs its
    default kernels, then the Hopper ones (forward and both backward passes; on another GPU
    the switch falls back to the portable kernels)."""
    import importlib

    from fuseformer import kernels as K

    A = importlib.import_module("fuseformer.kernels.attention")

    def run():
        torch.manual_seed(0)
        x = torch.randn(100, 96, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        r = torch.randn(100, 96, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(96, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        fc = torch.randn(160, 96, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        q = torch.randn(2, 3, 70, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        pad = torch.ones(2, 1, 1, 70, dtype=torch.bool, device="cuda")
        pad[1, ..., 50:] = False
        outs = []
        for _ in range(3):
            y = K.add_layer_norm(x, r, w, w, backend="triton")
            h = K.linear_gelu(y, fc, None, backend="triton")
            a = K.scaled_dot_product_attention(q, q, q, attn_mask=pad, backend="triton")
            loss = y.float().sum() + h.float().sum() + a.float().sum()
            outs += [y, h, a, *torch.autograd.grad(loss, (x, w, fc, q))]
        return outs

    with A.variant(kernel=attention_kernel):
        with L.use_fast_launch(False):
            slow = run()
        L.clear()
        with L.use_fast_launch(True):
            fast = run()
    assert L._kernels, "no kernel was kept: the fast path never ran"
    assert not L._refused, f"the fast launch failed for {L._refused}"
    for op, tables in (("attention_launchers", ("_fwd_plans", "_bwd_plans")),
                       ("add_layer_norm", ("_fwd_plans", "_bwd_plans")), ("reduce", ("_plans",)),
                       ("linear_gelu", ("_fwd_plans", "_dgelu_plans"))):
        for table in tables:
            assert getattr(importlib.import_module(f"fuseformer.kernels.{op}"), table), f"{op}.{table}: no plan bound"
    for a, b in zip(slow, fast):
        assert torch.equal(a, b)


def test_a_grid_function_of_the_meta_parameters_is_evaluated_on_them(fast):
    k = FakeKernel()
    x, y = _tensors()
    for block in (16, 16, 32):
        L.launch(k, lambda meta: (10 // meta["BLOCK"] + 1, 3), x, y, 64, 1e-5, MODE=2, BLOCK=block)
    assert k.paths() == ["triton", "fast", "triton"]  # BLOCK=32: another constexpr, another kernel
    assert k.log[0][1].__class__.__name__ == "function"  # Triton's path got the grid function itself
    assert k.log[1][1][:3] == (1, 3, 1)  # 10 // 16 + 1 programs, 3, and the padded third axis
