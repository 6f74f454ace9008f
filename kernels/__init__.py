"""fuseformer.kernels: fused attention, add+LayerNorm, Linear+GELU and cross-entropy.

    from fuseformer import kernels as K
    out = K.scaled_dot_product_attention(q, k, v, attn_mask=pad_mask)

Every op has the same signature and semantics as its reference in reference.py, runs on
the backend chosen by set_backend / use_backend / FUSEFORMER_BACKEND, and has autograd.
"""
import sys as _sys

if __name__ != "fuseformer.kernels":
    # This folder imported as a bare top-level `kernels`: the repository root is on sys.path
    # (`python -m ...` run there) and something probed that name -- transformers does, looking
    # for Hugging Face's `kernels` package. Running this package a second time would define
    # our torch custom ops again, which frees the first registration while fuseformer.kernels
    # still calls it: a segfault or a torch internal assert much later. Hand out the real
    # package instead (it has no __version__, so transformers reads it as "not installed").
    import importlib as _importlib

    _sys.modules[__name__] = _importlib.import_module("fuseformer.kernels")
else:
    from . import cuda_backend  # noqa: F401  (registers the cuda impls)
    from .add_layer_norm import add_layer_norm
    from .cross_entropy import cross_entropy
    from .attention import scaled_dot_product_attention
    from .varlen_attention import varlen_attention
    from . import backends
    from .backends import (
        BackendUnsupportedError,
        available_backends,
        backend_version,
        get_backend,
        set_backend,
        unavailable_reason,
        use_backend,
    )
    from .linear_gelu import linear_gelu

    if not backends.interpreting():
        # Compiled kernels' cache keys independent of what a process compiles first
        # (_util.settle_cache_keys says why): over every module here that holds kernels.
        from ._util import settle_cache_keys

        settle_cache_keys([m for name, m in list(_sys.modules.items()) if name.startswith(__name__ + ".")])

__all__ = [
    "scaled_dot_product_attention",
    "varlen_attention",
    "add_layer_norm",
    "linear_gelu",
    "cross_entropy",
    "set_backend",
    "get_backend",
    "use_backend",
    "available_backends",
    "backend_version",
    "unavailable_reason",
    "BackendUnsupportedError",
]
