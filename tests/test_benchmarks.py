"""Smoke tests of the benchmarks: `moe_layer.py` quick mode, `upcycling_quality.py` smoke size, `generate.py` quick
mode. Speed is never asserted."""

from __future__ import annotations

import math

import pytest

from tests.conftest import load_benchmark


def test_moe_layer_benchmark_quick_mode_runs(tmp_path, capsys):
    benchmark = load_benchmark("moe_layer")
    json_path = tmp_path / "moe_layer.json"
    # "system" malloc: leave the test process's allocator settings alone
    rows = benchmark.main(
        ["--quick", "--repeats", "1", "--warmup", "1", "--malloc", "system", "--no-memory", "--json", str(json_path)]
    )

    assert [row["case"]["name"] for row in rows] == [case.name for case in benchmark.quick_cases()]
    for row in rows:
        assert {"dense", "switch", row["ours_label"]} <= set(row["ms"])
        assert all(ms > 0 for ms in row["ms"].values())
        assert row["ours_over_dense"] > 0 and row["switch_over_ours"] > 0
        # the kernels agree on the warmup outputs (and Switch, at top-1 dropless, computes the same function)
        assert all(diff < 1e-4 for diff in row["max_abs_diff_vs_ours"].values())
    # a row's name gains " (machine N% busy)" when other processes used the CPUs meanwhile
    assert "| small E8 k1" in capsys.readouterr().out
    assert json_path.exists()


def test_moe_layer_benchmark_measures_peak_memory_in_subprocesses(capsys):
    benchmark = load_benchmark("moe_layer")
    [row] = benchmark.main(["--quick", "--cases", "small E8 k2 cap1.25", "--repeats", "1", "--malloc", "system"])
    # one worker per variant; a 256-token step may fit in memory the process already holds (0 MiB above its start)
    assert set(row["peak_mib"]) == set(row["ms"])
    assert all(mib >= 0 for mib in row["peak_mib"].values())
    assert "Peak resident memory of one forward+backward step" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["gpt2", "t5"])  # T5 on span corruption of the same text
def test_upcycling_quality_benchmark_smoke_size_runs(family, tmp_path):
    benchmark = load_benchmark("upcycling_quality")
    json_path, plot_path = tmp_path / "quality.json", tmp_path / "quality.png"
    result = benchmark.main(["--smoke", "--family", family, "--json", str(json_path), "--plot", str(plot_path)])

    rows = {row["recipe"]: row for row in result["rows"]}
    assert list(rows) == ["dense", *benchmark.DEFAULT_RECIPES]
    assert rows["dense"]["same_steps_vs_dense"] == (0.0, 0.0)
    # function-preserving recipes start at the dense model's held-out loss (granular: exactly; copy: top-2 of copies)
    for name in ("copy", "granular G=2"):
        assert abs(rows[name]["start"][0] - rows["dense"]["start"][0]) < 1e-4, name
    for row in rows.values():
        assert all(math.isfinite(value) for value in (*row["same_steps"], *row["same_time"]))
    assert json_path.exists() and plot_path.exists()


def test_upcycling_quality_benchmark_runs_the_widenet_recipes(tmp_path):
    benchmark = load_benchmark("upcycling_quality")
    widenet = [name for name in benchmark.RECIPES if name.startswith("widenet")]
    result = benchmark.main(["--smoke", "--recipes", *widenet, "--json", str(tmp_path / "q.json"), "--plot", ""])
    rows = {row["recipe"]: row for row in result["rows"]}
    assert list(rows) == ["dense", *widenet]
    for row in rows.values():
        assert all(math.isfinite(value) for value in (*row["same_steps"], *row["same_time"]))


def test_generate_benchmark_quick_runs_every_variant(tmp_path):
    benchmark = load_benchmark("generate")
    argv = ["--quick", "--batch-sizes", "2", "--implementations", "hf_moe_auto", "--json", str(tmp_path / "g.json")]
    result = benchmark.main(argv)
    rows = {row["variant"]: row for row in result["rows"]}
    assert list(rows) == ["dense", "dense K*F", "moe hf_moe_auto"]
    assert rows["dense K*F"]["vs_dense_equal_active"] == 1.0
    assert all(row["decode_tokens_per_s"] > 0 and row["prefill_ms"] > 0 for row in rows.values())
    assert (tmp_path / "g.json").exists()


def test_train_step_benchmark_quick_runs_every_variant(tmp_path):
    benchmark = load_benchmark("train_step")
    result = benchmark.main(["--quick", "--json", str(tmp_path / "t.json")])
    rows = {row["variant"]: row for row in result["rows"]}
    assert list(rows) == ["dense", "dense K*F", "moe hf_moe_auto", "moe grouped_mm", "moe eager"]
    assert rows["dense K*F"]["vs_dense_equal_active"] == 1.0
    assert all(row["tokens_per_s"] > 0 and row["peak_mib"] > 0 for row in rows.values())
    assert (tmp_path / "t.json").exists()


def test_generate_benchmark_compiles_with_a_static_cache():
    benchmark = load_benchmark("generate")
    settings = benchmark.Settings(**{**benchmark.QUICK, "batch_sizes": [1], "compile": True})
    model = benchmark.build("moe hf_moe_auto", settings)
    assert model.generation_config.cache_implementation == "static"
    # one worker's measurement in this process (the full run compiles once per worker and variant)
    assert benchmark.measure("moe hf_moe_auto", settings)["1"]["decode_tokens_per_s"] > 0
