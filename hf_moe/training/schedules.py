"""Dense-to-sparse gate schedule (Nie et al. 2021, "Dense-to-Sparse Gate for Mixture-of-Experts").

Training starts with a high router temperature (soft routing: the combine weights spread over the chosen experts,
and with a large top-k many experts train on every token) and anneals towards a low temperature (and small top-k):
sparse routing. The router side lives in the modeling core: a router's `temperature` divides the logits before the
softmax and `top_k` is read in every forward. Two routers have a temperature: `router_type="dense_to_sparse"` (the
paper's Gumbel gate, whose active experts are those above `gate_threshold`, so the experts per token fall as the
temperature does) and `"topk"` / `"noisy_topk"` (whose top-k stays fixed unless this callback anneals it too).
This callback only sets them. `LoadBalanceCallback` logs what they do: `moe/router_temperature` and
`moe/experts_per_token`, the experts each token actually used (counted by the MoE blocks, summed over ranks).
"""

from __future__ import annotations

import logging
import math

from torch import nn
from transformers import TrainerCallback

from ..modeling.moe_parts import moe_routers

__all__ = ["SCHEDULES", "DenseToSparseCallback", "anneal"]

logger = logging.getLogger(__name__)

SCHEDULES = ("linear", "cosine", "exponential")


def anneal(start: float, end: float, progress: float, schedule: str = "exponential") -> float:
    """The value at `progress` in [0, 1] (clamped) going from `start` to `end`.

    "linear"; "cosine" (half cosine: slow at both ends); "exponential" (geometric interpolation: equal ratios per
    step, the natural choice for a temperature, whose effect is multiplicative on the logits).
    """
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return start + (end - start) * progress
    if schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "exponential":
        return start * (end / start) ** progress
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def _routers(model: nn.Module) -> list[nn.Module]:
    return [router for _, router in moe_routers(model)]


class DenseToSparseCallback(TrainerCallback):
    """Anneals every router's temperature (and optionally top-k) over training steps.

    At the start of step t (0-based) the routers use `anneal(start, end, t / (num_steps - 1))`; top-k is interpolated
    linearly and rounded. At the end of training the final values are written to `model.config`
    (`router_temperature`, `num_experts_per_tok`, with `normalize_top_k_weights` pinned to what the routers used),
    so a saved checkpoint routes as the trained model did.

    Args:
        start_temperature, end_temperature: router softmax temperatures (> 0) at the first and last step.
        start_top_k, end_top_k: experts per token at the first and last step; None leaves top-k alone.
        num_steps: steps over which to anneal; None: the whole run (`state.max_steps`). Later steps keep the end.
        schedule: "exponential" (default), "linear" or "cosine" for the temperature.
    """

    def __init__(
        self,
        start_temperature: float = 2.0,
        end_temperature: float = 0.3,
        start_top_k: int | None = None,
        end_top_k: int | None = None,
        num_steps: int | None = None,
        schedule: str = "exponential",
    ):
        for name, value in (("start_temperature", start_temperature), ("end_temperature", end_temperature)):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if (start_top_k is None) != (end_top_k is None):
            raise ValueError(f"give both start_top_k and end_top_k or neither, got {start_top_k} and {end_top_k}")
        if start_top_k is not None and (start_top_k < 1 or end_top_k < 1):
            raise ValueError(f"start_top_k and end_top_k must be >= 1, got {start_top_k} and {end_top_k}")
        if num_steps is not None and num_steps < 1:
            raise ValueError(f"num_steps must be >= 1 or None, got {num_steps}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.start_temperature, self.end_temperature = float(start_temperature), float(end_temperature)
        self.start_top_k, self.end_top_k = start_top_k, end_top_k
        self.num_steps = num_steps
        self.schedule = schedule
        self._total_steps = num_steps

    def _progress(self, step: int) -> float:
        # step 0 runs at the start values and step num_steps - 1 at the end values
        return step / (self._total_steps - 1) if self._total_steps and self._total_steps > 1 else 1.0

    def temperature_at(self, step: int) -> float:
        return anneal(self.start_temperature, self.end_temperature, self._progress(step), self.schedule)

    def top_k_at(self, step: int) -> int | None:
        if self.start_top_k is None:
            return None
        return round(anneal(self.start_top_k, self.end_top_k, self._progress(step), "linear"))

    def apply(self, model: nn.Module, step: int) -> None:
        """Set every router (and MoE block) of `model` to the schedule's values at `step`."""
        temperature, top_k = self.temperature_at(step), self.top_k_at(step)
        for router in _routers(model):
            router.temperature = temperature
            if top_k is not None:
                router.top_k = top_k

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._total_steps = self.num_steps or state.max_steps
        routers = _routers(model)
        if not routers:
            logger.warning("DenseToSparseCallback: the model has no routers; nothing to anneal.")
            return
        without = sorted({type(r).__name__ for r in routers if not hasattr(r, "temperature")})
        if without:
            raise ValueError(
                f"DenseToSparseCallback anneals the router temperature, but {', '.join(without)} has none; use "
                "router_type='dense_to_sparse', 'topk' or 'noisy_topk'"
            )
        if self.start_top_k is not None:
            num_experts = min(r.num_experts for r in routers)
            if max(self.start_top_k, self.end_top_k) > num_experts:
                raise ValueError(
                    f"top-k schedule {self.start_top_k} -> {self.end_top_k} exceeds the experts per layer ({num_experts})"
                )
            if self.end_top_k == 1 and any(getattr(r, "normalize_top_k_weights", False) for r in routers):
                logger.warning(
                    "DenseToSparseCallback: top-k anneals to 1 with normalize_top_k_weights on, so the single "
                    "combine weight is always 1 and the router learns only from its auxiliary losses."
                )
        self.apply(model, state.global_step)  # global_step > 0 when resuming from a checkpoint

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.apply(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        routers = _routers(model)
        config = getattr(model, "config", None)
        if not routers or config is None:
            return
        config.router_temperature = routers[0].temperature
        if self.start_top_k is not None:
            if hasattr(routers[0], "normalize_top_k_weights"):
                # pin the normalization the routers were built with: the config derives it from top-k when None
                config.normalize_top_k_weights = routers[0].normalize_top_k_weights
            config.num_experts_per_tok = routers[0].top_k
