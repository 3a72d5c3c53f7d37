"""Router diagnostics: load diversity, top-k boundary margin (mean and histogram p05), routing stability of a probe,
expert-bias metrics, off by default, and a Trainer run that logs and draws them all."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import TrainerControl, TrainerState, TrainingArguments

import hf_moe
from hf_moe.modeling.modeling_gpt2_moe import GPT2MoeExperts
from hf_moe.modeling.sparse_moe import SparseMoeBlock
from hf_moe.training import enable_router_diagnostics, expert_bias_metrics, layer_metrics, moe_blocks
from tests.conftest import tiny_gpt2_moe_config

from .helpers import causal_examples, tiny_gpt2, training_args

# one bin of the margin histogram, in decades: [1e-6, 1) in 63 equal steps of log10
BIN_DECADES = 6 / 63
MARGIN_COUNTERS = ("topk_margin_sum", "topk_margin_histogram")


def counts_of(routed: list[float]) -> dict[str, torch.Tensor]:
    num_experts = len(routed)
    return {
        "routed_tokens_per_expert": torch.tensor(routed),
        "dropped_tokens_per_expert": torch.zeros(num_experts),
        "router_entropy_sum": torch.tensor(0.0),
        "num_tokens": torch.tensor(sum(routed) / 2),
        "balance_loss_sum": torch.tensor(0.0),
        "z_loss_sum": torch.tensor(0.0),
        "num_forwards": torch.tensor(1.0),
    }


@pytest.mark.parametrize(
    "routed, expected",
    [
        ([3.0, 3.0, 3.0, 3.0], 1.0),  # uniform
        ([8.0, 0.0, 0.0, 0.0], 0.25),  # one expert: 1/E
        ([4.0, 0.0, 2.0, 2.0], math.exp(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))) / 4),  # 2**1.5 / 4
    ],
)
def test_load_diversity_of_known_loads(routed, expected):
    assert layer_metrics(counts_of(routed))["load_diversity"] == pytest.approx(expected, rel=1e-12)


def block_with_known_probs(probs_TE: torch.Tensor, **overrides) -> tuple[SparseMoeBlock, torch.Tensor]:
    """A block whose router gives exactly `probs_TE`: W = [I_E | 0], hidden = [log p | noise] -> logits log p."""
    config = tiny_gpt2_moe_config(**overrides)
    block = SparseMoeBlock(config, GPT2MoeExperts(config)).eval()
    num_tokens, num_experts = probs_TE.shape
    with torch.no_grad():
        block.router.weight.zero_()
        block.router.weight[:, :num_experts] = torch.eye(num_experts)
    hidden_TD = torch.randn(num_tokens, 32)
    hidden_TD[:, :num_experts] = probs_TE.log()
    return block, hidden_TD


def reference_margins(scores_TE: torch.Tensor, top_k: int) -> torch.Tensor:
    ordered_TE = scores_TE.sort(dim=-1, descending=True).values
    return ordered_TE[:, top_k - 1] - ordered_TE[:, top_k]


@pytest.mark.parametrize("top_k, bias", [(1, None), (2, None), (2, [0.05, -0.02, 0.0, 0.01])])
def test_topk_margin_mean_and_p05_match_a_reference(top_k, bias):
    generator = torch.Generator().manual_seed(3)
    # spread logits: margins from ~1e-5 to ~1
    probs_TE = torch.softmax(4.0 * torch.randn(2, 600, 4, generator=generator), dim=-1)
    overrides = dict(num_experts_per_tok=top_k, router_bias_update_rate=0.01 if bias else 0.0)
    block, hidden_TD = block_with_known_probs(probs_TE.reshape(-1, 4), **overrides)
    block.diagnostics = True
    if bias:
        block.router.expert_bias.copy_(torch.tensor(bias))
    mask = (torch.rand(2, 600, generator=generator) > 0.2).float()  # padding must not count
    for index in range(2):  # two forwards: the counters sum
        block(hidden_TD.view(2, 600, 32)[index : index + 1], token_mask=mask[index : index + 1])
    metrics = layer_metrics({name: getattr(block, name) for name in block.COUNTERS})

    scores_TE = probs_TE.reshape(-1, 4) + (torch.tensor(bias) if bias else 0.0)
    margins = reference_margins(scores_TE, top_k)[mask.reshape(-1) == 1].double()
    assert block.topk_margin_histogram.sum().item() == mask.sum().item()
    assert metrics["topk_margin_mean"] == pytest.approx(margins.mean().item(), rel=1e-5)
    p05 = torch.quantile(margins, 0.05).item()
    assert abs(math.log10(metrics["topk_margin_p05"]) - math.log10(p05)) <= BIN_DECADES


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_experts_per_tok=4),
        dict(router_type="expert_choice", capacity_factor=2.0, allow_noncausal_routing=True),
    ],
    ids=["k_equals_E", "expert_choice"],
)
def test_no_margin_without_a_topk_boundary(overrides):
    # k = E selects every expert, expert choice selects tokens: no top-k set, so no number rather than a fake one
    block, hidden_TD = block_with_known_probs(torch.softmax(torch.randn(40, 4), dim=-1), **overrides)
    block.diagnostics = True
    block(hidden_TD.view(2, 20, 32))
    assert all(getattr(block, name).sum().item() == 0 for name in MARGIN_COUNTERS)
    metrics = layer_metrics({name: getattr(block, name) for name in block.COUNTERS})
    assert metrics and not {"topk_margin_mean", "topk_margin_p05"} & metrics.keys()


def test_diagnostics_are_off_by_default():
    model = tiny_gpt2().train()
    model(torch.randint(3, 99, (2, 8)))
    blocks = [block for _, block in moe_blocks(model)]
    assert not any(block.diagnostics for block in blocks)
    assert all(getattr(block, name).sum().item() == 0 for block in blocks for name in MARGIN_COUNTERS)
    assert blocks[0].num_tokens.item() == 16  # the usual counters did count
    enable_router_diagnostics(model)
    model(torch.randint(3, 99, (2, 8)))
    assert all(block.topk_margin_histogram.sum().item() == 16 for block in blocks)


class Driver:
    """Calls LoadBalanceCallback's hooks as Trainer would, around forwards the test makes itself."""

    def __init__(self, model, callback: hf_moe.LoadBalanceCallback):
        self.model, self.callback = model, callback
        self.args = TrainingArguments(output_dir="unused", report_to=[])
        self.state, self.control = TrainerState(), TrainerControl()
        callback.on_train_begin(self.args, self.state, self.control, model=model)

    def step(self, input_ids, attention_mask=None) -> None:
        self.model(input_ids=input_ids, attention_mask=attention_mask)
        self.callback.on_step_end(self.args, self.state, self.control)

    def log(self) -> dict:
        logs = {"loss": 0.0}
        self.callback.on_log(self.args, self.state, self.control, logs=logs, model=self.model)
        return logs


def top_k_sets(hidden_TD: torch.Tensor, weight_ED: torch.Tensor, top_k: int) -> torch.Tensor:
    probs_TE = torch.softmax(F.linear(hidden_TD, weight_ED), dim=-1)
    return probs_TE.topk(top_k, dim=-1).indices.sort(dim=-1).values


def test_stability_is_zero_without_training_and_counts_changed_top_k_sets():
    model = tiny_gpt2().train()
    routers = [block.router for _, block in moe_blocks(model)]
    seen = {}  # an independent witness of the probe: the routers' inputs in the first forward

    def witness(index):
        def hook(router, args):
            seen.setdefault(index, args[0].hidden_TD.detach().clone())

        return hook

    handles = [router.register_forward_pre_hook(witness(i)) for i, router in enumerate(routers)]
    driver = Driver(model, hf_moe.LoadBalanceCallback(save_plots=False))
    # 12 x 48 = 576 token rows, the last 8 of each row padding: the probe is rows 0..511 less their padding
    input_ids = torch.randint(3, 99, (12, 48))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[:, -8:] = 0
    driver.step(input_ids, attention_mask)
    for handle in handles:
        handle.remove()
    first = driver.log()
    assert not any("topk_changed_fraction" in key for key in first)  # nothing to compare with yet
    driver.step(torch.randint(3, 99, (4, 12)))  # later forwards do not move the probe
    unchanged = driver.log()
    assert unchanged["moe/layer_00/topk_changed_fraction"] == unchanged["moe/layer_01/topk_changed_fraction"] == 0.0

    probe_T = attention_mask.reshape(-1)[:512] == 1
    old_weight = routers[0].weight.detach().clone()
    with torch.no_grad():
        routers[0].weight.add_(0.05 * torch.randn_like(routers[0].weight))
    changed = driver.log()
    hidden_TD = seen[0][:512][probe_T]
    expected = (top_k_sets(hidden_TD, old_weight, 2) != top_k_sets(hidden_TD, routers[0].weight, 2)).any(-1)
    assert 0 < expected.float().mean().item() < 1
    assert changed["moe/layer_00/topk_changed_fraction"] == pytest.approx(expected.float().mean().item())
    assert changed["moe/layer_01/topk_changed_fraction"] == 0.0  # its router did not change
    assert changed["moe/topk_changed_fraction"] == pytest.approx(expected.float().mean().item() / 2)


def test_bias_metrics_follow_the_bias_updates():
    model = tiny_gpt2(router_bias_update_rate=0.01)
    blocks = [block for _, block in moe_blocks(model)]
    # bias += 0.01 * sign(mean load - load): by hand, layer 0 -> [0, 0.02, 0.01, -0.01], layer 1 -> [0.01, -0.01, 0, 0]
    blocks[0].router.update_expert_bias(torch.tensor([4.0, 0.0, 2.0, 2.0]))
    blocks[0].router.update_expert_bias(torch.tensor([0.0, 0.0, 0.0, 8.0]))
    blocks[1].router.update_expert_bias(torch.tensor([1.0, 3.0, 2.0, 2.0]))
    layers = expert_bias_metrics(blocks)
    assert layers[0] == pytest.approx({"bias_norm": math.sqrt(6e-4), "bias_min": -0.01, "bias_max": 0.02})
    assert layers[1] == pytest.approx({"bias_norm": math.sqrt(2e-4), "bias_min": -0.01, "bias_max": 0.01})
    logs = Driver(model, hf_moe.LoadBalanceCallback(save_plots=False)).log()
    assert logs["moe/layer_01/bias_max"] == pytest.approx(0.01)
    assert logs["moe/bias_norm"] == pytest.approx((math.sqrt(6e-4) + math.sqrt(2e-4)) / 2)
    assert expert_bias_metrics([block for _, block in moe_blocks(tiny_gpt2())]) == [{}, {}]


LAYER_DIAGNOSTICS = ("load_diversity", "topk_margin_mean", "topk_margin_p05", "bias_norm", "bias_min", "bias_max")


def test_trainer_run_with_bias_balancing_logs_and_draws_every_diagnostic(tmp_path):
    model = tiny_gpt2(router_bias_update_rate=0.01)
    callback = hf_moe.LoadBalanceCallback()
    trainer = hf_moe.MoeTrainer(
        model=model, args=training_args(tmp_path), train_dataset=causal_examples(16), callbacks=[callback]
    )
    trainer.train()
    first, second = [entry for entry in trainer.state.log_history if "loss" in entry]
    for entry in (first, second):
        for layer in range(2):
            assert {f"moe/layer_{layer:02d}/{name}" for name in LAYER_DIAGNOSTICS} <= entry.keys()
        assert {"moe/load_diversity", "moe/topk_margin_mean", "moe/topk_margin_p05", "moe/bias_norm"} <= entry.keys()
    assert "moe/topk_changed_fraction" not in first
    assert {"moe/topk_changed_fraction", "moe/layer_01/topk_changed_fraction"} <= second.keys()
    # the last log comes after the last bias update: it shows the bias the model ends with
    for layer, (_, block) in enumerate(moe_blocks(model)):
        bias = block.router.expert_bias
        assert bias.abs().max().item() > 0
        logged = [second[f"moe/layer_{layer:02d}/{name}"] for name in ("bias_norm", "bias_min", "bias_max")]
        assert logged == pytest.approx([bias.norm().item(), bias.min().item(), bias.max().item()])
    assert callback.history[-1]["bias_max"] == [second[f"moe/layer_{i:02d}/bias_max"] for i in range(2)]
    for name in ("moe_load_imbalance.png", "moe_load_diversity.png", "moe_expert_bias.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_callback_without_router_diagnostics_logs_the_classic_metrics_only():
    model = tiny_gpt2(router_bias_update_rate=0.01).train()
    driver = Driver(model, hf_moe.LoadBalanceCallback(save_plots=False, router_diagnostics=False))
    driver.step(torch.randint(3, 99, (2, 8)))
    driver.log()
    driver.step(torch.randint(3, 99, (2, 8)))
    logs = driver.log()
    assert not any(block.diagnostics for _, block in moe_blocks(model))
    assert "moe/layer_00/load_diversity" in logs  # from the load counters, always there
    assert not any(name in key for key in logs for name in ("topk_", "bias_"))
