"""fuseformer.kernels: fused attention, add+LayerNorm and Linear+GELU.

    from fuseformer import kernels as K
    out = K.scaled_dot_product_attention(q, k, v, attn_mask=pad_mask)

Every op has the same signature and semantics as its reference in reference.py, runs on
the backend chosen by set_backend / use_backend / FUSEFORMER_BACKEND, and has autograd.
"""
from .backends import (
    BackendUnsupportedError,
    available_backends,
    get_backend,
    set_backend,
    unavailable_reason,
    use_backend,
)
from .add_layer_norm import add_layer_norm
from .attention import scaled_dot_product_attention, varlen_attention
from .linear_gelu import linear_gelu

__all__ = [
    "scaled_dot_product_attention",
    "varlen_attention",
    "add_layer_norm",
    "linear_gelu",
    "set_backend",
    "get_backend",
    "use_backend",
    "available_backends",
    "unavailable_reason",
    "BackendUnsupportedError",
]
from . import cuda_backend  # noqa: F401,E402  (registers the cuda impls)
