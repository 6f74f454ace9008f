"""BERT on the fused kernels, loadable from (and savable to) Hugging Face checkpoints.

    embeddings: LN(token + segment + position) -> dropout
    encoder:    N post-LN blocks, x = LN(x + Attn(x)); x = LN(x + FFN(x)), GELU (erf)
    pooler:     tanh(Linear(h[CLS]))

Our module layout differs from transformers' in one place that matters for speed: query,
key and value are one fused `qkv` Linear. `hf_sources` maps our keys to theirs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import outputs as O
from .checkpoint import CAT, COPY, HFConfig, PreTrainedModel
from .layers import (AddLayerNorm, BackendChoice, TransformerBlock, VocabLogits, attention_mask_for, init_weights,
                     linear_gelu, wide)
from .pretraining import check_max_predictions, predicted_rows, pretraining_loss


def gelu_approximate(hidden_act: str) -> str:
    """Hugging Face's activation name -> linear_gelu's `approximate`."""
    table = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}
    if hidden_act not in table:
        raise ValueError(f"hidden_act must be one of {sorted(table)}, got {hidden_act!r}")
    return table[hidden_act]


def check_heads(hidden_size: int, num_heads: int) -> None:
    if num_heads <= 0 or hidden_size % num_heads != 0:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_attention_heads ({num_heads})")


@dataclasses.dataclass
class BertConfig(HFConfig):
    model_type: ClassVar[str] = "bert"
    only: ClassVar[dict[str, Any]] = {
        "is_decoder": False, "add_cross_attention": False, "position_embedding_type": "absolute"}
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    classifier_dropout: float | None = None
    tie_word_embeddings: bool = True
    problem_type: str | None = None

    def __post_init__(self):
        check_heads(self.hidden_size, self.num_attention_heads)
        gelu_approximate(self.hidden_act)


def _capturing_cuda_graph() -> bool:
    # Reading a value back to the host is illegal while a CUDA graph is being captured (the
    # benchmark's fuseformer-fused-graphs case): int(ids.max()) there aborted the capture, so
    # graphed inference was always reported as refused. is_available() first: the capture
    # query raises on a CPU-only torch build.
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def check_ids(name: str, ids: torch.Tensor | None, limit: int, what: str, shape=None) -> None:
    """Token ids in [0, limit).

    On the CPU a bad id gets a Python error naming the argument (reading CPU values costs no
    synchronisation). On a GPU, reading them back would stall the host until the GPU catches
    up, every forward: there the GPU checks them itself (torch._assert_async) and a bad id
    fails as a device-side assert. Skipped while compiling."""
    if ids is None:
        return
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer torch.Tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
    if shape is not None and tuple(ids.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(ids.shape)}")
    if not ids.numel() or torch.compiler.is_compiling():
        return
    if ids.device.type != "cpu":
        torch._assert_async(((ids >= 0) & (ids < limit)).all(), f"{name} must lie in [0, {limit}) ({what})")
    elif not _capturing_cuda_graph():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= limit:
            raise ValueError(f"{name} must lie in [0, {limit}) ({what}), got values in [{lo}, {hi}]")


def check_inputs(input_ids, inputs_embeds, width: int) -> tuple[int, int]:
    """Exactly one of input_ids (B, T) and inputs_embeds (B, T, width), as Hugging Face takes
    them; returns (B, T)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds, got "
                         + ("both" if input_ids is not None else "neither"))
    if inputs_embeds is not None:
        if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != width:
            raise ValueError(f"inputs_embeds must be a (batch, seq_len, {width}) tensor, "
                             f"got {getattr(inputs_embeds, 'shape', type(inputs_embeds))}")
        return tuple(inputs_embeds.shape[:2])
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a (batch, seq_len) tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    return tuple(input_ids.shape)


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig, embedding_size: int | None = None, backend: str | None = None):
        super().__init__()
        E = embedding_size or config.hidden_size  # ALBERT's factorised embedding uses E < H
        self.word_embeddings = nn.Embedding(config.vocab_size, E, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, E)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, E)
        self.LayerNorm = AddLayerNorm(E, config.layer_norm_eps, 0.0, backend)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.config = config

    def forward(self, input_ids, token_type_ids=None, position_ids=None, inputs_embeds=None):
        c = self.config
        B, T = check_inputs(input_ids, inputs_embeds, self.word_embeddings.embedding_dim)
        if T > c.max_position_embeddings:
            raise ValueError(f"input_ids has sequence length {T}, longer than the position table "
                             f"(max_position_embeddings={c.max_position_embeddings})")
        check_ids("input_ids", input_ids, c.vocab_size, "vocab_size")
        check_ids("token_type_ids", token_type_ids, c.type_vocab_size, "type_vocab_size", (B, T))
        check_ids("position_ids", position_ids, c.max_position_embeddings, "max_position_embeddings")
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)  # (B, T, E)
        if position_ids is None:
            position_ids = torch.arange(T, device=inputs_embeds.device)[None]  # (1, T)
        x = inputs_embeds + self.position_embeddings(position_ids)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


def post_ln_block(config, backend) -> TransformerBlock:
    return TransformerBlock(
        config.hidden_size, config.num_attention_heads, config.intermediate_size,
        eps=config.layer_norm_eps, attn_dropout=config.attention_probs_dropout_prob,
        hidden_dropout=config.hidden_dropout_prob, approximate=gelu_approximate(config.hidden_act),
        prenorm=False, causal=False, backend=backend)


class Unpadder:
    """Drops padding tokens once (B, T, C) -> (total, C) and puts them back at the end."""

    def __init__(self, attention_mask: torch.Tensor):
        if _capturing_cuda_graph():
            raise RuntimeError("unpad=True cannot run inside a CUDA graph capture: the packed length depends on "
                               "the mask's values. Capture a model built with unpad=False (CUDAGraphRunner pads "
                               "to static buckets instead)")
        keep = attention_mask.bool()
        self.B, self.T = keep.shape
        lengths = keep.sum(1, dtype=torch.int32)  # (B,)
        self.cu_seqlens = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))  # (B + 1,)
        # The one host read of a forward, and only where the device must tell us: varlen
        # attention takes max_seqlen as a Python int (it sizes the launch grid) and the packed
        # length sizes the index, so B lengths are copied back once. nonzero() would be a
        # second synchronisation: a stable sort puts the kept positions first, in order.
        host = lengths.tolist()
        self.max_seqlen = max(host, default=0)
        order = torch.argsort((~keep).flatten().to(torch.uint8), stable=True)
        self.index = order[:sum(host)]  # (total,)

    def unpad(self, x):  # (B, T, C) -> (total, C)
        return x.reshape(self.B * self.T, -1).index_select(0, self.index)

    def pad(self, x):  # (total, C) -> (B, T, C), zeros at padding
        out = x.new_zeros(self.B * self.T, x.shape[-1])
        return out.index_copy(0, self.index, x).view(self.B, self.T, -1)


def run_encoder(layers, x, attention_mask, unpad, output_hidden_states):
    """Post-LN blocks over (B, T, C), or over packed tokens when `unpad` and a (B, T) mask is
    given (a 4-D mask may say more than which tokens exist: it runs padded)."""
    B, T = x.shape[:2]
    mask = attention_mask_for(attention_mask, B, T, x.dtype)
    states = [x] if output_hidden_states else None
    if unpad and attention_mask is not None and attention_mask.dim() == 2:
        packer = Unpadder(attention_mask)
        h = packer.unpad(x)  # (total, C)
        for layer in layers:
            h = layer(h, packed=(packer.cu_seqlens, packer.max_seqlen))
            if states is not None:
                states.append(packer.pad(h))
        x = packer.pad(h)
    else:
        for layer in layers:
            x = layer(x, attn_mask=mask)
            if states is not None:
                states.append(x)
    return x, (tuple(states) if states is not None else None)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig, backend: str | None = None):
        super().__init__()
        self.layer = nn.ModuleList([post_ln_block(config, backend) for _ in range(config.num_hidden_layers)])


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, h):  # (B, T, C) -> (B, C) from [CLS]
        return torch.tanh(self.dense(h[:, 0]))


_LAYER_RENAMES = (
    (".attn.proj.", ".attention.output.dense."),
    (".attn_norm.", ".attention.output.LayerNorm."),
    (".ffn.fc.", ".intermediate.dense."),
    (".ffn.proj.", ".output.dense."),
    (".ffn_norm.", ".output.LayerNorm."),
)


class BertPreTrainedModel(PreTrainedModel):
    config_class = BertConfig
    base_model_prefix = "bert"

    def hf_sources(self, key):
        if ".attn.qkv." in key:
            head, leaf = key.split(".attn.qkv.")
            return [f"{head}.attention.self.{n}.{leaf}" for n in ("query", "key", "value")], CAT
        for ours, theirs in _LAYER_RENAMES:
            if ours in key:
                return [key.replace(ours, theirs)], COPY
        return [key], COPY

    def hf_ignored(self, hf_key):
        tied = self.config.tie_word_embeddings and hf_key.endswith("predictions.decoder.weight")
        return tied or hf_key.endswith("predictions.decoder.bias") or super().hf_ignored(hf_key)

    def _init(self):
        init_weights(self, self.config.initializer_range)
        for m in self.modules():
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()


class BertModel(BertPreTrainedModel):
    """Embeddings + encoder (+ pooler). `unpad=True` packs out padding once after the
    embeddings and runs every layer on the packed tokens (varlen attention)."""

    hf_architecture = "BertModel"

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True, backend: str | None = None,
                 unpad: bool = False):
        super().__init__()
        self.config, self.unpad = config, unpad
        self.embeddings = BertEmbeddings(config, backend=backend)
        self.encoder = BertEncoder(config, backend)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self._init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                output_hidden_states=False, return_dict=True,
                inputs_embeds=None):
        x = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)  # (B, T, C)
        x, states = run_encoder(self.encoder.layer, x, attention_mask, self.unpad, output_hidden_states)
        pooled = self.pooler(x) if self.pooler is not None else None
        out = O.BaseModelOutputWithPooling(x, pooled, states)
        return out if return_dict else out.to_tuple()


class BertPredictionHeadTransform(BackendChoice, nn.Module):
    def __init__(self, config: BertConfig, backend: str | None = None):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = AddLayerNorm(config.hidden_size, config.layer_norm_eps, 0.0, backend)
        self.approximate, self.backend = gelu_approximate(config.hidden_act), backend

    def forward(self, h):
        h = linear_gelu(h, self.dense.weight, self.dense.bias, self.approximate, self._backend, self.uses_torch(h))
        return self.LayerNorm(h)


class BertLMPredictionHead(nn.Module):
    """transform -> decoder; the decoder weight is the word embedding matrix when tied."""

    def __init__(self, config: BertConfig, backend: str | None = None):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config, backend)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.vocab_logits = VocabLogits(backend)

    def forward(self, h, word_embeddings: torch.Tensor):
        weight = word_embeddings if self.decoder is None else self.decoder.weight
        return self.vocab_logits(self.transform(h), weight, self.bias)  # (B, T, V)


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config, backend=None):
        super().__init__()
        self.predictions = BertLMPredictionHead(config, backend)


class BertPreTrainingHeads(nn.Module):
    def __init__(self, config, backend=None):
        super().__init__()
        self.predictions = BertLMPredictionHead(config, backend)
        self.seq_relationship = nn.Linear(config.hidden_size, 2)


def classification_loss(config, logits, labels):
    """Hugging Face's rule: regression for one label, else single- or multi-label."""
    kind = config.problem_type
    if kind is None:
        kind = "regression" if config.num_labels == 1 else (
            "single_label_classification" if labels.dtype in (torch.long, torch.int) else "multi_label_classification")
    if kind == "regression":
        if config.num_labels == 1:
            return F.mse_loss(wide(logits.squeeze(-1)), wide(labels).reshape(logits.shape[:-1]))
        # Several regression targets (problem_type="regression", num_labels > 1): labels are
        # (B, num_labels) like the logits, as transformers takes them; squeezing to (B,) failed.
        return F.mse_loss(wide(logits), wide(labels).reshape(logits.shape))
    if kind == "single_label_classification":
        return F.cross_entropy(wide(logits.reshape(-1, config.num_labels)), labels.reshape(-1))
    return F.binary_cross_entropy_with_logits(wide(logits), wide(labels))


class BertForPreTraining(BertPreTrainedModel):
    """MLM (decoder tied to the word embeddings) + next sentence prediction on [CLS]."""

    hf_architecture = "BertForPreTraining"

    def __init__(self, config: BertConfig, backend: str | None = None, unpad: bool = False,
                 max_predictions_per_seq: int | None = None):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, True, backend, unpad)
        self.cls = BertPreTrainingHeads(config, backend)
        self.max_predictions_per_seq = check_max_predictions(max_predictions_per_seq)  # see predicted_rows
        self._init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None, next_sentence_label=None, output_hidden_states=False, return_dict=True,
                inputs_embeds=None):
        base = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                         inputs_embeds=inputs_embeds)
        h, labels = predicted_rows(base.last_hidden_state, labels, self.max_predictions_per_seq)
        logits = self.cls.predictions(h, self.bert.embeddings.word_embeddings.weight)
        nsp = self.cls.seq_relationship(base.pooler_output)  # (B, 2)
        loss = pretraining_loss(logits, labels, nsp, next_sentence_label, self.cls.predictions.vocab_logits.loss)
        out = O.BertForPreTrainingOutput(loss, logits, nsp, base.hidden_states)
        return out if return_dict else out.to_tuple()


class BertForMaskedLM(BertPreTrainedModel):
    hf_architecture = "BertForMaskedLM"

    def __init__(self, config: BertConfig, backend: str | None = None, unpad: bool = False,
                 max_predictions_per_seq: int | None = None):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, False, backend, unpad)
        self.cls = BertOnlyMLMHead(config, backend)
        self.max_predictions_per_seq = check_max_predictions(max_predictions_per_seq)  # see predicted_rows
        self._init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None, output_hidden_states=False, return_dict=True,
                inputs_embeds=None):
        base = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                         inputs_embeds=inputs_embeds)
        h, labels = predicted_rows(base.last_hidden_state, labels, self.max_predictions_per_seq)
        logits = self.cls.predictions(h, self.bert.embeddings.word_embeddings.weight)
        loss = self.cls.predictions.vocab_logits.loss(logits, labels) if labels is not None else None
        out = O.MaskedLMOutput(loss, logits, base.hidden_states)
        return out if return_dict else out.to_tuple()


def classifier_head(config: BertConfig) -> tuple[nn.Dropout, nn.Linear]:
    """Dropout + Linear to num_labels, as Hugging Face's BERT classification heads build them."""
    p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
    return nn.Dropout(p), nn.Linear(config.hidden_size, config.num_labels)


class BertForSequenceClassification(BertPreTrainedModel):
    """Single sentence or sentence pair (token_type_ids) classification on the pooled [CLS]."""

    hf_architecture = "BertForSequenceClassification"

    def __init__(self, config: BertConfig, backend: str | None = None, unpad: bool = False):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, True, backend, unpad)
        self.dropout, self.classifier = classifier_head(config)
        self._init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None, output_hidden_states=False, return_dict=True,
                inputs_embeds=None):
        base = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                         inputs_embeds=inputs_embeds)
        logits = self.classifier(self.dropout(base.pooler_output))  # (B, num_labels)
        loss = classification_loss(self.config, logits, labels) if labels is not None else None
        out = O.SequenceClassifierOutput(loss, logits, base.hidden_states)
        return out if return_dict else out.to_tuple()


class BertForTokenClassification(BertPreTrainedModel):
    """Per-token classes (NER tagging)."""

    hf_architecture = "BertForTokenClassification"

    def __init__(self, config: BertConfig, backend: str | None = None, unpad: bool = False):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, False, backend, unpad)
        self.dropout, self.classifier = classifier_head(config)
        self._init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                labels=None, output_hidden_states=False, return_dict=True,
                inputs_embeds=None):
        base = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                         inputs_embeds=inputs_embeds)
        logits = self.classifier(self.dropout(base.last_hidden_state))  # (B, T, num_labels)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(wide(logits.reshape(-1, self.config.num_labels)), labels.reshape(-1))
        out = O.TokenClassifierOutput(loss, logits, base.hidden_states)
        return out if return_dict else out.to_tuple()


def span_loss(start_logits, end_logits, start_positions, end_positions):
    """Mean of start and end cross-entropies; positions outside the sequence are ignored."""
    ignored = start_logits.shape[1]
    s = start_positions.reshape(-1).clamp(0, ignored)
    e = end_positions.reshape(-1).clamp(0, ignored)
    return (F.cross_entropy(wide(start_logits), s, ignore_index=ignored)
            + F.cross_entropy(wide(end_logits), e, ignore_index=ignored)) / 2


class BertForQuestionAnswering(BertPreTrainedModel):
    """Extractive QA: start/end span logits for every token."""

    hf_architecture = "BertForQuestionAnswering"

    def __init__(self, config: BertConfig, backend: str | None = None, unpad: bool = False):
        super().__init__()
        self.config = config
        self.bert = BertModel(config, False, backend, unpad)
        self.qa_outputs = nn.Linear(config.hidden_size, config.num_labels)
        self._init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                start_positions=None, end_positions=None, output_hidden_states=False, return_dict=True,
                inputs_embeds=None):
        base = self.bert(input_ids, attention_mask, token_type_ids, position_ids, output_hidden_states,
                         inputs_embeds=inputs_embeds)
        logits = self.qa_outputs(base.last_hidden_state)  # (B, T, 2)
        start, end = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = span_loss(start, end, start_positions, end_positions)
        out = O.QuestionAnsweringModelOutput(loss, start, end, base.hidden_states)
        return out if return_dict else out.to_tuple()


__all__ = [
    "BertConfig", "BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForSequenceClassification",
    "BertForTokenClassification", "BertForQuestionAnswering",
]
