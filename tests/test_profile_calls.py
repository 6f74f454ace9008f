"""bench/profile_calls.py is run on a GPU only, inside the lent machine's few minutes: the
parts that also run on the CPU are exercised here so that a typo does not cost a GPU session."""
import pytest
import torch

from fuseformer.bench import profile_calls
from fuseformer.models import BertConfig


def test_profile_bert_on_the_cpu(capsys):
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16)
    profile_calls.profile_bert(2, 8, iters=1, device="cpu", config=config, backend="torch")
    out = capsys.readouterr().out
    assert "[bert B2 L8 torch.float32]" in out and "aten::" in out  # the CPU-side table (no device kernels)
    profile_calls.profile_bert(2, 8, iters=1, device="cpu", config=config, backend="torch", train=True)
    out = capsys.readouterr().out
    assert "[bert train B2 L8 torch.float32]" in out and "aten::" in out


def test_profile_gpt2_on_the_cpu(capsys):
    from fuseformer.models import GPT2Config

    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=16)
    profile_calls.profile_bert(2, 8, iters=1, device="cpu", config=config, backend="torch", family="gpt2")
    out = capsys.readouterr().out
    assert "[gpt2 B2 L8 torch.float32]" in out and "aten::" in out


def test_main_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here")
    with pytest.raises(SystemExit):
        profile_calls.main(["--bert", ""])


def test_profile_generate_on_the_cpu(capsys):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    profile_calls.profile_generate(2, 5, 3, iters=1, device="cpu", config=config, backend="torch")
    out = capsys.readouterr().out
    assert "ours, one node per block:" in out and "transformers sdpa:" in out
    assert "% of the generated tokens as transformers'" in out


def test_print_cprofile_names_the_functions_it_timed(capsys):
    def work():
        return torch.arange(10).sum()

    profile_calls._print_cprofile("[probe]", work, 3, lambda: None, rows=5)
    out = capsys.readouterr().out
    assert out.startswith("[probe] (cProfile, by tottime):")
    assert "work" in out and "3 " in out.split("work")[0].splitlines()[-1]  # its row: called 3 times
