"""ALBERT on the fused kernels: factorised embeddings and cross-layer parameter sharing.

    embeddings: V x E (E << H), LN, dropout, then one E -> H projection
    encoder:    num_hidden_layers applications of post-LN blocks drawn from
                num_hidden_groups groups of inner_group_num blocks each (Hugging Face's
                grouping: layer i uses group int(i / (num_hidden_layers / num_hidden_groups)))
    heads:      MLM (H -> E -> V, decoder tied to the embeddings) + sentence order prediction
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn as nn

from . import outputs as O
from .bert import BertEmbeddings, check_heads, classification_loss, gelu_approximate, post_ln_block, run_encoder
from .checkpoint import CAT, COPY, HFConfig, PreTrainedModel
from .layers import AddLayerNorm, BackendChoice, VocabLogits, init_weights, linear_gelu
from .pretraining import check_max_predictions, predicted_rows, pretraining_loss


@dataclasses.dataclass
class AlbertConfig(HFConfig):
    model_type: ClassVar[str] = "albert"
    only: ClassVar[dict[str, Any]] = {"position_embedding_type": "absolute"}
    vocab_size: int = 30000
    embedding_size: int = 128
    hidden_size: int = 4096
    num_hidden_layers: int = 12
    num_hidden_groups: int = 1
    num_attention_heads: int = 64
    intermediate_size: int = 16384
    inner_group_num: int = 1
    hidden_act: str = "gelu_new"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    classifier_dropout_prob: float = 0.1
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: int = 3
    tie_word_embeddings: bool = True
    problem_type: str | None = None

    def __post_init__(self):
        check_heads(self.hidden_size, self.num_attention_heads)
        gelu_approximate(self.hidden_act)
        if not 1 <= self.num_hidden_groups <= max(1, self.num_hidden_layers):
            raise ValueError(f"num_hidden_groups must be in [1, num_hidden_layers={self.num_hidden_layers}], "
                             f"got {self.num_hidden_groups}")


class AlbertLayerGroup(nn.Module):
    def __init__(self, config: AlbertConfig, backend=None):
        super().__init__()
        self.albert_layers = nn.ModuleList([post_ln_block(config, backend) for _ in range(config.inner_group_num)])
        for block in self.albert_layers:
            # Hugging Face's ALBERT applies no dropout to the FFN output before its LayerNorm.
            block.ffn_norm.dropout = 0.0


class AlbertTransformer(nn.Module):
    def __init__(self, config: AlbertConfig, backend=None):
        super().__init__()
        self.config = config
        self.embedding_hidden_mapping_in = nn.Linear(config.embedding_size, config.hidden_size)
        self.albert_layer_groups = nn.ModuleList([AlbertLayerGroup(config, backend)
                                                  for _ in range(config.num_hidden_groups)])

    def schedule(self):
        """The blocks in the order they run: shared weights appear many times."""
        L, G = self.config.num_hidden_layers, self.config.num_hidden_groups
        for i in range(L):
            yield from self.albert_layer_groups[int(i / (L / G))].albert_layers


class AlbertPreTrainedModel(PreTrainedModel):
    config_class = AlbertConfig
    base_model_prefix = "albert"

    _RENAMES = (
        (".attn.proj.", ".attention.dense."),
        (".attn_norm.", ".attention.LayerNorm."),
        (".ffn.fc.", ".ffn."),
        (".ffn.proj.", ".ffn_output."),
        (".ffn_norm.", ".full_layer_layer_norm."),
    )

    def hf_sources(self, key):
        if ".attn.qkv." in key:
            head, leaf = key.split(".attn.qkv.")
            return [f"{head}.attention.{n}.{leaf}" for n in ("query", "key", "value")], CAT
        for ours, theirs in self._RENAMES:
            if ours in key:
                return [key.replace(ours, theirs)], COPY
        return [key], COPY

    def hf_ignored(self, hf_key):
        tied = self.config.tie_word_embeddings and hf_key.endswith("predictions.decoder.weight")
        return tied or hf_key.endswith("predictions.decoder.bias") or super().hf_ignored(hf_key)

    def _init(self):
        init_weights(self, self.config.initializer_range)


class AlbertModel(AlbertPreTrainedModel):
    hf_architecture = "AlbertModel"

    def __init__(self, config: AlbertConfig, add_pooling_layer: bool = True, backend: str | None = None,
                 unpad: bool = False):
        super().__init__()
        self.config, self.unpad = config, unpad
        self.embeddings = BertEmbeddings(config, config.embedding_size, backend)
        self.encoder = AlbertTransformer(config, backend)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if add_pooling_layer else None
        self._init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states=False, return_dict=True,
                inputs_embeds=None):
        e = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)  # (B, T, E)
        x = self.encoder.embedding_hidden_mapping_in(e)  # (B, T, H)
        x, states = run_encoder(list(self.encoder.schedule()), x, attention_mask, self.unpad, output_hidden_states)
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None
        out = O.BaseModelOutputWithPooling(x, pooled, states)
        return out if return_dict else out.to_tuple()


class AlbertMLMHead(BackendChoice, nn.Module):
    """H -> E (GELU, LN) -> V; the E -> V decoder is the word embedding matrix when tied."""

    def __init__(self, config: AlbertConfig, backend=None):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.embedding_size)
        self.LayerNorm = AddLayerNorm(config.embedding_size, config.layer_norm_eps, 0.0, backend)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder = None if config.tie_word_embeddings else nn.Linear(config.embedding_size, config.vocab_size, bias=False)
        self.approximate, self.backend = gelu_approximate(config.hidden_act), backend
        self.vocab_logits = VocabLogits(backend)

    def forward(self, h, word_embeddings):
        h = linear_gelu(h, self.dense.weight, self.dense.bias, self.approximate, self._backend, self.uses_torch(h))
        weight = word_embeddings if self.decoder is None else self.decoder.weight
        return self.vocab_logits(self.LayerNorm(h), weight, self.bias)  # (B, T, V)


class AlbertSOPHead(nn.Module):
    def __init__(self, config: AlbertConfig):
        super().__init__()
        self.dropout = nn.Dropout(config.classifier_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, pooled):
        return self.classifier(self.dropout(pooled))


class AlbertForPreTraining(AlbertPreTrainedModel):
    """MLM + sentence order prediction (label 0: segments in order, 1: swapped)."""

    hf_architecture = "AlbertForPreTraining"

    def __init__(self, config: AlbertConfig, backend: str | None = None, unpad: bool = False,
                 max_predictions_per_seq: int | None = None):
        super().__init__()
        self.config = config
        self.albert = AlbertModel(config, True, backend, unpad)
        self.predictions = AlbertMLMHead(config, backend)
        self.sop_classifier = AlbertSOPHead(config)
        self.max_predictions_per_seq = check_max_predictions(max_predictions_per_seq)  # see predicted_rows
        self._init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None, sentence_order_label=None, output_hidden_states=False, return_dict=True,
                inputs_embeds=None):
        base = self.albert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                           inputs_embeds=inputs_embeds)
        h, labels = predicted_rows(base.last_hidden_state, labels, self.max_predictions_per_seq)
        logits = self.predictions(h, self.albert.embeddings.word_embeddings.weight)
        sop = self.sop_classifier(base.pooler_output)  # (B, 2)
        loss = pretraining_loss(logits, labels, sop, sentence_order_label, self.predictions.vocab_logits.loss)
        out = O.AlbertForPreTrainingOutput(loss, logits, sop, base.hidden_states)
        return out if return_dict else out.to_tuple()


class AlbertForMaskedLM(AlbertPreTrainedModel):
    hf_architecture = "AlbertForMaskedLM"

    def __init__(self, config: AlbertConfig, backend: str | None = None, unpad: bool = False,
                 max_predictions_per_seq: int | None = None):
        super().__init__()
        self.config = config
        self.albert = AlbertModel(config, False, backend, unpad)
        self.predictions = AlbertMLMHead(config, backend)
        self.max_predictions_per_seq = check_max_predictions(max_predictions_per_seq)  # see predicted_rows
        self._init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None, output_hidden_states=False, return_dict=True,
                inputs_embeds=None):
        base = self.albert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                           inputs_embeds=inputs_embeds)
        h, labels = predicted_rows(base.last_hidden_state, labels, self.max_predictions_per_seq)
        logits = self.predictions(h, self.albert.embeddings.word_embeddings.weight)
        loss = self.predictions.vocab_logits.loss(logits, labels) if labels is not None else None
        out = O.MaskedLMOutput(loss, logits, base.hidden_states)
        return out if return_dict else out.to_tuple()


class AlbertForSequenceClassification(AlbertPreTrainedModel):
    hf_architecture = "AlbertForSequenceClassification"

    def __init__(self, config: AlbertConfig, backend: str | None = None, unpad: bool = False):
        super().__init__()
        self.config = config
        self.albert = AlbertModel(config, True, backend, unpad)
        self.dropout = nn.Dropout(config.classifier_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self._init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None, output_hidden_states=False, return_dict=True,
                inputs_embeds=None):
        base = self.albert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                           inputs_embeds=inputs_embeds)
        logits = self.classifier(self.dropout(base.pooler_output))
        loss = classification_loss(self.config, logits, labels) if labels is not None else None
        out = O.SequenceClassifierOutput(loss, logits, base.hidden_states)
        return out if return_dict else out.to_tuple()


__all__ = ["AlbertConfig", "AlbertModel", "AlbertForPreTraining", "AlbertForMaskedLM", "AlbertForSequenceClassification"]
