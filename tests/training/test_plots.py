"""Load-balance pictures: valid PNGs, TensorBoard images, history from log_history, a clear error without matplotlib."""

from __future__ import annotations

import math
import sys

import pytest

from hf_moe.training import history_from_log_history, save_load_balance_plots

PNG = b"\x89PNG\r\n\x1a\n"
HISTORY = [
    {"step": 10, "token_fraction": [[0.4, 0.2, 0.2, 0.2], [0.25, 0.25, 0.25, 0.25]], "load_imbalance": [1.6, 1.0]},
    {"step": 20, "token_fraction": [[0.3, 0.3, 0.2, 0.2], [0.5, 0.5, 0.0, 0.0]], "load_imbalance": [1.2, 2.0]},
]
# as LoadBalanceCallback records it with bias balancing on layer 0 only (layer 1: NaN)
BIAS_HISTORY = [
    {**entry, "load_diversity": diversity, "bias_norm": [norm, math.nan], "bias_min": [low, math.nan],
     "bias_max": [high, math.nan]}
    for entry, diversity, norm, low, high in zip(
        HISTORY, [[0.95, 1.0], [0.97, 0.5]], [0.01, 0.02], [-0.01, -0.01], [0.0, 0.01], strict=True
    )
]  # fmt: skip


def test_plots_are_valid_pngs_and_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    paths = save_load_balance_plots(HISTORY, tmp_path / "plots", tb_writer=writer)
    writer.close()
    assert [p.name for p in paths] == ["moe_token_fraction_heatmap.png", "moe_load_imbalance.png"]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == PNG and data[12:16] == b"IHDR"
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == {"moe/token_fraction", "moe/load_imbalance"}
    assert events.Images("moe/token_fraction")[0].step == 20


def test_diversity_and_bias_plots_when_the_history_has_them(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    paths = save_load_balance_plots(BIAS_HISTORY, tmp_path / "plots", tb_writer=writer)
    writer.close()
    assert [p.name for p in paths] == [
        "moe_token_fraction_heatmap.png",
        "moe_load_imbalance.png",
        "moe_load_diversity.png",
        "moe_expert_bias.png",
    ]
    assert all(path.read_bytes()[:8] == PNG for path in paths)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert set(events.Tags()["images"]) == {
        "moe/token_fraction",
        "moe/load_imbalance",
        "moe/load_diversity",
        "moe/expert_bias",
    }


def test_bias_plot_draws_each_biased_layer_max_and_min():
    from hf_moe.training.plots import plot_expert_bias, plot_load_diversity

    steps = [h["step"] for h in BIAS_HISTORY]
    (axes,) = plot_expert_bias(
        steps, [h["bias_min"] for h in BIAS_HISTORY], [h["bias_max"] for h in BIAS_HISTORY]
    ).axes
    curves = [list(line.get_ydata()) for line in axes.lines if line.get_linestyle() != ":"]
    assert curves == [[0.0, 0.01], [-0.01, -0.01]]  # layer 0's max and min; layer 1 has no bias: nothing drawn
    (axes,) = plot_load_diversity(steps, [h["load_diversity"] for h in BIAS_HISTORY]).axes
    layers = [list(line.get_ydata()) for line in axes.lines if line.get_label().startswith("layer")]
    assert layers == [[0.95, 0.97], [1.0, 0.5]]


def test_history_from_log_history():
    log_history = [
        {"loss": 1.0, "step": 10, "moe/layer_00/load_imbalance": 1.5, "moe/layer_00/token_fraction_expert_00": 0.75,
         "moe/layer_00/token_fraction_expert_01": 0.25, "eval_moe/layer_00/load_imbalance": 9.0},
        {"eval_loss": 1.0, "step": 10, "eval_moe/layer_00/load_imbalance": 9.0},
    ]  # fmt: skip
    assert history_from_log_history(log_history) == [
        {"step": 10, "token_fraction": [[0.75, 0.25]], "load_imbalance": [1.5]}
    ]
    with_diagnostics = [
        {"loss": 1.0, "step": 4, "moe/layer_00/load_imbalance": 1.5, "moe/layer_01/load_imbalance": 1.1,
         "moe/layer_00/load_diversity": 0.9, "moe/layer_01/load_diversity": 0.8, "moe/layer_01/bias_norm": 0.02,
         "moe/layer_01/bias_min": -0.01, "moe/layer_01/bias_max": 0.01, "moe/layer_00/topk_margin_p05": 0.1}
    ]  # fmt: skip
    (entry,) = history_from_log_history(with_diagnostics)
    assert entry["load_diversity"] == [0.9, 0.8]
    assert entry["bias_max"][1] == 0.01 and math.isnan(entry["bias_max"][0])
    assert entry["bias_min"][1] == -0.01 and entry["bias_norm"][1] == 0.02


def test_missing_matplotlib_gives_install_hint(tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install hf-moe\[plot\]"):
        save_load_balance_plots(HISTORY, tmp_path)


def test_ragged_layers_are_padded(tmp_path):
    history = [
        {"step": 1, "token_fraction": [[0.5, 0.5], [0.25, 0.25, 0.25, 0.25]], "load_imbalance": [1.0, math.nan]}
    ]
    for path in save_load_balance_plots(history, tmp_path):
        assert path.read_bytes()[:8] == PNG


def colorbar_axes(figure):
    return [axes for axes in figure.axes if "fraction of routed tokens" in axes.get_ylabel()]


def test_heatmap_colorbar_is_labelled_and_marks_perfect_balance():
    from hf_moe.training.plots import plot_token_fraction_heatmap

    (colorbar,) = colorbar_axes(plot_token_fraction_heatmap(HISTORY[0]["token_fraction"]))
    assert "1/4" in colorbar.get_ylabel() and "perfect balance" in colorbar.get_ylabel()
    assert [set(line.get_ydata()) for line in colorbar.lines] == [{0.25}]


def test_heatmap_of_layers_with_different_expert_counts_marks_each_balance():
    from hf_moe.training.plots import plot_token_fraction_heatmap

    (colorbar,) = colorbar_axes(plot_token_fraction_heatmap([[0.5, 0.5], [0.25, 0.25, 0.25, 0.25]]))
    assert "1/2, 1/4" in colorbar.get_ylabel()
    assert sorted(line.get_ydata()[0] for line in colorbar.lines) == [0.25, 0.5]
