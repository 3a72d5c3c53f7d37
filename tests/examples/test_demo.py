"""`hf-moe demo` at smoke size: it explains itself, writes only into its output folder, warns about nothing spurious;
its picture marks perfect balance; its verdict on the gain follows the seeds."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM

from hf_moe.cli.demo import QUICK
from hf_moe.demo import DEFAULT_SETTINGS_SPREAD, DemoResult, DemoSettings, _summary, _verdict, demo_figure, run_demo


@pytest.mark.slow
def test_quick_demo_over_two_seeds(tmp_path, monkeypatch, emitted):
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    printed: list[str] = []
    result = run_demo(DemoSettings(output_dir=out, seeds=[0, 1], **QUICK), log=printed.append)

    assert not emitted.spurious()
    assert list(cwd.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "out"]
    assert sorted(p.name for p in out.iterdir()) == ["demo.png", "demo_results.json", "dense", "moe"]

    text = "\n".join(printed)
    assert all(len(line) <= 119 for line in printed if str(out) not in line)
    assert "Upcycling turns each feed-forward layer" in text.split("corpus:")[0]  # explained before it starts
    assert "what the numbers mean" in text and "1/4 = 0.250" in text
    assert "mean ± std over 2 seeds" in text
    # loading the folder without hf_moe needs the folder's code for the model and the tokenizer
    assert text.count(f'from_pretrained("{out / "moe"}", trust_remote_code=True)') == 2

    saved = json.loads((out / "demo_results.json").read_text())
    assert [run["seed"] for run in saved["result"]["per_seed"]] == [0, 1]
    assert saved["gain"]["n"] == 2 and saved["gain"]["std"] >= 0
    assert saved["gain"]["mean"] == pytest.approx(sum(result.gains) / 2)
    # the saved models are the first seed's
    assert saved["result"]["moe_validation_loss"] == saved["result"]["per_seed"][0]["moe_validation_loss"]
    assert AutoModelForCausalLM.from_pretrained(out / "moe").config.model_type == "gpt2_moe"


def fake_result(num_experts: int = 4, gains=(0.01,)) -> DemoResult:
    fraction = 1 / num_experts
    return DemoResult(
        base_validation_loss=5.0,
        dense_validation_loss=4.5,
        moe_validation_loss=4.5 - gains[0],
        curves={"dense": [(0, 5.0), (4, 4.5)], "moe": [(0, 5.0), (4, 4.5 - gains[0])]},
        load_balance={f"transformer.h.{i}.mlp": [fraction] * num_experts for i in range(2)},
        seconds={"train_dense": 1.0, "train_moe": 2.0},
        parameters={"dense": 10, "total": 30, "active": 15},
        per_seed=[
            {"seed": seed, "dense_validation_loss": 4.5, "moe_validation_loss": 4.5 - gain, "gain": gain}
            for seed, gain in enumerate(gains)
        ],
    )


def test_heatmap_colorbar_is_labelled_and_marks_perfect_balance():
    pytest.importorskip("matplotlib")
    figure = demo_figure(fake_result(num_experts=4))
    colorbars = [axes for axes in figure.axes if "fraction of routed tokens" in axes.get_ylabel()]
    assert len(colorbars) == 1
    assert "1/4" in colorbars[0].get_ylabel() and "perfect balance" in colorbars[0].get_ylabel()
    marks = [line for line in colorbars[0].lines if set(line.get_ydata()) == {0.25}]
    assert len(marks) == 1


def test_the_verdict_follows_the_seeds():
    assert "consistent" in _verdict([0.030, 0.034, 0.029])
    assert "not distinguishable from seed noise" in _verdict([0.010, -0.004, 0.006])
    assert "One seed cannot say" in _verdict([0.03])


def test_a_single_default_run_reports_the_measured_spread_or_says_how_to_measure_it():
    lines = _summary(fake_result(num_experts=8), DemoSettings())
    text = "\n".join(lines)
    if DEFAULT_SETTINGS_SPREAD is None:
        assert "--seeds 0 1 2" in text
    else:
        assert DEFAULT_SETTINGS_SPREAD["command"] in text and DEFAULT_SETTINGS_SPREAD["date"] in text
        assert all(f"{gain:+.4f}" in text for gain in DEFAULT_SETTINGS_SPREAD["gains"])
    # other settings: the measured spread does not apply to them
    other = "\n".join(_summary(fake_result(num_experts=8), DemoSettings(steps=10)))
    assert "--seeds 0 1 2" in other and "measured" not in other
    assert all(len(line) <= 119 for line in lines)
    assert "1/8 = 0.125" in text


def test_validation_passes_leave_the_training_random_stream_alone():
    """The demo measures validation loss while it trains: that must not change the dropout masks that follow."""
    import torch

    import hf_moe
    from hf_moe.training import language_model_loss
    from tests.conftest import tiny_gpt2_moe_config

    model = hf_moe.GPT2MoeForCausalLM(tiny_gpt2_moe_config())
    data = [{"input_ids": torch.randint(3, 99, (8,))} for _ in range(5)]
    state = torch.random.get_rng_state()
    language_model_loss(model, data, batch_size=2)
    assert torch.equal(torch.random.get_rng_state(), state)
