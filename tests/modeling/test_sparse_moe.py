"""The sparse MoE block: equivalence with the dense GPT-2 MLP, capacity pass-through, kernels, counters."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

from hf_moe.modeling import AUTO_EXPERTS_IMPLEMENTATION, EXPERTS_IMPLEMENTATIONS
from hf_moe.modeling.modeling_gpt2_moe import GPT2MoeExperts
from hf_moe.modeling.routing import RoutingInputs
from hf_moe.modeling.sparse_moe import SparseMoeBlock
from tests.conftest import tiny_gpt2_moe_config

IMPLEMENTATIONS = list(EXPERTS_IMPLEMENTATIONS)


def make_block(implementation=AUTO_EXPERTS_IMPLEMENTATION, **overrides) -> SparseMoeBlock:
    config = tiny_gpt2_moe_config(**overrides)
    config._experts_implementation = implementation
    block = SparseMoeBlock(config, GPT2MoeExperts(config))
    torch.nn.init.normal_(block.router.weight, std=0.5)
    for name, param in block.experts.named_parameters():
        torch.nn.init.normal_(param, std=0.3 if "bias" not in name else 0.1)
    return block.eval()


def kept_slots(block: SparseMoeBlock, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The block's keep mask for `hidden` (B, S, D), as its forward computes it."""
    inputs = RoutingInputs(hidden.reshape(-1, 32), hidden.shape[0], None if mask is None else mask.reshape(-1), None)
    return block.capacity.keep_mask(block.router(inputs), inputs, block.training, block.router.leaves_slots_unused)


def dense_mlp_like(block: SparseMoeBlock) -> GPT2MLP:
    """A dense GPT-2 MLP whose weights every expert of `block` is set to (copy upcycling by hand)."""
    config = tiny_gpt2_moe_config()
    mlp = GPT2MLP(64, config).eval()
    with torch.no_grad():
        for param in mlp.parameters():
            torch.nn.init.normal_(param, std=0.3)
        experts = block.experts
        experts.up_proj.copy_(mlp.c_fc.weight.expand_as(experts.up_proj))
        experts.up_proj_bias.copy_(mlp.c_fc.bias.expand_as(experts.up_proj_bias))
        experts.down_proj.copy_(mlp.c_proj.weight.expand_as(experts.down_proj))
        experts.down_proj_bias.copy_(mlp.c_proj.bias.expand_as(experts.down_proj_bias))
    return mlp


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_one_expert_block_equals_dense_mlp_forward_and_gradients(implementation):
    block = make_block(implementation, num_experts=1, num_experts_per_tok=1)
    mlp = dense_mlp_like(block)
    hidden = torch.randn(3, 5, 32)
    hidden_moe, hidden_dense = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    out_moe, out_dense = block(hidden_moe), mlp(hidden_dense)
    torch.testing.assert_close(out_moe, out_dense, rtol=1e-5, atol=1e-5)
    grad_out = torch.randn_like(out_moe)
    out_moe.backward(grad_out)
    out_dense.backward(grad_out)
    torch.testing.assert_close(hidden_moe.grad, hidden_dense.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block.experts.up_proj.grad[0], mlp.c_fc.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block.experts.down_proj.grad[0], mlp.c_proj.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(block.experts.up_proj_bias.grad[0], mlp.c_fc.bias.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_copies_of_one_mlp_with_normalized_weights_equal_dense(implementation, top_k):
    block = make_block(implementation, num_experts_per_tok=top_k, normalize_top_k_weights=True)
    mlp = dense_mlp_like(block)
    hidden = torch.randn(4, 6, 32)
    torch.testing.assert_close(block(hidden), mlp(hidden), rtol=1e-5, atol=1e-5)


def test_copies_still_give_the_router_a_gradient_through_the_losses():
    block = make_block(num_experts_per_tok=2).train()
    dense_mlp_like(block)
    inputs = RoutingInputs(torch.randn(24, 32))
    decision = block.router(inputs)
    losses = block.losses(decision, decision.top_k_weights_TK, None)
    (losses.balance_loss + losses.z_loss).backward()
    assert block.router.weight.grad.abs().sum() > 0


def test_experts_implementations_agree_forward_and_backward():
    results = {}
    for implementation in IMPLEMENTATIONS:
        torch.manual_seed(0)
        block = make_block(implementation, num_experts_per_tok=2)
        hidden = torch.randn(2, 7, 32, requires_grad=True)
        out = block(hidden)
        out.pow(2).sum().backward()
        results[implementation] = (out, hidden.grad, block.experts.up_proj.grad, block.router.weight.grad)
    for implementation in IMPLEMENTATIONS:
        for got, expected in zip(results[implementation], results["eager"], strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_dropped_tokens_get_zero_and_kept_tokens_are_unchanged(implementation):
    dropless = make_block(implementation, num_experts_per_tok=1)
    capped = make_block(implementation, num_experts_per_tok=1, eval_capacity_factor=0.5, min_capacity=1)
    capped.load_state_dict(dropless.state_dict())
    hidden = torch.randn(1, 40, 32)
    kept_T = kept_slots(capped, hidden).squeeze(-1)
    assert 0 < kept_T.sum() < 40, "the test needs some tokens dropped and some kept"
    out_capped, out_dropless = capped(hidden).reshape(40, 32), dropless(hidden).reshape(40, 32)
    assert (out_capped[~kept_T] == 0).all()
    torch.testing.assert_close(out_capped[kept_T], out_dropless[kept_T], rtol=1e-5, atol=1e-5)


def test_dropped_slots_cost_no_expert_flops():
    block = make_block("eager", num_experts_per_tok=2, eval_capacity_factor=0.25, min_capacity=1)
    rows_seen = []
    block.experts.register_forward_hook(lambda module, args, out: rows_seen.append(args[0].shape[0]))
    hidden = torch.randn(1, 32, 32)
    kept = kept_slots(block, hidden)
    block(hidden)
    assert rows_seen == [int(kept.sum())] and rows_seen[0] < 64


def test_expert_dropout_is_active_only_in_training():
    block = make_block(expert_dropout=0.5)
    hidden = torch.randn(2, 8, 32)
    assert torch.equal(block(hidden), block(hidden))
    block.train()
    assert not torch.equal(block(hidden), block(hidden))


def test_counters_count_assignments_drops_and_reset():
    block = make_block(num_experts_per_tok=2, capacity_factor=0.5, min_capacity=1).train()
    hidden = torch.randn(2, 10, 32)
    mask = torch.ones(2, 10)
    mask[1, 6:] = 0  # 4 padding tokens
    torch.manual_seed(3)
    block(hidden, token_mask=mask)
    torch.manual_seed(3)
    kept_TK = kept_slots(block, hidden, mask)
    assert block.routed_tokens_per_expert.sum().item() == 16 * 2
    valid_slots_TK = mask.reshape(-1, 1).bool().expand(-1, 2)
    expected_dropped = (~kept_TK & valid_slots_TK).sum().item()
    assert block.dropped_tokens_per_expert.sum().item() == expected_dropped
    assert block.num_tokens.item() == 16 and block.num_forwards.item() == 1
    assert block.router_entropy_sum.item() > 0
    block.reset_counters()
    assert all(getattr(block, name).abs().sum() == 0 for name in block.COUNTERS)


def test_counters_are_not_saved_in_the_state_dict():
    block = make_block()
    assert not any(name in key for key in block.state_dict() for name in SparseMoeBlock.COUNTERS)
