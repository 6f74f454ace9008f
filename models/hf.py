"""patch_hf: put our fused computations into an existing transformers model, in place.

What is swapped (parameters, their names and the model's state dict are untouched):
- attention: registered with transformers' AttentionInterface as "fuseformer", so every
  BERT / GPT-2 / ALBERT attention layer calls K.scaled_dot_product_attention (key-padding
  masks reach it as (B, 1, 1, S), the fast path);
- add + LayerNorm: BERT's SelfOutput/Output, ALBERT's attention output and FFN, GPT-2's
  block (the residual add is fused with ln_2) and every other LayerNorm;
- Linear + GELU: BERT's Intermediate, GPT-2's MLP (Conv1D weight is (in, out): passed
  transposed), ALBERT's ffn.

Modules are re-classed to a subclass that only overrides forward (`module.__class__ = ...`),
so isinstance checks, hooks and saving keep working. transformers is imported lazily.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .. import kernels as K
from .bert import gelu_approximate

ATTN_NAME = "fuseformer"
_registered = False


def _p(module, p: float) -> float:
    return p if module.training else 0.0


def fuseformer_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                         is_causal=None, **kwargs):
    """transformers' attention-function contract: q/k/v (B, nh, L, hs) -> ((B, L, nh, hs), None)."""
    causal = getattr(module, "is_causal", False) if is_causal is None else is_causal
    causal = bool(causal) and query.shape[2] > 1 and attention_mask is None
    mask = attention_mask
    if mask is not None and mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[-2] > 1:
        # transformers materialises a key-padding mask over every query row; when all rows
        # are equal, hand the kernel its (B, 1, 1, S) fast path instead.
        first = mask[:, :, :1, :]
        if mask.stride(-2) == 0 or (not torch.compiler.is_compiling() and torch.equal(mask, first.expand_as(mask))):
            mask = first
    y = K.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                       is_causal=causal, scale=scaling,
                                       backend=getattr(module, "fuseformer_backend", None))
    return y.transpose(1, 2).contiguous(), None


def _register():
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_NAME, fuseformer_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)  # bool masks, True = attend
    _registered = True


# --- forwards of the re-classed modules -------------------------------------------------------

def _layer_norm_forward(self, x):
    return K.add_layer_norm(x, None, self.weight, self.bias, eps=self.eps, backend=self.fuseformer_backend)


def _dense_add_norm_forward(self, hidden_states, input_tensor):
    """BERT SelfOutput / Output: LN(input + dropout(dense(h)))."""
    ln = self.LayerNorm
    return K.add_layer_norm(self.dense(hidden_states), input_tensor, ln.weight, ln.bias, eps=ln.eps,
                            dropout_p=_p(self, self.dropout.p), backend=self.fuseformer_backend)


def _bert_intermediate_forward(self, hidden_states):
    return K.linear_gelu(hidden_states, self.dense.weight, self.dense.bias,
                         approximate=self.fuseformer_gelu, backend=self.fuseformer_backend)


def _gpt2_mlp_forward(self, hidden_states):
    h = K.linear_gelu(hidden_states, self.c_fc.weight.t(), self.c_fc.bias,
                      approximate=self.fuseformer_gelu, backend=self.fuseformer_backend)
    return self.dropout(self.c_proj(h))


def _gpt2_block_forward(self, hidden_states, past_key_values=None, attention_mask=None,
                        encoder_hidden_states=None, encoder_attention_mask=None, use_cache=False, **kwargs):
    if encoder_hidden_states is not None:  # cross-attention: the stock path
        return type(self).__mro__[1].forward(self, hidden_states, past_key_values, attention_mask,
                                             encoder_hidden_states, encoder_attention_mask, use_cache, **kwargs)
    attn_out, _ = self.attn(self.ln_1(hidden_states), past_key_values=past_key_values,
                            attention_mask=attention_mask, use_cache=use_cache, **kwargs)
    ln = self.ln_2
    h, residual = K.add_layer_norm(attn_out, hidden_states, ln.weight, ln.bias, eps=ln.eps, prenorm=True,
                                   backend=self.fuseformer_backend)  # residual = x + attn; h = LN(residual)
    return residual + self.mlp(h)


def _albert_attention_forward(self, hidden_states, attention_mask=None, **kwargs):
    B, T, _ = hidden_states.shape
    shape = (B, T, -1, self.attention_head_size)
    q = self.query(hidden_states).view(shape).transpose(1, 2)  # (B, nh, T, hs)
    k = self.key(hidden_states).view(shape).transpose(1, 2)
    v = self.value(hidden_states).view(shape).transpose(1, 2)
    y, _ = fuseformer_attention(self, q, k, v, attention_mask, dropout=_p(self, self.attention_dropout.p),
                                scaling=self.scaling)
    y = self.dense(y.reshape(B, T, -1))
    ln = self.LayerNorm
    out = K.add_layer_norm(y, hidden_states, ln.weight, ln.bias, eps=ln.eps,
                           dropout_p=_p(self, self.output_dropout.p), backend=self.fuseformer_backend)
    return out, None


def _albert_layer_forward(self, hidden_states, attention_mask=None, **kwargs):
    a, _ = self.attention(hidden_states, attention_mask, **kwargs)
    h = K.linear_gelu(a, self.ffn.weight, self.ffn.bias, approximate=self.fuseformer_gelu,
                      backend=self.fuseformer_backend)
    ln = self.full_layer_layer_norm
    return K.add_layer_norm(self.ffn_output(h), a, ln.weight, ln.bias, eps=ln.eps, backend=self.fuseformer_backend)


# Stock class name -> our forward. Classes are matched by name so transformers stays optional.
_FORWARDS = {
    "BertSelfOutput": _dense_add_norm_forward,
    "BertOutput": _dense_add_norm_forward,
    "BertIntermediate": _bert_intermediate_forward,
    "GPT2MLP": _gpt2_mlp_forward,
    "GPT2Block": _gpt2_block_forward,
    "AlbertAttention": _albert_attention_forward,
    "AlbertSdpaAttention": _albert_attention_forward,
    "AlbertLayer": _albert_layer_forward,
    "LayerNorm": _layer_norm_forward,
}
_fused_classes: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    if cls not in _fused_classes:
        _fused_classes[cls] = type(f"Fused{cls.__name__}", (cls,), {"forward": _FORWARDS[cls.__name__]})
    return _fused_classes[cls]


def patch_hf(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Swap our fused attention, add+LayerNorm and GELU feed-forward into a transformers BERT,
    GPT-2 or ALBERT model (any head) in place; returns the same model."""
    try:
        import transformers
    except ImportError as err:
        raise ImportError(f"patch_hf needs transformers (pip install 'transformers>=5,<6'): {err}") from None
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"model must be a transformers model, got {type(model).__name__} "
                        "(fuseformer's own models run the fused kernels already)")
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in ("bert", "gpt2", "albert"):
        raise ValueError(f"patch_hf supports transformers BERT, GPT-2 and ALBERT models, got model_type={model_type!r}")
    act = config.activation_function if model_type == "gpt2" else config.hidden_act
    approximate = gelu_approximate(act)
    _register()

    for module in model.modules():
        cls = type(module)
        if cls in _fused_classes.values():  # patched before: just update the backend
            module.fuseformer_backend = backend
            continue
        if cls.__name__ not in _FORWARDS or (cls.__name__ == "LayerNorm" and cls is not nn.LayerNorm):
            continue
        module.__class__ = _fused_class(cls)
        module.fuseformer_backend = backend
        module.fuseformer_gelu = approximate

    for m in model.modules():
        if getattr(m, "config", None) is not None:  # attention layers read it in fuseformer_attention
            m.fuseformer_backend = backend
    if hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(ATTN_NAME)
        except (ValueError, KeyError, TypeError):
            config._attn_implementation = ATTN_NAME
    else:
        config._attn_implementation = ATTN_NAME
    return model


__all__ = ["patch_hf", "fuseformer_attention"]
