"""`hf-moe moefy --router-type hash`: a balanced hash from a corpus, its card and inspect line, and its bad inputs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from hf_moe.cli.main import main
from hf_moe.conversion import balanced_hash_table, token_frequencies
from hf_moe.modeling import moe_routers
from tests.cli.conftest import error_lines, snapshot
from tests.conftest import tiny_word_tokenizer


@pytest.fixture
def workspace(tmp_path):
    """tmp_path with `dense/` (tiny GPT-2 and its word tokenizer) and `corpus.txt` (skewed: w{i} about 300 / i times)."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=99, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=64, pad_token_id=1)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "dense")
    tiny_word_tokenizer().save_pretrained(tmp_path / "dense")
    words = [f"w{i}" for i in range(3, 99) for _ in range(300 // i)]
    (tmp_path / "corpus.txt").write_text(" ".join(words) + "\n")
    return tmp_path


def test_moefy_balanced_hash_writes_the_table_card_and_inspect_line(workspace, capsys):
    out, corpus = workspace / "moe", workspace / "corpus.txt"
    argv = ["moefy", str(workspace / "dense"), str(out), "--num-experts", "4", "--router-type", "hash"]
    assert main([*argv, "--hash-kind", "balanced", "--hash-corpus", str(corpus)]) == 0  # --top-k: one per head
    assert "top-1" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    counts_V = token_frequencies(tiny_word_tokenizer(), [corpus], vocab_size=99, progress=False)
    expected_HV = balanced_hash_table(counts_V, 4, seed=0)
    assert all(torch.equal(router.expert_of_token, expected_HV) for _, router in moe_routers(model))
    assert model.config.hash_kind == "balanced" and model.config.num_experts_per_tok == 1
    assert "| Hash table | balanced (greedy bin packing" in (out / "README.md").read_text()
    assert main(["inspect", str(out)]) == 0
    assert "router: hash (hash layers" in capsys.readouterr().out


MOEFY = ["moefy", "{ws}/dense", "{ws}/out", "--num-experts", "4"]
CASES = [
    ([*MOEFY, "--hash-kind", "balanced"], ["--hash-kind applies only with --router-type hash"]),
    ([*MOEFY, "--num-hash-heads", "2"], ["--num-hash-heads applies only with --router-type hash"]),
    ([*MOEFY, "--router-type", "hash", "--hash-kind", "balanced"], ["--hash-kind balanced", "--hash-corpus FILE"]),
    ([*MOEFY, "--router-type", "hash", "--hash-corpus", "{ws}/corpus.txt"], ["--hash-corpus applies only with --hash-kind balanced"]),
    ([*MOEFY, "--router-type", "hash", "--hash-kind", "balanced", "--hash-corpus", "{ws}/nope.txt"], ["--hash-corpus", "{ws}/nope.txt"]),
    ([*MOEFY, "--router-type", "hash", "--top-k", "2"], ["--top-k must be --num-hash-heads (1)", "got --top-k 2"]),
    ([*MOEFY, "--router-type", "hash", "--num-hash-heads", "3"], ["--num-experts 4 must be a multiple"]),
    ([*MOEFY, "--router-type", "hash", "--hash-kind", "sorted"], ["--hash-kind", "'sorted'", "balanced"]),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "fragments"), CASES, ids=[" ".join(case[0][5:]) for case in CASES])
def test_hash_option_errors_are_one_line_exit_2_and_write_nothing(workspace, capsys, argv, fragments):
    before = snapshot(workspace)
    capsys.readouterr()
    code = main([arg.format(ws=workspace) for arg in argv])
    captured = capsys.readouterr()
    lines = error_lines(captured.err)
    assert code == 2 and len(lines) == 1, captured.err
    assert lines[0].startswith("hf-moe moefy: error: ")
    for fragment in fragments:
        assert fragment.format(ws=workspace) in lines[0]
    assert snapshot(workspace) == before


def test_the_cli_hash_kinds_are_the_configs():
    from hf_moe.cli.moefy import HASH_KINDS as CLI_HASH_KINDS
    from hf_moe.modeling.configuration_moe import HASH_KINDS

    assert CLI_HASH_KINDS == HASH_KINDS
