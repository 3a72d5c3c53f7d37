"""Expert-choice routing (Zhou et al. 2022): each expert takes exactly its top-C tokens by affinity.

The defining properties, each checked with numbers: C from the formula, the chosen tokens are each expert's top-C
(brute-force sort), padding is never chosen, a token no expert chose passes through as 0 (block) and unchanged
(model layer), the causal families refuse it without the opt-in, and both families train, count, save, load, describe
and generate with it.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

import hf_moe
from hf_moe.hub import render_model_card
from hf_moe.modeling import ExpertChoiceRouter, RoutingInputs, moe_blocks, moe_routers
from hf_moe.modeling.modeling_gpt2_moe import GPT2MoeExperts
from hf_moe.modeling.sparse_moe import SparseMoeBlock
from tests.conftest import tiny_gpt2_moe_config
from tests.modeling.test_t5_moe import tiny_config as tiny_t5_config

NUM_EXPERTS = 4  # the tiny configs' expert count
CARD_LABEL = "expert choice: each expert takes its top-C tokens (Zhou et al. 2022)"


def ec_gpt2_config(**overrides) -> hf_moe.GPT2MoeConfig:
    fields = dict(router_type="expert_choice", allow_noncausal_routing=True, capacity_factor=1.0, min_capacity=1)
    return tiny_gpt2_moe_config(**{**fields, **overrides})


def ec_t5_config(**overrides) -> hf_moe.T5MoeConfig:
    fields = dict(router_type="expert_choice", decoder_moe_layers=[], capacity_factor=1.0, min_capacity=1)
    return tiny_t5_config(**{**fields, **overrides})


def make_router(**overrides) -> ExpertChoiceRouter:
    router = ExpertChoiceRouter(ec_gpt2_config(**overrides), 32)
    # a wide spread of affinities, so the top-C sets have no near ties
    torch.nn.init.normal_(router.weight, std=1.0)
    return router


def brute_force_choice(probs_TE: torch.Tensor, token_mask_T: torch.Tensor, num_units: int, capacity: int):
    """chosen_TE by sorting every (unit, expert) column in Python: the real tokens with the C largest affinities."""
    num_tokens, num_experts = probs_TE.shape
    unit_size = num_tokens // num_units
    chosen_TE = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    for unit in range(num_units):
        tokens = [t for t in range(unit * unit_size, (unit + 1) * unit_size) if token_mask_T[t]]
        for expert in range(num_experts):
            ranked = sorted(tokens, key=lambda t: -probs_TE[t, expert].item())
            chosen_TE[ranked[:capacity], expert] = True
    return chosen_TE


def chosen_of(decision) -> torch.Tensor:
    """chosen_TE (bool) from a decision's K = E slots, checking the slot layout on the way."""
    index_TK = decision.top_k_index_TK
    assert index_TK.shape[1] == NUM_EXPERTS
    chosen_TK = index_TK < NUM_EXPERTS
    # slot e holds expert e or the sentinel E
    slot_ids_TK = torch.arange(NUM_EXPERTS).expand_as(index_TK)
    assert torch.equal(torch.where(chosen_TK, index_TK, slot_ids_TK), slot_ids_TK)
    assert torch.equal(index_TK[~chosen_TK], torch.full_like(index_TK[~chosen_TK], NUM_EXPERTS))
    return chosen_TK


# --- the choice ---------------------------------------------------------------------------------------------------


# (config overrides, scope units, training, expected C) with B=3 sequences of S=8 (T=24), E=4; C by hand
CAPACITY_CASES = [
    (dict(capacity_factor=1.0), "batch", True, 6),  # ceil(1.0 * 24 / 4)
    (dict(capacity_factor=1.0, eval_capacity_factor=2.0), "batch", False, 12),  # ceil(2.0 * 24 / 4)
    (dict(capacity_factor=1.5), "batch", False, 9),  # evaluation falls back to capacity_factor: ceil(1.5 * 24 / 4)
    (dict(capacity_factor=0.1, min_capacity=4), "batch", True, 4),  # ceil(0.6) = 1, raised to min_capacity
    (dict(capacity_factor=None, expert_capacity=3), "batch", True, 3),
    (dict(capacity_factor=None, expert_capacity=50), "batch", True, 24),  # at most the unit's tokens
    (dict(capacity_factor=1.0), "sequence", True, 2),  # ceil(1.0 * 8 / 4) in each sequence
    (dict(capacity_factor=2.0, eval_capacity_factor=0.5), "sequence", False, 1),  # ceil(0.5 * 8 / 4)
]


@pytest.mark.parametrize(("overrides", "scope", "training", "capacity"), CAPACITY_CASES)
def test_each_expert_takes_exactly_its_top_c_tokens(overrides, scope, training, capacity):
    router = make_router(capacity_scope=scope, **overrides).train(training)
    hidden_BSD = torch.randn(3, 8, 32)
    decision = router(RoutingInputs(hidden_BSD.reshape(-1, 32), num_sequences=3))
    chosen_TE = chosen_of(decision)
    num_units = 3 if scope == "sequence" else 1
    # exactly C tokens per expert in every unit
    per_unit_load_UE = chosen_TE.view(num_units, -1, NUM_EXPERTS).sum(dim=1)
    assert torch.equal(per_unit_load_UE, torch.full((num_units, NUM_EXPERTS), capacity))
    # and they are the expert's top-C by affinity S = softmax(h W^T)
    probs_TE = torch.softmax(hidden_BSD.reshape(-1, 32) @ router.weight.detach().t(), dim=-1)
    torch.testing.assert_close(decision.probs_TE, probs_TE)
    assert torch.equal(chosen_TE, brute_force_choice(probs_TE, torch.ones(24, dtype=torch.bool), num_units, capacity))
    # combine weight = affinity where chosen, 0 elsewhere
    torch.testing.assert_close(decision.top_k_weights_TK, probs_TE * chosen_TE)


@pytest.mark.parametrize(("scope", "capacity_factor", "expected_load"), [("batch", 1.0, 4), ("sequence", 2.0, None)])
def test_padding_is_never_chosen(scope, capacity_factor, expected_load):
    router = make_router(capacity_scope=scope, capacity_factor=capacity_factor).eval()
    # B=2 sequences of 8; the second has only 3 real tokens, fewer than its C = ceil(2.0 * 8 / 4) = 4 in "sequence"
    token_mask_BS = torch.tensor([[1, 1, 0, 1, 1, 1, 0, 1], [1, 1, 1, 0, 0, 0, 0, 0]])
    mask_T = token_mask_BS.reshape(-1).bool()
    hidden_TD = torch.randn(16, 32)
    # large padding states give near one-hot affinities, at the top of their experts' columns: a choice that ignored
    # the mask would take them first
    hidden_TD[~mask_T] *= 20
    decision = router(RoutingInputs(hidden_TD, num_sequences=2, token_mask_T=token_mask_BS.reshape(-1)))
    chosen_TE = chosen_of(decision)
    assert not chosen_TE[~mask_T].any()
    assert torch.equal(decision.top_k_weights_TK[~mask_T], torch.zeros(int((~mask_T).sum()), NUM_EXPERTS))
    if scope == "batch":
        # C = ceil(1.0 * 16 / 4) = 4 among 10 real tokens
        assert torch.equal(chosen_TE.sum(dim=0), torch.full((NUM_EXPERTS,), expected_load))
        assert torch.equal(chosen_TE, brute_force_choice(decision.probs_TE, mask_T, 1, 4))
    else:
        # sequence 0: C = 4 of its 6 real tokens; sequence 1: all 3 real tokens, the surplus choice unused
        load_BE = chosen_TE.view(2, 8, NUM_EXPERTS).sum(dim=1)
        assert torch.equal(load_BE, torch.tensor([[4] * NUM_EXPERTS, [3] * NUM_EXPERTS]))
        assert torch.equal(chosen_TE, brute_force_choice(decision.probs_TE, mask_T, 2, 4))


def test_padding_is_never_chosen_in_a_t5_encoder():
    model = hf_moe.T5MoeForConditionalGeneration(ec_t5_config(capacity_factor=2.0)).eval()
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0, 0]])
    decisions = []
    for _, router in moe_routers(model):
        router.register_forward_hook(lambda module, args, decision: decisions.append(decision))
    with torch.no_grad():
        model(
            input_ids=torch.randint(2, 99, (2, 7)), attention_mask=attention_mask, labels=torch.randint(2, 99, (2, 3))
        )
    assert len(decisions) == 2  # the two encoder MoE layers
    padding_T = attention_mask.reshape(-1) == 0
    for decision in decisions:
        chosen_TE = chosen_of(decision)
        assert not chosen_TE[padding_T].any()
        # C = ceil(2.0 * 14 / 4) = 7 of the 9 real tokens
        assert torch.equal(chosen_TE.sum(dim=0), torch.full((NUM_EXPERTS,), 7))


# --- tokens no expert chose -----------------------------------------------------------------------------------------


def test_block_gives_zero_to_tokens_without_expert_and_the_affinity_weighted_sum_to_the_others():
    config = ec_gpt2_config(capacity_factor=0.5)  # C = ceil(0.5 * 16 / 4) = 2: at most 8 of 16 tokens are chosen
    block = SparseMoeBlock(config, GPT2MoeExperts(config)).eval()
    torch.nn.init.normal_(block.router.weight, std=1.0)
    for param in block.experts.parameters():
        torch.nn.init.normal_(param, std=0.3)
    hidden_BSD = torch.randn(2, 8, 32)
    decisions = []
    block.router.register_forward_hook(lambda module, args, decision: decisions.append(decision))
    with torch.no_grad():
        out_TD = block(hidden_BSD).reshape(16, 32)
        chosen_TE = chosen_of(decisions[0])
        unrouted_T = ~chosen_TE.any(dim=-1)
        assert unrouted_T.sum() >= 8
        assert torch.equal(out_TD[unrouted_T], torch.zeros(int(unrouted_T.sum()), 32))
        # the others: sum over the experts that chose them of S[t, e] * expert_e(h_t)
        hidden_TD = hidden_BSD.reshape(16, 32)
        expected_TD = torch.zeros(16, 32)
        for expert in range(NUM_EXPERTS):
            index_T1 = torch.full((16, 1), expert)
            expert_out_TD = block.experts(hidden_TD, index_T1, torch.ones(16, 1))
            expected_TD += (decisions[0].probs_TE[:, expert] * chosen_TE[:, expert]).unsqueeze(-1) * expert_out_TD
        torch.testing.assert_close(out_TD, expected_TD, rtol=1e-5, atol=1e-6)
    assert block.tokens_without_expert.item() == unrouted_T.sum().item()


def test_tokens_without_expert_pass_through_a_gpt2_layer_unchanged():
    # expert_capacity=1: each layer's 4 experts take at most 4 of the 16 tokens, so at least 12 get no expert
    model = hf_moe.GPT2MoeForCausalLM(ec_gpt2_config(capacity_factor=None, expert_capacity=1)).eval()
    records = []
    for layer in model.transformer.h:
        record = {}
        layer.ln_2.register_forward_pre_hook(lambda module, args, record=record: record.update(residual=args[0]))
        layer.mlp.router.register_forward_hook(
            lambda m, args, decision, record=record: record.update(decision=decision)
        )
        layer.register_forward_hook(lambda module, args, output, record=record: record.update(output=output))
        records.append(record)
    with torch.no_grad():
        model(input_ids=torch.randint(2, 99, (2, 8)))
    for record in records:
        unrouted_T = ~chosen_of(record["decision"]).any(dim=-1)
        assert unrouted_T.sum() >= 12
        residual_TD, output_TD = record["residual"].reshape(16, 32), record["output"].reshape(16, 32)
        # exactly the residual: the MoE feed-forward added 0
        assert torch.equal(output_TD[unrouted_T], residual_TD[unrouted_T])
        assert not torch.equal(output_TD[~unrouted_T], residual_TD[~unrouted_T])


# --- config -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda: tiny_gpt2_moe_config(router_type="expert_choice", capacity_factor=1.0),
        lambda: tiny_t5_config(router_type="expert_choice", capacity_factor=1.0),  # decoder MoE layers by default
        lambda: tiny_t5_config(router_type="expert_choice", capacity_factor=1.0, decoder_moe_layers=[1]),
    ],
)
def test_causal_moe_layers_refuse_expert_choice_without_the_opt_in(build):
    with pytest.raises(Exception, match=r"(?s)leaks the future.*allow_noncausal_routing=True") as raised:
        build()
    assert "decoder_moe_layers=[]" in str(raised.value)


def test_encoder_only_t5_and_the_opt_in_are_accepted():
    assert ec_t5_config().has_causal_moe_layers is False
    assert ec_gpt2_config().allow_noncausal_routing is True
    assert ec_t5_config(allow_noncausal_routing=True, decoder_moe_layers=None).has_causal_moe_layers is True


@pytest.mark.parametrize("build", [ec_gpt2_config, ec_t5_config])
def test_expert_choice_without_a_capacity_is_refused_naming_the_fields(build):
    with pytest.raises(Exception, match=r"(?s)needs a capacity.*capacity_factor.*expert_capacity"):
        build(capacity_factor=None)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(router_jitter_noise=0.1),
        dict(router_logit_noise_std=0.5),
        dict(router_temperature=2.0),
        dict(unit_combine_weights=True),
        dict(normalize_top_k_weights=True),
    ],
)
def test_token_choice_settings_are_refused_not_ignored(overrides):
    (name,) = overrides
    with pytest.raises(Exception, match=rf"does not use {name}"):
        ec_gpt2_config(**overrides)


def test_declared_defaults_and_experts_per_token():
    config = ec_gpt2_config(capacity_factor=1.5)
    assert config.aux_loss_coef == 0.0  # balanced by construction
    assert config.experts_per_token == 1.5  # the paper's c
    # a fixed capacity gives no per-token average without T: the config's num_experts_per_tok stands in
    assert ec_gpt2_config(capacity_factor=None, expert_capacity=3, num_experts_per_tok=3).experts_per_token == 3
    assert ec_gpt2_config(capacity_factor=8.0).experts_per_token == NUM_EXPERTS  # a token gets at most E experts


def test_settings_state_the_capacity_expert_choice_uses():
    settings = ExpertChoiceRouter.settings(ec_gpt2_config(capacity_factor=1.5, capacity_scope="sequence"))
    # an unset eval_capacity_factor means the training factor, not dropless
    assert settings == {
        "Expert choice capacity": "C = ceil(c * tokens / 4) per expert per sequence, at least 1; c = 1.5 in training, "
        "1.5 in evaluation"
    }
    fixed = ExpertChoiceRouter.settings(ec_gpt2_config(capacity_factor=None, expert_capacity=3))
    assert fixed == {"Expert choice capacity": "C = 3 tokens per expert per batch"}


# --- end to end -----------------------------------------------------------------------------------------------------


def tiny_model(family: str, **overrides):
    if family == "gpt2":
        return hf_moe.GPT2MoeForCausalLM(ec_gpt2_config(**overrides))
    return hf_moe.T5MoeForConditionalGeneration(ec_t5_config(**overrides))


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_expert_choice_trains_counts_saves_loads_describes_and_generates(family, tmp_path):
    # B=2, S=7: T=14, C = ceil(1.5 * 14 / 4) = 6, so E * C / T = 24 / 14 (not the nominal 1.5: C is rounded up)
    # z-loss off (and the aux loss is 0 by default): the router's gradient must come through the combine weights
    model = tiny_model(family, capacity_factor=1.5, router_z_loss_coef=0.0).train()
    assert model.config.parameter_counts()["total"] == model.num_parameters()
    assert all(isinstance(router, ExpertChoiceRouter) for _, router in moe_routers(model))
    input_ids = torch.randint(2, 99, (2, 7))
    labels = torch.randint(2, 99, (2, 5)) if family == "t5" else input_ids
    decisions = {}
    hooks = [
        # a forward hook that returns something replaces the output: `update` returns None
        router.register_forward_hook(lambda module, args, decision, name=name: decisions.update({name: decision}))
        for name, router in moe_routers(model)
    ]
    out = model(input_ids=input_ids, labels=labels)
    for hook in hooks:
        hook.remove()
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(router.weight.grad.abs().sum() > 0 for _, router in moe_routers(model))

    blocks = dict(moe_blocks(model))
    assert len(blocks) == 2 and len(decisions) == 2
    for name, decision in decisions.items():
        block = blocks[name.removesuffix(".router")]
        chosen_TE = chosen_of(decision)
        assert block.tokens_without_expert.item() == (~chosen_TE.any(dim=-1)).sum().item()
        assert block.num_tokens.item() == 14
        assert block.kept_slots_sum.item() / block.num_tokens.item() == pytest.approx(NUM_EXPERTS * 6 / 14)
        assert torch.equal(block.routed_tokens_per_expert, torch.full((NUM_EXPERTS,), 6.0))
        assert block.dropped_tokens_per_expert.sum().item() == 0

    model.eval()
    model.save_pretrained(tmp_path)
    auto = AutoModelForSeq2SeqLM if family == "t5" else AutoModelForCausalLM
    loaded = auto.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(
            loaded(input_ids=input_ids, labels=labels).logits, model(input_ids=input_ids, labels=labels).logits
        )
    assert f"| Router | `expert_choice`: {CARD_LABEL} |" in str(render_model_card(loaded.config))
    from hf_moe.cli.inspect import describe

    assert describe(str(tmp_path))["router_type"] == "expert_choice"
    generated = loaded.generate(input_ids, min_new_tokens=3, max_new_tokens=3, do_sample=False)
    # GPT-2 continues the prompt; T5's decoder starts from its start token
    assert generated.shape == (2, 7 + 3 if family == "gpt2" else 1 + 3)
