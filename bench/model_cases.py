"""The `models` suite: BERT, GPT-2 and ALBERT, ours against Hugging Face transformers on the
same random weights (nothing is downloaded). Declarations plus the one `prepare` that all
model cases share.

Dropout is 0 in every config, so a training step is deterministic and its loss can be held
to the parity rule; the step is forward + backward (no optimizer update, which is the same
code for every implementation).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import time
import warnings
from typing import Callable

import torch

from fuseformer.kernels import attention, attention_launchers
from fuseformer.kernels.launch import use_fast_launch
from fuseformer.kernels.parity import Parity, parity
from fuseformer.models import fused_block

from . import op_trace
from .core import BASELINE, OURS, Case, CaseUnavailable, Prepared, Refused

CPU_NOTE = ("Models on the CPU: small configs (hidden 256, 4 layers, 4 heads, vocab 8192, batch 4 x 128 tokens, "
            "fp32, random weights), our models on the torch backend against transformers eager and sdpa "
            "(inference for BERT, GPT-2, ALBERT; a BERT MLM training step).")

# family -> (our class, transformers class, config maker)
FAMILIES = {
    ("bert", "infer"): ("BertModel", "BertModel"),
    ("bert", "train"): ("BertForMaskedLM", "BertForMaskedLM"),
    ("gpt2", "infer"): ("GPT2LMHeadModel", "GPT2LMHeadModel"),
    ("gpt2", "train"): ("GPT2LMHeadModel", "GPT2LMHeadModel"),
    ("albert", "infer"): ("AlbertModel", "AlbertModel"),
    ("albert", "train"): ("AlbertForMaskedLM", "AlbertForMaskedLM"),
}

SIZES = {
    # GPU: the public base sizes; CPU: small enough for a 2-core machine.
    "cuda": dict(hidden=768, layers=12, heads=12, inter=3072, vocab=30522, embed=128),
    "cpu": dict(hidden=256, layers=4, heads=4, inter=1024, vocab=8192, embed=128),
}


def hf_config(family: str, size: dict):
    import transformers as T

    h, n, a, i, v = size["hidden"], size["layers"], size["heads"], size["inter"], size["vocab"]
    if family == "bert":
        return T.BertConfig(vocab_size=v, hidden_size=h, num_hidden_layers=n, num_attention_heads=a,
                            intermediate_size=i, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if family == "gpt2":
        v = 50257 if v == 30522 else v
        return T.GPT2Config(vocab_size=v, n_embd=h, n_layer=n, n_head=a, n_positions=1024,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=v - 1, eos_token_id=v - 1)
    return T.AlbertConfig(vocab_size=v, embedding_size=size["embed"], hidden_size=h, num_hidden_layers=n,
                          num_attention_heads=a, intermediate_size=i, hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0)


def _unavailable(hf_name: str) -> str | None:
    """Why the baseline cannot exist here. Only other people's packages can be missing: a
    failure to import our own models is an error of the case (the runner reports it so),
    never a skip that would hide it."""
    try:
        import transformers
    except ImportError as err:
        return f"transformers is not installed ({err})"
    if not hasattr(transformers, hf_name):
        return f"transformers {transformers.__version__} has no {hf_name}"
    return None


def _flops(family: str, task: str, size: dict, B: int, L: int) -> float:
    """Nominal dense matmul FLOPs (padding counted as tokens); a training step is 3x forward."""
    h, n, i, v, e = size["hidden"], size["layers"], size["inter"], size["vocab"], size["embed"]
    tokens = B * L
    per_layer = 2 * tokens * (4 * h * h + 2 * h * i) + 4 * B * L * L * h
    total = n * per_layer
    if family == "albert":
        total += 2 * tokens * e * h
    if family == "gpt2":
        total += 2 * tokens * h * (50257 if v == 30522 else v)  # the tied LM head
    elif task == "train":
        head_width = e if family == "albert" else h
        total += 2 * tokens * (h * head_width + head_width * v)
    return float(total * (3 if task == "train" else 1))


def mlm_rows_bound(case, inputs) -> int | None:
    """max_predictions_per_seq for a BERT or ALBERT MLM training case's fuseformer-*-mlm-rows
    variant: 20% of the tokens, as the original BERT's 20 at L128, above the cases' 15% rate;
    None for other cases, or where these labels hold more (a device-side assert on a GPU would
    end the run)."""
    if case.task != "train" or case.family not in ("bert", "albert"):
        return None
    bound = max(1, (case.L + 4) // 5)
    return bound if int((inputs["labels"] != -100).sum()) <= case.B * bound else None


@dataclasses.dataclass
class ModelCase(Case):
    family: str = "bert"
    task: str = "infer"
    B: int = 1
    L: int = 128
    pad: float = 0.0
    size: dict = dataclasses.field(default_factory=dict)
    device_type: str = "cpu"
    suite: str = "models"
    timed_on_cpu: bool = True

    @property
    def graph_timed(self) -> bool:
        """Training steps are timed in a CUDA graph too (forward, loss and backward captured
        together, every implementation alike), which an eager step cannot tell: how much of it
        is the kernels' time, and whether the step synchronises with the host (time_graph
        raises on a sync first, so the entry says "not graphed" and why). Inference has its
        own graph implementations (fuseformer-fused-graphs, the runner), timed as such."""
        return self.task == "train"

    def _inputs(self, device, vocab):
        gen = torch.Generator().manual_seed(7)
        ids = torch.randint(1, vocab, (self.B, self.L), generator=gen)
        mask = torch.ones(self.B, self.L, dtype=torch.long)
        if self.pad:
            lo = max(1, int(round(self.L * (1 - 2 * self.pad))))
            lengths = torch.randint(lo, self.L + 1, (self.B,), generator=gen)
            mask = (torch.arange(self.L)[None, :] < lengths[:, None]).long()
        inputs = {"input_ids": ids, "attention_mask": mask}
        if self.family != "gpt2":
            inputs["token_type_ids"] = (torch.arange(self.L)[None, :] >= self.L // 2).long().expand(self.B, -1).contiguous()
        if self.task == "train":
            if self.family == "gpt2":
                labels = ids.clone()
            else:
                chosen = torch.rand(self.B, self.L, generator=gen) < 0.15
                labels = torch.where(chosen & mask.bool(), ids, torch.full_like(ids, -100))
            inputs["labels"] = labels
        return {k: v.to(device) for k, v in inputs.items()}

    def _graph_runner(self, model, inputs: dict) -> Callable[[], torch.Tensor]:
        from fuseformer.models import CUDAGraphRunner

        try:
            runner = CUDAGraphRunner(model, [(self.B, self.L)], input_names=tuple(inputs), clone_outputs=False)
        except (ValueError, TypeError) as err:  # the runner refuses what it cannot capture
            raise Refused(f"CUDAGraphRunner: {err}") from None
        return lambda: self._main_output(runner(**inputs))

    def _train_step(self, model, inputs: dict) -> Callable[[], torch.Tensor]:
        from fuseformer.models import CUDAGraphTrainStep

        try:
            step = CUDAGraphTrainStep(model, [(self.B, self.L)], input_names=tuple(inputs))
        except (ValueError, TypeError) as err:  # it refuses what it cannot capture
            raise Refused(f"CUDAGraphTrainStep: {err}") from None
        return lambda: step(**inputs)

    def _main_output(self, out) -> torch.Tensor:
        if self.task == "train":
            return out.loss
        return out.last_hidden_state if hasattr(out, "last_hidden_state") and out.last_hidden_state is not None else out.logits

    def prepare(self, device, dtype, l2_bytes):
        ours_name, hf_name = FAMILIES[(self.family, self.task)]
        reason = _unavailable(hf_name)
        if reason:
            raise CaseUnavailable(reason)
        import transformers

        from fuseformer import models

        ours_class = getattr(models, ours_name)

        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf32 = getattr(transformers, hf_name)(hf_config(self.family, self.size))
        hf32.train(self.task == "train")
        inputs = self._inputs(device, hf32.config.vocab_size)
        where = None
        if self.task == "infer" and "attention_mask" in inputs and self.family != "gpt2":
            where = inputs["attention_mask"].bool()[:, :, None]

        def hf_variant(attn: str, dt: torch.dtype):
            m = copy.deepcopy(hf32)
            m.set_attn_implementation(attn)
            return m.to(device=device, dtype=dt)

        def ours_variant(backend: str, **kwargs):
            return ours_class.from_hf(hf32, backend=backend, **kwargs).to(device=device, dtype=dtype)

        def cuda_model():
            from fuseformer import kernels

            reason = kernels.unavailable_reason("cuda")  # builds csrc/ the first time
            if reason:
                raise Refused(f"the cuda backend cannot run here: {reason}")
            return ours_variant("cuda")

        train = self.task == "train"

        def runnable(model) -> Callable[[], torch.Tensor]:
            if not train:
                return lambda: self._main_output(model(**inputs))
            params = [p for p in model.parameters() if p.requires_grad]

            def step():
                for p in params:
                    p.grad = None
                loss = model(**inputs).loss
                loss.backward()
                return loss.detach()

            return step

        grad_ctx = torch.enable_grad if train else torch.no_grad
        with grad_ctx():
            ref64, ref64_grads = self._reference(hf_variant("eager", torch.float64), runnable)
            torch_d, torch_d_grads = self._reference(hf_variant("eager", dtype), runnable)

        # name -> (kind, the model, captured in a CUDA graph: False, True (bare capture), "runner" or "train-step")
        variants: dict[str, tuple[str, Callable[[], torch.nn.Module], bool | str]] = {
            "hf-eager": (BASELINE, lambda: hf_variant("eager", dtype), False),
            "hf-sdpa": (BASELINE, lambda: hf_variant("sdpa", dtype), False),
            "fuseformer-torch": (OURS, lambda: ours_variant("torch"), False),
        }
        # name -> a context entered around its every call (build, parity and timing alike)
        contexts: dict[str, Callable[[], contextlib.AbstractContextManager]] = {}
        bound = mlm_rows_bound(self, inputs)
        if bound:
            # The MLM head and its loss on the labelled tokens only (models/pretraining.py,
            # predicted_rows): the same loss and gradients, the head's work on a fifth of the
            # tokens. On the fused backends on a GPU, on the torch one on the CPU.
            name = "fuseformer-fused-mlm-rows" if device.type == "cuda" else "fuseformer-torch-mlm-rows"
            variants[name] = (OURS, lambda: ours_variant("auto" if device.type == "cuda" else "torch",
                                                         max_predictions_per_seq=bound), False)
        if device.type == "cuda":
            variants["hf-compile"] = (BASELINE, lambda: torch.compile(hf_variant("sdpa", dtype)), False)
            # One instance for eager and graphs (building one takes seconds), built at first use
            # so that a failure is reported for the implementation, not the case.
            fused = functools.cache(lambda: ours_variant("auto"))
            variants["fuseformer-fused"] = (OURS, fused, False)
            # The eager model on Triton's own launch path instead of the fast launch (the default,
            # kernels/launch.py): eager BERT is host-bound on the H100
            # (bench/results/h100/README.md), so this is where the fast launch shows what it is
            # worth, forward and backward.
            variants["fuseformer-fused-triton-launch"] = (OURS, fused, False)
            contexts["fuseformer-fused-triton-launch"] = lambda: use_fast_launch(False)
            # The blocks op by op (four Python autograd nodes a layer) instead of one fused node
            # each (models/fused_block.py, the default): what the fused node is worth, forward
            # and backward.
            variants["fuseformer-fused-per-op"] = (OURS, fused, False)
            contexts["fuseformer-fused-per-op"] = lambda: fused_block.use(False)
            if train:
                # The backward on the calling thread instead of autograd's CUDA device thread:
                # on the H200 (2026-11-27) add+LN's eager fwd+bwd took 558 us of host time
                # through the engine's thread and 329 without it, where a bare Python Function
                # differs by 53 (bench/results/h200/2026-11-27-a3eeca9/profile_calls.txt). Our blocks' backward
                # nodes are Python; if the step is much faster here, that thread is the cost.
                variants["fuseformer-fused-calling-thread"] = (OURS, fused, False)
                contexts["fuseformer-fused-calling-thread"] = lambda: torch.autograd.set_multithreading_enabled(False)
                # The step replayed from a CUDA graph by the user-facing CUDAGraphTrainStep
                # (models/graphs.py): forward and backward one launch, its inputs copied into
                # the bucket's buffers and its gradients restored to the parameters each call.
                variants["fuseformer-fused-train-graph"] = (OURS, lambda: ours_variant("auto"), "train-step")
                if self.L <= max(attention_launchers.ONE_PASS_BLOCKS):
                    # The attention backward as one kernel where every key fits one block
                    # (attention.VARIANTS["dq"] "fused"; BERT's L128): one launch a layer instead
                    # of two, and no dQ pass recomputing S and dP.
                    variants["fuseformer-fused-dq-one-pass"] = (OURS, fused, False)
                    contexts["fuseformer-fused-dq-one-pass"] = lambda: attention.variant(dq="fused")
            # Every op on csrc/ (named: `auto` never builds it), whose launches cross pybind11
            # once instead of Triton's Python launcher: the other way to less host time per op.
            variants["fuseformer-fused-cuda"] = (OURS, cuda_model, False)
            if not train:
                variants["fuseformer-fused-graphs"] = (OURS, fused, True)
                # The user-facing CUDAGraphRunner (bucketed capture, padding, slicing) beside the
                # bench's bare capture: what it adds per call is the difference of the two.
                variants["fuseformer-graph-runner"] = (OURS, fused, "runner")
                if self.family == "bert" and self.pad:
                    variants["fuseformer-fused-unpad"] = (OURS, lambda: ours_variant("auto", unpad=True), False)

        def context_of(name):
            return contexts.get(name, contextlib.nullcontext)

        fns, refused, errors, results, kinds, details = {}, {}, {}, {}, {}, {}
        for name, (kind, make, graphed) in variants.items():
            kinds[name] = kind
            started = time.perf_counter()
            before = op_trace.tuned_keys()
            try:
                with grad_ctx(), context_of(name)(), warnings.catch_warnings(), \
                        op_trace.record_backends() as ran:
                    # Silenced: the fallbacks the warnings would report are recorded in `ran`.
                    warnings.simplefilter("ignore")
                    model = make()
                    if graphed == "runner":
                        fn = self._graph_runner(model, inputs)
                    elif graphed == "train-step":
                        fn = self._train_step(model, inputs)
                        details[name] = {"replays_own_graph": True}
                    else:
                        fn = _graphed(runnable(model)) if graphed else runnable(model)
                    out = fn()
                    checks = [("loss" if train else "out", parity(out, ref64, torch_d, dtype, where))]
                    if train:
                        checks.append(_grad_check(_hf_named_grads(model), ref64_grads, torch_d_grads, dtype))
            except Refused as err:
                refused[name] = str(err)
                continue
            except Exception as err:  # noqa: BLE001 - reported per implementation
                errors[name] = f"{type(err).__name__}: {err}".splitlines()[0]
                continue
            results[name] = checks
            # Building and first call: a torch.compile or CUDA-graph capture costs its time here.
            details[name] = {**details.get(name, {}), "backends": ran,
                             "first_call_seconds": time.perf_counter() - started}
            warning = op_trace.summary(ran, fused=name.startswith("fuseformer-fused"))
            if warning:
                details[name]["backend_warning"] = warning
            tuned = op_trace.tuned_since(before)
            if tuned:  # the autotuners' picks its first call made (op_trace.tuned_since says why)
                details[name]["tuned"] = tuned

            def timed(fn=fn, context=context_of(name)):
                with grad_ctx(), context():
                    return fn()

            fns[name] = timed
        return Prepared(fns, refused, errors, results, {}, kinds, details)

    def _reference(self, model, runnable) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """The main output (the loss when training) and, when training, the gradient of every
        parameter by its Hugging Face name."""
        out = runnable(model)().detach()
        return out, (_hf_named_grads(model) if self.task == "train" else None)


def _hf_named_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Each parameter's gradient, keyed by its Hugging Face name (so ours and transformers'
    can be compared tensor by tensor)."""
    model = getattr(model, "_orig_mod", model)  # what torch.compile wraps
    params = dict(model.named_parameters())
    if not hasattr(model, "hf_state_dict"):
        return {n: p.grad for n, p in params.items() if p.grad is not None}
    # Ours: our checkpoint conversion maps weights to Hugging Face names (splitting the fused
    # QKV, transposing where needed). Run it on the gradients by lending them to the
    # parameters for the call, so there is one conversion to trust, not a second copy.
    with torch.no_grad():
        weights = {n: p.data for n, p in params.items()}
        try:
            for n, p in params.items():
                p.data = p.grad if p.grad is not None else torch.full_like(p, float("nan"))
            converted = model.hf_state_dict()
        finally:
            for n, p in params.items():
                p.data = weights[n]
    return converted


def _grad_check(grads, ref64_grads, torch_d_grads, dtype) -> tuple[str, Parity]:
    """One parity check over every parameter gradient: the worst one (error / bound), named."""
    missing = sorted(n for n in ref64_grads if n not in grads)
    if missing:
        raise ValueError(f"no gradient for {len(missing)} parameter(s), e.g. {missing[0]}")
    checks = [(n, parity(grads[n], ref64_grads[n], torch_d_grads[n], dtype)) for n in ref64_grads]
    name, worst = max(checks, key=lambda c: c[1].error / c[1].bound)
    failing = sum(not p.ok for _, p in checks)
    return f"grad {name} (worst of {len(checks)}" + (f", {failing} fail)" if failing else ")"), worst


def _graphed(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """Capture one inference call in a CUDA graph (static inputs): launches replayed, no
    Python or kernel-launch overhead per layer."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up outside the graph: autotuning and lazy allocations
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            static_out = fn()
    except Exception as err:  # noqa: BLE001
        raise Refused(f"could not capture a CUDA graph: {type(err).__name__}: {err}".splitlines()[0]) from None

    def replay():
        graph.replay()
        return static_out

    return replay


def _case(family, task, B, L, device_type, pad=0.0, dtype=None, quick=False) -> ModelCase:
    size = SIZES[device_type]
    pad_tag = f"_pad{int(pad * 100)}" if pad else ""
    name = f"{family}_{task}_B{B}_L{L}{pad_tag}"
    what = "inference" if task == "infer" else ("MLM training step" if family != "gpt2" else "LM training step")
    return ModelCase(
        name=name, group=f"{family}_{task}", params={"family": family, "task": task, "B": B, "L": L, "pad": pad, **size},
        flops=_flops(family, task, size, B, L), x=None, dtype=dtype, quick=quick, note=f"{family} {what}, random weights",
        family=family, task=task, B=B, L=L, pad=pad, size=size, device_type=device_type,
    )


def cases(device_type: str) -> list[ModelCase]:
    if device_type == "cuda":
        fp16, bf16 = torch.float16, torch.bfloat16
        return [
            _case("bert", "infer", 32, 128, "cuda", dtype=fp16, quick=True),
            _case("bert", "infer", 8, 512, "cuda", pad=0.3, dtype=fp16),
            # Not in --quick: with the compile of HF's training graph it would take --quick past
            # its 3 minutes on an H100; the full run gates it.
            _case("bert", "train", 32, 128, "cuda", dtype=bf16),
            _case("gpt2", "infer", 8, 512, "cuda", dtype=fp16),
            _case("gpt2", "train", 8, 512, "cuda", dtype=bf16),
            _case("albert", "infer", 32, 128, "cuda", dtype=fp16),
            _case("albert", "train", 32, 128, "cuda", dtype=bf16),
        ]
    return [
        _case("bert", "infer", 4, 128, "cpu", pad=0.3, quick=True),
        _case("gpt2", "infer", 4, 128, "cpu", quick=True),
        _case("albert", "infer", 4, 128, "cpu"),
        # One training step only: the float64 reference of a training step is the slowest
        # thing a CPU run does, and the GPU run has all three.
        _case("bert", "train", 4, 128, "cpu"),
    ]
