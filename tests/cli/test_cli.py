"""The `hf-moe` CLI surface: moefy -> inspect -> Auto classes, atomic writes, refusal of a non-empty OUT, upload."""

from __future__ import annotations

import json
from unittest import mock

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from hf_moe.cli.main import main
from hf_moe.conversion import REPORT_FILENAME
from tests.conftest import tiny_word_tokenizer


@pytest.fixture
def dense_folder(tmp_path):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=99, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=64, pad_token_id=1)
    folder = tmp_path / "dense"
    GPT2LMHeadModel(config).save_pretrained(folder)
    tiny_word_tokenizer().save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: mit\n---\n# a dense model\n")
    return folder


def test_moefy_inspect_and_load_round_trip(dense_folder, tmp_path, capsys):
    out = tmp_path / "moe"
    code = main(
        [
            "moefy", str(dense_folder), str(out), "--num-experts", "4", "--top-k", "2",
            "--moe-layers", "every_other", "--init", "noise", "--seed", "3", "--normalize-top-k-weights",
        ]
    )  # fmt: skip
    assert code == 0
    files = {path.name for path in out.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", REPORT_FILENAME, "tokenizer.json"} <= files
    report = json.loads((out / REPORT_FILENAME).read_text())
    assert report["init_method"] == "noise" and report["seed"] == 3 and report["moe_layers"] == [1]
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "mit"  # inherited from the source's card

    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["moe_layers"] == {"layers": [1]}
    assert summary["experts_per_layer"] == 4 and summary["experts_per_token"] == 2
    assert summary["parameters"]["total"] > summary["parameters"]["active"]
    assert main(["inspect", str(out)]) == 0
    assert "active per token" in capsys.readouterr().out

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    dense = GPT2LMHeadModel.from_pretrained(dense_folder).eval()
    input_ids = torch.randint(2, 99, (1, 6))
    assert torch.allclose(model(input_ids).logits, dense(input_ids).logits, atol=0.05)  # noise init: close


def test_moefy_refuses_a_non_empty_out_unless_overwrite(dense_folder, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(["moefy", str(dense_folder), str(out), "--num-experts", "2", "--top-k", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
    assert main(["moefy", str(dense_folder), str(out), "--num-experts", "2", "--top-k", "1", "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_a_failure_midway_leaves_no_out_folder(dense_folder, tmp_path, monkeypatch):
    out = tmp_path / "never"

    def broken_card(*args, **kwargs):
        raise RuntimeError("disk full while writing the card")

    monkeypatch.setattr("hf_moe.hub.render_model_card", broken_card)
    with pytest.raises(RuntimeError, match="disk full"):
        main(["moefy", str(dense_folder), str(out), "--num-experts", "2", "--top-k", "1"])
    assert not out.exists()
    assert not any(path.name.startswith(".never") for path in tmp_path.iterdir())  # no staging left behind


def test_a_failure_during_overwrite_keeps_the_old_folder(dense_folder, tmp_path, monkeypatch):
    out = tmp_path / "old"
    assert main(["moefy", str(dense_folder), str(out), "--num-experts", "2", "--top-k", "1"]) == 0
    before = (out / "model.safetensors").read_bytes()
    monkeypatch.setattr("hf_moe.hub.render_model_card", mock.Mock(side_effect=RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        main(["moefy", str(dense_folder), str(out), "--num-experts", "4", "--top-k", "1", "--overwrite"])
    assert (out / "model.safetensors").read_bytes() == before


def test_moefy_push_to_hub_uploads_our_folder_with_a_mocked_api(dense_folder, tmp_path, monkeypatch):
    api = mock.create_autospec(HfApi, instance=True)
    monkeypatch.setattr("hf_moe.hub.upload.HfApi", lambda *args, **kwargs: api)
    out = tmp_path / "up"
    argv = ["moefy", str(dense_folder), str(out), "--num-experts", "2", "--top-k", "1", "--push-to-hub", "me/tiny"]
    assert main(argv) == 0
    api.create_repo.assert_called_once()
    assert (
        api.create_repo.call_args.args[:1] == ("me/tiny",) or api.create_repo.call_args.kwargs["repo_id"] == "me/tiny"
    )
    api.upload_folder.assert_called_once()
    assert str(out) in str(api.upload_folder.call_args)


def test_unsupported_source_is_a_clear_cli_error(tmp_path, capsys):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    ).save_pretrained(folder)
    assert main(["moefy", str(folder), str(tmp_path / "out")]) == 2
    assert "supports model types" in capsys.readouterr().err
    assert main(["inspect", str(folder)]) == 2


def test_help_lists_every_subcommand(capsys):
    assert main(["--help"]) == 0  # main returns the exit code, also for --help
    text = capsys.readouterr().out
    assert all(name in text for name in ("moefy", "inspect", "demo"))


def test_demo_quick_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "validation loss" in printed and "load balance" in printed
    results = json.loads((out / "demo_results.json").read_text())["result"]
    assert results["moe_validation_loss"] > 0 and results["dense_validation_loss"] > 0
    assert len(results["curves"]["moe"]) >= 2
    for name in ("dense", "moe"):
        assert (out / name / "config.json").exists() and (out / name / "README.md").exists()
    assert (out / "moe" / REPORT_FILENAME).exists()
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reloaded = AutoModelForCausalLM.from_pretrained(out / "moe")
    assert reloaded.config.model_type == "gpt2_moe"


def test_moefy_with_shared_experts_shows_them_in_inspect_and_the_card(dense_folder, tmp_path, capsys):
    out = tmp_path / "moe"
    argv = [
        "moefy",
        str(dense_folder),
        str(out),
        "--num-experts",
        "4",
        "--num-shared-experts",
        "2",
        "--shared-expert-gate",
    ]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shared_experts"] == {"count": 2, "intermediate_size": 128, "gate": True}
    # 2 layers x (2 x 32 x 128 + 128 + 32 + the gate's 32) parameters, all active
    assert summary["parameters"]["shared_experts"] == 2 * (2 * 32 * 128 + 128 + 32 + 32)
    assert summary["weights"]["checked"] and not summary["weights"].get("unexpected")
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "shared experts: 2 per layer, always active, 128 wide, sigmoid-gated" in text
    assert "in shared experts" in text
    card = (out / "README.md").read_text()
    assert "| Shared experts | 2 per MoE layer" in card and "In shared experts (always active)" in card
    # copies of the dense FFN with the gate at 1/2: the upcycled model is the dense one
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    dense = GPT2LMHeadModel.from_pretrained(dense_folder).eval()
    input_ids = torch.randint(2, 99, (1, 6))
    torch.testing.assert_close(model(input_ids).logits, dense(input_ids).logits, rtol=1e-5, atol=1e-5)


def test_moefy_widenet_from_the_cli_stores_one_block_and_says_so(dense_folder, tmp_path, capsys):
    out = tmp_path / "moe"
    argv = ["moefy", str(dense_folder), str(out), "--num-experts", "4", "--share-blocks-across-layers"]
    assert main([*argv, "--shared-block-init", "1"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shared_blocks"] == {"across_layers": True, "per_layer_router": False}
    assert summary["weights"]["checked"] and not summary["weights"].get("unexpected")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert summary["parameters"]["total"] == model.num_parameters() < summary["parameters"]["active"]
    dense = GPT2LMHeadModel.from_pretrained(dense_folder)
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, dense.transformer.h[1].attn.c_attn.weight)
    assert main(["inspect", str(out)]) == 0
    assert "blocks shared across layers (WideNet): one block per stack" in capsys.readouterr().out
    card = (out / "README.md").read_text()
    assert "| Blocks shared across layers | WideNet" in card and "| Total (stored) |" in card
    assert "a shared weight counted once per layer" in card
    assert main(["moefy", str(dense_folder), str(tmp_path / "bad"), "--per-layer-router"]) == 2
    assert "--per-layer-router applies only with --share-blocks-across-layers" in capsys.readouterr().err
    assert main([*argv[:2], str(tmp_path / "bad"), "--share-blocks-across-layers", "--shared-block-init", "x"]) == 2
    assert "must be 'mean' or a block index" in capsys.readouterr().err


def test_moefy_pyramid_from_the_cli(dense_folder, tmp_path, capsys):
    out = tmp_path / "moe"
    assert main(["moefy", str(dense_folder), str(out), "--num-experts", "2,4", "--top-k", "2"]) == 0
    capsys.readouterr()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_experts_per_layer == [2, 4]
    assert [layer.mlp.experts.num_experts for layer in model.transformer.h] == [2, 4]
    assert main(["moefy", str(dense_folder), str(tmp_path / "bad"), "--num-experts", "2,4", "--top-k", "3"]) == 2
    assert "--top-k 3 exceeds the experts of some MoE layer" in capsys.readouterr().err
    assert main(["moefy", str(dense_folder), str(tmp_path / "bad"), "--num-experts", "2,0"]) == 2
    assert "must be an integer >= 1" in capsys.readouterr().err


def test_moefy_shared_expert_gate_needs_shared_experts(dense_folder, tmp_path, capsys):
    assert main(["moefy", str(dense_folder), str(tmp_path / "moe"), "--shared-expert-gate"]) == 2
    assert "num_shared_experts=0" in capsys.readouterr().err
    assert not (tmp_path / "moe").exists()


def test_moefy_residual_moe_from_the_cli_preserves_the_dense_model(dense_folder, tmp_path, capsys):
    out = tmp_path / "moe"
    argv = ["moefy", str(dense_folder), str(out), "--num-experts", "4", "--top-k", "1", "--residual-moe"]
    assert main([*argv, "--normalize-top-k-weights"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert "residual MoE: a dense MLP 64 wide beside the routed expert" in capsys.readouterr().out
    assert "| Residual MoE | a dense MLP (64 neurons)" in (out / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    dense = GPT2LMHeadModel.from_pretrained(dense_folder).eval()
    input_ids = torch.randint(2, 99, (1, 6))
    torch.testing.assert_close(model(input_ids).logits, dense(input_ids).logits, rtol=1e-5, atol=1e-5)
    assert main(["moefy", str(dense_folder), str(tmp_path / "top2"), "--residual-moe"]) == 2
    assert "set num_experts_per_tok=1" in capsys.readouterr().err
