"""Load-balance pictures: token fraction per layer x expert (heatmap), load imbalance and load diversity over training
steps, and the expert bias over steps when the routers balance with one.

matplotlib is optional (`pip install hf-moe[plot]`) and imported only here, lazily. Figures are drawn on
`matplotlib.figure.Figure` with the Agg canvas, not pyplot: no global figure state, no GUI backend, safe in
training processes and threads.

The pictures take a load-balance history: a list of {"step", "token_fraction" (L lists of E floats),
"load_imbalance" (L floats)}, optionally "load_diversity" and, with bias balancing, "bias_norm", "bias_min",
"bias_max" (L floats, NaN where a layer has none), as kept by `LoadBalanceCallback.history` or rebuilt from a
Trainer's `state.log_history` with `history_from_log_history`. A picture is drawn from the entries that have its
numbers.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path

__all__ = [
    "BIAS_FILENAME",
    "DIVERSITY_FILENAME",
    "HEATMAP_FILENAME",
    "IMBALANCE_FILENAME",
    "agg_figure",
    "draw_token_fraction_heatmap",
    "history_from_log_history",
    "plot_expert_bias",
    "plot_load_diversity",
    "plot_load_imbalance",
    "plot_token_fraction_heatmap",
    "save_figure",
    "save_load_balance_plots",
]

HEATMAP_FILENAME = "moe_token_fraction_heatmap.png"
IMBALANCE_FILENAME = "moe_load_imbalance.png"
DIVERSITY_FILENAME = "moe_load_diversity.png"
BIAS_FILENAME = "moe_expert_bias.png"


def agg_figure(figsize: tuple[float, float]):
    """A `matplotlib.figure.Figure` on the Agg canvas (no pyplot, no GUI); ImportError with an install hint."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "hf_moe's load-balance plots need matplotlib; install it with `pip install hf-moe[plot]` "
            "(or `pip install matplotlib`)."
        ) from error
    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)
    return figure


def draw_token_fraction_heatmap(figure, axes, token_fraction: list[list[float]], layer_names: list[str] | None = None):
    """Draw the layer x expert heatmap of token fractions on `axes`, with its colorbar; return the colorbar.

    The colorbar is labelled "fraction of routed tokens" and carries a line at 1/E, the fraction every expert gets
    under perfect balance (one line per distinct expert count, should layers differ), so a glance tells how far
    each cell is from balance. NaN cells (no data, or a layer with fewer experts) are drawn blank.
    """
    num_layers = len(token_fraction)
    num_experts = max((len(row) for row in token_fraction), default=0)
    # layers may have different expert counts: pad the short rows with NaN (drawn blank)
    grid = [list(row) + [math.nan] * (num_experts - len(row)) for row in token_fraction]
    image = axes.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
    axes.set_xlabel("expert")
    axes.set_ylabel("MoE layer")
    axes.set_xticks(range(num_experts))
    axes.set_yticks(range(num_layers), layer_names if layer_names is not None else list(range(num_layers)))
    expert_counts = sorted({len(row) for row in token_fraction if row})
    balanced = ", ".join(f"1/{count}" for count in expert_counts) or "1/E"
    colorbar = figure.colorbar(
        image, ax=axes, label=f"fraction of routed tokens\n(red line: {balanced}, perfect balance)"
    )
    for count in expert_counts:
        colorbar.ax.axhline(1.0 / count, color="red", linewidth=3.0)
    return colorbar


def plot_token_fraction_heatmap(token_fraction: list[list[float]], title: str = "Token fraction per expert"):
    """A matplotlib Figure: rows are MoE layers, columns experts, colour the fraction of tokens (NaN: no data)."""
    num_layers = len(token_fraction)
    num_experts = max((len(row) for row in token_fraction), default=0)
    figure = agg_figure((max(5.5, 0.5 * num_experts + 2.5), max(3.0, 0.4 * num_layers + 1.5)))
    axes = figure.add_subplot()
    draw_token_fraction_heatmap(figure, axes, token_fraction)
    axes.set_title(title)
    figure.tight_layout()
    return figure


def _layer_column(rows: list[list[float]], layer: int) -> list[float]:
    return [row[layer] if layer < len(row) else math.nan for row in rows]


def _finish_steps_figure(figure, axes, num_layers: int, ylabel: str, title: str):
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    if num_layers <= 12:  # beyond that a legend hides the curves
        axes.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    return figure


def _plot_layers_over_steps(steps: list[int], values: list[list[float]], ylabel: str, title: str, balanced: float):
    """One line per layer (`values[t][layer]`, NaN: no data), their mean in black, a dashed line at `balanced`."""
    figure = agg_figure((7.0, 4.0))
    axes = figure.add_subplot()
    num_layers = max((len(row) for row in values), default=0)
    for layer in range(num_layers):
        axes.plot(steps, _layer_column(values, layer), linewidth=1.0, alpha=0.6, label=f"layer {layer:02d}")
    means = []
    for row in values:
        finite = [v for v in row if not math.isnan(v)]
        means.append(sum(finite) / len(finite) if finite else math.nan)
    axes.plot(steps, means, color="black", linewidth=2.0, label="mean")
    axes.axhline(balanced, color="grey", linestyle="--", linewidth=0.8)  # perfect balance
    return _finish_steps_figure(figure, axes, num_layers, ylabel, title)


def plot_load_imbalance(steps: list[int], load_imbalance: list[list[float]], title: str = "Load imbalance"):
    """A matplotlib Figure: max/mean expert load per layer over steps (`load_imbalance[t][layer]`), and their mean."""
    return _plot_layers_over_steps(steps, load_imbalance, "max / mean tokens per expert", title, balanced=1.0)


def plot_load_diversity(steps: list[int], load_diversity: list[list[float]], title: str = "Load diversity"):
    """A matplotlib Figure: exp(entropy of the expert load) / E per layer over steps, and their mean (1 is uniform
    load, 1/E one expert)."""
    return _plot_layers_over_steps(steps, load_diversity, "exp(entropy of load) / experts", title, balanced=1.0)


def plot_expert_bias(
    steps: list[int], bias_min: list[list[float]], bias_max: list[list[float]], title: str = "Expert bias"
):
    """A matplotlib Figure: the range of each layer's expert bias (aux-loss-free balancing) over steps, the largest
    bias solid and the smallest dashed in the layer's colour; layers without a bias (NaN) draw nothing."""
    figure = agg_figure((7.0, 4.0))
    axes = figure.add_subplot()
    num_layers = max((len(row) for row in bias_max), default=0)
    for layer in range(num_layers):
        highs = _layer_column(bias_max, layer)
        if all(math.isnan(v) for v in highs):
            continue
        (line,) = axes.plot(steps, highs, linewidth=1.2, label=f"layer {layer:02d}")
        axes.plot(steps, _layer_column(bias_min, layer), linewidth=1.2, linestyle="--", color=line.get_color())
    axes.axhline(0.0, color="grey", linestyle=":", linewidth=0.8)  # where every bias starts
    return _finish_steps_figure(figure, axes, num_layers, "expert bias (solid max, dashed min)", title)


def save_figure(figure, path: str | Path) -> Path:
    """Save `figure` as a PNG at `path`, atomically: an interrupted run never leaves a truncated file behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        figure.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _to_tensorboard(writer, tag: str, figure, step: int | None) -> None:
    import numpy as np

    canvas = figure.canvas
    canvas.draw()
    image_HWC = np.asarray(canvas.buffer_rgba())[..., :3]
    writer.add_image(tag, image_HWC, global_step=step, dataformats="HWC")
    writer.flush()


def save_load_balance_plots(
    history: list[dict], output_dir: str | Path, tb_writer=None, step: int | None = None
) -> list[Path]:
    """Save the heatmap (last logged window) and the imbalance-over-steps plot as PNGs in `output_dir`, the
    diversity-over-steps plot when the history has diversity, the bias-over-steps plot when it has biases.

    With `tb_writer` (a `torch.utils.tensorboard.SummaryWriter`), also add them as images `moe/token_fraction`,
    `moe/load_imbalance`, `moe/load_diversity` and `moe/expert_bias`. Returns the paths written. Raises ImportError
    (with an install hint) without matplotlib.
    """
    if not history:
        raise ValueError("history is empty: nothing was logged yet (no training log with MoE counts)")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    last = history[-1]
    step = last["step"] if step is None else step
    heatmap = plot_token_fraction_heatmap(
        last["token_fraction"], title=f"Token fraction per expert, step {last['step']}"
    )
    figures = [
        ("moe/token_fraction", HEATMAP_FILENAME, heatmap),
        (
            "moe/load_imbalance",
            IMBALANCE_FILENAME,
            plot_load_imbalance([h["step"] for h in history], [h["load_imbalance"] for h in history]),
        ),
    ]
    if with_diversity := [h for h in history if "load_diversity" in h]:
        steps, diversity = [h["step"] for h in with_diversity], [h["load_diversity"] for h in with_diversity]
        figures.append(("moe/load_diversity", DIVERSITY_FILENAME, plot_load_diversity(steps, diversity)))
    if with_bias := [h for h in history if "bias_max" in h]:
        bias = plot_expert_bias(
            [h["step"] for h in with_bias], [h["bias_min"] for h in with_bias], [h["bias_max"] for h in with_bias]
        )
        figures.append(("moe/expert_bias", BIAS_FILENAME, bias))
    paths = [save_figure(figure, output_dir / filename) for _, filename, figure in figures]
    if tb_writer is not None:
        for tag, _, figure in figures:
            _to_tensorboard(tb_writer, tag, figure, step)
    return paths


_FRACTION_KEY = re.compile(r"^moe/layer_(\d+)/token_fraction_expert_(\d+)$")
# the per-layer numbers of the pictures over steps
_LAYER_SERIES = ("load_imbalance", "load_diversity", "bias_norm", "bias_min", "bias_max")
_SERIES_KEY = re.compile(rf"^moe/layer_(\d+)/({'|'.join(_LAYER_SERIES)})$")


def history_from_log_history(log_history: list[dict]) -> list[dict]:
    """A load-balance history from a Trainer's `state.log_history` (or a saved trainer_state.json's).

    Uses the training entries (`moe/layer_XX/...`, not `eval_moe/...`); the heatmap needs the per-expert fractions
    (`LoadBalanceCallback(log_per_expert=True)`, the default).
    """
    history = []
    for entry in log_history:
        fractions: dict[int, dict[int, float]] = {}
        series: dict[str, dict[int, float]] = {}
        for key, value in entry.items():
            if match := _FRACTION_KEY.match(key):
                fractions.setdefault(int(match[1]), {})[int(match[2])] = value
            elif match := _SERIES_KEY.match(key):
                series.setdefault(match[2], {})[int(match[1])] = value
        imbalance = series.get("load_imbalance")
        if not imbalance:
            continue
        num_layers = max(imbalance) + 1
        record = {
            "step": entry.get("step", len(history)),
            "token_fraction": [
                [fractions.get(layer, {}).get(e, math.nan) for e in range(max(fractions.get(layer, {0: 0})) + 1)]
                for layer in range(num_layers)
            ],
        }
        for name in _LAYER_SERIES:
            if name in series:
                record[name] = [series[name].get(layer, math.nan) for layer in range(num_layers)]
        history.append(record)
    return history
