"""GPT-2 on the fused kernels: pre-LN causal decoder, tied LM head, KV-cached generate().

    x = drop(wte[ids] + wpe[pos])
    for each block:  x = x + Attn(LN1(x));  x = x + MLP(LN2(x))    (tanh GELU)
    logits = LN_f(x) @ wte^T

Each residual add is fused with the LayerNorm that follows it (add_layer_norm, prenorm=True),
so the blocks pass (branch output, residual stream) along. Hugging Face stores the
projections as Conv1D, weight (in, out): they are transposed on load and save.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import outputs as O
from .bert import check_heads, check_ids, check_inputs, gelu_approximate
from .checkpoint import COPY, TRANSPOSE, HFConfig, PreTrainedModel
from .generation import generate, release_cuda_graphs
from .layers import (AddLayerNorm, StaticKVCache, TransformerBlock, VocabLogits, attention_mask_for, init_weights,
                     scale_residual_projections)


@dataclasses.dataclass
class GPT2Config(HFConfig):
    model_type: ClassVar[str] = "gpt2"
    only: ClassVar[dict[str, Any]] = {
        "add_cross_attention": False, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None
    tie_word_embeddings: bool = True
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    problem_type: str | None = None

    def __post_init__(self):
        check_heads(self.n_embd, self.n_head)
        gelu_approximate(self.activation_function)
        if not self.scale_attn_weights or self.scale_attn_by_inverse_layer_idx:
            raise ValueError("GPT2Config: only scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False "
                             "(the released GPT-2 attention scaling) is supported")

    @property
    def hidden_size(self) -> int:
        return self.n_embd


class GPT2PreTrainedModel(PreTrainedModel):
    config_class = GPT2Config
    base_model_prefix = "transformer"

    # ours -> Hugging Face; the Conv1D weights are stored transposed there.
    _RENAMES = (
        (".attn_norm.", ".ln_1.", False),
        (".attn.qkv.", ".attn.c_attn.", True),
        (".attn.proj.", ".attn.c_proj.", True),
        (".ffn_norm.", ".ln_2.", False),
        (".ffn.fc.", ".mlp.c_fc.", True),
        (".ffn.proj.", ".mlp.c_proj.", True),
    )

    def hf_sources(self, key):
        for ours, theirs, conv1d in self._RENAMES:
            if ours in key:
                how = TRANSPOSE if conv1d and key.endswith(".weight") else COPY
                return [key.replace(ours, theirs)], how
        return [key], COPY

    def hf_ignored(self, hf_key):
        # attn.bias / attn.masked_bias: causal-mask buffers older checkpoints carry.
        tied = self.config.tie_word_embeddings and hf_key == "lm_head.weight"
        return tied or hf_key.endswith((".attn.bias", ".attn.masked_bias")) or super().hf_ignored(hf_key)

    def _init(self):
        std = self.config.initializer_range
        init_weights(self, std)
        scale_residual_projections(self, std, 2 * self.config.n_layer)


class GPT2Model(GPT2PreTrainedModel):
    hf_architecture = "GPT2Model"

    def __init__(self, config: GPT2Config, backend: str | None = None):
        super().__init__()
        self.config = config
        C = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, C)
        self.wpe = nn.Embedding(config.n_positions, C)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([
            TransformerBlock(C, config.n_head, config.n_inner or 4 * C, eps=config.layer_norm_epsilon,
                             attn_dropout=config.attn_pdrop, hidden_dropout=config.resid_pdrop,
                             approximate=gelu_approximate(config.activation_function),
                             prenorm=True, causal=True, backend=backend)
            for _ in range(config.n_layer)
        ])
        self.ln_f = AddLayerNorm(C, config.layer_norm_epsilon, config.resid_pdrop, backend)
        self._init()

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, position_ids=None,
                use_cache=False, output_hidden_states=False, return_dict=True, inputs_embeds=None):
        """past_key_values: one (k, v) per block, each (B, nh, S_past, hs), or a StaticKVCache
        (one token a step, its position_ids given; the cache itself is returned as the new one).
        attention_mask: (B, S_past + T), 1 = attend, or a 4-D bool / additive float mask."""
        c = self.config
        B, T = check_inputs(input_ids, inputs_embeds, c.n_embd)
        if past_key_values is not None and len(past_key_values) != c.n_layer:
            raise ValueError(f"past_key_values must hold one (k, v) per layer ({c.n_layer}), got {len(past_key_values)}")
        static = isinstance(past_key_values, StaticKVCache)
        if static:
            # A decoding step on preallocated buffers (generate(cuda_graph=True)): its slot and
            # positions live on the device, so nothing here reads a length back.
            if T != 1 or position_ids is None or attention_mask is not None:
                raise ValueError("a StaticKVCache step takes one token (B, 1) with its position_ids and no "
                                 "attention_mask (the cache's key_mask is the mask)")
            past = 0
        else:
            past = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        if past + T > c.n_positions:
            raise ValueError(f"input_ids reaches position {past + T}, beyond the position table (n_positions={c.n_positions})")
        check_ids("input_ids", input_ids, c.vocab_size, "vocab_size")
        check_ids("position_ids", position_ids, c.n_positions, "n_positions")
        if inputs_embeds is None:
            inputs_embeds = self.wte(input_ids)  # (B, T, C)
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=inputs_embeds.device)[None]  # (1, T)
        if static:
            past_key_values.key_mask.index_fill_(3, past_key_values.position, True)  # this step's own slot
            mask = past_key_values.key_mask
        else:
            mask = attention_mask_for(attention_mask, B, past + T, inputs_embeds.dtype)  # (B, 1, 1, S) or None

        h = self.drop(inputs_embeds + self.wpe(position_ids))  # (B, T, C)
        residual, presents, states = None, [], []
        for i, block in enumerate(self.h):
            if output_hidden_states:
                states.append(h if residual is None else residual + h)
            if static:
                kv = past_key_values.layer(i)
            else:
                kv = past_key_values[i] if past_key_values is not None else None
            out = block(h, residual, attn_mask=mask, past_kv=kv, use_cache=use_cache)
            if use_cache:
                h, residual, kv = out
                presents.append(kv)
            else:
                h, residual = out
        x = self.ln_f(h, residual)  # LN(residual + drop(h)): the last block's add, fused
        if output_hidden_states:
            states.append(x)
        if static:
            past_key_values.position.add_(1)
            presents = past_key_values
        elif use_cache:
            presents = tuple(presents)
        out = O.BaseModelOutputWithPast(x, presents if use_cache else None,
                                        tuple(states) if output_hidden_states else None)
        return out if return_dict else out.to_tuple()


class GPT2LMHeadModel(GPT2PreTrainedModel):
    """GPT-2 with the LM head tied to the token embedding, and generate()."""

    hf_architecture = "GPT2LMHeadModel"

    def __init__(self, config: GPT2Config, backend: str | None = None):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config, backend)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.vocab_logits = VocabLogits(backend)
        self._init()

    def forward(self, input_ids=None, past_key_values=None, attention_mask=None, position_ids=None,
                labels=None, use_cache=False, output_hidden_states=False, return_dict=True, inputs_embeds=None):
        base = self.transformer(input_ids, past_key_values, attention_mask, position_ids, use_cache,
                                output_hidden_states, inputs_embeds=inputs_embeds)
        weight = self.transformer.wte.weight if self.lm_head is None else self.lm_head.weight
        logits = self.vocab_logits(base.last_hidden_state, weight)  # (B, T, V)
        loss = None
        if labels is not None:
            # Token t predicts token t + 1: the labels move one left, the last position has
            # none (-100), and the logits are used as they are (slicing them would copy).
            loss = self.vocab_logits.loss(logits, F.pad(labels[:, 1:], (0, 1), value=-100))
        out = O.CausalLMOutputWithPast(loss, logits, base.past_key_values, base.hidden_states)
        return out if return_dict else out.to_tuple()

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int | None = None, **kwargs) -> torch.Tensor:
        """Append up to `max_new_tokens` tokens to each row of `input_ids`; the keywords of
        fuseformer.models.generation.generate (attention_mask, max_length, do_sample,
        temperature, top_k, top_p, eos_token_id, pad_token_id, ...)."""
        return generate(self, input_ids, max_new_tokens, **kwargs)

    def release_cuda_graphs(self) -> None:
        """Drop the decoding steps generate(cuda_graph=True) captured, and their buffers."""
        release_cuda_graphs(self)


__all__ = ["GPT2Config", "GPT2Model", "GPT2LMHeadModel"]
