"""Model outputs with Hugging Face's attribute names, without importing transformers.

Like transformers' ModelOutput: attribute access (`out.logits`), key access (`out["logits"]`)
and index access over the fields that are set (`out[0]`), so code written for transformers
runs unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch


@dataclasses.dataclass
class ModelOutput:
    def to_tuple(self) -> tuple:
        return tuple(v for v in (getattr(self, f.name) for f in dataclasses.fields(self)) if v is not None)

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    def __getitem__(self, key: int | slice | str) -> Any:
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]

    def __iter__(self):
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(self.to_tuple())


Tensor = torch.Tensor | None


@dataclasses.dataclass
class BaseModelOutputWithPooling(ModelOutput):
    last_hidden_state: Tensor = None
    pooler_output: Tensor = None
    hidden_states: tuple | None = None


@dataclasses.dataclass
class BaseModelOutputWithPast(ModelOutput):
    last_hidden_state: Tensor = None
    past_key_values: tuple | None = None
    hidden_states: tuple | None = None


@dataclasses.dataclass
class CausalLMOutputWithPast(ModelOutput):
    loss: Tensor = None
    logits: Tensor = None
    past_key_values: tuple | None = None
    hidden_states: tuple | None = None


@dataclasses.dataclass
class MaskedLMOutput(ModelOutput):
    loss: Tensor = None
    logits: Tensor = None
    hidden_states: tuple | None = None


@dataclasses.dataclass
class SequenceClassifierOutput(ModelOutput):
    loss: Tensor = None
    logits: Tensor = None
    hidden_states: tuple | None = None


@dataclasses.dataclass
class TokenClassifierOutput(ModelOutput):
    loss: Tensor = None
    logits: Tensor = None
    hidden_states: tuple | None = None


@dataclasses.dataclass
class QuestionAnsweringModelOutput(ModelOutput):
    loss: Tensor = None
    start_logits: Tensor = None
    end_logits: Tensor = None
    hidden_states: tuple | None = None


@dataclasses.dataclass
class BertForPreTrainingOutput(ModelOutput):
    loss: Tensor = None
    prediction_logits: Tensor = None
    seq_relationship_logits: Tensor = None
    hidden_states: tuple | None = None


@dataclasses.dataclass
class AlbertForPreTrainingOutput(ModelOutput):
    loss: Tensor = None
    prediction_logits: Tensor = None
    sop_logits: Tensor = None
    hidden_states: tuple | None = None
