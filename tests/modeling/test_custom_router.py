"""Adding a router is one class and one registry line: two routers defined here run end to end in both families.

- `ThresholdRouter`: learned, and uses a *variable* number of experts per token (every expert whose probability beats
  1/E, at most K): the slots it leaves unused carry the sentinel id E and weight 0, as the router contract says.
- `TokenIdRouter`: no parameters, routes by token id (`input_id % E`): token ids reach every MoE layer, also during
  cached generation (only the new tokens' ids) and in T5's decoder.

The remote-code load of a saved folder (built-in routers) is `tests/modeling/test_hub_portability.py`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

import hf_moe
from hf_moe.hub import render_model_card
from hf_moe.modeling import Router, RouterDecision, RoutingInputs, moe_blocks, moe_routers
from hf_moe.modeling.registry import ROUTERS
from tests.conftest import tiny_gpt2_moe_config
from tests.modeling.test_t5_moe import tiny_config as tiny_t5_config


class ThresholdRouter(Router):
    leaves_slots_unused = True

    def __init__(self, config, hidden_size: int):
        super().__init__(config, hidden_size)
        self.weight = nn.Parameter(torch.empty(self.num_experts, hidden_size))

    def forward(self, inputs: RoutingInputs) -> RouterDecision:
        logits_TE = F.linear(inputs.hidden_TD.float(), self.weight.float())
        probs_TE = torch.softmax(logits_TE, dim=-1)
        top_probs_TK, top_index_TK = probs_TE.topk(self.top_k, dim=-1)
        used_TK = top_probs_TK > 1.0 / self.num_experts
        used_TK[:, 0] = True  # every token keeps its best expert
        index_TK = torch.where(used_TK, top_index_TK, self.num_experts)
        return RouterDecision(logits_TE, index_TK, top_probs_TK * used_TK, probs_TE)


class TokenIdRouter(Router):
    def forward(self, inputs: RoutingInputs) -> RouterDecision:
        if inputs.input_ids_T is None:
            raise ValueError("TokenIdRouter routes by token id: call the model with input_ids")
        index_TK = (inputs.input_ids_T % self.num_experts).unsqueeze(-1)
        logits_TE = torch.zeros(index_TK.shape[0], self.num_experts, device=index_TK.device)
        return RouterDecision(logits_TE, index_TK, torch.ones(index_TK.shape, device=index_TK.device))


@pytest.fixture(autouse=True)
def registered_routers():
    hf_moe.register_router(
        "threshold", ThresholdRouter, extra_parameters=lambda experts, hidden: experts * hidden, card_label="threshold"
    )
    hf_moe.register_router("token_id", TokenIdRouter, extra_parameters=lambda experts, hidden: 0, card_label="by id")
    yield
    del ROUTERS["threshold"], ROUTERS["token_id"]


def tiny(family: str, router_type: str, **overrides):
    if family == "gpt2":
        return hf_moe.GPT2MoeForCausalLM(tiny_gpt2_moe_config(router_type=router_type, **overrides))
    return hf_moe.T5MoeForConditionalGeneration(tiny_t5_config(router_type=router_type, **overrides))


def batch_for(model) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(2, 99, (2, 8))
    labels = torch.randint(2, 99, (2, 5)) if model.config.is_encoder_decoder else input_ids
    return {"input_ids": input_ids, "labels": labels}


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_a_registered_router_trains_saves_loads_and_is_described(family, tmp_path):
    model = tiny(family, "threshold", num_experts_per_tok=3, capacity_factor=2.0, min_capacity=1).train()
    assert all(isinstance(router, ThresholdRouter) for _, router in moe_routers(model))
    assert model.config.parameter_counts()["total"] == model.num_parameters()
    batch = batch_for(model)
    out = model(**batch)
    assert torch.isfinite(out.loss) and out.aux_loss is not None and out.z_loss is not None
    out.loss.backward()
    assert all(router.weight.grad.abs().sum() > 0 for _, router in moe_routers(model))
    # unused slots were routed to no expert: fewer assignments than tokens x K, at least one per token
    for _, block in moe_blocks(model):
        assert block.num_tokens.item() <= block.routed_tokens_per_expert.sum().item() < 3 * block.num_tokens.item()

    model.eval()
    model.save_pretrained(tmp_path)
    auto = AutoModelForSeq2SeqLM if model.config.is_encoder_decoder else AutoModelForCausalLM
    loaded = auto.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    card = render_model_card(loaded.config)
    assert "| Router | `threshold`: threshold |" in str(card)
    from hf_moe.cli.inspect import describe

    assert describe(str(tmp_path))["router_type"] == "threshold"


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_token_ids_reach_every_moe_layer_also_in_cached_generation(family):
    model = tiny(family, "token_id").eval()
    seen = []

    def record(router, args, decision):
        seen.append((args[0].input_ids_T.clone(), decision.top_k_index_TK[:, 0].clone()))

    for _, router in moe_routers(model):
        router.register_forward_hook(record)
    input_ids = torch.randint(2, 99, (2, 6))
    model.generate(input_ids, max_new_tokens=4, do_sample=False)
    assert seen
    for ids_T, experts_T in seen:
        # the defining property of routing by id: the same token goes to the same expert, in every layer and step
        assert torch.equal(experts_T, ids_T % model.config.num_local_experts)
    # cached decoding routes only the new token of each row
    assert any(ids_T.numel() == 2 for ids_T, _ in seen)


def test_a_router_that_needs_token_ids_says_so_for_inputs_embeds():
    model = tiny("gpt2", "token_id").eval()
    with pytest.raises(ValueError, match="input_ids"):
        model(inputs_embeds=torch.randn(1, 3, 32))


def test_an_unregistered_router_type_names_the_registered_ones():
    with pytest.raises(Exception, match="router_type must be one of"):
        tiny_gpt2_moe_config(router_type="no_such_router")
