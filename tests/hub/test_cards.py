"""Model cards: Hub metadata parsed back from README.md, a body that records how the MoE was made, runnable usage."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

import hf_moe
from hf_moe.hub import MODEL_CARD_TEMPLATE, render_model_card, save_model_card
from tests.conftest import tiny_gpt2_moe_config, tiny_word_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[2]

GPT2_REPORT = {
    "source_model": "openai-community/gpt2",
    "source_model_type": "gpt2",
    "source_class": "GPT2LMHeadModel",
    "target_class": "GPT2MoeForCausalLM",
    "init_method": "noise",
    "init_options": {"noise_scale": 0.05},
    "seed": 1234,
    "num_experts": 4,
    "top_k": 2,
    "router_type": "topk",
    "moe_layers": [1],
    "parameters": {"total": 1, "active": 1, "experts": 1},
    "dense_parameters": 40_000,
    "versions": {"hf_moe": "0.1.0", "transformers": "5.24.0", "torch": "2.13.0"},
}


def saved_card(tmp_path, config, **kwargs) -> tuple[ModelCard, str]:
    """Render, save as README.md and load back, as the Hub would read it."""
    path = save_model_card(tmp_path, render_model_card(config, **kwargs))
    return ModelCard.load(path), path.read_text(encoding="utf-8")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_gpt2_card_metadata_parses_back(tmp_path):
    config = tiny_gpt2_moe_config(moe_layers=[1])
    card, _ = saved_card(
        tmp_path, config, report=GPT2_REPORT, base_model="openai-community/gpt2", license="mit", repo_id="me/tiny"
    )
    assert card.data.base_model == "openai-community/gpt2"
    assert card.data.license == "mit"
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "text-generation"
    assert set(card.data.tags) == {"hf_moe", "moe", "mixture-of-experts", "gpt2", "upcycling"}


def test_body_records_conversion_routing_and_parameter_counts(tmp_path):
    config = tiny_gpt2_moe_config(
        moe_layers=[1], capacity_factor=1.5, router_aux_loss_coef=0.02, router_z_loss_coef=0.003, expert_dropout=0.1
    )
    _, text = saved_card(tmp_path, config, report=GPT2_REPORT, base_model="openai-community/gpt2")
    for row in (
        # from the report
        "| Init method | `noise`",
        "| Init options | `noise_scale=0.05` |",
        "| Seed | 1234 |",
        "| MoE layers | 1 |",
        "| Made with | hf_moe 0.1.0, transformers 5.24.0, torch 2.13.0 |",
        # from the config
        "| MoE layers | 1 (of 2) |",
        "| Experts per MoE layer | 4 |",
        "| Experts per token | 2 |",
        "| Router | `topk`",
        "| Capacity factor (training) | 1.5 ",
        "| Capacity factor (evaluation) | dropless",
        "| Load-balancing loss | `switch`: Switch load balancing (Fedus et al. 2021), coefficient 0.02 |",
        "| Router z-loss coefficient | 0.003 |",
        "| Expert dropout | 0.1 |",
    ):
        assert row in text, row
    counts = config.parameter_counts()
    assert f"| Total | {counts['total']:,}" in text
    assert f"| Active per token | {counts['active']:,}" in text
    assert f"| In experts | {counts['experts']:,}" in text
    assert f"| Dense source model | {GPT2_REPORT['dense_parameters']:,}" in text


def test_usage_snippets_with_and_without_hf_moe(tmp_path):
    config = tiny_gpt2_moe_config()
    _, text = saved_card(tmp_path, config, repo_id="me/tiny-moe")
    with_hf_moe, without_hf_moe = python_blocks(text)
    assert "import hf_moe" in with_hf_moe
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-moe")' in with_hf_moe
    assert "hf_moe" not in without_hf_moe
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-moe", trust_remote_code=True)' in without_hf_moe
    ast.parse(without_hf_moe)


def test_hf_moe_usage_snippet_runs_on_a_saved_folder(tmp_path):
    folder = tmp_path / "model"
    hf_moe.GPT2MoeForCausalLM(tiny_gpt2_moe_config()).save_pretrained(folder)
    tiny_word_tokenizer().save_pretrained(folder)
    text = str(render_model_card(hf_moe.GPT2MoeConfig.from_pretrained(folder), repo_id=str(folder)))
    exec(compile(python_blocks(text)[0], "card-snippet", "exec"), {})  # loads, tokenizes and generates


def test_results_tables_only_when_given(tmp_path):
    config = tiny_gpt2_moe_config()
    _, text = saved_card(
        tmp_path, config, training_results={"train_loss": 2.345678, "steps": 800}, eval_results={"eval|loss": 2.5}
    )
    assert "## Training results" in text and "| train_loss | 2.346 |" in text and "| steps | 800 |" in text
    assert "## Evaluation results" in text and "| eval\\|loss | 2.5 |" in text  # a "|" cannot break the table

    _, text = saved_card(tmp_path, config)
    assert "## Training results" not in text and "## Evaluation results" not in text


def test_card_without_report_or_base_model(tmp_path):
    card, text = saved_card(tmp_path, tiny_gpt2_moe_config())
    assert card.data.base_model is None and card.data.license is None
    assert "upcycling" not in card.data.tags
    assert "No conversion report was given" in text
    assert "| Seed |" not in text and "bibtex" not in text
    assert 'from_pretrained("path/to/this/model")' in text
    assert "# GPT-2 MoE" in text
    assert "{{" not in text and "{%" not in text


def test_partial_report_leaves_missing_rows_out(tmp_path):
    _, text = saved_card(tmp_path, tiny_gpt2_moe_config(), report={"init_method": "split", "hf_moe_version": "0.1.0"})
    assert "| Init method | `split`: " in text
    assert "| Made with | hf_moe 0.1.0 |" in text
    assert "| Seed |" not in text and "| Source model |" not in text


def test_t5_card_metadata_and_layers(tmp_path):
    config = hf_moe.T5MoeConfig(
        vocab_size=99, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, num_experts=4, decoder_moe_layers=[1]
    )
    report = {"init_method": "copy", "seed": 0, "moe_layers": {"encoder": [0, 1], "decoder": [1]}}
    card, text = saved_card(tmp_path, config, report=report, base_model="google-t5/t5-small", license="apache-2.0")
    assert card.data.pipeline_tag == "text2text-generation"
    assert "t5" in card.data.tags and "gpt2" not in card.data.tags
    assert "| MoE layers (encoder) | all 2 |" in text and "| MoE layers (decoder) | 1 (of 2) |" in text
    assert "| MoE layers (encoder) | 0, 1 |" in text and "| MoE layers (decoder) | 1 |" in text
    assert "AutoModelForSeq2SeqLM.from_pretrained(" in text and "AutoModelForCausalLM" not in text
    assert f"| Total | {config.parameter_counts()['total']:,}" in text


def test_architecture_picks_pipeline_tag_and_auto_class(tmp_path):
    config = tiny_gpt2_moe_config(architectures=["GPT2MoeForSequenceClassification"])
    card, text = saved_card(tmp_path, config)
    assert card.data.pipeline_tag == "text-classification"
    assert "AutoModelForSequenceClassification.from_pretrained(" in text and "generate(" not in text


def test_bad_inputs_get_clear_errors(tmp_path):
    from transformers import GPT2Config

    with pytest.raises(TypeError, match="hf_moe model"):
        render_model_card(GPT2Config())
    with pytest.raises(TypeError, match="report must be a dict"):
        render_model_card(tiny_gpt2_moe_config(), report=["copy"])
    with pytest.raises(NotADirectoryError, match="missing"):
        save_model_card(tmp_path / "missing", render_model_card(tiny_gpt2_moe_config()))


def test_save_model_card_replaces_the_readme_in_one_piece(tmp_path):
    (tmp_path / "README.md").write_text("old card")
    path = save_model_card(tmp_path, render_model_card(tiny_gpt2_moe_config()))
    assert path == tmp_path / "README.md" and path.read_text().startswith("---\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]  # no partial file left behind


def test_template_ships_as_package_data():
    tomllib = pytest.importorskip("tomllib")
    package_data = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package_dir = REPO_ROOT / "hf_moe"
    shipped = {p for pattern in package_data["hf_moe"] for p in package_dir.glob(pattern)}
    assert MODEL_CARD_TEMPLATE.resolve() in {p.resolve() for p in shipped}


def test_example_card_is_in_sync_with_the_template(tmp_path):
    spec = importlib.util.spec_from_file_location("render_example", REPO_ROOT / "model_cards" / "render_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fresh = module.main(tmp_path)
    committed = REPO_ROOT / "model_cards" / module.EXAMPLE_NAME
    assert fresh.read_text() == committed.read_text(), "stale example: run python model_cards/render_example.py"


def test_router_init_and_merge_reports_say_how_the_moe_was_made(tmp_path):
    _, text = saved_card(tmp_path, tiny_gpt2_moe_config(), report={"init_method": "copy", "router_init": "kmeans"})
    assert "| Router init | `kmeans`: rows along the k-means centroids" in text
    merged = {"init_method": "btx", "sources": ["me/math", "me/code"], "source_model": "me/math, me/code"}
    (tmp_path / "merged").mkdir()
    card, text = saved_card(
        tmp_path / "merged", tiny_gpt2_moe_config(), report=merged, base_model=["me/math", "me/code"]
    )
    assert "| Expert 1 | the feed-forward networks of `me/code` |" in text and "Branch-Train-MiX" in text
    assert "Source model" not in text and "upcycling" not in card.data.tags
    assert card.data.base_model_relation == "merge" and {"merge", "branch-train-mix"} <= set(card.data.tags)


def test_balancing_scope_and_expert_bias_are_on_the_card_only_when_set(tmp_path):
    # DeepSeek-V3's recipe: the bias balances, a small sequence-wise loss is opted into with a coefficient
    config = tiny_gpt2_moe_config(router_bias_update_rate=0.002, aux_loss_scope="sequence", router_aux_loss_coef=1e-4)
    _, text = saved_card(tmp_path, config)
    assert "| Load-balancing loss | `switch`: Switch load balancing (Fedus et al. 2021), coefficient 0.0001 |" in text
    assert "| Load-balancing loss scope | `sequence`: the loss of each sequence, averaged over sequences" in text
    (bias_row,) = [line for line in text.splitlines() if line.startswith("| Aux-loss-free balancing |")]
    assert "by 0.002 towards balance (Wang et al. 2024; DeepSeek-V3)" in bias_row
    assert "`MoeTrainer` or `RouterBalancingCallback`" in bias_row  # a plain Trainer leaves the bias where it is

    # the bias alone: its coefficient defaults to 0, the scope stays the usual one
    _, text = saved_card(tmp_path, tiny_gpt2_moe_config(router_bias_update_rate=0.002))
    assert "coefficient 0.0 |" in text and "| Load-balancing loss scope |" not in text

    _, text = saved_card(tmp_path, tiny_gpt2_moe_config(aux_loss_scope="global_batch"))
    (scope_row,) = [line for line in text.splitlines() if line.startswith("| Load-balancing loss scope |")]
    assert scope_row.startswith("| Load-balancing loss scope | `global_batch`: ") and "(Qiu et al. 2025)" in scope_row
    assert "RouterBalancingCallback" in scope_row  # the count restarts at each optimizer step only with it
    assert "| Aux-loss-free balancing |" not in text and "coefficient 0.01 |" in text

    _, text = saved_card(tmp_path, tiny_gpt2_moe_config())  # the defaults add no row
    assert "Load-balancing loss scope" not in text and "Aux-loss-free" not in text
