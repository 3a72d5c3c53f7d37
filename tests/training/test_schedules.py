"""Dense-to-sparse schedule: router temperature in the modeling core, and the callback that anneals it."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import Trainer, TrainerCallback

import hf_moe
from hf_moe.training import DenseToSparseCallback, anneal
from tests.conftest import tiny_gpt2_moe_config

from .helpers import causal_examples, tiny_gpt2, training_args


def test_router_temperature_divides_logits_before_softmax():
    config = tiny_gpt2_moe_config()
    router = hf_moe.modeling.build_router(config, 32)
    torch.nn.init.normal_(router.weight)
    hidden = hf_moe.RoutingInputs(torch.randn(10, 32))
    plain = router(hidden)
    router.temperature = 0.5
    tempered = router(hidden)
    # the logits stay untempered (the z-loss regularizes the router, not the schedule); the softmax is tempered
    torch.testing.assert_close(tempered.logits_TE, plain.logits_TE)
    torch.testing.assert_close(tempered.probs_TE, torch.softmax(plain.logits_TE / 0.5, dim=-1))
    assert torch.equal(tempered.top_k_index_TK, plain.top_k_index_TK)  # temperature does not change the winners
    probs = torch.softmax(plain.logits_TE / 0.5, dim=-1).gather(1, plain.top_k_index_TK)
    torch.testing.assert_close(tempered.top_k_weights_TK, probs / probs.sum(-1, keepdim=True))


def test_router_temperature_config_field():
    assert tiny_gpt2(router_temperature=0.7).transformer.h[0].mlp.router.temperature == 0.7
    with pytest.raises(StrictDataclassClassValidationError, match="router_temperature"):
        tiny_gpt2_moe_config(router_temperature=0.0)


def test_anneal_endpoints():
    for schedule in ("linear", "cosine", "exponential"):
        assert anneal(2.0, 0.5, 0.0, schedule) == pytest.approx(2.0)
        assert anneal(2.0, 0.5, 1.0, schedule) == pytest.approx(0.5)
    assert anneal(2.0, 0.5, 0.5, "exponential") == pytest.approx(1.0)  # geometric mean
    with pytest.raises(ValueError, match="schedule"):
        anneal(2.0, 0.5, 0.5, "step")


class Probe(TrainerCallback):
    """Records what the routers use in every step (runs after DenseToSparseCallback's on_step_begin)."""

    def __init__(self):
        self.seen = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        routers = [m for m in model.modules() if isinstance(m, hf_moe.Router)]
        temperatures, top_ks = {r.temperature for r in routers}, {r.top_k for r in routers}
        assert len(temperatures) == len(top_ks) == 1  # every router follows the schedule
        self.seen.append((temperatures.pop(), top_ks.pop()))


def test_dense_to_sparse_callback_anneals_temperature_and_top_k(tmp_path):
    model = tiny_gpt2(num_experts_per_tok=4)
    probe = Probe()
    schedule = DenseToSparseCallback(2.0, 0.5, start_top_k=4, end_top_k=2, schedule="exponential")
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=3),
        train_dataset=causal_examples(12),
        callbacks=[schedule, probe],
    )
    trainer.train()
    assert probe.seen == [(2.0, 4), (pytest.approx(1.0), 3), (pytest.approx(0.5), 2)]
    # the final routing is written to the config, so a saved checkpoint routes as trained
    assert model.config.router_temperature == pytest.approx(0.5)
    assert model.config.num_experts_per_tok == 2 and model.config.normalize_top_k_weights is True
    reloaded = hf_moe.GPT2MoeForCausalLM(model.config)
    assert reloaded.transformer.h[0].mlp.router.top_k == 2


def test_dense_to_sparse_callback_rejects_bad_settings():
    with pytest.raises(ValueError, match="end_temperature"):
        DenseToSparseCallback(2.0, 0.0)
    with pytest.raises(ValueError, match="start_top_k and end_top_k"):
        DenseToSparseCallback(start_top_k=4)
