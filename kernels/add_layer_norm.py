"""PLACEHOLDER until the Triton add+LayerNorm lands: calls the reference."""
from . import reference


def add_layer_norm(x, residual, weight, bias, eps=1e-5, dropout_p=0.0, prenorm=False, *, backend=None):
    return reference.add_layer_norm(x, residual, weight, bias, eps, dropout_p, prenorm)
