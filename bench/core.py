"""What a benchmark case is. Case files (ops.py, model_cases.py) only declare cases with these
classes; runner.py executes every case the same way: parity first, then timing.

A case is prepared once per run into a `Prepared`: one zero-argument callable per
implementation that can run here (the runner times those), the implementations that refused
the case and why, and the parity verdict of each checked implementation against the float64
reference (computed on the same call that proved the implementation runs).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
import warnings
from typing import Any, Callable

import torch

from fuseformer.kernels.parity import Parity, parity

OURS = "ours"
BASELINE = "baseline"


class Refused(Exception):
    """An implementation declines this case (a backend without a kernel for it, an SDPA
    backend that does not take a mask, ...). Reported as refused, never as an error."""


class CaseUnavailable(Exception):
    """What the case measures does not exist here (a model not written yet, transformers
    not installed): the case is reported as skipped, with this reason."""


@dataclasses.dataclass
class Impl:
    """One way to compute a case.

    fn(inputs) -> output (a tensor or a tuple of tensors). `build`, when given, turns fn into
    the callable to time once per run (torch.compile does its work there); `available()`
    returns None or why this implementation cannot run in this process at all.
    """

    name: str
    fn: Callable[[dict], Any]
    kind: str = BASELINE
    check: bool = True  # compare its output with the reference (False: a different function)
    note: str = ""
    available: Callable[[], str | None] = lambda: None
    build: Callable[[Callable], Callable] | None = None
    timed_on_cpu: bool = True
    # Entered around every call, forward and backward together: a kernel variant chosen by
    # a module switch (fuseformer's not-yet-default kernels) is in force for the whole step.
    context: Callable[[], Any] | None = None


@dataclasses.dataclass
class Prepared:
    fns: dict[str, Callable[[], Any]]  # zero-argument, rotating over input copies
    refused: dict[str, str]
    errors: dict[str, str]
    parity: dict[str, list[tuple[str, Parity]]]
    not_timed: dict[str, str]  # runs and was checked, but timing it here would mislead
    kinds: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> OURS or BASELINE
    details: dict[str, dict] = dataclasses.field(default_factory=dict)  # name -> extra fields for its results entry


@dataclasses.dataclass
class Case:
    """Common description; subclasses implement `prepare`.

    name: unique, used by --filter; group: the plot series and threshold family;
    params: the shapes and options, recorded in the results; flops/elements: the work and
    the fewest elements the case must read and write (None where meaningless); x: the param plotted on the
    x axis of the speedup plot (e.g. "L"); dtype: the case's own dtype on a GPU when the
    run does not force one (the targets fix fp16 for BERT inference, say).
    """

    name: str
    suite: str = "ops"
    group: str = ""
    params: dict = dataclasses.field(default_factory=dict)
    flops: float | None = None
    elements: float | None = None  # elements moved; bytes = elements x the run's element size
    x: str | None = None
    dtype: torch.dtype | None = None
    quick: bool = False
    timed_on_cpu: bool = False
    cpu_note: str = ""
    note: str = ""

    @property
    def graph_timed(self) -> bool:
        """On a GPU, each implementation is timed a second time replayed in a CUDA graph
        (runner._time_graphed): the ops cases; model cases say for themselves."""
        return self.suite == "ops"

    def prepare(self, device: torch.device, dtype: torch.dtype, l2_bytes: int) -> Prepared:
        raise NotImplementedError


def _upcast(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().double().requires_grad_(value.requires_grad)
    return value


def _as_tuple(out) -> tuple:
    if isinstance(out, torch.Tensor):
        return (out,)
    return tuple(out)


def _refusal(err: BaseException) -> str | None:
    """A refusal reads as one line: the first line of the error."""
    from fuseformer.kernels import BackendUnsupportedError

    if isinstance(err, (Refused, BackendUnsupportedError)):
        return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return None


@dataclasses.dataclass
class OpCase(Case):
    """A single op. make_inputs(device, dtype, generator) -> dict of tensors (fresh random
    values, never zeros); reference(inputs) is the oracle, run once in float64 and once in
    the case's dtype (plain PyTorch, the parity rule's torch_d). With `grad_inputs` the case
    is forward+backward: every implementation's output is (out, d input_1, d input_2, ...)
    for the upstream gradient inputs["grad_out"]. `where(inputs)` selects the positions that
    exist (padding left out); `batch_keys` lets the float64 reference run one batch element
    at a time so it does not need the whole batch's L x L scores at once."""

    make_inputs: Callable[..., dict] | None = None
    reference: Callable[[dict], Any] | None = None
    impls: list[Impl] = dataclasses.field(default_factory=list)
    grad_inputs: tuple[str, ...] = ()
    where: Callable[[dict], torch.Tensor | None] | None = None
    batch_keys: tuple[str, ...] = ()
    suite: str = "ops"

    def _wrap(self, fn: Callable[[dict], Any]) -> Callable[[dict], tuple]:
        if not self.grad_inputs:
            return lambda inputs: _as_tuple(fn(inputs))

        def fwd_bwd(inputs):
            out = fn(inputs)
            wrt = [inputs[k] for k in self.grad_inputs]
            grads = torch.autograd.grad(out, wrt, inputs["grad_out"])
            return (out, *grads)

        return fwd_bwd

    def _reference_on(self, inputs: dict) -> tuple:
        run = self._wrap(self.reference)
        if not self.batch_keys:
            return run(inputs)
        batch = inputs[self.batch_keys[0]].shape[0]
        parts = []
        for b in range(batch):
            sub = {}
            for key, value in inputs.items():
                if value is not None and (key in self.batch_keys or key == "grad_out"):
                    # Slice a leaf copy so autograd.grad sees a leaf of this sub-problem.
                    value = value[b : b + 1].detach().requires_grad_(value.requires_grad)
                sub[key] = value
            parts.append(run(sub))
        return tuple(torch.cat(p, dim=0) for p in zip(*parts))

    def _copies(self, device, dtype, l2_bytes) -> list[dict]:
        # Rotate over several input sets when one would stay resident in L2: otherwise the
        # timing measures cache, not memory. The first copy is also the parity input.
        count = 1
        working_set = (self.elements or 0) * torch.empty((), dtype=dtype).element_size()
        if device.type == "cuda" and 0 < working_set < l2_bytes:
            count = min(16, max(2, math.ceil(2 * l2_bytes / working_set)))
        copies = []
        for i in range(count):
            gen = torch.Generator(device=device).manual_seed(1234 + i)
            copies.append(self.make_inputs(device, dtype, gen))
        return copies

    def prepare(self, device, dtype, l2_bytes):
        from . import op_trace

        copies = self._copies(device, dtype, l2_bytes)
        first = copies[0]
        ref64 = self._reference_on({k: _upcast(v) for k, v in first.items()})
        torch_d = self._reference_on(first)
        where = self.where(first) if self.where else None
        fns, refused, errors, results, not_timed, details = {}, {}, {}, {}, {}, {}
        for impl in self.impls:
            reason = impl.available()
            if reason:
                refused[impl.name] = reason
                continue
            # The first call's cost (compilation, autotuning) is where a slow run's time goes.
            started = time.perf_counter()
            base = impl.build(impl.fn) if impl.build else impl.fn
            run = self._wrap(base)
            if impl.context is not None:
                run = _within(impl.context, run)
            caught = []
            before = op_trace.tuned_keys()
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    out = run(first)
            except Exception as err:  # noqa: BLE001 - every failure is reported, none hidden
                why = _refusal(err)
                if why is None and isinstance(err, RuntimeError) and impl.name.startswith("sdpa-"):
                    # torch says why a backend declined in warnings, then raises "No available kernel".
                    said = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
                    why = "; ".join(said[:2] or [str(err).strip().splitlines()[0]])
                if why is not None:
                    refused[impl.name] = why
                else:
                    errors[impl.name] = f"{type(err).__name__}: {err}".splitlines()[0]
                continue
            details[impl.name] = {"first_call_seconds": time.perf_counter() - started}
            tuned = op_trace.tuned_since(before)
            if tuned:  # the autotuners' picks this first call made (op_trace.tuned_since says why)
                details[impl.name]["tuned"] = tuned
            if impl.check:
                results[impl.name] = _compare(out, ref64, torch_d, dtype, where, self.grad_inputs)
            if device.type == "cpu" and not (self.timed_on_cpu and impl.timed_on_cpu):
                not_timed[impl.name] = self.cpu_note or "not timed on the CPU"
                continue
            fns[impl.name] = _rotating(run, copies)
        kinds = {impl.name: impl.kind for impl in self.impls}
        return Prepared(fns, refused, errors, results, not_timed, kinds, details)


def _within(context: Callable[[], Any], run: Callable[[dict], Any]) -> Callable[[dict], Any]:
    def call(inputs):
        with context():
            return run(inputs)

    return call


def _rotating(run: Callable[[dict], Any], copies: list[dict]) -> Callable[[], Any]:
    if len(copies) == 1:
        only = copies[0]
        return lambda: run(only)
    cycle = itertools.cycle(copies)
    return lambda: run(next(cycle))


def _compare(out, ref64, torch_d, dtype, where, grad_inputs) -> list[tuple[str, Parity]]:
    out = _as_tuple(out)
    if grad_inputs:
        labels = ["out"] + [f"grad {name}" for name in grad_inputs]
    else:
        labels = ["out"] if len(out) == 1 else [f"out{j}" for j in range(len(out))]
    if len(out) != len(ref64):
        raise ValueError(f"implementation returned {len(out)} tensors, the reference {len(ref64)}")
    checks = []
    for i, (label, o, r, t) in enumerate(zip(labels, out, ref64, torch_d)):
        # A padding mask selects tokens of the output; gradients of masked keys are exactly
        # zero on both sides, so they are compared everywhere.
        w = where if i == 0 else None
        checks.append((label, parity(o.detach(), r.detach(), t.detach(), dtype, w)))
    return checks
