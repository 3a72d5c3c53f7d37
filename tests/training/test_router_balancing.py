"""Aux-loss-free bias balancing (Wang et al. 2024; DeepSeek-V3) in one process: the bias steers selection only, moves
once per optimizer step by exactly the rate, evens a skewed router without any aux loss, and resumes exactly.
The multi-process equivalences are in test_ddp.py and tests/parallel."""

from __future__ import annotations

import warnings
from itertools import pairwise

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import Trainer, TrainerCallback

import hf_moe
from hf_moe.modeling.routing import RoutingInputs
from hf_moe.training import RouterBalancer, RouterBalancingCallback, moe_blocks
from tests.conftest import tiny_gpt2_moe_config

from .helpers import RoutingRecorder, causal_examples, seq2seq_examples, tiny_gpt2, tiny_t5, training_args

RATE = 0.01


def biases(model) -> list[torch.Tensor]:
    return [block.router.expert_bias.clone() for _, block in moe_blocks(model)]


class BiasHistory(TrainerCallback):
    """The biases after every micro-batch and after every optimizer step (`RouterBalancingCallback` runs before it:
    `MoeTrainer` adds that one when it is built, this one comes later through `add_callback`)."""

    def __init__(self, model):
        self.model = model
        self.after_micro_batch: list[list[torch.Tensor]] = []
        self.after_step: list[list[torch.Tensor]] = [biases(model)]

    def on_substep_end(self, args, state, control, **kwargs):
        self.after_micro_batch.append(biases(self.model))

    def on_step_end(self, args, state, control, **kwargs):
        self.after_step.append(biases(self.model))


def train(model, tmp_path, callbacks=(), examples=None, trainer_class=hf_moe.MoeTrainer, **args):
    trainer = trainer_class(
        model=model,
        args=training_args(tmp_path, **args),
        train_dataset=examples if examples is not None else causal_examples(32, 12),
    )
    for callback in callbacks:
        trainer.add_callback(callback)
    trainer.train()
    return trainer


def test_bias_selects_the_experts_but_the_weights_stay_unbiased():
    config = tiny_gpt2_moe_config(router_bias_update_rate=RATE, num_experts_per_tok=1)
    router = hf_moe.modeling.registry.build_router(config, 32)
    router.init_weights(0.02)
    hidden_TD = torch.randn(10, 32)
    plain = router(RoutingInputs(hidden_TD))
    router.expert_bias[3] = 1.0  # more than any probability gap: every token picks expert 3
    biased = router(RoutingInputs(hidden_TD))
    assert (biased.top_k_index_TK == 3).all() and not (plain.top_k_index_TK == 3).all()
    torch.testing.assert_close(biased.top_k_weights_TK[:, 0], plain.probs_TE[:, 3])  # unbiased p of expert 3
    torch.testing.assert_close(biased.logits_TE, plain.logits_TE)


def test_the_bias_update_is_rate_times_the_sign_of_the_load_gap():
    router = hf_moe.modeling.registry.build_router(tiny_gpt2_moe_config(router_bias_update_rate=RATE), 32)
    router.update_expert_bias(torch.tensor([10.0, 2.0, 4.0, 4.0], dtype=torch.float64))  # mean 5
    torch.testing.assert_close(router.expert_bias, torch.tensor([-RATE, RATE, RATE, RATE]))
    router.update_expert_bias(torch.tensor([5.0, 5.0, 5.0, 5.0]))  # balanced: no move
    torch.testing.assert_close(router.expert_bias, torch.tensor([-RATE, RATE, RATE, RATE]))


def test_training_forwards_count_valid_selections_only():
    model = tiny_gpt2(router_bias_update_rate=RATE).train()
    recorder = RoutingRecorder(model)
    ids = torch.randint(3, 99, (2, 6))
    model(input_ids=ids)
    for (_, block), counted in zip(moe_blocks(model), recorder.take(True), strict=True):
        torch.testing.assert_close(block.router.expert_load, counted)
    mask = torch.ones_like(ids)
    mask[0, 3:] = 0
    for _, block in moe_blocks(model):
        block.router.expert_load.zero_()
    model(input_ids=ids, attention_mask=mask)
    assert [block.router.expert_load.sum().item() for _, block in moe_blocks(model)] == [9 * 2] * 2  # 9 tokens, k=2
    model.eval()(input_ids=ids)  # evaluation does not count
    assert [block.router.expert_load.sum().item() for _, block in moe_blocks(model)] == [9 * 2] * 2


def skewed(model, generator_seed: int = 1):
    """Every MoE layer's router sends nearly every token to expert 0: a constant offset on the router's input (the
    layer norm's bias) that the router's row 0 is aligned with, on top of a spread of random rows."""
    generator = torch.Generator().manual_seed(generator_seed)
    with torch.no_grad():
        for layer in model.transformer.h:
            offset = torch.randn(32, generator=generator)
            offset = 2 * offset / offset.norm()
            layer.ln_2.bias.copy_(offset)
            layer.mlp.router.weight.copy_(torch.randn(4, 32, generator=generator) / 32**0.5)
            layer.mlp.router.weight[0] += 0.75 * offset
    return model


@pytest.mark.parametrize("rate", [0.0, RATE], ids=["no_bias", "bias"])
def test_bias_balancing_evens_a_skewed_router_without_any_aux_loss(tmp_path, rate):
    # Switch routing (top-1): the hardest to balance, every token has one expert
    fields = dict(router_aux_loss_coef=0.0, router_z_loss_coef=0.0, num_experts_per_tok=1)
    model = skewed(tiny_gpt2(router_bias_update_rate=rate, **fields))
    recorder = RoutingRecorder(model)
    loads = []  # per step, (layers, E) assignments, counted by the recorder's own hooks

    class Loads(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            loads.append(torch.stack(recorder.take(True)))

    train(model, tmp_path, [Loads()], examples=causal_examples(64, 16), max_steps=100, per_device_train_batch_size=16)
    loads = torch.stack(loads)  # (steps, layers, E)

    def imbalance(load_LE):  # max / mean load of each layer
        return load_LE.max(dim=-1).values / load_LE.mean(dim=-1)

    assert (imbalance(loads[0]) > 3.0).all()  # the skew: nearly all of the 256 tokens on expert 0
    late = imbalance(loads[70:].sum(dim=0))  # the load of steps 70-99 together, for each layer
    balanced_steps = (imbalance(loads) < 1.2).all(dim=-1).nonzero().flatten().tolist()  # every layer below 1.2
    if rate == 0:
        assert (late > 2.5).all(), late  # the task alone does not balance it (the control)
        assert not balanced_steps
    else:
        # the bias needs ~0.45 (the probability gap) at 0.01 per step, so ~50 steps; then it stays balanced
        # (a single step's 256 tokens vary by ~10% per expert, so the bound is on the steps together)
        assert balanced_steps and balanced_steps[0] <= 60, balanced_steps
        assert (late < 1.2).all(), late


def test_the_bias_moves_once_per_optimizer_step_not_per_micro_batch(tmp_path):
    # learning rate 0: routing is the same in every run, so 4 micro-batches of 4 must equal one batch of 16
    runs = {}
    for accumulation, batch in ((1, 16), (4, 4)):
        torch.manual_seed(0)
        model = tiny_gpt2(router_bias_update_rate=RATE)
        history = BiasHistory(model)
        train(
            model,
            tmp_path / str(accumulation),
            [history],
            max_steps=5,
            learning_rate=0.0,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
        )
        runs[accumulation] = history
    accumulated = runs[4]
    # between the micro-batches of a step the bias stays where the last step left it
    assert len(accumulated.after_micro_batch) == 5 * 3  # the 3 micro-batches before each step's last
    for step in range(5):
        for seen in accumulated.after_micro_batch[3 * step : 3 * step + 3]:
            for layer, bias in enumerate(seen):
                torch.testing.assert_close(bias, accumulated.after_step[step][layer], rtol=0, atol=0)
    # every step moves every expert by exactly the rate (or not at all), from the loads of all its micro-batches
    for before, after in pairwise(accumulated.after_step):
        for old, new in zip(before, after, strict=True):
            steps = ((new - old).abs() / RATE).round()
            torch.testing.assert_close((new - old).abs(), steps * RATE)
            assert set(steps.tolist()) <= {0.0, 1.0} and steps.sum() > 0
    for accumulated_step, full_batch_step in zip(accumulated.after_step, runs[1].after_step, strict=True):
        for a, b in zip(accumulated_step, full_batch_step, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_resume_from_a_checkpoint_continues_the_bias_exactly(tmp_path):
    def run(output_dir, resume=None):
        torch.manual_seed(0)
        model = tiny_gpt2(router_bias_update_rate=RATE)
        trainer = hf_moe.MoeTrainer(
            model=model,
            args=training_args(output_dir, max_steps=6, save_strategy="steps", save_steps=3),
            train_dataset=causal_examples(32, 12),
        )
        trainer.train(resume_from_checkpoint=resume)
        return model

    straight = run(tmp_path / "straight")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "straight" / "checkpoint-3"))
    for a, b in zip(biases(straight), biases(resumed), strict=True):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    halfway = hf_moe.GPT2MoeForCausalLM.from_pretrained(tmp_path / "straight" / "checkpoint-3")
    assert any((a != b).any() for a, b in zip(biases(halfway), biases(straight), strict=True))


def test_plain_trainer_with_the_callback_moves_the_bias_and_moe_trainer_adds_it_once(tmp_path):
    model = tiny_gpt2(router_bias_update_rate=RATE)
    plain = Trainer(model=model, args=training_args(tmp_path), train_dataset=causal_examples(16, 12))
    plain.add_callback(RouterBalancingCallback())
    plain.train()
    assert all(bias.abs().sum() > 0 for bias in biases(model))

    def balancing_callbacks(trainer):
        return [c for c in trainer.callback_handler.callbacks if isinstance(c, RouterBalancingCallback)]

    assert len(balancing_callbacks(hf_moe.MoeTrainer(model=model, args=training_args(tmp_path)))) == 1
    given = hf_moe.MoeTrainer(model=model, args=training_args(tmp_path), callbacks=[RouterBalancingCallback()])
    assert len(balancing_callbacks(given)) == 1
    assert balancing_callbacks(hf_moe.MoeTrainer(model=tiny_gpt2(), args=training_args(tmp_path))) == []


def test_training_without_a_balancer_warns(monkeypatch):
    monkeypatch.setattr(hf_moe.SparseMoeBlock, "FORWARDS_WITHOUT_STEP_WARNING", 3)
    model = tiny_gpt2(router_bias_update_rate=RATE).train()
    ids = torch.randint(3, 99, (1, 5))
    balancer = RouterBalancer(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(5):  # a step after every two forwards: no warning
            model(input_ids=ids)
            model(input_ids=ids)
            balancer.step()
    with pytest.warns(UserWarning, match="RouterBalancingCallback"):
        for _ in range(3):
            model(input_ids=ids)


def test_t5_bias_balancing_moves_encoder_and_decoder_biases(tmp_path):
    model = tiny_t5(router_bias_update_rate=RATE)
    history = BiasHistory(model)
    train(model, tmp_path, [history], examples=seq2seq_examples(16))
    names = [name for name, _ in moe_blocks(model)]
    assert any("encoder" in n for n in names) and any("decoder" in n for n in names)
    for layer in range(len(names)):
        moves = torch.stack([after[layer] - before[layer] for before, after in pairwise(history.after_step)])
        assert moves.abs().sum() > 0  # every layer moved at some step (it may come back to 0: sign updates)
        assert set(moves.abs().div(RATE).round().unique().tolist()) <= {0.0, 1.0}


def test_the_bias_stays_float32_and_survives_save_and_load(tmp_path):
    model = tiny_gpt2(router_bias_update_rate=RATE)
    for index, (_, block) in enumerate(moe_blocks(model)):
        block.router.expert_bias.copy_(torch.tensor([1e-3, -2e-3, 3e-3, 0.0]) * (index + 1))
    expected = biases(model)
    model.to(torch.bfloat16)  # a step of 1e-3 next to 1.0 would vanish in bfloat16
    assert all(block.router.expert_bias.dtype == torch.float32 for _, block in moe_blocks(model))
    model.save_pretrained(tmp_path)
    loaded = hf_moe.GPT2MoeForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    for a, b in zip(expected, biases(loaded), strict=True):
        assert b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert loaded.config.router_bias_update_rate == RATE


def test_a_fresh_model_starts_with_a_zero_bias():
    torch.manual_seed(0)
    assert all((bias == 0).all() for bias in biases(tiny_gpt2(router_bias_update_rate=RATE)))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(router_bias_update_rate=-0.1), "router_bias_update_rate must be a finite number >= 0"),
        (dict(router_bias_update_rate=float("inf")), "router_bias_update_rate must be a finite number >= 0"),
        (dict(router_bias_update_rate=RATE, router_type="expert_choice"), "needs a router that selects"),
        (dict(router_bias_update_rate=RATE, router_type="base"), "needs a router that selects"),
    ],
)
def test_bad_bias_settings_are_refused_with_what_is_allowed(fields, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        tiny_gpt2_moe_config(**fields)


def test_bias_balancing_needs_no_aux_loss_but_takes_a_complementary_one():
    assert tiny_gpt2_moe_config(router_bias_update_rate=RATE).aux_loss_coef == 0.0
    config = tiny_gpt2_moe_config(router_bias_update_rate=RATE, router_aux_loss_coef=1e-4, aux_loss_scope="sequence")
    assert config.aux_loss_coef == 1e-4
