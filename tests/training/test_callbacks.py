"""LoadBalanceCallback: metrics in log_history and TensorBoard, exact counts, reset, eval pass, T5, placement."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainerCallback
from transformers.integrations import TensorBoardCallback

import hf_moe
from hf_moe.training import collect_moe_metrics, layer_metrics, moe_blocks

from .helpers import RoutingRecorder, causal_examples, seq2seq_examples, tiny_gpt2, tiny_t5, training_args

LAYER_NAMES = {
    "load_imbalance",
    "cv",
    "router_entropy",
    "dropped_fraction",
    "dead_experts",
    "aux_loss",
    "z_loss",
    "tokens",
    "load_diversity",
    "topk_margin_mean",
    "topk_margin_p05",
}
SUMMARY_NAMES = {
    "load_imbalance",
    "load_imbalance_max",
    "cv",
    "router_entropy",
    "dropped_fraction",
    "dead_experts",
    "load_diversity",
    "topk_margin_mean",
    "topk_margin_p05",
}


class WitnessCallback(TrainerCallback):
    """Takes the hook-based routing counts at every log (it runs after LoadBalanceCallback, which goes first)."""

    def __init__(self, recorder: RoutingRecorder):
        self.recorder = recorder
        self.train_windows, self.eval_windows = [], []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.train_windows.append(self.recorder.take(training=True))
        elif "eval_loss" in logs:
            self.eval_windows.append(self.recorder.take(training=False))


def fractions(logs: dict, prefix: str, layer: int, num_experts: int = 4) -> torch.Tensor:
    return torch.tensor(
        [logs[f"{prefix}/layer_{layer:02d}/token_fraction_expert_{e:02d}"] for e in range(num_experts)]
    )


@pytest.fixture(scope="module")
def tensorboard_run(tmp_path_factory):
    """One GPT-2 MoE run with capacity (so slots drop), evaluation every 2 steps, TensorBoard reporting."""
    torch.manual_seed(0)
    output_dir = tmp_path_factory.mktemp("tb_run")
    model = tiny_gpt2(capacity_factor=1.0, eval_capacity_factor=1.0)
    recorder = RoutingRecorder(model)
    witness = WitnessCallback(recorder)
    args = training_args(output_dir, report_to="tensorboard", eval_strategy="steps", eval_steps=2)
    # MoeTrainer puts the callback first, before TensorBoard's
    trainer = hf_moe.MoeTrainer(
        model=model,
        args=args,
        train_dataset=causal_examples(32),
        eval_dataset=causal_examples(8, seed=1),
        callbacks=[hf_moe.LoadBalanceCallback(), witness],
    )
    trainer.train()
    return trainer, witness, output_dir


def train_logs(trainer):
    return [e for e in trainer.state.log_history if "loss" in e]


def eval_logs(trainer):
    return [e for e in trainer.state.log_history if "eval_loss" in e]


def test_callback_goes_first_in_the_handler(tensorboard_run):
    trainer, _, _ = tensorboard_run
    callbacks = trainer.callback_handler.callbacks
    assert isinstance(callbacks[0], hf_moe.LoadBalanceCallback)
    assert any(isinstance(cb, TensorBoardCallback) for cb in callbacks[1:])


def test_metrics_in_log_history(tensorboard_run):
    trainer, _, _ = tensorboard_run
    logs = train_logs(trainer)
    assert [e["step"] for e in logs] == [2, 4]
    for entry in logs:
        for layer in range(2):
            assert {f"moe/layer_{layer:02d}/{name}" for name in LAYER_NAMES} <= entry.keys()
            assert fractions(entry, "moe", layer).sum().item() == pytest.approx(1.0)
        assert {f"moe/{name}" for name in SUMMARY_NAMES} <= entry.keys()
        assert entry["moe/dropped_fraction"] > 0  # capacity factor 1.0 with 4 experts, top-2 drops some slots
        assert entry["moe/load_imbalance_max"] >= entry["moe/load_imbalance"] >= 1.0
        assert 0.25 <= entry["moe/load_diversity"] <= 1.0
        assert not any("bias" in key for key in entry)  # no bias balancing in this run
    # stability compares with the previous log's probe routing: from the second log on
    assert "moe/topk_changed_fraction" not in logs[0]
    assert 0.0 <= logs[1]["moe/layer_00/topk_changed_fraction"] <= 1.0
    # the train-end summary entry gets no MoE metrics
    assert not any(k.startswith("moe/") for k in trainer.state.log_history[-1])


def test_train_counts_are_exact_per_window(tensorboard_run):
    # each window's fractions equal the router assignments seen by hooks in that window only: counters were reset
    # after every log, and evaluation forwards did not leak into training windows
    trainer, witness, _ = tensorboard_run
    for entry, window in zip(train_logs(trainer), witness.train_windows, strict=True):
        for layer, counts in enumerate(window):
            torch.testing.assert_close(fractions(entry, "moe", layer), (counts / counts.sum()).float())
            # 2 steps x 4 sequences x 12 tokens
            assert entry[f"moe/layer_{layer:02d}/tokens"] == 2 * 4 * 12


def test_counters_reset_after_logging(tensorboard_run):
    trainer, _, _ = tensorboard_run
    for _, block in moe_blocks(trainer.model):
        for name in block.COUNTERS:
            assert getattr(block, name).abs().sum().item() == 0, name


def test_eval_metrics_come_from_the_eval_pass_only(tensorboard_run):
    trainer, witness, _ = tensorboard_run
    logs = eval_logs(trainer)
    assert len(logs) == 2
    for entry, window in zip(logs, witness.eval_windows, strict=True):
        assert not any(k.startswith("moe/") for k in entry)
        assert entry["eval_moe/layer_00/tokens"] == 8 * 12  # one pass over the 8 eval sequences
        # the margins are counted in evaluation too; stability is a training-log measurement
        assert "eval_moe/layer_00/topk_margin_p05" in entry
        assert not any("topk_changed_fraction" in key for key in entry)
        for layer, counts in enumerate(window):
            torch.testing.assert_close(fractions(entry, "eval_moe", layer), (counts / counts.sum()).float())


def test_metrics_reach_tensorboard_event_files(tensorboard_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer, _, output_dir = tensorboard_run
    (event_dir,) = {p.parent for p in output_dir.rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(event_dir), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    # TensorBoardCallback rewrites "x" to "train/x" and "eval_x" to "eval/x"
    for name in (
        "moe/layer_00/load_imbalance",
        "moe/layer_01/token_fraction_expert_03",
        "moe/load_imbalance",
        "moe/layer_00/load_diversity",
        "moe/topk_margin_p05",
    ):
        assert f"train/{name}" in scalars
        assert f"eval/{name}" in scalars
    logged = {e["step"]: e["moe/layer_01/cv"] for e in train_logs(trainer)}
    written = {s.step: s.value for s in events.Scalars("train/moe/layer_01/cv")}
    assert written == pytest.approx(logged)
    assert {"moe/token_fraction", "moe/load_imbalance", "moe/load_diversity"} <= set(events.Tags()["images"])
    assert "moe/expert_bias" not in events.Tags()["images"]


def test_plots_saved_at_train_end(tensorboard_run):
    _, _, output_dir = tensorboard_run
    for name in ("moe_token_fraction_heatmap.png", "moe_load_imbalance.png", "moe_load_diversity.png"):
        assert (output_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (output_dir / "moe_expert_bias.png").exists()  # no bias balancing in this run


@pytest.mark.parametrize("how", ["attach_to", "moe_trainer_add_callback"])
def test_callback_added_after_init_goes_first(tmp_path, how):
    model = tiny_gpt2()
    trainer_class = Trainer if how == "attach_to" else hf_moe.MoeTrainer
    args = training_args(tmp_path, max_steps=2, report_to="tensorboard")
    trainer = trainer_class(model=model, args=args, train_dataset=causal_examples(8))
    callback = hf_moe.LoadBalanceCallback(save_plots=False)
    if how == "attach_to":
        assert callback.attach_to(trainer) is callback
    else:
        trainer.add_callback(callback)
    trainer.train()
    assert trainer.callback_handler.callbacks[0] is callback
    assert "moe/layer_01/load_imbalance" in trainer.state.log_history[0]


def test_plain_trainer_callbacks_still_reach_the_log_history(tmp_path):
    # in Trainer(callbacks=[...]) the callback runs after the reporting integrations, but log_history has it all
    trainer = Trainer(
        model=tiny_gpt2(),
        args=training_args(tmp_path, max_steps=2),
        train_dataset=causal_examples(8),
        callbacks=[hf_moe.LoadBalanceCallback(save_plots=False)],
    )
    trainer.train()
    assert "moe/layer_01/load_imbalance" in trainer.state.log_history[0]


def test_t5_family(tmp_path):
    # T5: encoder and decoder MoE blocks (2 + 2), numbered in module order; evaluate() outside training
    model = tiny_t5()
    recorder = RoutingRecorder(model)
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=2, per_device_train_batch_size=2),
        train_dataset=seq2seq_examples(8),
        eval_dataset=seq2seq_examples(4, seed=1),
        callbacks=[hf_moe.LoadBalanceCallback(save_plots=False)],
    )
    trainer.train()
    entry = train_logs(trainer)[0]
    assert [f"moe/layer_{i:02d}/tokens" in entry for i in range(5)] == [True] * 4 + [False]
    assert entry["moe/layer_00/tokens"] == 2 * 2 * 10 and entry["moe/layer_03/tokens"] == 2 * 2 * 6
    recorder.take(training=False)
    metrics = trainer.evaluate()
    window = recorder.take(training=False)
    for layer, counts in enumerate(window):
        torch.testing.assert_close(fractions(metrics, "eval_moe", layer), (counts / counts.sum()).float())


def test_layer_metrics_on_known_counts():
    counts = {
        "routed_tokens_per_expert": torch.tensor([4.0, 0.0, 2.0, 2.0]),
        "dropped_tokens_per_expert": torch.tensor([1.0, 0.0, 0.0, 1.0]),
        "router_entropy_sum": torch.tensor(3.0),
        "num_tokens": torch.tensor(4.0),
        "balance_loss_sum": torch.tensor(2.5),
        "z_loss_sum": torch.tensor(0.5),
        "num_forwards": torch.tensor(2.0),
    }
    metrics = layer_metrics(counts)
    assert metrics["token_fraction_expert_00"] == 0.5 and metrics["token_fraction_expert_01"] == 0.0
    assert metrics["load_imbalance"] == 2.0  # max 4 / mean 2
    assert metrics["cv"] == pytest.approx((2.0**0.5) / 2.0)  # population std sqrt(2), mean 2
    assert metrics["router_entropy"] == 0.75
    assert metrics["dropped_fraction"] == 0.25
    assert metrics["dead_experts"] == 1.0
    assert (metrics["aux_loss"], metrics["z_loss"], metrics["tokens"]) == (1.25, 0.25, 4.0)
    assert layer_metrics({**counts, "num_forwards": torch.tensor(0.0)}) == {}


def test_collect_moe_metrics_for_custom_loops():
    model = tiny_gpt2().eval()
    recorder = RoutingRecorder(model)
    with torch.no_grad():
        model(torch.randint(3, 99, (2, 8)))
    metrics = collect_moe_metrics(model)
    counts = recorder.take(training=False)[0]
    torch.testing.assert_close(fractions(metrics, "moe", 0), (counts / counts.sum()).float())
    assert collect_moe_metrics(model) == {}  # reset: nothing counted since
