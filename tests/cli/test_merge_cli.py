"""`hf-moe merge`: merge -> inspect -> Auto classes with the card and report; bad input is one line, exit 2, nothing
written; the parser stays light."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from hf_moe.cli.main import main
from hf_moe.conversion import REPORT_FILENAME
from tests.cli.conftest import error_lines, snapshot
from tests.conftest import tiny_word_tokenizer

FIELDS = dict(vocab_size=99, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=64, pad_token_id=1)


def save_dense(folder, seed: int, **overrides):
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(**{**FIELDS, **overrides})).save_pretrained(folder)
    tiny_word_tokenizer().save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# a dense model\n")
    return folder


@pytest.fixture
def domains(tmp_path):
    """Three dense folders of one architecture, differently seeded (stand-ins for three domain fine-tunes)."""
    return [save_dense(tmp_path / f"domain{seed}", seed) for seed in (0, 1, 2)]


def test_merge_inspect_and_load_round_trip(domains, tmp_path, capsys):
    out = tmp_path / "btx"
    argv = ["merge", *map(str, domains), str(out), "--top-k", "2", "--moe-layers", "1", "--seed", "3"]
    assert main([*argv, "--router-bias-update-rate", "0.001", "--aux-loss-scope", "sequence"]) == 0
    assert f"wrote {out}: GPT2MoeForCausalLM, 3 experts (one per source), top-2" in capsys.readouterr().out
    files = {path.name for path in out.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", REPORT_FILENAME, "tokenizer.json"} <= files
    assert not any(path.name.startswith(".btx") for path in tmp_path.iterdir())  # no staging folder left

    report = json.loads((out / REPORT_FILENAME).read_text())
    assert report["sources"] == [str(folder) for folder in domains]
    assert report["init_method"] == "btx" and report["num_experts"] == 3 and report["moe_layers"] == [1]
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "mit" and "branch-train-mix" in card.data.tags
    assert "Branch-Train-MiX" in card.text and "arXiv:2403.07816" in card.text
    for i, folder in enumerate(domains):
        assert f"| Expert {i} | the feed-forward networks of `{folder}` |" in card.text
    assert "was copied exactly" not in card.text  # moefy's account of a single source
    assert "limitations of its source models" in card.text and "The routers are untrained" in card.text
    assert "moefy" not in card.text.split("## How this MoE was made")[1].split("## Usage")[0]

    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["moe_layers"] == {"layers": [1]} and summary["experts_per_layer"] == 3
    assert summary["weights"]["checked"] is True
    assert summary["aux_loss"]["scope"] == "sequence" and summary["router_bias_update_rate"] == 0.001
    assert summary["expert_bias"]["layers"] == {"transformer.h.1.mlp.router": {"min": 0.0, "max": 0.0, "norm": 0.0}}

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    experts = model.transformer.h[1].mlp.experts
    for i, folder in enumerate(domains):
        dense = GPT2LMHeadModel.from_pretrained(folder)
        assert torch.equal(experts.up_proj[i], dense.transformer.h[1].mlp.c_fc.weight)
        assert torch.equal(experts.down_proj[i], dense.transformer.h[1].mlp.c_proj.weight)
    assert model(torch.randint(2, 99, (1, 6))).logits.shape == (1, 6, 99)


def test_copies_of_one_folder_keep_its_logits(domains, tmp_path):
    out = tmp_path / "copies"
    folder = str(domains[0])
    assert main(["merge", folder, folder, folder, str(out), "--top-k", "2", "--normalize-top-k-weights"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    dense = GPT2LMHeadModel.from_pretrained(folder).eval()
    input_ids = torch.randint(2, 99, (2, 7), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(merged(input_ids).logits, dense(input_ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("make_argv", "message"),
    [
        (
            lambda d, out: ["merge", str(d[0]), str(d[3]), str(out)],
            r"differs from sources\[0\] .*'s: n_embd \(hidden size\) is 64 \(sources\[0\]: 32\)",
        ),
        (lambda d, out: ["merge", str(d[0]), str(out)], "merge needs 2 or more SOURCE models before OUT, got 1"),
        (lambda d, out: ["merge", str(d[0]), str(d[1]), str(out), "--top-k", "3"], "--top-k 3 exceeds the 2 experts"),
        (lambda d, out: ["merge", str(d[0]), str(d[0].parent / "nowhere"), str(out)], "SOURCE 2 folder .* not found"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(domains, tmp_path, capsys, make_argv, message):
    wider = save_dense(tmp_path / "wider", 3, n_embd=64)
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert main(make_argv([*domains, wider], tmp_path / "out")) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("hf-moe merge: error: "), lines
    assert re.search(message, lines[0]), lines[0]
    assert snapshot(tmp_path) == before


def test_merge_refuses_a_non_empty_out_unless_overwrite(domains, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    argv = ["merge", str(domains[0]), str(domains[1]), str(out), "--top-k", "1"]
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").read_text() == "precious"
    assert main([*argv, "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    # OUT may not be one of its own sources: --overwrite would replace a source with the merge
    assert main(["merge", str(domains[0]), str(out), str(out), "--top-k", "1", "--overwrite"]) == 2
    assert "is also a SOURCE" in capsys.readouterr().err


def test_merge_help_and_usage_errors_import_no_torch():
    heavy = ("torch", "transformers", "hf_moe.modeling", "hf_moe.conversion")
    code = (
        "import sys, hf_moe_cli; codes = [hf_moe_cli.main(a) for a in (['--help'], ['merge', '--help'], "
        "['merge', 'a', 'b', 'out', '--top-k', '0'])]; print(codes, [m for m in %r if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code % (heavy,)], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "[0, 0, 2] []", result.stderr[-2000:]
    assert "Branch-Train-MiX" in result.stdout and "SOURCE [SOURCE ...] OUT" in result.stdout
    assert "hf-moe merge: error: argument --top-k: must be an integer >= 1, got 0" in result.stderr
