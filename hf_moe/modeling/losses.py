"""Router losses as pure functions of tensors.

Shape legend: T tokens (batch x sequence, flattened), E experts, K expert slots per token.
`token_mask_T` (optional, any dtype) marks the tokens that count: padding tokens are 0 and are left out of every
mean, so padding never changes a loss. Expert id E is the sentinel of an unused slot (see `routing.py`): it counts
towards no expert.

The balance losses a config can name (`aux_loss_type`, `registry.BALANCE_LOSSES`) share one signature,
`loss(decision, combine_weights_TK, token_mask_T) -> scalar`: the router's decision and the combine weights the
experts actually used (0 at slots dropped by capacity). The block computes them; the model averages them over layers.

What a balance loss averages over (`aux_loss_scope`, computed by `sparse_moe.RouterLosses`):
- "micro_batch": the tokens of one forward;
- "sequence": each sequence's tokens, then the mean over sequences (`sequence_mean`, any registered loss);
- "global_batch": the Switch loss with the assignment fractions f_e of the whole optimizer step so far, summed over
  data-parallel ranks (detached), and this forward's mean probabilities P_e (`switch_load_balancing_loss(fraction_E=)`).

Every loss is computed in float32; callers pass float32 router tensors.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .routing import RouterDecision

__all__ = [
    "AUX_LOSS_SCOPES",
    "accumulation_share",
    "assignment_counts",
    "cv_squared",
    "importance_load_balance_loss",
    "importance_load_loss",
    "mean_over_layers",
    "noisy_top_k_load",
    "router_z_loss",
    "sequence_mean",
    "switch_balance_loss",
    "switch_global_batch_loss",
    "switch_load_balancing_loss",
]

AUX_LOSS_SCOPES = ("micro_batch", "global_batch", "sequence")


def _token_weights(num_tokens: int, token_mask_T: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    if token_mask_T is None:
        return torch.ones(num_tokens, dtype=torch.float32, device=device)
    return token_mask_T.reshape(-1).to(device=device, dtype=torch.float32)


def switch_load_balancing_loss(
    probs_TE: torch.Tensor,
    top_k_index_TK: torch.Tensor,
    token_mask_T: torch.Tensor | None = None,
    fraction_E: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4-6), generalized to top-k.

    E * sum_e f_e * P_e, with f_e the fraction of the (token, slot) assignments that went to expert e and P_e the
    mean router probability of expert e. Equals 1 at perfectly uniform routing, its minimum for balanced
    assignments; it grows to E when one expert takes everything with certainty. `fraction_E`, when given, replaces
    this batch's f (global-batch balancing: counted over more tokens; f has no gradient either way).
    """
    num_tokens, num_experts = probs_TE.shape
    top_k = top_k_index_TK.shape[-1]
    # without a padding mask every token weighs 1: the weighted sums are plain ones (fewer ops, in every forward)
    weights_T = None if token_mask_T is None else _token_weights(num_tokens, token_mask_T, probs_TE.device)
    num_valid = max(num_tokens, 1) if weights_T is None else weights_T.sum().clamp_min(1.0)
    if fraction_E is None:
        assignments_E = _assignments_per_expert(top_k_index_TK, weights_T, num_experts)
        fraction_E = assignments_E / (num_valid * top_k)
    probs_TE = probs_TE.float()
    summed_probs_E = probs_TE.sum(dim=0) if weights_T is None else (probs_TE * weights_T.unsqueeze(-1)).sum(dim=0)
    return num_experts * torch.sum(fraction_E * summed_probs_E) / num_valid


def _assignments_per_expert(
    top_k_index_TK: torch.Tensor, weights_T: torch.Tensor | None, num_experts: int
) -> torch.Tensor:
    """(E,) the (token, slot) assignments per expert, each token's weighing `weights_T` (None: 1 each)."""
    # scatter_add, not bincount: no host sync, and padding tokens add weight 0; one extra bin takes the sentinel id
    # of unused slots and is dropped. Out of place, so `torch.vmap` can batch it over sequences (`sequence_mean`)
    index_N = top_k_index_TK.reshape(-1)
    bins = torch.zeros(num_experts + 1, dtype=torch.float32, device=top_k_index_TK.device)
    if weights_T is None:
        slot_weights_N = bins.new_ones(()).expand(index_N.shape)
    else:
        slot_weights_N = weights_T.repeat_interleave(top_k_index_TK.shape[-1])
    return bins.scatter_add(0, index_N, slot_weights_N)[:num_experts]


def assignment_counts(top_k_index_TK: torch.Tensor, token_mask_T: torch.Tensor | None, num_experts: int):
    """(assignments per expert (E,), slots) of one forward, padding excluded: what global-batch balancing sums."""
    weights_T = _token_weights(top_k_index_TK.shape[0], token_mask_T, top_k_index_TK.device)
    assignments_E = _assignments_per_expert(top_k_index_TK, weights_T, num_experts)
    return assignments_E, weights_T.sum() * top_k_index_TK.shape[-1]


def cv_squared(values: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation (population variance / mean^2); 0 for equal values."""
    values = values.float()
    if values.numel() <= 1:
        return values.new_zeros(())
    return values.var(unbiased=False) / (values.mean() ** 2 + eps)


def importance_load_loss(
    gates_TE: torch.Tensor, load_E: torch.Tensor, token_mask_T: torch.Tensor | None = None
) -> torch.Tensor:
    """Shazeer et al. (2017) balancing loss: CV^2 of the expert importance (sum of gate values) + CV^2 of the load.

    `gates_TE` holds each token's combine weights at its selected experts and 0 elsewhere; `load_E` is the
    (smooth, for noisy gating, else hard) number of tokens per expert. Lower bound 0, reached by equal importance and
    equal load.
    """
    weights_T = _token_weights(gates_TE.shape[0], token_mask_T, gates_TE.device)
    importance_E = (gates_TE.float() * weights_T.unsqueeze(-1)).sum(dim=0)
    return cv_squared(importance_E) + cv_squared(load_E)


def noisy_top_k_load(
    clean_logits_TE: torch.Tensor,
    noisy_logits_TE: torch.Tensor,
    noise_std_TE: torch.Tensor,
    top_k: int,
    token_mask_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Smooth per-expert load estimator of noisy top-k gating (Shazeer et al. 2017, appendix A).

    P(token, e) = Phi((clean_e - threshold_e) / noise_std_e): the probability that expert e stays in the top k if its
    noise is resampled, the other experts' noisy logits held fixed. The threshold is the k-th largest noisy logit
    among the other experts. Returns load_E = sum over tokens of P, differentiable in the clean logits and noise.
    """
    num_tokens, num_experts = clean_logits_TE.shape
    weights_T = _token_weights(num_tokens, token_mask_T, clean_logits_TE.device)
    if top_k >= num_experts:  # every expert is always selected
        return weights_T.sum().expand(num_experts)
    top_values_TK1, _ = noisy_logits_TE.topk(top_k + 1, dim=-1)
    kth_T1 = top_values_TK1[:, top_k - 1 : top_k]  # k-th largest overall
    k_plus_1th_T1 = top_values_TK1[:, top_k : top_k + 1]
    # an expert inside the top k must beat the (k+1)-th value to stay in; one outside must beat the k-th
    is_in_TE = noisy_logits_TE >= kth_T1
    threshold_TE = torch.where(is_in_TE, k_plus_1th_T1, kth_T1)
    normal = torch.distributions.Normal(
        torch.zeros((), device=clean_logits_TE.device), torch.ones((), device=clean_logits_TE.device)
    )
    prob_TE = normal.cdf((clean_logits_TE - threshold_TE) / noise_std_TE)
    return (prob_TE * weights_T.unsqueeze(-1)).sum(dim=0)


def router_z_loss(logits_TE: torch.Tensor, token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022): mean over tokens of logsumexp(logits)^2.

    Penalizes large router logits, which keeps the float32 softmax stable. 0 only when every logsumexp is 0.
    """
    z_T = torch.logsumexp(logits_TE.float(), dim=-1)
    if token_mask_T is None:
        return z_T.square().sum() / max(z_T.shape[0], 1)
    weights_T = _token_weights(logits_TE.shape[0], token_mask_T, logits_TE.device)
    return (z_T.square() * weights_T).sum() / weights_T.sum().clamp_min(1.0)


def switch_balance_loss(
    decision: RouterDecision, combine_weights_TK: torch.Tensor, token_mask_T: torch.Tensor | None = None
) -> torch.Tensor:
    """`aux_loss_type="switch"`: the Switch load-balancing loss of a routing decision (dropped slots still count as
    assignments: the router chose them)."""
    return switch_load_balancing_loss(decision.routing_probs(), decision.top_k_index_TK, token_mask_T)


def switch_global_batch_loss(
    decision: RouterDecision, combine_weights_TK: torch.Tensor, token_mask_T, fraction_E: torch.Tensor
) -> torch.Tensor:
    """`aux_loss_type="switch"`, `aux_loss_scope="global_batch"`: the Switch loss with the global batch's assignment
    fractions `fraction_E` and this forward's mean probabilities (the only part with a gradient)."""
    return switch_load_balancing_loss(decision.routing_probs(), decision.top_k_index_TK, token_mask_T, fraction_E)


def sequence_mean(loss, decision: RouterDecision, combine_weights_TK, token_mask_T, num_sequences: int):
    """`aux_loss_scope="sequence"`: `loss` (a balance loss) of each sequence's tokens, averaged over the sequences that
    have a token that counts. The T tokens are `num_sequences` sequences, row by row; one `torch.vmap`, no loop."""
    num_tokens = decision.top_k_index_TK.shape[0]
    if token_mask_T is None:
        token_mask_T = torch.ones(num_tokens, device=decision.top_k_index_TK.device)

    def by_sequence(value):  # (T, ...) -> (B, S, ...), through the decision's nested tuples
        if value is None:
            return None
        if isinstance(value, tuple):
            return type(value)(*(by_sequence(v) for v in value))
        return value.reshape(num_sequences, num_tokens // num_sequences, *value.shape[1:])

    def batch_dims(value):  # vmap's in_dims: 0 for each tensor, None where the decision holds None
        if value is None:
            return None
        if isinstance(value, tuple):
            return type(value)(*(batch_dims(v) for v in value))
        return 0

    mask_BS = by_sequence(token_mask_T).float()
    vmapped = torch.vmap(loss, in_dims=(batch_dims(decision), 0, 0))
    losses_B = vmapped(by_sequence(decision), by_sequence(combine_weights_TK), mask_BS)
    counted_B = (mask_BS.sum(dim=-1) > 0).float()
    return (losses_B * counted_B).sum() / counted_B.sum().clamp_min(1.0)


def importance_load_balance_loss(
    decision: RouterDecision, combine_weights_TK: torch.Tensor, token_mask_T: torch.Tensor | None = None
) -> torch.Tensor:
    """`aux_loss_type="cv_squared"`: importance + load (Shazeer et al. 2017) of a routing decision.

    Importance sums the combine weights the experts used. Load is the smooth estimator when the router carries noisy
    gating's noise (training), else the hard number of (token, expert) assignments, which has no gradient: then only
    the importance term trains the router.
    """
    num_tokens, num_experts = decision.logits_TE.shape
    index_TK = decision.top_k_index_TK
    # one extra column takes the sentinel id of unused slots, then is dropped
    gates_TE = torch.zeros(num_tokens, num_experts + 1, dtype=torch.float32, device=index_TK.device)
    gates_TE = gates_TE.scatter(1, index_TK, combine_weights_TK.float())[:, :num_experts]
    if decision.noise is not None:
        noise = decision.noise
        load_E = noisy_top_k_load(
            noise.clean_logits_TE, noise.noisy_logits_TE, noise.noise_std_TE, index_TK.shape[-1], token_mask_T
        )
    else:
        load_E = _assignments_per_expert(
            index_TK, _token_weights(num_tokens, token_mask_T, index_TK.device), num_experts
        )
    return importance_load_loss(gates_TE, load_E, token_mask_T)


def mean_over_layers(per_layer_losses: tuple[torch.Tensor, ...] | None) -> torch.Tensor | None:
    """Average of the MoE layers' losses (each layer's loss is computed on its own routing, never pooled)."""
    if not per_layer_losses:
        return None
    return torch.stack([loss.float() for loss in per_layer_losses]).mean()


def accumulation_share(num_local_items: torch.Tensor, num_items_in_batch: torch.Tensor | int | None):
    """The share of the router losses one micro-batch adds under gradient accumulation.

    With `num_items_in_batch` (passed by `Trainer` when it accumulates gradients), the language-model loss is a sum
    over this micro-batch divided by the label count of the whole accumulated batch, so micro-batch losses add up to
    one batch's loss. Weighting the router losses by this micro-batch's share of the labels makes them add up the same
    way, instead of growing with the number of accumulation steps. Without it: 1.
    """
    if num_items_in_batch is None:
        return 1.0
    return num_local_items.float() / torch.as_tensor(num_items_in_batch, device=num_local_items.device).float()
