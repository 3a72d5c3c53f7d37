"""What the balance loss averages over (`aux_loss_scope`): one forward, each sequence, or the optimizer step's
micro-batches so far. Each scope is checked against the micro-batch loss computed on the tokens it should see."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError

from hf_moe.modeling.losses import assignment_counts, switch_load_balancing_loss
from hf_moe.modeling.registry import BALANCE_LOSSES, build_router
from hf_moe.modeling.routing import RoutingInputs
from hf_moe.modeling.sparse_moe import RouterLosses
from tests.conftest import tiny_gpt2_moe_config

HIDDEN = 32


def routed(config, hidden_TD, num_sequences=1, token_mask_T=None, seed=0):
    """A far-from-uniform router's training decision on `hidden_TD` (the tests use its top-k weights: no capacity)."""
    torch.manual_seed(seed)
    router = build_router(config, HIDDEN)
    router.init_weights(1.0)  # std 1: far from uniform, so the losses differ between token sets
    router.train()
    torch.manual_seed(seed + 1)  # the same noise for every call with the same seed
    return router(RoutingInputs(hidden_TD, num_sequences, token_mask_T))


@pytest.mark.parametrize(
    "fields",
    [dict(aux_loss_type="switch"), dict(aux_loss_type="cv_squared", router_type="noisy_topk")],
    ids=["switch", "cv_squared"],
)
def test_sequence_scope_is_the_mean_of_the_per_sequence_losses(fields):
    config = tiny_gpt2_moe_config(aux_loss_scope="sequence", **fields)
    hidden_TD = torch.randn(2 * 6, HIDDEN)
    decision = routed(config, hidden_TD, num_sequences=2)
    losses = RouterLosses(config)
    scoped = losses(decision, decision.top_k_weights_TK, None, num_sequences=2).balance_loss

    loss = BALANCE_LOSSES.entry(fields["aux_loss_type"]).loss
    per_sequence = [
        loss(type(decision)(*(piece(v, rows) for v in decision)), decision.top_k_weights_TK[rows], None)
        for rows in (slice(0, 6), slice(6, 12))
    ]
    assert per_sequence[0].item() != pytest.approx(per_sequence[1].item(), rel=1e-3)  # the test can tell them apart
    torch.testing.assert_close(scoped, (per_sequence[0] + per_sequence[1]) / 2)
    # and differs from the loss over both sequences' tokens at once (the micro-batch scope)
    assert scoped.item() != pytest.approx(loss(decision, decision.top_k_weights_TK, None).item(), rel=1e-4)


def piece(value, rows):
    """`value` (a decision field: tensor, None or nested tuple of them) restricted to token rows `rows`."""
    if value is None:
        return None
    if isinstance(value, tuple):
        return type(value)(*(piece(v, rows) for v in value))
    return value[rows]


def test_sequence_scope_skips_padding_and_padding_only_sequences():
    config = tiny_gpt2_moe_config(aux_loss_scope="sequence")
    hidden_TD = torch.randn(3 * 4, HIDDEN)
    mask_T = torch.tensor([1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0, 0.0])  # sequence 1 is all padding
    decision = routed(config, hidden_TD, num_sequences=3, token_mask_T=mask_T)
    scoped = RouterLosses(config)(decision, decision.top_k_weights_TK, mask_T, num_sequences=3).balance_loss

    probs_TE = decision.routing_probs()
    first = switch_load_balancing_loss(probs_TE[:3], decision.top_k_index_TK[:3])
    last = switch_load_balancing_loss(probs_TE[8:10], decision.top_k_index_TK[8:10])
    torch.testing.assert_close(scoped, (first + last) / 2)


def test_global_batch_scope_counts_the_step_so_far_and_restarts_after_a_step():
    config = tiny_gpt2_moe_config(aux_loss_scope="global_batch")
    losses = RouterLosses(config).train()
    micro_batches = [routed(config, torch.randn(8, HIDDEN), seed=s) for s in range(3)]
    masks = [None, torch.tensor([1, 1, 1, 1, 1, 0, 0, 0.0]), None]

    def global_loss(seen, decision, mask):
        # the Switch loss with f counted over every micro-batch seen so far, P from this one
        counts = [assignment_counts(d.top_k_index_TK, m, 4) for d, m in seen]
        fraction_E = sum(c[0] for c in counts) / sum(c[1] for c in counts)
        return switch_load_balancing_loss(decision.routing_probs(), decision.top_k_index_TK, mask, fraction_E)

    seen = []
    for decision, mask in zip(micro_batches, masks, strict=True):
        seen.append((decision, mask))
        value = losses(decision, decision.top_k_weights_TK, mask).balance_loss
        torch.testing.assert_close(value, global_loss(seen, decision, mask))
    # the last micro-batch's f is the whole step's, which differs from its own
    own = switch_load_balancing_loss(micro_batches[2].routing_probs(), micro_batches[2].top_k_index_TK)
    assert value.item() != pytest.approx(own.item(), rel=1e-4)

    # a recomputation (activation checkpointing) does not count the forward twice
    again = losses(micro_batches[2], micro_batches[2].top_k_weights_TK, None, counting=False).balance_loss
    torch.testing.assert_close(again, value)

    losses.reset_global_batch()  # the optimizer step: the next micro-batch sees only itself
    first_of_next = losses(micro_batches[0], micro_batches[0].top_k_weights_TK, None).balance_loss
    own = switch_load_balancing_loss(micro_batches[0].routing_probs(), micro_batches[0].top_k_index_TK)
    torch.testing.assert_close(first_of_next, own)


def test_global_batch_scope_in_evaluation_is_the_micro_batch_loss_and_counts_nothing():
    config = tiny_gpt2_moe_config(aux_loss_scope="global_batch")
    losses = RouterLosses(config).eval()
    decision = routed(config, torch.randn(8, HIDDEN))
    value = losses(decision, decision.top_k_weights_TK, None).balance_loss
    own = switch_load_balancing_loss(decision.routing_probs(), decision.top_k_index_TK)
    torch.testing.assert_close(value, own)
    assert losses.global_slots.item() == 0


def test_global_batch_gradient_flows_through_the_probabilities_only():
    config = tiny_gpt2_moe_config(aux_loss_scope="global_batch")
    losses = RouterLosses(config).train()
    hidden_TD = torch.randn(8, HIDDEN, requires_grad=True)
    decision = routed(config, hidden_TD)
    losses(decision, decision.top_k_weights_TK, None).balance_loss.backward()
    assert hidden_TD.grad.abs().sum() > 0
    assert not losses.global_assignments_per_expert.requires_grad


@pytest.mark.parametrize("scope", ["sequence", "global_batch"])
@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_scopes_train_both_families(family, scope):
    from tests.training.helpers import tiny_gpt2, tiny_t5

    model = (tiny_gpt2 if family == "gpt2" else tiny_t5)(aux_loss_scope=scope).train()
    ids = torch.randint(3, 99, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    labels = ids if family == "gpt2" else torch.randint(3, 99, (2, 5))
    output = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.isfinite(output.aux_loss) and output.aux_loss > 0
    output.loss.backward()
    router_grads = [p.grad for n, p in model.named_parameters() if n.endswith("router.weight")]
    assert router_grads and all(g is not None and g.abs().sum() > 0 for g in router_grads)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(aux_loss_scope="batch"), "aux_loss_scope must be one of"),
        (dict(aux_loss_scope="global_batch", aux_loss_type="cv_squared"), "supports aux_loss_scope in"),
    ],
)
def test_bad_scopes_are_refused_with_what_is_allowed(fields, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        tiny_gpt2_moe_config(**fields)
