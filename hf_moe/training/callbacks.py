"""`LoadBalanceCallback`: per-layer router metrics in the Trainer logs, TensorBoard and pictures.

How the metrics reach the reporting integrations: `Trainer.log` appends a copy of `logs` to `state.log_history` and
then calls every callback's `on_log` in list order. The callback adds its metrics to the shared `logs` dict (and to the
`log_history` entry just appended), so every callback after it sees them. `Trainer(callbacks=[...])` puts user
callbacks after the reporting ones (TensorBoard, W&B, ...), which would then miss them; callbacks get no handle on the
Trainer through public API, so the callback cannot move itself. Hence `attach_to(trainer)` puts it first, and
`MoeTrainer` does that for every `LoadBalanceCallback` it is given. Being first also means, at `on_train_end`, the
TensorBoard writer is still open for the pictures.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from transformers import TrainerCallback

from ..modeling.moe_parts import moe_routers
from .load_balance import (
    CounterAccumulator,
    RouterProbe,
    counter_reduce_group,
    enable_router_diagnostics,
    expert_bias_metrics,
    layer_metrics,
    metrics_from_counts,
    moe_blocks,
    per_layer_metrics,
)

__all__ = ["LoadBalanceCallback"]

logger = logging.getLogger(__name__)

_BIAS_NAMES = ("bias_norm", "bias_min", "bias_max")


def _eval_prefix(logs: dict) -> str | None:
    # `Trainer.evaluate(metric_key_prefix=p)` logs `{p}_runtime` (speed metrics); the end-of-training summary logs
    # `train_runtime`, which is not an evaluation
    for key in logs:
        if key.endswith("_runtime") and key != "train_runtime":
            return key[: -len("_runtime")]
    return None


def _router_temperature(model) -> dict[str, float]:
    # what the routers ran the last step with (DenseToSparseCallback sets it alike on every router and rank);
    # logged only when it is not the plain softmax's 1.0, so top-k runs do not log a constant
    temperatures = [getattr(router, "temperature", 1.0) for _, router in moe_routers(model)] if model else []
    if not temperatures or all(t == 1.0 for t in temperatures):
        return {}
    return {"moe/router_temperature": sum(temperatures) / len(temperatures)}


class LoadBalanceCallback(TrainerCallback):
    """Adds router load-balance metrics to every Trainer log, training and evaluation, from the MoE blocks' counters.

    Add it with `callback.attach_to(trainer)` (first in the Trainer's list, so TensorBoard / W&B get its metrics in the
    same step) or through `MoeTrainer(callbacks=[...])`, which does that; in a plain `Trainer(callbacks=[...])` the
    metrics reach `state.log_history` and the callbacks after it, but not the reporting integrations before it.

    Training logs get `moe/layer_{i:02d}/{name}` and `moe/{name}` (see `hf_moe.training.load_balance.layer_metrics`
    for the names), counted over the steps since the previous log; evaluation logs get the same under
    `{metric_key_prefix}_moe/...` (`eval_moe/...`), counted over that evaluation pass only. Counts are summed over
    data-parallel ranks. At the end of training, a heatmap of token fractions (layer x expert) and plots of load
    imbalance and load diversity over steps (and of the expert bias, with bias balancing) are saved in
    `args.output_dir` and sent to TensorBoard when it is a reporting integration.

    Router diagnostics (`router_diagnostics=True`): the blocks count the top-k boundary margin (`topk_margin_mean`,
    `topk_margin_p05`, also in evaluation logs), and each training log adds the routing stability of a fixed probe of
    at most 512 tokens per layer (`topk_changed_fraction`, from the second log on; `load_balance.RouterProbe`) and,
    for routers balanced by an expert bias, `bias_norm`, `bias_min`, `bias_max` and `moe/bias_norm`.

    Args:
        log_per_expert: also log each expert's token fraction (`token_fraction_expert_{e:02d}`), E scalars per layer.
        save_plots: save the pictures at the end of training (needs matplotlib: `pip install hf-moe[plot]`).
        router_diagnostics: count and log the router diagnostics above (turns on the blocks' `diagnostics`).
    """

    def __init__(self, log_per_expert: bool = True, save_plots: bool = True, router_diagnostics: bool = True):
        self.log_per_expert = log_per_expert
        self.save_plots = save_plots
        self.router_diagnostics = router_diagnostics
        # one entry per training log: {"step", "token_fraction" (L lists of E floats), "load_imbalance",
        # "load_diversity" (L floats), and with bias balancing "bias_norm", "bias_min", "bias_max" (L floats, NaN for
        # layers without a bias)}
        self.history: list[dict] = []
        self._handler = None  # the Trainer's CallbackHandler, once attached
        self._train: CounterAccumulator | None = None
        self._eval: CounterAccumulator | None = None
        self._probe: RouterProbe | None = None

    # ---- placement and binding ----
    def attach_to(self, trainer) -> LoadBalanceCallback:
        """Add this callback to `trainer` as its first callback (moving it there if already added); returns it."""
        handler = trainer.callback_handler
        # a new list, not an in-place move: the handler may be iterating over the old one right now
        handler.callbacks = [self] + [callback for callback in handler.callbacks if callback is not self]
        self._handler = handler
        return self

    def _bind(self, model) -> None:
        blocks = [block for _, block in moe_blocks(model)] if model is not None else []
        same = self._train is not None and len(blocks) == len(self._train.blocks)
        if same and all(a is b for a, b in zip(blocks, self._train.blocks, strict=True)):
            return
        if not blocks:
            logger.warning("LoadBalanceCallback: the model has no MoE blocks; nothing will be logged.")
        group = counter_reduce_group(model) if model is not None else None
        self._train, self._eval = CounterAccumulator(blocks, group), CounterAccumulator(blocks, group)
        if self._probe is not None:
            self._probe.remove()
        self._probe = RouterProbe(blocks, group=group) if self.router_diagnostics else None
        if self.router_diagnostics and model is not None:
            enable_router_diagnostics(model)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._bind(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._bind(model)
        # what the blocks counted before training (a manual forward, an evaluation) is not training load
        self._train.harvest()
        self._train.reset()
        self.history = []
        if self._probe is not None:
            self._probe.arm()
        if self.save_plots and state.is_world_process_zero:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                logger.warning(
                    "LoadBalanceCallback(save_plots=True) needs matplotlib; install it with `pip install hf-moe[plot]` "
                    "(training goes on without pictures)."
                )

    # ---- counting: harvest after every micro-batch (see CounterAccumulator for why) ----
    def on_substep_end(self, args, state, control, **kwargs):
        if self._train is not None:
            self._train.harvest()

    def on_step_end(self, args, state, control, **kwargs):
        if self._train is not None:
            self._train.harvest()

    def on_prediction_step(self, args, state, control, **kwargs):
        if self._eval is not None:
            self._eval.harvest()

    def on_predict(self, args, state, control, **kwargs):
        # predict() logs nothing, so its counts would otherwise leak into the next evaluation's metrics
        if self._eval is not None:
            self._eval.harvest()
            self._eval.reset()

    # ---- logging ----
    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None:
            return
        if self._train is None:
            self._bind(model)
        if not self._train.blocks:
            return
        prefix = _eval_prefix(logs)
        if prefix is not None:
            self._eval.harvest()
            metrics = metrics_from_counts(
                self._eval.reduce_and_reset(), prefix=f"{prefix}_moe", per_expert=self.log_per_expert
            )
        elif "loss" in logs:
            self._train.harvest()
            counts = self._train.reduce_and_reset()
            metrics = metrics_from_counts(counts, prefix="moe", per_expert=self.log_per_expert)
            metrics.update(_router_temperature(model))
            bias = expert_bias_metrics(self._train.blocks) if self.router_diagnostics else []
            if self._probe is not None:
                metrics.update(per_layer_metrics(self._probe.changed_fractions(), means=("topk_changed_fraction",)))
            metrics.update(per_layer_metrics(bias, means=("bias_norm",)))
            self._record(state.global_step, counts, bias)
        else:
            return
        logs.update(metrics)
        last = state.log_history[-1] if state.log_history else None
        # Trainer.log appended {**logs, "step": ...} just before calling on_log: complete that entry too
        if (
            last is not None
            and last.get("step") == state.global_step
            and all(k in last for k in logs if k not in metrics)
        ):
            last.update(metrics)

    def _record(self, step: int, counts: list[dict], bias: list[dict]) -> None:
        fractions, imbalance, diversity = [], [], []
        for layer_counts in counts:
            layer = layer_metrics(layer_counts, per_expert=True)
            num_experts = layer_counts["routed_tokens_per_expert"].numel()
            fractions.append([layer.get(f"token_fraction_expert_{e:02d}", math.nan) for e in range(num_experts)])
            imbalance.append(layer.get("load_imbalance", math.nan))
            diversity.append(layer.get("load_diversity", math.nan))
        entry = {"step": step, "token_fraction": fractions, "load_imbalance": imbalance, "load_diversity": diversity}
        if any(bias):
            entry.update({name: [layer.get(name, math.nan) for layer in bias] for name in _BIAS_NAMES})
        self.history.append(entry)

    # ---- pictures ----
    def tensorboard_writer(self):
        """The open `SummaryWriter` of the Trainer's TensorBoard callback, if it has one (known once attached)."""
        if self._handler is None:
            return None
        for callback in self._handler.callbacks:
            if type(callback).__name__ == "TensorBoardCallback" and getattr(callback, "tb_writer", None) is not None:
                return callback.tb_writer
        return None

    def plot(self, output_dir: str | Path, tb_writer=None, step: int | None = None) -> list[Path]:
        """Save the pictures of the training so far in `output_dir` (and to `tb_writer`): the heatmap, imbalance and
        diversity over steps, and the expert bias over steps when a router balances with one."""
        from .plots import save_load_balance_plots

        return save_load_balance_plots(self.history, output_dir, tb_writer=tb_writer, step=step)

    def on_train_end(self, args, state, control, **kwargs):
        if self._probe is not None:
            self._probe.remove()  # a later train() arms it again
        if not (self.save_plots and self.history and state.is_world_process_zero):
            return
        try:
            self.plot(args.output_dir, tb_writer=self.tensorboard_writer(), step=state.global_step)
        except ImportError as error:
            logger.warning(f"LoadBalanceCallback: no pictures saved ({error})")
