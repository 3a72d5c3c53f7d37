"""Multi-task temperature sampling (Dua et al. 2022, "Tricks for Training Sparse Translation Models", arXiv 2110.08246).

Each example comes from task i with probability p_i = n_i^(1/T) / sum_j n_j^(1/T), n_i the task's size. T = 1 samples
in proportion to the sizes; a larger T flattens the mixture towards uniform, so low-resource tasks are seen more. The
paper raises T over training: the model first learns from the mixture as it is, then the small tasks get more weight.

    TemperatureMixture({"en-de": de, "en-fr": fr, ...})   draws example by example with the current proportions
    TaskTemperatureCallback(mixture, 1.0, 5.0)           sets mixture.temperature at every step, logs proportions

Who owns what: the mixture owns the temperature (set by the callback at the start of every step) and the counts of
examples drawn per task (counted while iterating, read and reset by the callback at every training log).

Why not `datasets.interleave_datasets(probabilities=...)`: it fixes the probabilities at construction. Its sampler
(`RandomlyCyclingMultiSourcesExamplesIterable`) keeps them in a private attribute, draws the source indices 1000 at a
time ahead of the examples, and `IterableDataset.__iter__` works on re-built copies of it, so a change made from
outside would arrive late or not at all. The mixture here draws its task per example from the proportions of the
moment, so a new temperature applies from the next draw.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Mapping, Sequence

import datasets
import torch
from transformers import TrainerCallback

from .schedules import SCHEDULES, anneal

__all__ = ["TaskTemperatureCallback", "TemperatureMixture", "temperature_proportions"]


def _check_temperature(temperature: float, name: str = "temperature") -> float:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"{name} must be a finite number > 0, got {temperature}")
    return float(temperature)


def temperature_proportions(sizes: Sequence[float], temperature: float) -> list[float]:
    """p_i = n_i^(1/T) / sum_j n_j^(1/T) for task sizes n_i > 0 and temperature T > 0."""
    temperature = _check_temperature(temperature)
    if not sizes:
        raise ValueError("sizes must name at least one task")
    if not all(size > 0 and math.isfinite(size) for size in sizes):
        raise ValueError(f"every task size must be a finite number > 0, got {list(sizes)}")
    # n^(1/T) as exp(log(n) / T) shifted by the largest log: no overflow for huge sizes and small T
    logs = [math.log(size) / temperature for size in sizes]
    top = max(logs)
    weights = [math.exp(value - top) for value in logs]
    total = sum(weights)
    return [weight / total for weight in weights]


class TemperatureMixture(torch.utils.data.IterableDataset):
    """An endless stream of examples from several `datasets.Dataset`s, each example's task drawn with probability
    `temperature_proportions(sizes, temperature)`.

    Each task's examples are read in a fresh random order on every pass through it (a permutation per pass), so a small
    task repeats its examples, all of them once per pass, when it is sampled more often than its size allows. The
    stream is a function of `seed` and of the temperatures set while iterating: every `iter()` starts it anew.

    With `Trainer`: give `max_steps` (the stream has no length) and keep `dataloader_num_workers=0`. A DataLoader
    worker would iterate a pickled copy, which the callback's temperature changes never reach, and every worker would
    draw the same stream; iterating in a worker raises `RuntimeError`. Under several processes Accelerate lets the
    first process draw every batch and sends the other processes their share (`dispatch_batches`, its default for an
    iterable dataset), so one mixture decides the whole global batch. The DataLoader and Accelerate fetch a batch or
    two ahead, so the draws follow the temperature schedule a step or two late. On resuming from a checkpoint the
    Trainer skips batches by drawing them at the resumed step's temperature: the stream after resuming is not that of
    an uninterrupted run.

    Args:
        tasks: task name -> dataset, every dataset with the same columns (the collator batches examples of all tasks
            together). The names are used in the logged metric names.
        temperature: T > 0 to start with; `TaskTemperatureCallback` changes it during training.
        seed: seeds the task draws and the per-pass orders.
    """

    def __init__(self, tasks: Mapping[str, datasets.Dataset], temperature: float = 1.0, seed: int = 0):
        if not tasks:
            raise ValueError("tasks must hold at least one dataset")
        for name, dataset in tasks.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"task names must be non-empty strings, got {name!r}")
            if not isinstance(dataset, datasets.Dataset):
                raise TypeError(f"task {name!r} must be a datasets.Dataset, got {type(dataset).__name__}")
            if len(dataset) == 0:
                raise ValueError(f"task {name!r} has no examples")
        first, *_ = tasks
        columns = set(tasks[first].column_names)
        for name, dataset in tasks.items():
            if set(dataset.column_names) != columns:
                raise ValueError(
                    f"every task needs the same columns: {first!r} has {sorted(columns)}, {name!r} has "
                    f"{sorted(dataset.column_names)}"
                )
        self.tasks = dict(tasks)
        self.names = list(self.tasks)
        self.sizes = [len(dataset) for dataset in self.tasks.values()]
        self.seed = seed
        # examples drawn per task since the last take_drawn(); counted while iterating
        self.drawn = dict.fromkeys(self.names, 0)
        self.temperature = temperature

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = _check_temperature(value)
        self._proportions = temperature_proportions(self.sizes, self._temperature)
        cumulative, total = [], 0.0
        for proportion in self._proportions:
            total += proportion
            cumulative.append(total)
        self._cumulative = cumulative

    @property
    def proportions(self) -> dict[str, float]:
        """Task name -> probability of drawing it at the current temperature."""
        return dict(zip(self.names, self._proportions, strict=True))

    def take_drawn(self) -> dict[str, int]:
        """The examples drawn per task since the previous call (or since construction); resets the counts."""
        drawn, self.drawn = self.drawn, dict.fromkeys(self.names, 0)
        return drawn

    def __iter__(self) -> Iterator[dict]:
        if torch.utils.data.get_worker_info() is not None:
            raise RuntimeError(
                "TemperatureMixture must be iterated in the main process (dataloader_num_workers=0): a DataLoader "
                "worker holds a copy that temperature changes never reach, and every worker would draw the same stream"
            )
        generator = torch.Generator().manual_seed(self.seed)
        orders: list[list[int]] = [[] for _ in self.names]  # what is left of each task's current pass, reversed
        last = len(self.names) - 1
        while True:
            # read self._cumulative at every draw: a temperature set meanwhile applies from this example on;
            # min(): the last cumulative sum may round to just below 1
            task = min(bisect.bisect_right(self._cumulative, torch.rand((), generator=generator).item()), last)
            if not orders[task]:
                orders[task] = torch.randperm(self.sizes[task], generator=generator).tolist()
            name = self.names[task]
            self.drawn[name] += 1
            yield self.tasks[name][orders[task].pop()]


class TaskTemperatureCallback(TrainerCallback):
    """Raises the mixture's sampling temperature over training steps and logs the mixing proportions.

    At the start of step t (0-based) the mixture samples at `anneal(start, end, t / (num_steps - 1), schedule)`. Every
    training log gets `task_sampling/temperature`, `task_sampling/proportion_{name}` (the formula's proportions at that
    temperature) and `task_sampling/drawn_{name}` (the fraction of examples drawn from each task since the previous
    log, left out when nothing was drawn, as on processes other than the first under `dispatch_batches`).

    Like any callback in `Trainer(callbacks=[...])`, it runs after the reporting integrations (TensorBoard, W&B), which
    then miss these metrics; `state.log_history` and the callbacks after it get them (see `LoadBalanceCallback`).

    Args:
        mixture: the `TemperatureMixture` the Trainer trains on.
        start_temperature, end_temperature: temperatures (> 0) at the first and last step; the paper goes 1 -> 5.
        num_steps: steps over which to change it; None: the whole run (`state.max_steps`). Later steps keep the end.
        schedule: "linear" (default), "cosine" or "exponential", as in `hf_moe.training.anneal`.
    """

    def __init__(
        self,
        mixture: TemperatureMixture,
        start_temperature: float = 1.0,
        end_temperature: float = 5.0,
        num_steps: int | None = None,
        schedule: str = "linear",
    ):
        if not isinstance(mixture, TemperatureMixture):
            raise TypeError(f"mixture must be a TemperatureMixture, got {type(mixture).__name__}")
        self.start_temperature = _check_temperature(start_temperature, "start_temperature")
        self.end_temperature = _check_temperature(end_temperature, "end_temperature")
        if num_steps is not None and num_steps < 1:
            raise ValueError(f"num_steps must be >= 1 or None, got {num_steps}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.mixture = mixture
        self.num_steps = num_steps
        self.schedule = schedule
        self._total_steps = num_steps

    def temperature_at(self, step: int) -> float:
        total = self._total_steps
        # step 0 runs at the start temperature and step num_steps - 1 at the end temperature
        progress = step / (total - 1) if total and total > 1 else 1.0
        return anneal(self.start_temperature, self.end_temperature, progress, self.schedule)

    def on_train_begin(self, args, state, control, **kwargs):
        if args.dataloader_num_workers > 0:
            raise ValueError(
                "TaskTemperatureCallback needs dataloader_num_workers=0: the workers' copies of the mixture would "
                f"never see the new temperatures (got dataloader_num_workers={args.dataloader_num_workers})"
            )
        self._total_steps = self.num_steps or state.max_steps
        self.mixture.temperature = self.temperature_at(state.global_step)  # global_step > 0 when resuming
        self.mixture.take_drawn()  # draws before training (a look at the data) are not the training mixture

    def on_step_begin(self, args, state, control, **kwargs):
        self.mixture.temperature = self.temperature_at(state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs:  # evaluation and end-of-training summaries draw nothing
            return
        metrics = {"task_sampling/temperature": self.mixture.temperature}
        for name, proportion in self.mixture.proportions.items():
            metrics[f"task_sampling/proportion_{name}"] = proportion
        drawn = self.mixture.take_drawn()
        total = sum(drawn.values())
        if total:
            for name, count in drawn.items():
                metrics[f"task_sampling/drawn_{name}"] = count / total
        logs.update(metrics)
        last = state.log_history[-1] if state.log_history else None
        # Trainer.log appended {**logs, "step": ...} just before calling on_log: complete that entry too
        if last is not None and last.get("step") == state.global_step and "loss" in last:
            last.update(metrics)
