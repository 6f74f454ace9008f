"""Launching our Triton kernels with less host time per call (the default since 2026-11-26;
FUSEFORMER_FAST_LAUNCH=0 or set_fast_launch(False) gives every launch Triton's own path).

Why: on the H100 machine (bench/results/h100/, 2026-11-26) Triton's own `kernel[grid](...)`
took 19.7 µs of host time for the add+LN kernel, against 6.7 µs for a torch add, and an eager
BERT forward makes ~50 such launches. JITFunction.run does per call what is the same on every
call of ours: read its knobs, bind and specialize every argument, build a cache key string from
that, check the kernel's globals, build launch metadata for the launch hooks (a dict even when
no hook is installed, on triton 3.6) and call the hook chains.

What this does instead: the first call for a (kernel, specialization) goes through Triton as
usual and keeps the CompiledKernel it returns; later calls hand the arguments straight to that
kernel's launcher, the same call JITFunction.run ends with (triton 3.6 and 3.9 alike:
`kernel.run(grid0, grid1, grid2, stream, function, packed_metadata, launch_metadata,
enter_hook, exit_hook, *every argument in signature order)`), with no metadata and no hooks.

Correctness rests on the key: it must tell apart every call Triton would compile differently.
It holds the kernel, the current device, num_warps/num_stages, every keyword argument (the
constexprs), the value of every constexpr passed positionally, and, per positional argument: for a tensor its dtype and whether its data pointer
is 16-byte aligned (Triton's alignment specialization), for an int whether it is 1, whether it
is divisible by 16 and which integer type holds it (Triton's integer specializations), for a
float or bool its type, None as None. That is at least as fine as Triton's own key, so a kept
kernel is only reused where Triton would pick the same one. A grid function is evaluated on
the keyword arguments (ours read BLOCK_M or BLOCK_N there). A triton.heuristics wrapper's
values are computed from the arguments, as Heuristics.run does, and its kernel launched.
Host tensor descriptors (triton.tools.tensor_descriptor.TensorDescriptor) are keyed on what
Triton specializes them on (dtype and block shape) and handed to the launcher as they are: it
encodes each into a CUtensorMap per launch on both paths (except a launch plan's re-launch on
triton 3.6, which expands them itself and keeps the encodings: DescriptorBound). Anything else
(a grid function that reads other arguments, an installed launch hook, the interpreter) takes
Triton's path.

Tensors reach the launcher as their data pointers (ints), not as tensors. Given a tensor,
Triton's launcher (its C code, triton 3.6 and 3.9 alike: getPointer / extractPointer) calls
its data_ptr() and then asks the driver about that address (cuPointerGetAttribute,
CU_POINTER_ATTRIBUTE_DEVICE_POINTER), once per tensor per launch, to refuse host memory with
"cannot be accessed from Triton (cpu tensor?)"; given an int, it takes it as the device
pointer with no driver call. Our public ops check every tensor's device before launching, and
on a CUDA device (unified addressing) the device pointer of a CUDA tensor is its data_ptr(),
so the driver's answer is known: asking it costs a driver call per tensor (attention's portable
forward passes 9 tensors, its backward 29 over three kernels) on the host time this module
exists to cut. The fast path reads each tensor's data_ptr() anyway (for the alignment in the
key); which positions hold tensors is fixed by the key and kept with the kernel. The driver
call is a GPU machine's cost: the stand-in driver's host timings on a CPU cannot show it, and
no GPU has timed the change yet.

Why it is the default: on the H200 (bench/results/h200/2026-11-27-a3eeca9/) the models suite's eager
cases ran 1.41x faster (geomean) than on Triton's own launch path, and the overhead group's
add+LN forward took 24.1 µs of host time against 40.2 (attention with a padding mask 50.4
against 87.4). It was made the default before any GPU had timed it, on two measurements
without one:
- Same launches: every launcher of ours, run through Triton's real JIT path with a stand-in
  driver (tests/offline_launch_check.py, in CI), hands each kernel's launcher the same grid,
  stream, function, metadata and arguments (a tensor's address where Triton's path hands the
  tensor) on the fast path as on Triton's, under triton 3.6 and 3.9; the launcher (Triton's C
  code) then makes the same driver launch on both paths, and it skips the hooks only where it
  gets None for them, as it does when none is set.
- Less host time: the same calls through Triton's launch path on this project's CPU (the
  overhead group's second table on a CPU), host µs per call, Triton's path -> fast launch:
  attention forward with a padding mask 77.9 -> 58.7, add+LN forward 30.8 -> 21.5,
  Linear+GELU forward 56.8 -> 30.8, their forward+backward 292 -> 213, 178 -> 146, 212 -> 156.
On a GPU `fuseformer bench --filter overhead` times both paths and the models suite times
the eager model on Triton's path too (fuseformer-fused-triton-launch); the gpu test
test_gpu_fast_launch_gives_the_same_bits_as_triton_s_launch compares their outputs bit for bit.
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

from . import backends


# On unless FUSEFORMER_FAST_LAUNCH says off (0, false, no, off); read once at import,
# set_fast_launch changes it.
_ENABLED = os.environ.get("FUSEFORMER_FAST_LAUNCH", "").strip().lower() not in ("0", "false", "no", "off", "n")
_INTERPRET = backends.interpreting()  # read at import, as Triton reads it when a kernel is decorated

# Kernels are keyed by id(): a JITFunction's own __hash__ takes a lock and reads a property
# (about a microsecond here), and a launch looks a kernel up three times. Every entry keeps the
# kernel object too and a hit checks it is the same one, so an id that a freed kernel's
# successor reuses never matches.
# (id(kernel), device, options, constexprs, argument specializations) -> (CompiledKernel, tail,
# kernel, tensor positions): `tail` holds the values of the parameters after the positional ones,
# in signature order; the positions, which positional arguments are tensors (passed as pointers).
_kernels: dict[tuple, tuple] = {}
# Kernels whose fast launch raised once, id -> kernel: they take Triton's path from then on.
_refused: dict = {}
_driver = None  # (get_current_device, get_current_stream), resolved at the first fast launch


def fast_launch_enabled() -> bool:
    return _ENABLED


def set_fast_launch(enabled: bool) -> bool:
    """Turn the fast launch path on or off for the process; returns the previous setting."""
    global _ENABLED
    previous, _ENABLED = _ENABLED, bool(enabled)
    return previous


@contextlib.contextmanager
def use_fast_launch(enabled: bool = True):
    previous = set_fast_launch(enabled)
    try:
        yield
    finally:
        set_fast_launch(previous)


_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter


def _spec(args, pointers):
    """What Triton specializes the positional arguments on (or finer), one entry each; None
    when an argument is of a type the fast path does not know. Written for speed (attention
    passes ~30 arguments: a generic isinstance chain cost ~17 µs here, this ~3): dispatch on
    the exact class first, ints (strides, sizes) being most of them.
      int     -1 for the value 1; else its residue mod 16 (0: divisible by 16), plus 16 past
              32 bits and 32 past 64 (Triton's i32 / i64 / u64)
      float   -2;  bool -3 (neither is specialized on its value);  None  None
      tensor  two entries: its dtype, then its data pointer's residue mod 16 (0: aligned); a
              dtype only ever comes from a tensor, so the flat sequence still reads one way
      host TensorDescriptor  one entry, a tuple: its tensor's dtype, its block shape and its
              padding (Triton 3.6 and 3.9 specialize one on the first two alone,
              "tensordesc<bf16[1, 1, 128, 64]>"; its base, shape and strides are launch
              arguments, which the kernel's launcher turns into a CUtensorMap each launch)
    `pointers` gets each tensor's data pointer, in order: the fast launch passes those (the
    module docstring says why)."""
    out = []
    add = out.append
    for a in args:
        c = a.__class__
        if c is int:
            if a == 1:
                add(-1)
            elif -0x80000000 <= a <= 0x7FFFFFFF:
                add(a & 15)
            else:
                add((16 if -0x8000000000000000 <= a <= 0x7FFFFFFFFFFFFFFF else 32) + (a & 15))
        elif c is _Tensor or c is _Parameter or (c is not float and c is not bool and isinstance(a, _Tensor)):
            p = a.data_ptr()
            add(a.dtype)
            add(p & 15)
            pointers.append(p)
        elif c is float:
            add(-2)
        elif a is None:
            add(None)
        elif c is bool:
            add(-3)
        elif c is _descriptor_class():
            add((a.base.dtype, tuple(a.block_shape), a.padding))
        else:
            return None
    return tuple(out)


_DESCRIPTOR = []  # [triton.tools.tensor_descriptor.TensorDescriptor], imported on first need


def _descriptor_class():
    if not _DESCRIPTOR:
        from triton.tools.tensor_descriptor import TensorDescriptor

        _DESCRIPTOR.append(TensorDescriptor)
    return _DESCRIPTOR[0]


def new_descriptor(base, shape, strides, block_shape, padding="zero"):
    """A host TensorDescriptor over `base`, filled in directly: its constructor re-validates
    what the caller has checked already (16-byte base and strides, unit last stride), ~3 µs a
    descriptor. The lists are copied: a launcher may re-fit a descriptor's box later."""
    desc = object.__new__(_descriptor_class())
    desc.base, desc.shape, desc.strides, desc.block_shape, desc.padding = (
        base, list(shape), list(strides), list(block_shape), padding)
    return desc


_runtime_knobs = None  # triton.knobs.runtime, imported at the first call of _hooks_idle


def _hooks_idle() -> bool:
    """No launch hook is installed (a profiler such as proton installs one): the hooks and
    their metadata can be skipped."""
    global _runtime_knobs
    if _runtime_knobs is None:
        from triton import knobs

        _runtime_knobs = knobs.runtime
    for hook in (_runtime_knobs.launch_enter_hook, _runtime_knobs.launch_exit_hook):
        # None (older releases) or an empty HookChain (3.6+) calls nothing.
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


def _is_jit(fn) -> bool:
    from triton.runtime.jit import JITFunction

    return isinstance(fn, JITFunction)


def _tail(fn, n_positional: int, kwargs: dict) -> tuple:
    """The values of `fn`'s parameters after the first n_positional, as JITFunction's binder
    fills them: the keyword arguments given, else each parameter's default."""
    values = []
    for param in fn.params[n_positional:]:
        if param.name in kwargs:
            values.append(kwargs[param.name])
        elif param.has_default:
            values.append(param.default)
        else:
            raise TypeError(f"{fn.__name__}: no value for parameter {param.name!r}")
    return tuple(values)


_constexpr_positions: dict = {}  # id(kernel) -> (kernel, positions)


def _constexprs_at(fn):
    """Positions of fn's constexpr parameters (their values, not their kinds, pick a compiled
    kernel when passed positionally); None for anything but a plain JITFunction."""
    entry = _constexpr_positions.get(id(fn))
    if entry is not None and entry[0] is fn:
        return entry[1]
    positions = tuple(i for i, p in enumerate(fn.params) if p.is_constexpr) if _is_jit(fn) else None
    _constexpr_positions[id(fn)] = (fn, positions)
    return positions


def _without_heuristics(fn, args, kwargs):
    """(the kernel beneath, kwargs with each heuristic's value) for a triton.heuristics
    wrapper, as Heuristics.run computes them from the named arguments; else (fn, kwargs)."""
    from triton.runtime.autotuner import Heuristics

    while fn.__class__ is Heuristics:
        named = dict(zip(fn.arg_names, args), **kwargs)
        kwargs = {**kwargs, **{name: heuristic(named) for name, heuristic in fn.values.items()}}
        fn = fn.fn
    return fn, kwargs


def launch(fn, grid, *args, **kwargs) -> None:
    """fn[grid](*args, **kwargs), on the fast path when it is on and the call allows it."""
    if not _ENABLED or _INTERPRET or _refused.get(id(fn)) is fn:
        fn[grid](*args, **kwargs)
        return
    given = fn
    constexprs = _constexprs_at(fn)
    if constexprs is None:  # not a plain JITFunction: a triton.heuristics wrapper, say
        fn, kwargs = _without_heuristics(fn, args, kwargs)
        constexprs = _constexprs_at(fn)
    dims = grid
    if callable(grid):
        # Ours read only meta-parameters given as keywords (BLOCK_M from the tuned config):
        # evaluated on those here; one that reads anything else takes Triton's path.
        try:
            dims = grid(kwargs)
        except KeyError:
            fn[grid](*args, **kwargs)
            return
    if not isinstance(dims, tuple):
        fn[grid](*args, **kwargs)
        return
    pointers = []
    spec = _spec(args, pointers)
    if constexprs is None or spec is None or not _hooks_idle():
        fn[grid](*args, **kwargs)
        return
    if constexprs:
        spec += tuple(args[i] for i in constexprs if i < len(args))
    global _driver
    if _driver is None:
        from triton.runtime import driver

        _driver = (driver.active.get_current_device, driver.active.get_current_stream)
    device = _driver[0]()
    key = (id(fn), device, tuple(kwargs.items()), spec)
    entry = _kernels.get(key)
    if entry is None or entry[2] is not fn:
        # Triton's own path: compiles (or finds) the kernel for this specialization, launches
        # it, and returns it.
        compiled = fn[grid](*args, **kwargs)
        if compiled is not None:
            tensors_at = tuple(i for i, a in enumerate(args) if isinstance(a, _Tensor))
            _kernels[key] = (compiled, _tail(fn, len(args), kwargs), fn, tensors_at)
        return
    compiled, tail, _, tensors_at = entry
    grid_1 = dims[1] if len(dims) > 1 else 1
    grid_2 = dims[2] if len(dims) > 2 else 1
    passed = list(args)
    for i, p in zip(tensors_at, pointers):  # the key pins which positions hold tensors
        passed[i] = p
    try:
        compiled.run(dims[0], grid_1, grid_2, _driver[1](device), compiled.function, compiled.packed_metadata, None,
                     None, None, *passed, *tail)
    except Exception as err:  # noqa: BLE001 - the launcher refused the arguments before launching
        _refused.update({id(fn): fn, id(given): given})
        warnings.warn(f"fuseformer: the fast launch of {getattr(fn, '__name__', fn)} failed ({err}); it takes "
                      "Triton's launch path from now on", stacklevel=2)
        fn[grid](*args, **kwargs)
        return
    if _bind_requested:
        global _last
        _last = (fn, (dims[0], grid_1, grid_2), device, compiled, args, tail)


# ----------------------------------------------------------------------------- launch plans
#
# A launcher that makes the same launch again and again for one shape (attention's forward:
# ~35 arguments derived from shapes, strides and flags) can keep it whole: `bind_last` turns
# the fast launch just made into a Bound, which re-launches the same kernel, grid and trailing
# arguments with new leading tensors (the call's inputs and fresh outputs). The launcher keys
# its plans on everything the trailing arguments derive from; a Bound itself refuses (returns
# False, launching nothing) whenever the fast path would not be taken as it was: the fast
# launch off, a launch hook installed, another current device, or a tensor whose dtype or
# 16-byte alignment class differs from the bound call's (Triton specializes on both). A launch
# through host TMA descriptors binds a DescriptorBound, which makes new descriptors over each
# call's tensors (a descriptor holds its call's tensor, so the bound one is never passed again).

# (kernel, grid dims, device, CompiledKernel, args, tail) of the latest fast launch, kept only
# between request_bind() and bind_last(), so that no call's tensors outlive it here.
_last = None
_bind_requested = False
_plan_tables: list = []  # launchers' plan dicts, emptied by clear()


class Bound:
    __slots__ = ("dims", "device", "compiled", "rest", "tail", "classes")

    def __init__(self, dims, device, compiled, rest, tail, classes):
        self.dims, self.device, self.compiled, self.rest, self.tail = dims, device, compiled, rest, tail
        self.classes = classes

    def __call__(self, *leading) -> bool:
        return self._launch(leading, None)

    def _checked(self, leading):
        """(the leading tensors' data pointers, the current device), or None where the fast
        path would not be taken as for the bound call: the fast launch off, a hook installed,
        a tensor of another dtype or 16-byte alignment class, another current device."""
        if not _ENABLED or len(leading) != len(self.classes) or not _hooks_idle():
            return None
        pointers = []
        for t, (dtype, residue) in zip(leading, self.classes):
            p = t.data_ptr()
            if t.dtype is not dtype or p & 15 != residue:
                return None
            pointers.append(p)
        device = _driver[0]()
        return None if device != self.device else (pointers, device)

    def _launch(self, leading, described) -> bool:
        """Launch with the leading tensors after checking them (_checked): each passed as its
        data pointer (as the fast launch passes tensors), or as its host descriptor where
        `described` has one."""
        checked = self._checked(leading)
        if checked is None:
            return False
        passed, device = checked
        if described is not None:
            passed = [p if d is None else d for p, d in zip(passed, described)]
        c = self.compiled
        d = self.dims
        c.run(d[0], d[1], d[2], _driver[1](device), c.function, c.packed_metadata, None, None, None, *passed,
              *self.rest, *self.tail)
        return True


class DescriptorBound(Bound):
    """A Bound whose launch took some leading tensors through host TMA descriptors
    (triton.tools.tensor_descriptor.TensorDescriptor): a descriptor holds its call's tensor, so
    each re-launch makes new ones over the new tensors, with the bound ones' shape, strides,
    box and padding. `templates`: per leading position, None (the tensor itself) or (shape,
    strides, block_shape, padding). It refuses a tensor of another shape or strides there
    (the launcher's key pins them; checked all the same: a descriptor of the wrong extent
    would read out of bounds).

    On triton 3.6 (what torch 2.11 pins) the launcher takes descriptors through a Python
    wrapper (wrap_handle_tensordesc's `inner`): per launch it walks every argument in Python
    and encodes each descriptor into a CUtensorMap again (fill_tma_descriptor), ~6.5 µs of
    host time for attention's forward on this project's CPU before any encoding. Where that
    wrapper is found (_TmaDirect), a re-launch hands the launcher beneath it the expanded
    arguments itself: only the leading positions are expanded (the bound trailing arguments
    hold no descriptor), each descriptor by the wrapper's own make_tensordesc_arg, and its
    expansion (the CUtensorMap, shape and strides) is kept per data pointer, which a
    descriptor's template and the kernel's metadata then determine wholly; steady-state calls,
    whose tensors the caching allocator hands the same addresses, encode nothing. Triton 3.9
    expands in C++: no wrapper to skip there."""

    __slots__ = ("templates", "direct")

    def __init__(self, dims, device, compiled, rest, tail, classes, templates):
        super().__init__(dims, device, compiled, rest, tail, classes)
        self.templates = templates
        self.direct = _TmaDirect.of(compiled, templates)

    def __call__(self, *leading) -> bool:
        if len(leading) != len(self.templates):
            return False
        for t, template in zip(leading, self.templates):
            if template is not None and (list(t.shape) != template[0] or list(t.stride()) != template[1]):
                return False
        if self.direct is not None:
            return self._launch_direct(leading)
        described = [None if template is None else new_descriptor(t, *template)  # checks held for the bound call
                     for t, template in zip(leading, self.templates)]
        return self._launch(leading, described)

    def _launch_direct(self, leading) -> bool:
        """_launch, with the launcher's descriptor wrapper done here (the class docstring)."""
        checked = self._checked(leading)
        if checked is None:
            return False
        pointers, device = checked
        direct = self.direct
        expanded = []
        for i, (t, p, template) in enumerate(zip(leading, pointers, self.templates)):
            if template is None:
                expanded.append(p)
            else:
                parts = direct.known[i].get(p)
                if parts is None:
                    parts = direct.expand(i, t, template)
                expanded.extend(parts)
        c = self.compiled
        d = self.dims
        direct.launcher(d[0], d[1], d[2], _driver[1](device), c.function, direct.cooperative, direct.pdl, None, None,
                        c.packed_metadata, None, None, None, *expanded, *self.rest, *self.tail)
        return True


class _TmaDirect:
    """What DescriptorBound needs to call a triton 3.6 launcher beneath its descriptor wrapper:
    the C launcher, the launch flags CudaLauncher.__call__ passes, the wrapper's
    make_tensordesc_arg and the descriptor metadata of each leading position, and per position
    the expansions made so far, by data pointer (at most KEEP each)."""

    KEEP = 64
    __slots__ = ("launcher", "cooperative", "pdl", "make", "metas", "known")

    @classmethod
    def of(cls, compiled, templates):
        """A _TmaDirect for `compiled`, or None where its launcher is not triton 3.6's
        CudaLauncher with that wrapper exactly as expected (then the launch goes through it)."""
        run = getattr(compiled, "run", None)
        inner = getattr(run, "launch", None)
        code = getattr(inner, "__code__", None)
        if code is None or code.co_freevars != ("launcher", "tensordesc_indices", "tensordesc_meta"):
            return None
        cells = dict(zip(code.co_freevars, (c.cell_contents for c in inner.__closure__)))
        glob = inner.__globals__
        make, base = glob.get("make_tensordesc_arg"), glob.get("_BASE_ARGS_FORMAT_LEN")
        indices, metas = sorted(cells["tensordesc_indices"]), cells["tensordesc_meta"]
        described = [i for i, template in enumerate(templates) if template is not None]
        # 13 leading launcher arguments (grid, stream, function, flags, scratch, metadata,
        # hooks); no scratch to allocate (CudaLauncher.__call__ would); the descriptors among
        # the leading positions are exactly the kernel's, each with its metadata.
        if (make is None or base != 13 or getattr(run, "global_scratch_size", 1)
                or getattr(run, "profile_scratch_size", 1) or indices != described
                or not metas or len(metas) != len(indices) or any(m is None for m in metas)):
            return None
        self = object.__new__(cls)
        self.launcher, self.make = cells["launcher"], make
        self.cooperative, self.pdl = run.launch_cooperative_grid, run.launch_pdl
        by_position = dict(zip(indices, metas))
        self.metas = tuple(by_position.get(i) for i in range(len(templates)))
        self.known = tuple({} if t is not None else None for t in templates)
        return self

    def expand(self, i, t, template):
        """The wrapper's expansion of a descriptor of `t` at leading position i (CUtensorMap,
        shape, strides), kept under t's data pointer."""
        parts = self.make(new_descriptor(t, *template), self.metas[i])
        known = self.known[i]
        if len(known) >= self.KEEP:
            known.clear()
        known[t.data_ptr()] = parts
        return parts


def _same_tensor(a, b) -> bool:
    return a is b or (isinstance(a, _Tensor) and isinstance(b, _Tensor) and a.dtype == b.dtype
                      and a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride())


def _same_or_described(a, b) -> bool:
    """a is b's tensor (_same_tensor), or a host descriptor of it."""
    return _same_tensor(a, b) or (a.__class__ is _descriptor_class() and _same_tensor(a.base, b))


def request_bind() -> None:
    """Keep the next fast launch for bind_last (a launcher about to build a plan)."""
    global _bind_requested, _last
    _bind_requested, _last = True, None


def bind_last(*candidates):
    """(i, Bound) for the fast launch made since request_bind(), if it launched the i-th
    candidate's kernel with its leading tensors (the same tensors, views of the same memory,
    shape and strides, or host descriptors of them: a DescriptorBound then) first and nothing
    but non-tensors after them (no tensor descriptor either: it holds a call's tensor); else
    None. candidates: (kernel, leading tensors) pairs. Forgets that launch either way."""
    global _bind_requested, _last
    last, _last, _bind_requested = _last, None, False
    if last is None:
        return None
    fn, dims, device, compiled, args, tail = last
    for i, (kernel, leading) in enumerate(candidates):
        n = len(leading)
        if (kernel is fn and len(args) >= n and all(_same_or_described(a, b) for a, b in zip(args, leading))
                and not any(isinstance(a, (_Tensor, _descriptor_class())) for a in args[n:])):
            classes = tuple((t.dtype, t.data_ptr() & 15) for t in leading)
            templates = tuple((list(a.shape), list(a.strides), list(a.block_shape), a.padding)
                              if a.__class__ is _descriptor_class() else None for a in args[:n])
            if any(templates):
                return i, DescriptorBound(dims, device, compiled, args[n:], tail, classes, templates)
            return i, Bound(dims, device, compiled, args[n:], tail, classes)
    return None


class PlanTable(dict):
    """A launcher's plans: key -> (candidate index, Bound). A launcher calls, per launch site,
    with its key (None where it keeps no plan; it builds one only when `active()`) and its
    candidates ((kernel, leading tensors) pairs, one per kernel the launch may take):
        table.launch(key, candidates, full)
    where `full` makes the launch as without plans (so with a plan, the arguments it derives
    are never built): run(key, candidates), else full() and keep(key, candidates).
    Plans are keyed by exact shapes: a workload whose shapes keep changing (growing sequence
    lengths) would add one per call, so past LIMIT the table starts over (a plan is rebuilt by
    the next fast launch of its shape). `enabled` False turns this table's plans off (tests
    that count the launches through a launcher)."""

    LIMIT = 4096
    enabled = True

    def __setitem__(self, key, value):
        if len(self) >= self.LIMIT:
            self.clear()
        super().__setitem__(key, value)

    def active(self) -> bool:
        """Plans only ride on the fast launch (so never under the interpreter)."""
        return self.enabled and _ENABLED and not _INTERPRET

    def run(self, key, candidates) -> bool:
        """Re-launch the plan kept under `key` with its candidate's leading tensors; False
        when it refuses (nothing launched) or there is none (then the launch that follows is
        kept for `keep`)."""
        plan = self.get(key)
        if plan is None:
            request_bind()
            return False
        i, bound = plan
        return bound(*candidates[i][1])

    def keep(self, key, candidates) -> None:
        """After the full launch of a key `run` found no plan for: bind that launch."""
        if key not in self:
            plan = bind_last(*candidates)
            if plan is not None:
                self[key] = plan

    def launch(self, key, candidates, full) -> None:
        """One launch site through this table: the plan kept under `key` re-launched, or else
        `full()`, the launch as the launcher makes it without plans, kept for the next call.
        key None (a call the launcher keeps no plan for) or plans off: `full()` alone."""
        # active() and run() written out: this is every planned launch's path (~0.3 µs less).
        if key is None or not (self.enabled and _ENABLED and not _INTERPRET):
            full()
            return
        plan = self.get(key)
        if plan is not None:
            if plan[1](*candidates[plan[0]][1]):
                return
            full()  # refused: launched as without plans, and the plan stays for the next call
            return
        request_bind()
        full()
        self.keep(key, candidates)


def plan_table() -> PlanTable:
    """A table for a launcher's plans, emptied with the kept kernels by clear()."""
    table = PlanTable()
    _plan_tables.append(table)
    return table


def clear() -> None:
    """Forget every kept kernel and plan (tests)."""
    global _last, _bind_requested
    _last, _bind_requested = None, False
    _kernels.clear()
    _refused.clear()
    _constexpr_positions.clear()
    for table in _plan_tables:
        table.clear()
