"""from_pretrained as transformers users call it: config overrides as keywords, dtype /
torch_dtype (the checkpoint's by default), unused weights skipped with one warning, hub ids
from huggingface_hub's local cache (built here; never the network)."""
import os
import shutil
import warnings

import pytest
import torch

from models_util import VOCAB

import fuseformer.models as M
from fuseformer.models import CheckpointMismatchError, CheckpointWarning

transformers = pytest.importorskip("transformers")


def hf_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=48, max_position_embeddings=40)
    base.update(kw)
    return transformers.BertConfig(**base)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(hf_config(num_labels=2)).save_pretrained(path)
    return str(path)


def test_config_overrides_as_keywords(folder):
    with pytest.raises(CheckpointMismatchError, match=r"classifier.weight: checkpoint \(2, 32\) vs model \(3, 32\)"):
        M.BertForSequenceClassification.from_pretrained(folder, num_labels=3)
    with pytest.warns(CheckpointWarning, match="missing keys.*classifier.weight"):  # the 3-class head is new
        m = M.BertForSequenceClassification.from_pretrained(folder, num_labels=3, hidden_dropout_prob=0.0,
                                                            ignore_mismatched_sizes=True)
    assert m.config.num_labels == 3 and m.classifier.out_features == 3
    assert m.config.hidden_dropout_prob == 0.0 and m.bert.embeddings.dropout.p == 0.0
    hf = transformers.BertForSequenceClassification.from_pretrained(folder, num_labels=3, ignore_mismatched_sizes=True)
    assert hf.config.num_labels == 3
    assert torch.equal(m.bert.embeddings.word_embeddings.weight, hf.bert.embeddings.word_embeddings.weight)
    with pytest.raises(TypeError, match=r"unexpected keyword\(s\) \['num_lables'\]"):
        M.BertForSequenceClassification.from_pretrained(folder, num_lables=3)
    with pytest.raises(ValueError, match="hidden_act"):
        M.BertModel.from_pretrained(folder, hidden_act="relu")


def test_dtype_defaults_to_the_checkpoints_as_transformers_5(tmp_path):
    hf16 = transformers.BertModel(hf_config()).to(torch.bfloat16)
    hf16.save_pretrained(tmp_path)
    assert transformers.BertModel.from_pretrained(tmp_path).dtype == torch.bfloat16  # transformers' own default
    assert M.BertModel.from_pretrained(tmp_path).dtype == torch.bfloat16
    assert M.BertModel.from_pretrained(tmp_path, dtype=torch.float32).dtype == torch.float32
    assert M.BertModel.from_pretrained(tmp_path, torch_dtype="float16").dtype == torch.float16
    assert M.BertModel.from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype"):
        M.BertModel.from_pretrained(tmp_path, dtype="float8")
    with pytest.raises(ValueError, match="not both"):
        M.BertModel.from_pretrained(tmp_path, dtype=torch.float16, torch_dtype=torch.float32)
    # our own save records the dtype the same way
    M.BertModel.from_pretrained(tmp_path, dtype=torch.float16).save_pretrained(tmp_path / "ours")
    assert M.BertModel.from_pretrained(tmp_path / "ours").dtype == torch.float16
    assert transformers.BertModel.from_pretrained(tmp_path / "ours").dtype == torch.float16


def test_unused_weights_skipped_with_one_warning(folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = M.BertModel.from_pretrained(folder, add_pooling_layer=False)
    ours = [w for w in caught if issubclass(w.category, CheckpointWarning)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    text = str(ours[0].message)
    assert "unexpected keys (4): classifier.bias, classifier.weight, pooler.dense.bias, pooler.dense.weight" in text
    assert "skipped" in text and "missing" not in text
    assert m.pooler is None


def test_missing_weights_still_an_error_unless_strict_false(folder, tmp_path):
    M.BertModel.from_pretrained(folder).save_pretrained(tmp_path)  # a base model: no classifier
    with pytest.raises(CheckpointMismatchError, match="missing keys"):
        M.BertForSequenceClassification.from_pretrained(tmp_path)
    with pytest.warns(CheckpointWarning, match="missing weights keep their fresh initialisation"):
        M.BertForSequenceClassification.from_pretrained(tmp_path, strict=False)


def _hub_cache(root, repo_id, source, commit="0123456789abcdef0123456789abcdef01234567"):
    """The layout huggingface_hub keeps: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = os.path.join(root, "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", commit)
    os.makedirs(os.path.join(repo, "refs"))
    shutil.copytree(source, snapshot)
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    return snapshot


def test_hub_id_resolved_from_the_local_cache_offline(folder, tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _hub_cache(str(tmp_path), "someone/tiny-bert", folder)
    m = M.BertForSequenceClassification.from_pretrained("someone/tiny-bert", cache_dir=str(tmp_path))
    direct = M.BertForSequenceClassification.from_pretrained(folder)
    assert torch.equal(m.classifier.weight, direct.classifier.weight)
    with pytest.raises(FileNotFoundError, match=r"'someone/absent' is neither a local folder nor a hub id found "
                                                r"in huggingface_hub's local cache \(offline"):
        M.BertModel.from_pretrained("someone/absent", cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a hub id"):
        M.BertModel.from_pretrained(str(tmp_path / "no" / "such" / "folder"))
