"""Load-balance pictures: token fraction per layer x expert (heatmap) and load imbalance over training steps.

matplotlib is optional (`pip install hf-moe[plot]`) and imported only here, lazily. Figures are drawn on
`matplotlib.figure.Figure` with the Agg canvas, not pyplot: no global figure state, no GUI backend, safe in
training processes and threads.

The pictures take a load-balance history: a list of {"step", "token_fraction" (L lists of E floats),
"load_imbalance" (L floats)}, as kept by `LoadBalanceCallback.history` or rebuilt from a Trainer's
`state.log_history` with `history_from_log_history`.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path

__all__ = [
    "HEATMAP_FILENAME",
    "IMBALANCE_FILENAME",
    "agg_figure",
    "draw_token_fraction_heatmap",
    "history_from_log_history",
    "plot_load_imbalance",
    "plot_token_fraction_heatmap",
    "save_figure",
    "save_load_balance_plots",
]

HEATMAP_FILENAME = "moe_token_fraction_heatmap.png"
IMBALANCE_FILENAME = "moe_load_imbalance.png"


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


def plot_load_imbalance(steps: list[int], load_imbalance: list[list[float]], title: str = "Load imbalance"):
    """A matplotlib Figure: max/mean expert load per layer over steps (`load_imbalance[t][layer]`), and their mean."""
    figure = agg_figure((7.0, 4.0))
    axes = figure.add_subplot()
    num_layers = max((len(row) for row in load_imbalance), default=0)
    for layer in range(num_layers):
        values = [row[layer] if layer < len(row) else math.nan for row in load_imbalance]
        axes.plot(steps, values, linewidth=1.0, alpha=0.6, label=f"layer {layer:02d}")
    means = []
    for row in load_imbalance:
        finite = [v for v in row if not math.isnan(v)]
        means.append(sum(finite) / len(finite) if finite else math.nan)
    axes.plot(steps, means, color="black", linewidth=2.0, label="mean")
    axes.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)  # perfect balance
    axes.set_xlabel("step")
    axes.set_ylabel("max / mean tokens per expert")
    axes.set_title(title)
    if num_layers <= 12:  # beyond that a legend hides the curves
        axes.legend(fontsize="small", ncol=2)
    figure.tight_layout()
    return figure


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
    """Save the heatmap (last logged window) and the imbalance-over-steps plot as PNGs in `output_dir`.

    With `tb_writer` (a `torch.utils.tensorboard.SummaryWriter`), also add them as images `moe/token_fraction` and
    `moe/load_imbalance`. Returns the paths written. Raises ImportError (with an install hint) without matplotlib.
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
    imbalance = plot_load_imbalance([h["step"] for h in history], [h["load_imbalance"] for h in history])
    paths = [
        save_figure(heatmap, output_dir / HEATMAP_FILENAME),
        save_figure(imbalance, output_dir / IMBALANCE_FILENAME),
    ]
    if tb_writer is not None:
        _to_tensorboard(tb_writer, "moe/token_fraction", heatmap, step)
        _to_tensorboard(tb_writer, "moe/load_imbalance", imbalance, step)
    return paths


_FRACTION_KEY = re.compile(r"^moe/layer_(\d+)/token_fraction_expert_(\d+)$")
_IMBALANCE_KEY = re.compile(r"^moe/layer_(\d+)/load_imbalance$")


def history_from_log_history(log_history: list[dict]) -> list[dict]:
    """A load-balance history from a Trainer's `state.log_history` (or a saved trainer_state.json's).

    Uses the training entries (`moe/layer_XX/...`, not `eval_moe/...`); the heatmap needs the per-expert fractions
    (`LoadBalanceCallback(log_per_expert=True)`, the default).
    """
    history = []
    for entry in log_history:
        fractions: dict[int, dict[int, float]] = {}
        imbalance: dict[int, float] = {}
        for key, value in entry.items():
            if match := _FRACTION_KEY.match(key):
                fractions.setdefault(int(match[1]), {})[int(match[2])] = value
            elif match := _IMBALANCE_KEY.match(key):
                imbalance[int(match[1])] = value
        if not imbalance:
            continue
        num_layers = max(imbalance) + 1
        history.append(
            {
                "step": entry.get("step", len(history)),
                "token_fraction": [
                    [fractions.get(layer, {}).get(e, math.nan) for e in range(max(fractions.get(layer, {0: 0})) + 1)]
                    for layer in range(num_layers)
                ],
                "load_imbalance": [imbalance.get(layer, math.nan) for layer in range(num_layers)],
            }
        )
    return history
