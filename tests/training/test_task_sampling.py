"""Multi-task temperature sampling: the proportions formula, the mixture's draws, and the callback that raises T."""

from __future__ import annotations

from collections import Counter
from itertools import islice

import datasets
import numpy as np
import pytest
import torch
from transformers import Trainer, TrainerControl, TrainerState

from hf_moe.training.task_sampling import TaskTemperatureCallback, TemperatureMixture, temperature_proportions

from .helpers import causal_examples, tiny_gpt2, training_args

SIZES = {"big": 1000, "mid": 100, "small": 10}


def indexed_tasks(sizes: dict[str, int]) -> dict[str, datasets.Dataset]:
    # each example names its task and its index, so the draws can be counted without trusting the mixture's counts
    return {
        name: datasets.Dataset.from_dict({"task": [name] * size, "index": list(range(size))})
        for name, size in sizes.items()
    }


def formula(sizes, temperature) -> np.ndarray:
    # the paper's formula written directly, a reference apart from the module's log-space version
    weights = np.asarray(sizes, dtype=np.float64) ** (1.0 / temperature)
    return weights / weights.sum()


def test_proportions_hand_computed():
    assert temperature_proportions([1000, 100, 10], 1.0) == pytest.approx([1000 / 1110, 100 / 1110, 10 / 1110])
    assert temperature_proportions([100, 25], 2.0) == pytest.approx([2 / 3, 1 / 3])  # sqrt: 10 and 5
    assert temperature_proportions([8, 1], 3.0) == pytest.approx([2 / 3, 1 / 3])  # cube root: 2 and 1
    assert temperature_proportions([7], 5.0) == pytest.approx([1.0])
    assert temperature_proportions([1000, 10], 1e9) == pytest.approx([0.5, 0.5])  # T -> inf: uniform
    # small T with large sizes: n^(1/T) overflows a float, the proportions do not
    assert temperature_proportions([1e6, 1e5], 0.01) == pytest.approx([1.0, 0.0])


@pytest.mark.parametrize(
    ("sizes", "temperature", "match"),
    [
        ([10, 0], 1.0, "size"),
        ([10, -3], 1.0, "size"),
        ([], 1.0, "at least one"),
        ([10], 0.0, "temperature"),
        ([10], float("inf"), "temperature"),
    ],
)
def test_proportions_refuse_bad_inputs(sizes, temperature, match):
    with pytest.raises(ValueError, match=match):
        temperature_proportions(sizes, temperature)


@pytest.mark.parametrize("temperature", [1.0, 5.0])
def test_drawn_proportions_match_formula(temperature):
    mixture = TemperatureMixture(indexed_tasks(SIZES), temperature=temperature, seed=0)
    num_draws = 20_000
    counts = Counter(example["task"] for example in islice(mixture, num_draws))
    expected = formula(list(SIZES.values()), temperature)
    for name, probability in zip(SIZES, expected, strict=True):
        assert abs(counts[name] / num_draws - probability) < 0.02, (name, counts[name] / num_draws, probability)
    assert mixture.take_drawn() == {name: counts[name] for name in SIZES}
    assert mixture.take_drawn() == dict.fromkeys(SIZES, 0)  # reset


def test_each_pass_shuffles_every_example_once_and_seed_fixes_the_stream():
    sizes = {"big": 50, "small": 7}
    mixture = TemperatureMixture(indexed_tasks(sizes), temperature=5.0, seed=3)
    stream = [(e["task"], e["index"]) for e in islice(mixture, 600)]
    small = [index for task, index in stream if task == "small"]
    passes = [small[i : i + 7] for i in range(0, len(small) - 6, 7)]
    assert len(passes) >= 5
    for order in passes:
        assert sorted(order) == list(range(7))  # every example once per pass
    assert len({tuple(order) for order in passes}) > 1  # a new order per pass
    again = [(e["task"], e["index"]) for e in islice(mixture, 600)]
    other = [(e["task"], e["index"]) for e in islice(TemperatureMixture(indexed_tasks(sizes), 5.0, seed=4), 600)]
    assert again == stream  # each iter() restarts from the seed
    assert other != stream


def test_new_temperature_applies_to_the_running_iterator():
    mixture = TemperatureMixture(indexed_tasks(SIZES), temperature=1.0, seed=1)
    stream = iter(mixture)
    first = Counter(next(stream)["task"] for _ in range(2000))
    mixture.temperature = 50.0
    later = Counter(next(stream)["task"] for _ in range(20_000))
    assert first["small"] / 2000 < 0.03
    assert abs(later["small"] / 20_000 - formula(list(SIZES.values()), 50.0)[2]) < 0.02


def test_mixture_refuses_bad_inputs():
    tasks = indexed_tasks({"a": 3})
    with pytest.raises(ValueError, match="at least one"):
        TemperatureMixture({})
    with pytest.raises(ValueError, match="no examples"):
        TemperatureMixture({**tasks, "empty": datasets.Dataset.from_dict({"task": [], "index": []})})
    with pytest.raises(TypeError, match="datasets.Dataset"):
        TemperatureMixture({"a": [{"task": "a"}]})
    with pytest.raises(ValueError, match="same columns"):
        TemperatureMixture({**tasks, "b": datasets.Dataset.from_dict({"text": ["x"]})})
    with pytest.raises(ValueError, match="temperature"):
        TemperatureMixture(tasks, temperature=-1.0)
    mixture = TemperatureMixture(tasks)
    with pytest.raises(ValueError, match="temperature"):
        mixture.temperature = 0.0
    with pytest.raises(TypeError, match="TemperatureMixture"):
        TaskTemperatureCallback(tasks)
    with pytest.raises(ValueError, match="end_temperature"):
        TaskTemperatureCallback(mixture, end_temperature=0.0)
    with pytest.raises(ValueError, match="schedule"):
        TaskTemperatureCallback(mixture, schedule="step")


def test_mixture_refuses_dataloader_workers():
    # a worker would iterate a copy that the callback's temperature changes never reach
    loader = torch.utils.data.DataLoader(TemperatureMixture(indexed_tasks({"a": 3})), batch_size=2, num_workers=1)
    with pytest.raises(RuntimeError, match="main process"):
        next(iter(loader))


def test_schedule_raises_temperature_and_small_task_share(tmp_path):
    mixture = TemperatureMixture(indexed_tasks(SIZES))
    callback = TaskTemperatureCallback(mixture, start_temperature=1.0, end_temperature=5.0)
    args, state, control = training_args(tmp_path), TrainerState(max_steps=9), TrainerControl()
    callback.on_train_begin(args, state, control)
    temperatures, small = [], []
    for step in range(9):
        state.global_step = step
        callback.on_step_begin(args, state, control)
        temperatures.append(mixture.temperature)
        small.append(mixture.proportions["small"])
    assert temperatures == pytest.approx([1.0 + 0.5 * step for step in range(9)])  # linear 1 -> 5 over 9 steps
    assert all(b > a for a, b in zip(small, small[1:], strict=False))
    assert small[0] == pytest.approx(10 / 1110)
    assert small[-1] == pytest.approx(formula(list(SIZES.values()), 5.0)[2])
    with pytest.raises(ValueError, match="dataloader_num_workers"):
        callback.on_train_begin(training_args(tmp_path, dataloader_num_workers=2), state, control)


def causal_task(num: int, seed: int) -> datasets.Dataset:
    rows = causal_examples(num=num, seed=seed)
    dataset = datasets.Dataset.from_dict({key: [row[key].tolist() for row in rows] for key in rows[0]})
    return dataset.with_format("torch")


def test_trainer_logs_temperature_and_proportions(tmp_path):
    sizes = {"big": 16, "mid": 8, "small": 4}
    mixture = TemperatureMixture({name: causal_task(n, seed) for seed, (name, n) in enumerate(sizes.items())})
    callback = TaskTemperatureCallback(mixture, start_temperature=1.0, end_temperature=5.0)
    trainer = Trainer(model=tiny_gpt2(), args=training_args(tmp_path), train_dataset=mixture, callbacks=[callback])
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2  # max_steps=4, logging_steps=2
    # the log at step 2 follows step index 1 (T = 1 + 4/3), the one at step 4 step index 3 (T = 5)
    assert logs[0]["task_sampling/temperature"] == pytest.approx(1.0 + 4.0 / 3.0)
    assert logs[1]["task_sampling/temperature"] == pytest.approx(5.0)
    assert mixture.temperature == pytest.approx(5.0)
    for entry in logs:
        expected = formula(list(sizes.values()), entry["task_sampling/temperature"])
        proportions = [entry[f"task_sampling/proportion_{name}"] for name in sizes]
        assert proportions == pytest.approx(expected.tolist())
        drawn = [entry[f"task_sampling/drawn_{name}"] for name in sizes]
        assert sum(drawn) == pytest.approx(1.0)
        assert all(0.0 <= fraction <= 1.0 for fraction in drawn)
