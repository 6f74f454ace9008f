"""fuseformer.models: BERT, GPT-2 and ALBERT on the fused kernels, interchangeable with
Hugging Face checkpoints (from_pretrained from a folder or a cached hub id / from_hf /
save_pretrained) and models (patch_hf / unpatch); CUDAGraphRunner replays a model from CUDA
graphs captured per (batch, length) bucket, CUDAGraphTrainStep a training step's forward and
backward, and GPT-2's generate(cuda_graph=True) its decoding step on a StaticKVCache.
docs/models.md has the details.

transformers is optional: only from_hf, patch_hf and loading our saved folders back into
transformers need it.
"""
from .layers import AddLayerNorm, FeedForward, MultiHeadSelfAttention, StaticKVCache, TransformerBlock
from .checkpoint import CheckpointMismatchError
from .bert import (
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)
from .gpt2 import GPT2Config, GPT2LMHeadModel, GPT2Model
from .albert import (
    AlbertConfig,
    AlbertForMaskedLM,
    AlbertForPreTraining,
    AlbertForSequenceClassification,
    AlbertModel,
)
from .hf import patch_hf, unpatch
from .graphs import CUDAGraphRunner, CUDAGraphTrainStep
from .checkpoint import CheckpointWarning
from . import pretraining
from .speed import cpu_speed_case

__all__ = [
    "BertConfig", "BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForSequenceClassification",
    "BertForTokenClassification", "BertForQuestionAnswering",
    "GPT2Config", "GPT2Model", "GPT2LMHeadModel",
    "AlbertConfig", "AlbertModel", "AlbertForPreTraining", "AlbertForMaskedLM", "AlbertForSequenceClassification",
    "patch_hf", "unpatch", "MultiHeadSelfAttention", "AddLayerNorm", "FeedForward", "TransformerBlock",
    "CheckpointMismatchError", "CheckpointWarning", "CUDAGraphRunner", "CUDAGraphTrainStep", "StaticKVCache",
    "pretraining",
    "cpu_speed_case",
]
