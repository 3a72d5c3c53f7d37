"""The dense-to-sparse gate (Nie et al. 2021): dense at a high temperature, about one expert per token once annealed."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, Trainer

import hf_moe
from hf_moe.cli.inspect import describe
from hf_moe.hub import render_model_card
from hf_moe.modeling import DenseToSparseRouter, RoutingInputs, moe_routers
from hf_moe.training import DenseToSparseCallback, LoadBalanceCallback
from tests.conftest import tiny_gpt2_moe_config
from tests.modeling.test_t5_moe import tiny_config as tiny_t5_config
from tests.training.helpers import causal_examples, training_args

NUM_EXPERTS = 4


def router(temperature: float = 1.0, threshold: float = 0.01, top_k: int = NUM_EXPERTS) -> DenseToSparseRouter:
    config = tiny_gpt2_moe_config(
        router_type="dense_to_sparse",
        num_experts_per_tok=top_k,
        router_temperature=temperature,
        gate_threshold=threshold,
    )
    gate = DenseToSparseRouter(config, 32)
    torch.nn.init.normal_(gate.weight, std=1.0)
    return gate


def test_at_a_high_temperature_every_expert_is_active_for_every_token():
    hidden = RoutingInputs(torch.randn(64, 32))
    for training in (True, False):
        decision = router(temperature=100.0).train(training)(hidden)
        assert torch.equal(decision.top_k_index_TK.sort(dim=-1).values, torch.arange(NUM_EXPERTS).expand(64, -1))
        assert (decision.top_k_weights_TK > 0).all()


def test_active_experts_are_those_above_the_threshold_at_most_k_at_least_the_best():
    gate = router(temperature=0.5, threshold=0.1, top_k=3).eval()
    hidden = RoutingInputs(torch.randn(200, 32))
    decision = gate(hidden)
    gate_TE = torch.softmax(torch.nn.functional.linear(hidden.hidden_TD, gate.weight) / 0.5, dim=-1)
    torch.testing.assert_close(decision.probs_TE, gate_TE)
    ranked_TE = gate_TE.argsort(dim=-1, descending=True)
    for t in range(200):
        expected = [e for e in ranked_TE[t, :3].tolist() if gate_TE[t, e] > 0.1] or [ranked_TE[t, 0].item()]
        used = [e for e in decision.top_k_index_TK[t].tolist() if e < NUM_EXPERTS]
        assert used == expected
        # combine weights: the gate weights themselves (not renormalized), 0 at unused slots
        weights = decision.top_k_weights_TK[t]
        torch.testing.assert_close(weights[: len(used)], gate_TE[t, used])
        assert (weights[len(used) :] == 0).all()
    # the cases above are not all trivial: some tokens use 1, some 2 or 3 experts
    assert len({int((row < NUM_EXPERTS).sum()) for row in decision.top_k_index_TK}) >= 2


def test_gumbel_noise_only_in_training():
    gate = router(temperature=1.0)
    hidden = RoutingInputs(torch.randn(32, 32))
    gate.eval()
    assert torch.equal(gate(hidden).logits_TE, gate(hidden).logits_TE)
    gate.train()
    torch.manual_seed(0)
    noisy = gate(hidden).logits_TE
    assert not torch.allclose(noisy, gate(hidden).logits_TE)
    # Gumbel(0, 1): mean Euler's gamma (0.577), std pi / sqrt(6) (1.28)
    noise = torch.cat([gate(hidden).logits_TE - gate.eval()(hidden).logits_TE for _ in range(50) if gate.train()])
    assert abs(noise.mean().item() - 0.5772) < 0.05 and abs(noise.std().item() - 1.2825) < 0.05


def test_annealing_on_a_toy_task_goes_from_all_experts_to_about_one(tmp_path):
    torch.manual_seed(0)
    model = hf_moe.GPT2MoeForCausalLM(
        tiny_gpt2_moe_config(router_type="dense_to_sparse", num_experts_per_tok=NUM_EXPERTS)
    )
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=40, logging_steps=5, learning_rate=3e-3),
        train_dataset=causal_examples(64),
        callbacks=[DenseToSparseCallback(2.0, 0.02)],
    )
    LoadBalanceCallback(save_plots=False).attach_to(trainer)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "moe/experts_per_token" in entry]
    first, last = logged[0], logged[-1]
    assert first["moe/experts_per_token"] > 3.9  # steps 1-5, temperature 2.0 -> 1.25: dense
    assert last["moe/experts_per_token"] <= 1.2  # steps 36-40, temperature 0.036 -> 0.02: sparse
    assert last["moe/router_temperature"] == pytest.approx(0.02)
    # the annealed temperature is saved with the model (evaluation has no Gumbel noise: how sparse it routes then
    # depends on how far apart the router learned to put its logits, not on this schedule alone)
    assert model.config.router_temperature == pytest.approx(0.02)


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_dense_to_sparse_end_to_end(family, tmp_path):
    fields = dict(router_type="dense_to_sparse", num_experts_per_tok=3, router_temperature=0.7)
    if family == "gpt2":
        model = hf_moe.GPT2MoeForCausalLM(tiny_gpt2_moe_config(**fields))
        batch = {"input_ids": torch.randint(2, 99, (2, 8))}
        batch["labels"] = batch["input_ids"]
        auto = AutoModelForCausalLM
    else:
        model = hf_moe.T5MoeForConditionalGeneration(tiny_t5_config(**fields))
        batch = {"input_ids": torch.randint(2, 99, (2, 8)), "labels": torch.randint(2, 99, (2, 5))}
        auto = AutoModelForSeq2SeqLM
    assert model.config.aux_loss_coef == 0.0  # no balance loss by default, as in the paper
    assert model.config.parameter_counts()["total"] == model.num_parameters()
    model.train()
    out = model(**batch)
    out.loss.backward()
    assert all(r.weight.grad.abs().sum() > 0 for _, r in moe_routers(model))  # the gate weights carry gradients

    model.eval()
    model.save_pretrained(tmp_path)
    loaded = auto.from_pretrained(tmp_path).eval()
    assert all(r.temperature == 0.7 for _, r in moe_routers(loaded))
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    assert "`dense_to_sparse`: dense-to-sparse Gumbel gate (Nie et al. 2021)" in str(render_model_card(loaded.config))
    assert describe(str(tmp_path))["router_type"] == "dense_to_sparse"
    generated = loaded.generate(batch["input_ids"], max_new_tokens=3, do_sample=False)
    assert generated.shape[0] == 2


def test_bad_dense_to_sparse_settings_are_refused():
    with pytest.raises(StrictDataclassClassValidationError, match="gate_threshold"):
        tiny_gpt2_moe_config(router_type="dense_to_sparse", gate_threshold=1.5)
    with pytest.raises(StrictDataclassClassValidationError, match="normalize_top_k_weights"):
        tiny_gpt2_moe_config(router_type="dense_to_sparse", normalize_top_k_weights=True)


def test_the_schedule_refuses_routers_without_a_temperature(tmp_path):
    from tests.modeling.test_custom_router import TokenIdRouter

    hf_moe.register_router("token_id_dts", TokenIdRouter, extra_parameters=lambda e, d: 0, card_label="by id")
    try:
        model = hf_moe.GPT2MoeForCausalLM(tiny_gpt2_moe_config(router_type="token_id_dts"))
        model.transformer.h[0].mlp.router.__dict__.pop("temperature", None)
        trainer = Trainer(
            model=model,
            args=training_args(tmp_path, max_steps=1),
            train_dataset=causal_examples(4),
            callbacks=[DenseToSparseCallback()],
        )
        with pytest.raises(ValueError, match="temperature"):
            trainer.train()
    finally:
        del hf_moe.modeling.registry.ROUTERS["token_id_dts"]
