"""patch_hf: put our fused computations into an existing transformers model, in place.

What is swapped (parameters, their names and the model's state dict are untouched):
- attention: registered with transformers' AttentionInterface as "fuseformer", so every
  BERT / GPT-2 / ALBERT attention layer calls K.scaled_dot_product_attention (key-padding
  masks reach it as (B, 1, 1, S), the fast path, with is_causal=True in GPT-2);
- add + LayerNorm: BERT's SelfOutput/Output, ALBERT's attention output and FFN, GPT-2's
  block (the residual add is fused with ln_2) and every other LayerNorm;
- Linear + GELU: BERT's Intermediate, GPT-2's MLP (Conv1D weight is (in, out): passed
  transposed), ALBERT's ffn.

Modules are re-classed to a subclass that only overrides forward (`module.__class__ = ...`),
so isinstance checks, hooks and saving keep working, and `unpatch` puts the stock classes
back. transformers is imported lazily.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from . import layers as L
from .bert import gelu_approximate

ATTN_NAME = "fuseformer"
_registered = False


def _p(module, p: float) -> float:
    return p if module.training else 0.0


def _backend(module):
    return getattr(module, "fuseformer_backend", None)


def _torch(module, x) -> bool:
    return L.torch_path(module, _backend(module), x)


def fuseformer_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                         is_causal=None, **kwargs):
    """transformers' attention-function contract: q/k/v (B, nh, L, hs) -> ((B, L, nh, hs), None)."""
    causal = getattr(module, "is_causal", False) if is_causal is None else is_causal
    causal = bool(causal) and query.shape[2] > 1 and attention_mask is None
    mask = attention_mask
    use_torch = _torch(module, query)
    # A padded causal mask (_key_padding_mask_interface): its key row and is_causal for the fused
    # kernels; torch's SDPA, which takes one or the other, keeps the dense mask.
    row = None if use_torch else getattr(mask, "_fuseformer_key_row", None)
    if row is not None and row.shape[0] == query.shape[0] and query.shape[2] == key.shape[2] == row.shape[-1]:
        mask, causal = row, True
    elif mask is not None and mask.dim() == 4 and mask.shape[-2] > 1 and mask.stride(-2) == 0:
        # Every query row is the same row, expanded: hand the kernel its (B, 1, 1, S) fast path.
        # Decided from the strides alone; comparing the rows' values would synchronise with
        # the GPU on every call. Key-padding masks arrive as (B, 1, 1, S) already (_key_padding_mask_interface).
        mask = mask[:, :, :1, :]
    y = L.attention(query, key, value, mask, dropout, causal, scaling, _backend(module), use_torch)
    return y.transpose(1, 2).contiguous(), None


def _key_padding_mask_interface():
    """transformers' mask interface for "fuseformer": its own sdpa_mask (bool, True = attend),
    except
    - a padded bidirectional mask, given as what it is: key padding (B, 1, 1, S), not a
      (B, 1, L, S) copy of it per query row;
    - a padded causal mask without a cache (GPT-2's forward on a padded batch): transformers'
      dense (B, 1, L, L) mask, carrying its key-padding row as `_fuseformer_key_row`, which
      fuseformer_attention hands the kernels with is_causal=True: they read one row per batch
      and skip the key tiles past the diagonal, where the dense mask is read per tile and
      every tile computed. The dense mask stays correct on its own wherever the row is not
      picked up (torch.compile, which this leaves to transformers' own path). An unpadded
      batch still gets no mask, as from transformers (which checks that on the host: torch's
      SDPA then runs its flash kernel).
    A bidirectional all-ones mask stays a mask: transformers drops it after checking that on
    the host, which synchronises with the GPU every forward."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sdpa_mask

    def mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
             attention_mask=None, **kwargs):
        padded = attention_mask is not None and attention_mask.dim() == 2
        if mask_function is bidirectional_mask_function and padded:
            keep = attention_mask.bool()
            if keep.shape[-1] < kv_offset + kv_length:  # as transformers' prepare_padding_mask
                keep = torch.nn.functional.pad(keep, (0, kv_offset + kv_length - keep.shape[-1]))
            return keep[:, None, None, kv_offset:kv_offset + kv_length]
        if (mask_function is causal_mask_function and padded and not torch.compiler.is_compiling()
                and type(q_offset) is int and type(kv_offset) is int and q_offset == kv_offset == 0
                and q_length == kv_length == attention_mask.shape[-1] and kwargs.get("local_size") is None):
            dense = sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                              **kwargs)
            if dense is not None:  # None: no padding (transformers checked), is_causal alone
                dense._fuseformer_key_row = attention_mask.bool()[:, None, None, :]
            return dense
        return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                         **kwargs)

    return mask


def _register():
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(ATTN_NAME, fuseformer_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, _key_padding_mask_interface())
    _registered = True


# --- forwards of the re-classed modules -------------------------------------------------------

def _layer_norm_forward(self, x):
    return L.add_layer_norm(x, None, self.weight, self.bias, self.eps, 0.0, False, _backend(self), _torch(self, x))


def _dense_add_norm_forward(self, hidden_states, input_tensor):
    """BERT SelfOutput / Output: LN(input + dropout(dense(h)))."""
    ln = self.LayerNorm
    return L.add_layer_norm(self.dense(hidden_states), input_tensor, ln.weight, ln.bias, ln.eps,
                            _p(self, self.dropout.p), False, _backend(self), _torch(self, input_tensor))


def _bert_intermediate_forward(self, hidden_states):
    return L.linear_gelu(hidden_states, self.dense.weight, self.dense.bias, self.fuseformer_gelu,
                         _backend(self), _torch(self, hidden_states))


def _gpt2_mlp_forward(self, hidden_states):
    h = L.linear_gelu(hidden_states, self.c_fc.weight.t(), self.c_fc.bias, self.fuseformer_gelu,
                      _backend(self), _torch(self, hidden_states))
    return self.dropout(self.c_proj(h))


def _gpt2_block_forward(self, hidden_states, cache=None, attention_mask=None, encoder_hidden_states=None,
                        encoder_attention_mask=None, use_cache=False, **kwargs):
    # The cache goes on positionally: transformers renamed the keyword (past_key_values ->
    # cache, the old name deprecated until 5.40) but kept its place second in both versions.
    if "past_key_values" in kwargs:
        cache = kwargs.pop("past_key_values")
    if encoder_hidden_states is not None:  # cross-attention: the stock path
        return type(self).__mro__[1].forward(self, hidden_states, cache, attention_mask, encoder_hidden_states,
                                             encoder_attention_mask=encoder_attention_mask, use_cache=use_cache,
                                             **kwargs)
    attn_out, _ = self.attn(self.ln_1(hidden_states), cache, attention_mask=attention_mask, use_cache=use_cache,
                            **kwargs)
    ln = self.ln_2
    h, residual = L.add_layer_norm(attn_out, hidden_states, ln.weight, ln.bias, ln.eps, 0.0, True,
                                   _backend(self), _torch(self, hidden_states))  # residual = x + attn; h = LN(residual)
    return residual + self.mlp(h)


def _albert_attention_forward(self, hidden_states, attention_mask=None, **kwargs):
    B, T, _ = hidden_states.shape
    shape = (B, T, -1, self.attention_head_size)
    q = self.query(hidden_states).view(size=shape).transpose(1, 2)  # (B, nh, T, hs)
    k = self.key(hidden_states).view(size=shape).transpose(1, 2)
    v = self.value(hidden_states).view(size=shape).transpose(1, 2)
    y, _ = fuseformer_attention(self, q, k, v, attention_mask, dropout=_p(self, self.attention_dropout.p),
                                scaling=self.scaling)
    y = self.dense(y.reshape(B, T, -1))
    ln = self.LayerNorm
    out = L.add_layer_norm(y, hidden_states, ln.weight, ln.bias, ln.eps, _p(self, self.output_dropout.p), False,
                           _backend(self), _torch(self, y))
    return out, None


def _albert_layer_forward(self, hidden_states, attention_mask=None, **kwargs):
    a, _ = self.attention(hidden_states, attention_mask, **kwargs)
    use_torch = _torch(self, a)
    h = L.linear_gelu(a, self.ffn.weight, self.ffn.bias, self.fuseformer_gelu, _backend(self), use_torch)
    ln = self.full_layer_layer_norm
    return L.add_layer_norm(self.ffn_output(h), a, ln.weight, ln.bias, ln.eps, 0.0, False, _backend(self), use_torch)


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


def _check_model(model: nn.Module):
    try:
        import transformers
    except ImportError as err:
        raise ImportError(f"patch_hf needs transformers (pip install 'transformers>=5,<6'): {err}") from None
    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"model must be a transformers model, got {type(model).__name__} "
                        "(fuseformer's own models run the fused kernels already)")


def _set_attn_implementation(model: nn.Module, name: str) -> None:
    try:
        model.set_attn_implementation(name)
    except (AttributeError, ValueError, KeyError, TypeError):
        model.config._attn_implementation = name


def patch_hf(model: nn.Module, backend: str | None = None) -> nn.Module:
    """Swap our fused attention, add+LayerNorm and GELU feed-forward into a transformers BERT,
    GPT-2 or ALBERT model (any head) in place; returns the same model. `unpatch` undoes it.

    On the torch backend (and `auto` on the CPU) the swapped modules run PyTorch's own fused
    functions (F.scaled_dot_product_attention, F.layer_norm), as our models do."""
    backend = L.check_backend(backend)
    _check_model(model)
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in ("bert", "gpt2", "albert"):
        raise ValueError(f"patch_hf supports transformers BERT, GPT-2 and ALBERT models, got model_type={model_type!r}")
    act = config.activation_function if model_type == "gpt2" else config.hidden_act
    approximate = gelu_approximate(act)
    _register()

    for module in model.modules():
        cls = type(module)
        if cls.__name__ in _FORWARDS and cls not in _fused_classes.values() and (
                cls.__name__ != "LayerNorm" or cls is nn.LayerNorm):
            module.__class__ = _fused_class(cls)
            module.fuseformer_gelu = approximate
        if type(module) in _fused_classes.values() or getattr(module, "config", None) is not None:
            module.fuseformer_backend = backend  # attention layers (they have a config) read it too
    if config._attn_implementation != ATTN_NAME:  # patched again: keep the first one to restore
        model._fuseformer_unpatched_attn = config._attn_implementation
    _set_attn_implementation(model, ATTN_NAME)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo patch_hf in place: the stock classes and attention implementation come back;
    parameters were never touched. Returns the same model."""
    _check_model(model)
    for module in model.modules():
        if type(module) in _fused_classes.values():
            module.__class__ = type(module).__mro__[1]
        for name in ("fuseformer_backend", "fuseformer_gelu", "_torch_path_plan"):
            module.__dict__.pop(name, None)
    previous = model.__dict__.pop("_fuseformer_unpatched_attn", None)
    if previous is not None:
        _set_attn_implementation(model, previous)
    return model


__all__ = ["patch_hf", "unpatch", "fuseformer_attention"]
