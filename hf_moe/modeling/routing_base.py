"""BASE layers (Lewis et al. 2021, "BASE Layers: Simplifying Training of Large, Sparse Models", arXiv 2103.16716).

Shape legend: T tokens (batch x sequence, flattened row by row), D hidden size, E experts, K = 1 expert slot per
token; in the solver P = T + E persons (the tokens, then E dummies), Q = T // E + 1 seats per expert, N flat seats
(or persons) plus one sink entry.

A BASE layer balances by construction instead of by a loss: in training, tokens are assigned to experts by a balanced
linear assignment, every expert taking floor(T'/E) or ceil(T'/E) of the T' real tokens, with the total token-expert
score as large as possible. Each expert e has a centroid w_e (a row of the router's `weight`):

```
s_TE = h_TD w_ED^T                                   float32 scores (also the decision's logits: z-loss, metrics)
training:   expert_T = balanced_assignment(s_TE)      padding gets the sentinel id E (`leaves_slots_unused`)
evaluation: expert_T = argmax_e s_TE                  greedy top-1, like any router (eval capacity applies)
output = h + sigmoid(s_Te) * f_e(h)                   the block's residual adds h; the combine weight is sigmoid(s_Te)
```
The router learns through the combine weight sigmoid(s_Te) (and the z-loss); there is no balance loss
(`default_aux_loss_coef = 0`).

Per rank: the assignment balances the tokens of one forward, i.e. one micro-batch on one rank. Under data or expert
parallelism each rank assigns its own micro-batch's tokens, so loads are balanced per rank and per micro-batch, not
globally (the paper solves one assignment across all workers; here no collective is added to the router).

Causality: in training a token's expert depends on the other tokens of the batch, later tokens of its own sequence
included. The paper accepts this for training; evaluation and generation use greedy top-1, which is causal, so a
causal decoder needs no `allow_noncausal_routing` opt-in (training and inference route differently by design).

Host syncs: the project's rule is at most one per layer; this router needs more in training and bounds them. A
training forward makes ceil(rounds / 16) host syncs in the solver (convergence checks; measured 4-6 at T = 2048, E = 8,
at most 256 by construction, see `balanced_assignment`), plus the block's one (`run_experts`, which drops the
padding's unused slots). An evaluation forward makes none in the router (argmax), only the block's.

Hub portability: this file travels with every saved checkpoint; only torch / transformers and single-dot siblings.
"""

from __future__ import annotations

import math
import warnings
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .routing import Router, RouterDecision, RoutingInputs, refuse_settings

__all__ = ["AuctionResult", "BaseLayerRouter", "auction_balanced_assignment", "balanced_assignment"]

# eps schedule, relative to the spread R of the scores: eps_k = R * EPS_START / EPS_FACTOR**k, down to R * EPS_FINAL.
# EPS_FINAL = 2^-20 keeps each bid increment a few float32 ulps above prices of order R (so prices always rise) while
# bounding the final total's distance from the optimum by (T' + E) * EPS_FINAL * R.
EPS_START = 0.25
EPS_FACTOR = 8.0
EPS_FINAL = 2.0**-20
NUM_PHASES = 1 + math.ceil(math.log(EPS_START / EPS_FINAL) / math.log(EPS_FACTOR))
# rounds between two convergence checks (each check is one host sync); the rounds after convergence are no-ops
CHECK_EVERY = 16
# a bound on the rounds of one solve (so on its host syncs: MAX_ROUNDS / CHECK_EVERY); measured solves take far fewer
MAX_ROUNDS = 4096


class AuctionResult(NamedTuple):
    """What `auction_balanced_assignment` returns: the assignment and what it cost."""

    expert_T: torch.Tensor  # int64 expert per token; the sentinel E for padding
    rounds: int  # bidding rounds run (a multiple of the check interval)
    host_syncs: int  # convergence checks made (each one reads a device flag on the host)
    converged: bool  # False: the round bound was hit and the balanced-by-sort fallback was used


def balanced_assignment(scores_TE: torch.Tensor, token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """The balanced assignment of maximal total score: expert_T, (T,) int64, the sentinel E for padding tokens.

    Every expert gets floor(T'/E) or ceil(T'/E) of the T' real tokens (`token_mask_T` != 0; all tokens when None), and
    sum_t scores_TE[t, expert_T[t]] is maximal among such assignments (up to the auction's final eps, see below).

    Exact reduction. With q = T' // E and r = T' % E, give every expert q + 1 seats and add E - r dummy persons who
    value every expert at 0, at most one dummy per expert. Persons (T' + E - r) and seats (E * (q + 1)) are equally
    many, so a complete assignment fills every seat: an expert holds q + 1 real tokens, or q and a dummy. Every
    balanced assignment arises this way and dummies add 0, so the two optima agree, and which r experts take the ceil
    is part of the optimization.

    Algorithm: Bertsekas' auction for transportation problems (similar objects: the seats of an expert are alike to
    a token), Jacobi version (all unassigned persons bid in the same round), with eps-scaling. An expert's price is
    its cheapest seat's price. An unassigned token bids for its best expert e (largest score - price) the price +
    (best - second best value) + eps. Each expert gives its k-th highest bid its k-th cheapest seat if the bid beats
    that seat's price, evicting the holder, who bids again later. The u unassigned dummies, identical persons, bid
    together: the k-th for the k-th cheapest dummy-free expert, all at the price of the first dummy-free expert none
    of them bids for + eps, so they land in one round and every dummy's expert costs at most eps more than the
    cheapest dummy-free one. Scores are first shifted per token by their maximum (the optimum does not move: each
    token is assigned once), so they lie in [-R, 0], R being their largest spread.

    Why the result is optimal: at the end every token's expert is within eps of its best at the experts' prices
    lambda_e, and (dummies' rule) every expert holding a dummy (load q) costs at most eps more than any expert
    without one (load q + 1). Prices lambda_e and the threshold c = the cheapest dummy-free price are then a dual
    solution of the balanced LP (per expert: load q + 1 needs lambda_e >= c, load q needs lambda_e <= c) within
    (T' + r) * eps of the assignment's total, so the total is within (T' + E) * eps_final of the optimum, and exactly
    optimal when no other balanced assignment comes that close.

    Epsilon schedule: eps = R / 4, divided by 8 per phase down to R * 2^-20 (7 phases; the last eps keeps every bid
    increment a few float32 ulps above prices of order R). A phase ends when every person holds a seat; the next one
    starts with every person unassigned and every seat of an expert at that expert's price (shifted so the cheapest
    expert costs 0). The phases advance on the device (no host branch), so a solve is one loop of identical rounds.

    Termination and host syncs: within a phase every accepted bid raises a seat's price by more than 0 and the top
    bid per expert by at least eps, with prices bounded by the scores, so each phase ends. The host reads a device
    "finished" flag once every CHECK_EVERY = 16 rounds (rounds after the end are no-ops): ceil(rounds / 16) host
    syncs per solve, at most MAX_ROUNDS / 16 = 256. Measured on this project's 2-core CPU, random N(0, 1) scores:
    T = 2048, E = 8: 64-96 rounds (4-6 syncs, 0.07-0.1 s); T = 4096, E = 64: 880 rounds (55 syncs, ~3 s); many
    ties or one popular expert: up to a few hundred rounds. Should the bound ever be hit, the result is the
    balanced-by-sort fallback (tokens sorted by their preferred expert and dealt to the experts in contiguous blocks):
    still exactly balanced, no longer optimal, with a warning.

    Works for any T and E: T not divisible by E, T' < E (q = 0: one seat per expert, E - T' dummies), ties (bids
    still rise by eps), T' = 0 (all sentinel). Runs on the scores' device; no gradient flows through it.
    """
    return auction_balanced_assignment(scores_TE, token_mask_T).expert_T


@torch.no_grad()
def auction_balanced_assignment(
    scores_TE: torch.Tensor,
    token_mask_T: torch.Tensor | None = None,
    max_rounds: int = MAX_ROUNDS,
    check_every: int = CHECK_EVERY,
) -> AuctionResult:
    """`balanced_assignment` with its knobs and its cost (rounds, host syncs, whether it converged)."""
    if scores_TE.dim() != 2:
        raise ValueError(f"scores_TE must be a (tokens, experts) matrix, got shape {tuple(scores_TE.shape)}")
    if max_rounds < 1 or check_every < 1:
        raise ValueError(f"max_rounds and check_every must be >= 1, got {max_rounds} and {check_every}")
    num_tokens, num_experts = scores_TE.shape
    device = scores_TE.device
    is_real_T = (
        torch.ones(num_tokens, dtype=torch.bool, device=device)
        if token_mask_T is None
        else token_mask_T.to(device).reshape(-1) != 0
    )
    sentinel_T = torch.full((num_tokens,), num_experts, dtype=torch.long, device=device)
    if num_experts == 1 or num_tokens == 0:
        return AuctionResult(torch.where(is_real_T, 0, sentinel_T), 0, 0, True)
    auction = _Auction(scores_TE.float(), is_real_T)
    rounds = host_syncs = 0
    converged = False
    while rounds < max_rounds:
        for _ in range(min(check_every, max_rounds - rounds)):
            auction.round()
            rounds += 1
        host_syncs += 1
        if bool(auction.finished):  # the solver's host sync: one per check_every rounds
            converged = True
            break
    if not converged:
        warnings.warn(
            f"balanced_assignment: the auction did not converge in {max_rounds} rounds; using the balanced-by-sort "
            "fallback (balanced, not optimal)",
            RuntimeWarning,
            stacklevel=2,
        )
        return AuctionResult(_balanced_by_sort(scores_TE.float(), is_real_T), rounds, host_syncs, False)
    expert_T = auction.seat_P[:num_tokens] // auction.seats_per_expert
    return AuctionResult(torch.where(is_real_T, expert_T, sentinel_T), rounds, host_syncs, True)


class _Auction:
    """The auction's state on the device and one bidding round (see `balanced_assignment` for the algorithm).

    Seats are an (E, Q) grid, Q = T // E + 1: expert e's first q + 1 seats are enabled, the others cost +inf and are
    never taken. Everything has a fixed shape, so T' (and q, r) stay on the device: no host sync to size anything.
    Persons are the T tokens (padding inactive) and E dummies (the first E - r active), ids T.. T+E-1.
    """

    def __init__(self, scores_TE: torch.Tensor, is_real_T: torch.Tensor):
        num_tokens, num_experts = scores_TE.shape
        device = scores_TE.device
        self.num_tokens, self.num_experts = num_tokens, num_experts
        self.seats_per_expert = num_tokens // num_experts + 1
        num_real = is_real_T.sum()
        per_expert = num_real // num_experts  # q
        dummies = num_experts - (num_real - per_expert * num_experts)  # E - r
        self.active_P = torch.cat([is_real_T, torch.arange(num_experts, device=device) < dummies])
        self.seat_P = torch.full((num_tokens + num_experts,), -1, dtype=torch.long, device=device)
        column_EQ = torch.arange(self.seats_per_expert, device=device).expand(num_experts, -1)
        self.enabled_EQ = column_EQ <= per_expert
        self.price_EQ = torch.where(self.enabled_EQ, 0.0, torch.inf)
        self.holder_EQ = torch.full_like(column_EQ, -1)
        # scores shifted per token into [-R, 0]
        shifted_TE = scores_TE - scores_TE.max(dim=1, keepdim=True).values
        self.value_TE = torch.where(is_real_T.unsqueeze(1), shifted_TE, 0.0)
        spread = -self.value_TE.min()
        # all-equal scores (spread 0) still need a positive eps; any scale works for them
        self.spread = torch.where(spread > 0, spread, 1.0)
        self.eps = self.spread * EPS_START
        self.phase = torch.zeros((), dtype=torch.long, device=device)
        self.finished = torch.zeros((), dtype=torch.bool, device=device)

    def round(self) -> None:
        num_tokens, num_experts, width = self.num_tokens, self.num_experts, self.seats_per_expert
        device = self.price_EQ.device
        unassigned_P = self.active_P & (self.seat_P < 0)
        sorted_price_EQ, sorted_column_EQ = self.price_EQ.sort(dim=1)
        # an expert's price: its cheapest seat (all of its seats are alike to a token)
        price_E = sorted_price_EQ[:, 0]

        # tokens bid for their best expert at (its price + best value - second best value + eps)
        net_TE = self.value_TE - price_E
        top_net_T2, top_expert_T2 = net_TE.topk(2, dim=1)
        expert_T = top_expert_T2[:, 0]
        increment_T = (top_net_T2[:, 0] - top_net_T2[:, 1]).clamp(max=self.spread) + self.eps
        bid_T = torch.where(unassigned_P[:num_tokens], price_E[expert_T] + increment_T, -torch.inf)

        # dummies bid for the dummy-free experts (an expert holds at most one dummy), as identical persons together:
        # the k-th unassigned dummy for the k-th cheapest, all at the price of the first expert none of them bids for
        # (+ eps); so a dummy's expert never costs more than eps above the cheapest dummy-free one
        has_dummy_E = (self.holder_EQ >= num_tokens).any(dim=1)
        sorted_free_E, free_order_E = torch.where(has_dummy_E, torch.inf, price_E).sort()
        unassigned_D = unassigned_P[num_tokens:]
        num_unassigned = unassigned_D.sum()
        # u dummies unassigned leave r + u >= u experts dummy-free; with u = r + u (r = 0) all of them are bid for
        num_free = num_experts - has_dummy_E.sum()
        reference = sorted_free_E[torch.minimum(num_unassigned, num_free - 1)]
        rank_D = (torch.cumsum(unassigned_D.long(), 0) - 1).clamp(min=0)
        expert_D = free_order_E[rank_D]
        bid_D = torch.where(unassigned_D, reference + self.eps, -torch.inf)

        # each expert gives its k-th highest bid its k-th cheapest seat, if the bid beats that seat's price
        expert_P = torch.cat([expert_T, expert_D])
        bid_P = torch.cat([bid_T, bid_D])
        num_persons = expert_P.numel()
        by_bid_P = torch.argsort(bid_P, descending=True, stable=True)
        order_P = by_bid_P[torch.argsort(expert_P[by_bid_P], stable=True)]
        sorted_expert_P = expert_P[order_P]
        count_E = torch.zeros(num_experts, dtype=torch.long, device=device).scatter_add_(
            0, expert_P, torch.ones_like(expert_P)
        )
        rank_P = torch.arange(num_persons, device=device) - (torch.cumsum(count_E, 0) - count_E)[sorted_expert_P]
        column_rank_P = rank_P.clamp(max=width - 1)
        sorted_bid_P = bid_P[order_P]
        wins_P = (rank_P < width) & (sorted_bid_P > sorted_price_EQ[sorted_expert_P, column_rank_P])

        # updates through a sink slot at the end, so masked-out entries need no boolean indexing (no host sync)
        num_seats = self.price_EQ.numel()
        seat_won_P = sorted_expert_P * width + sorted_column_EQ[sorted_expert_P, column_rank_P]
        target_P = torch.where(wins_P, seat_won_P, num_seats)
        holder_N = torch.cat([self.holder_EQ.reshape(-1), self.holder_EQ.new_full((1,), -1)])
        price_N = torch.cat([self.price_EQ.reshape(-1), self.price_EQ.new_zeros(1)])
        evicted_P = holder_N[target_P]
        seat_N = torch.cat([self.seat_P, self.seat_P.new_full((1,), -1)])
        seat_N.scatter_(0, torch.where(evicted_P >= 0, evicted_P, num_persons), -1)
        seat_N.scatter_(0, torch.where(wins_P, order_P, num_persons), target_P)
        holder_N.scatter_(0, target_P, torch.where(wins_P, order_P, -1))
        price_N.scatter_(0, target_P, sorted_bid_P)
        seat_P = seat_N[:num_persons]
        holder_EQ = holder_N[:num_seats].view_as(self.holder_EQ)
        price_EQ = price_N[:num_seats].view_as(self.price_EQ)

        # phase end: every person holds a seat; the next phase starts from these prices with a smaller eps
        done = ~(self.active_P & (seat_P < 0)).any()
        last = self.phase == NUM_PHASES - 1
        advance = done & ~last
        self.finished = done & last
        self.eps = torch.where(advance, self.eps / EPS_FACTOR, self.eps)
        self.phase = self.phase + advance.long()
        self.seat_P = torch.where(advance, -1, seat_P)
        self.holder_EQ = torch.where(advance, -1, holder_EQ)
        # the next phase starts every seat of an expert at the expert's price (its cheapest seat: the dual variable;
        # what single bidders paid above it is no market price, and an empty seat left above it would only be reached
        # by eps-sized steps); shifted so the cheapest expert costs 0, which keeps float32 precise
        expert_price_E = price_EQ.min(dim=1).values
        restart_EQ = torch.where(self.enabled_EQ, (expert_price_E - expert_price_E.min()).unsqueeze(1), torch.inf)
        self.price_EQ = torch.where(advance, restart_EQ, price_EQ)


def _balanced_by_sort(scores_TE: torch.Tensor, is_real_T: torch.Tensor) -> torch.Tensor:
    """A balanced, not optimal, assignment: real tokens sorted by (preferred expert, score) and dealt to experts in
    contiguous blocks (the i-th of T' gets expert floor(i * E / T'), which gives floor/ceil(T'/E) each)."""
    num_tokens, num_experts = scores_TE.shape
    best_T, preferred_T = scores_TE.max(dim=1)
    by_score_T = torch.argsort(best_T, descending=True, stable=True)
    # padding sorts after every real token
    group_T = torch.where(is_real_T, preferred_T, num_experts)[by_score_T]
    order_T = by_score_T[torch.argsort(group_T, stable=True)]
    num_real = is_real_T.sum().clamp(min=1)
    expert_sorted_T = torch.arange(num_tokens, device=scores_TE.device) * num_experts // num_real
    expert_T = torch.empty_like(expert_sorted_T).scatter_(0, order_T, expert_sorted_T)
    return torch.where(is_real_T, expert_T, num_experts)


class BaseLayerRouter(Router):
    """BASE layers routing (`router_type="base"`): a balanced assignment in training, greedy top-1 in evaluation.

    `weight` (E, D) holds the experts' centroids; the combine weight of a token's expert is sigmoid(score). One expert
    per token (`num_experts_per_tok=1`). See the module docstring for per-rank balance, causality and host syncs.
    """

    # padding tokens get no expert in training (the sentinel id E): they must not take a balanced slot
    leaves_slots_unused: ClassVar[bool] = True
    # balanced by construction; the paper uses no balance loss
    default_aux_loss_coef: ClassVar[float] = 0.0

    def __init__(self, config, hidden_size: int):
        super().__init__(config, hidden_size)
        self.weight = nn.Parameter(torch.empty(self.num_experts, hidden_size))

    def forward(self, inputs: RoutingInputs) -> RouterDecision:
        hidden_TD = inputs.hidden_TD
        # float32 routing whatever the autocast dtype, like every router
        with torch.autocast(device_type=hidden_TD.device.type, enabled=False):
            scores_TE = F.linear(hidden_TD.float(), self.weight.float())
            if self.training:
                expert_T = balanced_assignment(scores_TE.detach(), inputs.token_mask_T)
            else:
                expert_T = scores_TE.argmax(dim=-1)
            top_k_index_TK = expert_T.unsqueeze(-1)
            used_TK = top_k_index_TK < self.num_experts
            chosen_TK = scores_TE.gather(1, top_k_index_TK.clamp(max=self.num_experts - 1))
            # the paper's h + sigmoid(h . w_e) f_e(h): the block adds h, the router gives the weight (and learns by it)
            top_k_weights_TK = torch.sigmoid(chosen_TK) * used_TK
        return RouterDecision(scores_TE, top_k_index_TK, top_k_weights_TK)

    @classmethod
    def validate_config(cls, config) -> None:
        if config.num_experts_per_tok != 1:
            raise ValueError(
                "router_type='base' assigns one expert per token (a balanced linear assignment): num_experts_per_tok "
                f"must be 1, got {config.num_experts_per_tok}"
            )
        refuse_settings(config, "base", "its combine weight is sigmoid(score)")

    @classmethod
    def experts_per_token(cls, config) -> float:
        return 1
