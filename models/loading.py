"""What from_pretrained resolves before building a model: the folder (a local path, or a hub
id through huggingface_hub's local cache), the tensors in it, and the dtype to load them in.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

_DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "float64": torch.float64, "double": torch.float64}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once, at its import.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def resolve_folder(name_or_path: str, *, cache_dir: str | None = None, revision: str | None = None,
                   local_files_only: bool = False) -> str:
    """A local folder as it is; otherwise a Hugging Face hub id ("org/name") looked up in
    huggingface_hub's cache (cache_dir, else HF_HUB_CACHE / HF_HOME). With HF_HUB_OFFLINE set
    or local_files_only=True only the cache is read; otherwise huggingface_hub may download,
    as transformers' from_pretrained does."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"pretrained_model_name_or_path must be a folder or a hub id, got {type(name_or_path).__name__}")
    name_or_path = os.fspath(name_or_path)
    if os.path.isdir(name_or_path):
        return name_or_path
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{name_or_path!r} is not a folder, and resolving it as a hub id needs "
                                "huggingface_hub (pip install huggingface_hub)") from None
    offline = local_files_only or _offline()
    try:
        return snapshot_download(name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=offline,
                                 allow_patterns=["config.json", "*.safetensors", "*.safetensors.index.json",
                                                 "pytorch_model.bin"])
    except Exception as err:  # noqa: BLE001 - every cause (bad id, not cached, offline) reads the same here
        where = "in huggingface_hub's local cache" + (" (offline: HF_HUB_OFFLINE or local_files_only)" if offline else "")
        raise FileNotFoundError(f"{name_or_path!r} is neither a local folder nor a hub id found {where}: "
                                f"{type(err).__name__}: {err}".splitlines()[0]) from err


def read_config_dict(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in {folder!r}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_state_dict(folder: str) -> dict[str, torch.Tensor]:
    """model.safetensors (or its shards), else pytorch_model.bin, from a local folder."""
    from safetensors.torch import load_file

    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return load_file(single)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load_file(os.path.join(folder, shard)))
        return state
    binf = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(binf):
        return torch.load(binf, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no {', '.join(WEIGHT_FILES)} in {folder!r}")


def _first_float_dtype(state_dict) -> torch.dtype | None:
    for v in state_dict.values():
        if torch.is_floating_point(v):
            return v.dtype
    return None


def resolve_dtype(dtype, torch_dtype, config_dict: dict[str, Any], state: dict[str, torch.Tensor]) -> torch.dtype:
    """dtype= (torch_dtype= is its older name); None or "auto" is the checkpoint's dtype, as in
    transformers 5: config.json's dtype / torch_dtype entry, else the weights' own."""
    if torch_dtype is not None:
        if dtype is not None and dtype != torch_dtype:
            raise ValueError(f"pass dtype or torch_dtype (its older name), not both: got dtype={dtype!r}, "
                             f"torch_dtype={torch_dtype!r}")
        dtype = torch_dtype
    if dtype is None or dtype == "auto":
        dtype = config_dict.get("dtype") or config_dict.get("torch_dtype") or _first_float_dtype(state) or torch.float32
    if isinstance(dtype, str):
        dtype = _DTYPES.get(dtype.removeprefix("torch."), dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, one of {sorted(_DTYPES)} or 'auto', got {dtype!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
