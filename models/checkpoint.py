"""Hugging Face checkpoint interop shared by the model families.

A family maps each of our state-dict keys to the Hugging Face key(s) it comes from
(`hf_sources`): most are renames, a fused QKV weight is the concatenation of query, key
and value, and GPT-2's Conv1D weights are stored (in, out) so they are transposed. Loading
applies the map one way, saving the other way. transformers itself is needed only by
`from_hf` (it is handed a transformers model) and never imported here.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import os
import warnings
from typing import Any, ClassVar

import torch
import torch.nn as nn

from .loading import dtype_name, read_config_dict, read_state_dict, resolve_dtype, resolve_folder

COPY, CAT, TRANSPOSE = "copy", "cat", "transpose"


def describe_mismatch(headline: str, missing, unexpected, mismatched) -> str:
    lines = [headline]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
    if mismatched:
        lines.append(f"  mis-shaped keys ({len(mismatched)}): " + "; ".join(mismatched))
    return "\n".join(lines)


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not fit the model; the message lists every problem."""

    def __init__(self, missing, unexpected, mismatched, where=""):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        super().__init__(describe_mismatch(f"checkpoint{where} does not fit the model:", missing, unexpected, mismatched))


class CheckpointWarning(UserWarning):
    """A checkpoint loaded with weights skipped (unused) or left at their initialisation (missing)."""


@dataclasses.dataclass
class HFConfig:
    """Base of the config dataclasses: fields named as in Hugging Face's config.json."""

    model_type: ClassVar[str] = ""
    # Hugging Face options this architecture does not implement, with the one value it does:
    # a config asking for another (a decoder BERT, relative positions) is refused by name
    # rather than loaded into a model that would silently compute something else.
    only: ClassVar[dict[str, Any]] = {}
    num_labels: int = 2
    id2label: dict[int, str] | None = None  # class names; None = LABEL_0, LABEL_1, ...

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HFConfig":
        d = dict(d)
        mt = d.get("model_type")
        if mt is not None and cls.model_type and mt != cls.model_type:
            raise ValueError(f"config has model_type {mt!r}, expected {cls.model_type!r} for {cls.__name__}")
        for key, supported in cls.only.items():
            if key in d and d[key] != supported:
                raise ValueError(f"{cls.__name__}: {key}={d[key]!r} is not supported (only {supported!r})")
        if d.get("id2label"):
            d["id2label"] = {int(i): name for i, name in d["id2label"].items()}  # JSON keys are strings
            d.setdefault("num_labels", len(d["id2label"]))
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json_file(cls, path: str) -> "HFConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    @classmethod
    def from_hf(cls, hf_config) -> "HFConfig":
        return cls.from_dict(hf_config.to_dict())

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        n = d.pop("num_labels")
        names = self.id2label if self.id2label and len(self.id2label) == n else {i: f"LABEL_{i}" for i in range(n)}
        d["id2label"] = {str(i): names[i] for i in range(n)}
        d["label2id"] = {names[i]: i for i in range(n)}
        d["model_type"] = self.model_type
        return d

    def to_json_file(self, path: str, architecture: str | None = None, dtype: torch.dtype | None = None) -> None:
        d = self.to_dict()
        if architecture:
            d["architectures"] = [architecture]
        if dtype is not None:  # what dtype="auto" loads it as, in transformers and here
            d["dtype"] = dtype_name(dtype)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(d, f, indent=2, sort_keys=True)


class PreTrainedModel(nn.Module):
    """from_pretrained / from_hf / save_pretrained for a model with a Hugging Face twin."""

    config_class: ClassVar[type[HFConfig]]
    base_model_prefix: ClassVar[str] = ""  # "bert", "transformer", "albert"
    hf_architecture: ClassVar[str] = ""  # the transformers class this model mirrors

    # --- what a family defines -------------------------------------------------------------
    def hf_sources(self, key: str) -> tuple[list[str], str]:
        """The Hugging Face key(s) our `key` is built from and how (COPY, CAT, TRANSPOSE)."""
        return [key], COPY

    def hf_ignored(self, hf_key: str) -> bool:
        """Checkpoint entries we neither load nor miss: buffers and tied copies."""
        return hf_key.endswith(".position_ids") or hf_key.endswith("embeddings.token_type_ids")

    def set_backend(self, backend: str | None) -> "PreTrainedModel":
        """Run every layer on `backend` ('triton', 'cuda', 'torch', 'auto'; None = default)."""
        from .layers import BackendChoice, check_backend

        backend = check_backend(backend)
        for m in self.modules():
            if isinstance(m, BackendChoice):
                m.backend = backend
        return self

    # --- what transformers' PreTrainedModel also answers -----------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the floating-point parameters (the first one)."""
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameter count, shared (tied) weights counted once, as transformers counts them."""
        skip = set()
        if exclude_embeddings:
            skip = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        return sum(p.numel() for p in self.parameters()
                   if id(p) not in skip and (p.requires_grad or not only_trainable))

    # --- loading ---------------------------------------------------------------------------
    def load_hf_state_dict(self, hf_state: dict[str, torch.Tensor], strict: bool = True, where: str = "",
                           ignore_mismatched_sizes: bool = False) -> None:
        ours = self.state_dict()
        prefix = self.base_model_prefix + "." if self.base_model_prefix else ""
        model_has_prefix = bool(prefix) and any(k.startswith(prefix) for k in ours)
        ckpt_has_prefix = bool(prefix) and any(k.startswith(prefix) for k in hf_state)
        dropped = []
        if model_has_prefix and not ckpt_has_prefix:
            hf_state = {prefix + k: v for k, v in hf_state.items()}  # a base-model checkpoint
        if prefix and not model_has_prefix and ckpt_has_prefix:
            # A task model's checkpoint loaded into the base model: its heads are not ours.
            dropped = [k for k in hf_state if not k.startswith(prefix)]
            hf_state = {k[len(prefix):]: v for k, v in hf_state.items() if k.startswith(prefix)}
        hf_state = {k: v for k, v in hf_state.items() if not self.hf_ignored(k)}

        new, used, missing, mismatched = {}, set(), [], []
        for key, param in ours.items():
            sources, how = self.hf_sources(key)
            absent = [s for s in sources if s not in hf_state]
            used.update(s for s in sources if s in hf_state)  # a partial QKV is missing, not unexpected
            if absent:
                missing.extend(absent)
                continue
            tensors = [hf_state[s] for s in sources]
            value = torch.cat(tensors, 0) if how == CAT else tensors[0].t() if how == TRANSPOSE else tensors[0]
            if value.shape != param.shape:
                mismatched.append(f"{'+'.join(sources)}: checkpoint {tuple(value.shape)} vs model {tuple(param.shape)}")
                continue
            new[key] = value
        unexpected = sorted(k for k in dropped + list(hf_state) if k not in used)
        if ignore_mismatched_sizes and mismatched:  # transformers' keyword: a new head of another size
            missing, mismatched = missing + [m.split(":")[0] for m in mismatched], []
            strict = False
        if mismatched or (strict and missing):
            raise CheckpointMismatchError(missing, unexpected, mismatched, where)
        if missing or unexpected:
            # One warning for everything, as transformers gives: weights the model has no place
            # for (a pooler with add_pooling_layer=False, a task head) are skipped, and missing
            # ones (strict=False) keep their fresh initialisation.
            notes = (["  (unexpected weights were skipped)"] if unexpected else []) + (
                ["  (missing weights keep their fresh initialisation)"] if missing else [])
            headline = f"checkpoint{where} loaded into {type(self).__name__} with differences:"
            warnings.warn("\n".join([describe_mismatch(headline, missing, unexpected, [])] + notes),
                          CheckpointWarning, stacklevel=3)
        self.load_state_dict(new, strict=False)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, *, dtype: torch.dtype | str | None = None,
                        torch_dtype: torch.dtype | str | None = None, strict: bool = True,
                        backend: str | None = None, cache_dir: str | None = None, revision: str | None = None,
                        local_files_only: bool = False, ignore_mismatched_sizes: bool = False, **kwargs):
        """Load a Hugging Face format folder (config.json + model.safetensors / pytorch_model.bin),
        or a hub id ("sentence-transformers/all-MiniLM-L6-v2") from huggingface_hub's cache.

        Keywords that are config fields override config.json (num_labels=3,
        hidden_dropout_prob=0.0); the others go to the model (add_pooling_layer, unpad).
        dtype (or torch_dtype): None / "auto" is the checkpoint's dtype, as in transformers 5.
        Checkpoint weights the model has no place for are skipped with one warning; missing
        ones are an error unless strict=False (then fresh initialisation, same warning), and so
        are weights of another shape unless ignore_mismatched_sizes=True (a head resized by
        num_labels=...)."""
        from .layers import check_backend

        backend = check_backend(backend)  # a misspelt name fails before anything is read
        model_kwargs = cls._split_overrides(kwargs)
        folder = resolve_folder(pretrained_model_name_or_path, cache_dir=cache_dir, revision=revision,
                                local_files_only=local_files_only)
        config_dict = read_config_dict(folder)
        config = cls.config_class.from_dict({**config_dict, **kwargs})
        state = read_state_dict(folder)
        dtype = resolve_dtype(dtype, torch_dtype, config_dict, state)
        model = cls(config, **model_kwargs).to(dtype)
        model.load_hf_state_dict(state, strict=strict, where=f" {folder!r}", ignore_mismatched_sizes=ignore_mismatched_sizes)
        if backend is not None:
            model.set_backend(backend)
        return model.eval()

    @classmethod
    def _split_overrides(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Takes the model's own keywords out of `kwargs`, leaving the config overrides;
        anything that is neither is refused by name."""
        config_fields = {f.name for f in dataclasses.fields(cls.config_class)}
        model_args = set(inspect.signature(cls.__init__).parameters) - {"self", "config", "backend"}
        unknown = sorted(k for k in kwargs if k not in config_fields and k not in model_args)
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pretrained got unexpected keyword(s) {unknown}: neither "
                            f"{cls.config_class.__name__} fields nor {cls.__name__} arguments ({sorted(model_args)})")
        model_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in model_args}
        if "num_labels" in kwargs and "id2label" not in kwargs:
            kwargs["id2label"] = None  # the checkpoint's class names are for another number of classes
        return model_kwargs

    @classmethod
    def from_hf(cls, hf_model, *, backend: str | None = None, **model_kwargs):
        """Our model with the weights, dtype, device and train/eval mode of a transformers model."""
        from .layers import check_backend

        backend = check_backend(backend)
        config = cls.config_class.from_hf(hf_model.config)
        state = hf_model.state_dict()
        param = next(hf_model.parameters())
        model = cls(config, **model_kwargs).to(device=param.device, dtype=param.dtype)
        model.load_hf_state_dict(state, where=f" of {type(hf_model).__name__}")
        if backend is not None:
            model.set_backend(backend)
        return model.train(hf_model.training)

    # --- saving ----------------------------------------------------------------------------
    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in self.state_dict().items():
            sources, how = self.hf_sources(key)
            if how == CAT:
                for s, part in zip(sources, value.chunk(len(sources), 0)):
                    out[s] = part
            elif how == TRANSPOSE:
                out[sources[0]] = value.t()
            else:
                out[sources[0]] = value
        # safetensors refuses views that share storage (the split QKV): give each its own.
        return {k: v.detach().contiguous().clone() for k, v in out.items()}

    def save_pretrained(self, folder: str) -> None:
        """Write config.json + model.safetensors that transformers' from_pretrained loads."""
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        self.config.to_json_file(os.path.join(folder, "config.json"), self.hf_architecture, self.dtype)
        tensors = {k: v.cpu() for k, v in self.hf_state_dict().items()}
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
