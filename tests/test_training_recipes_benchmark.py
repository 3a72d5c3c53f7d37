"""Smoke test of `benchmarks/training_recipes.py` (every study at smoke size) and a check of its paired summary on
hand-made numbers."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def recipes():
    return load_benchmark("training_recipes")


def _numbers(value):
    """Every int or float inside nested dicts, lists and tuples (strings and None left out)."""
    if isinstance(value, dict):
        for item in value.values():
            yield from _numbers(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _numbers(item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield value


@pytest.mark.slow
def test_training_recipes_smoke_runs_every_study(recipes, tmp_path, capsys):
    json_path = tmp_path / "recipes.json"
    result = recipes.main(["--smoke", "--json", str(json_path)])

    settings = result["settings"]
    seeds = settings["seeds"]
    assert len(seeds) == 2
    vocab_bound = math.log(settings["vocab_size"]) + 1.0  # a few steps from random init stay near log(V)
    groups = {(row["study"], row["group"], row["arm"], row["metric"]) for row in result["rows"]}
    expected = {
        ("kd", f"{student} student", arm, "perplexity") for student in recipes.STUDENTS for arm in recipes.KD_ARMS
    }
    expected |= {("warmup", "random-init MoE", arm, "loss") for arm in ("none", "dense warm-up 2")}
    expected |= {
        ("temperature", "3-task mixture", arm, metric)
        for arm in ("T=1", "T 1->5")
        for metric in ("loss python", "loss docs", "loss prose", "mean loss")
    }
    assert groups == expected
    for row in result["rows"]:
        assert row["seeds"] == seeds
        if row["arm"] == row["baseline"]:
            assert row["vs_baseline"] == (0.0, 0.0)
        if row["metric"] == "perplexity":
            assert all(1.0 < value < math.exp(vocab_bound) for value in row["values"])
        else:
            assert all(0.0 < value < vocab_bound for value in row["values"])
    assert result["task_sizes"]["docs"]["train"] == settings["docs_blocks"]
    assert result["task_sizes"]["prose"]["train"] == settings["prose_blocks"]

    kd_runs = [run for run in result["runs"] if run["study"] == "kd"]
    # one teacher for every run, and every student of a kind starts from the same copy of it whatever the seed
    assert len({run["teacher_perplexity"] for run in kd_runs}) == 1
    for student in recipes.STUDENTS:
        assert len({run["perplexity_before"] for run in kd_runs if run["group"] == f"{student} student"}) == 1
    for run in result["runs"]:
        if run["study"] == "temperature":
            assert math.isclose(sum(run["drawn_share"].values()), 1.0)
            losses = [run["metrics"][f"loss {name}"] for name in ("python", "docs", "prose")]
            assert math.isclose(run["metrics"]["mean loss"], sum(losses) / 3)

    assert all(math.isfinite(number) for number in _numbers(result))
    assert json.loads(json_path.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
    out = capsys.readouterr().out
    assert "| kd | mos student | alpha=0.25 | perplexity |" in out and "(baseline)" in out


def test_summary_pairs_differences_by_seed(recipes):
    # arm "b" is 1.0 better than "a" in seed 0 and 3.0 better in seed 1; the runs come in a shuffled order
    runs = [
        {"study": "s", "group": "g", "arm": "a", "seed": 0, "metrics": {"loss": 5.0}},
        {"study": "s", "group": "g", "arm": "b", "seed": 1, "metrics": {"loss": 4.0}},
        {"study": "s", "group": "g", "arm": "a", "seed": 1, "metrics": {"loss": 7.0}},
        {"study": "s", "group": "g", "arm": "b", "seed": 0, "metrics": {"loss": 4.0}},
    ]
    rows = {row["arm"]: row for row in recipes.summarize(runs)}

    assert rows["a"]["baseline"] == rows["b"]["baseline"] == "a"
    assert rows["a"]["mean_std"] == pytest.approx((6.0, math.sqrt(2.0)))
    assert rows["b"]["mean_std"] == pytest.approx((4.0, 0.0))
    # the paired gaps are -1 and -3: mean -2, std sqrt(2); unpaired, the spread of "a" alone would hide them
    assert rows["b"]["vs_baseline"] == pytest.approx((-2.0, math.sqrt(2.0)))
    assert rows["a"]["vs_baseline"] == (0.0, 0.0)
