"""`LoadBalanceCallback`: per-layer router metrics in the Trainer logs, TensorBoard and pictures.

How the metrics reach the reporting integrations: `Trainer.log` appends a copy of `logs` to `state.log_history` and
then calls every callback's `on_log` in list order, where the user's callbacks come after the reporting ones
(TensorBoard, W&B, ...). A callback appended there adds its metrics after those integrations have written the
step. So at `on_init_end` / `on_train_begin` the callback finds the `CallbackHandler` that is calling it and moves
itself to the front of its list; its `on_log` then adds the metrics to the shared `logs` dict before any
integration reads it, and to the `log_history` entry just appended. At `on_train_end`, being first also means the
TensorBoard writer is still open for the pictures.
"""

from __future__ import annotations

import inspect
import logging
import math
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from .load_balance import CounterAccumulator, layer_metrics, metrics_from_counts, moe_blocks

__all__ = ["LoadBalanceCallback", "find_callback_handler", "move_callback_to_front"]

logger = logging.getLogger(__name__)


def find_callback_handler(max_depth: int = 8) -> CallbackHandler | None:
    """The `CallbackHandler` dispatching the event that is running now (found on the call stack), or None."""
    frame = inspect.currentframe()
    try:
        for _ in range(max_depth):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if isinstance(owner, CallbackHandler):
                return owner
        return None
    finally:
        del frame  # frames in locals make reference cycles


def move_callback_to_front(handler: CallbackHandler, callback: TrainerCallback) -> None:
    """Put `callback` first in `handler`'s list, so its `on_log` runs before the reporting integrations'."""
    # a new list, not an in-place move: the handler may be iterating over the old one right now
    handler.callbacks = [callback] + [cb for cb in handler.callbacks if cb is not callback]


def _eval_prefix(logs: dict) -> str | None:
    # `Trainer.evaluate(metric_key_prefix=p)` logs `{p}_runtime` (speed metrics); the end-of-training summary logs
    # `train_runtime`, which is not an evaluation
    for key in logs:
        if key.endswith("_runtime") and key != "train_runtime":
            return key[: -len("_runtime")]
    return None


class LoadBalanceCallback(TrainerCallback):
    """Adds router load-balance metrics to every Trainer log, training and evaluation, from the MoE blocks' counters.

    Training logs get `moe/layer_{i:02d}/{name}` and `moe/{name}` (see `hf_moe.training.load_balance.layer_metrics`
    for the names), counted over the steps since the previous log; evaluation logs get the same under
    `{metric_key_prefix}_moe/...` (`eval_moe/...`), counted over that evaluation pass only. Counts are summed over
    data-parallel ranks. At the end of training, a heatmap of token fractions (layer x expert) and a plot of load
    imbalance over steps are saved in `args.output_dir` and sent to TensorBoard when it is a reporting integration.

    Args:
        log_per_expert: also log each expert's token fraction (`token_fraction_expert_{e:02d}`), E scalars per layer.
        save_plots: save the pictures at the end of training (needs matplotlib: `pip install hf-moe[plot]`).
    """

    def __init__(self, log_per_expert: bool = True, save_plots: bool = True):
        self.log_per_expert = log_per_expert
        self.save_plots = save_plots
        # one entry per training log: {"step", "token_fraction" (L lists of E floats), "load_imbalance" (L floats)}
        self.history: list[dict] = []
        self._handler: CallbackHandler | None = None
        self._train: CounterAccumulator | None = None
        self._eval: CounterAccumulator | None = None
        self._warned = False

    # ---- placement and binding ----
    def _take_front_seat(self) -> None:
        handler = find_callback_handler()
        if handler is None:
            if not self._warned:
                logger.warning(
                    "LoadBalanceCallback could not find the Trainer's callback handler: its metrics reach "
                    "state.log_history but may miss reporting integrations that run before it."
                )
                self._warned = True
            return
        self._handler = handler
        if handler.callbacks[0] is not self:
            move_callback_to_front(handler, self)

    def _bind(self, model) -> None:
        blocks = [block for _, block in moe_blocks(model)] if model is not None else []
        same = self._train is not None and len(blocks) == len(self._train.blocks)
        if same and all(a is b for a, b in zip(blocks, self._train.blocks, strict=True)):
            return
        if not blocks:
            logger.warning("LoadBalanceCallback: the model has no MoE blocks; nothing will be logged.")
        self._train, self._eval = CounterAccumulator(blocks), CounterAccumulator(blocks)

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._take_front_seat()
        self._bind(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._take_front_seat()  # again: the callback may have been added with trainer.add_callback after init
        self._bind(model)
        # what the blocks counted before training (a manual forward, an evaluation) is not training load
        self._train.harvest()
        self._train.reset()
        self.history = []
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
            self._record(state.global_step, counts)
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

    def _record(self, step: int, counts: list[dict]) -> None:
        fractions, imbalance = [], []
        for layer_counts in counts:
            layer = layer_metrics(layer_counts, per_expert=True)
            num_experts = layer_counts["routed_tokens_per_expert"].numel()
            fractions.append([layer.get(f"token_fraction_expert_{e:02d}", math.nan) for e in range(num_experts)])
            imbalance.append(layer.get("load_imbalance", math.nan))
        self.history.append({"step": step, "token_fraction": fractions, "load_imbalance": imbalance})

    # ---- pictures ----
    def tensorboard_writer(self):
        """The open `SummaryWriter` of the Trainer's TensorBoard callback, if it has one."""
        if self._handler is None:
            return None
        for callback in self._handler.callbacks:
            if type(callback).__name__ == "TensorBoardCallback" and getattr(callback, "tb_writer", None) is not None:
                return callback.tb_writer
        return None

    def plot(self, output_dir: str | Path, tb_writer=None, step: int | None = None) -> list[Path]:
        """Save the heatmap and the imbalance plot of the training so far in `output_dir` (and to `tb_writer`)."""
        from .plots import save_load_balance_plots

        return save_load_balance_plots(self.history, output_dir, tb_writer=tb_writer, step=step)

    def on_train_end(self, args, state, control, **kwargs):
        if not (self.save_plots and self.history and state.is_world_process_zero):
            return
        try:
            self.plot(args.output_dir, tb_writer=self.tensorboard_writer(), step=state.global_step)
        except ImportError as error:
            logger.warning(f"LoadBalanceCallback: no pictures saved ({error})")
