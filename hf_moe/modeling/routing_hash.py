"""Hash layers (Roller et al. 2021, "Hash Layers For Large Sparse Models", arXiv 2106.04426), `router_type="hash"`.

Shape legend: T tokens, E experts, H hash heads (`num_hash_heads`), G = E / H experts per head, V vocabulary size.

A hash layer routes each token by its id through a fixed table, not by its hidden state: nothing is learned, every
occurrence of a token id goes to the same experts in every layer, batch, generation step and after reloading.

```
expert_of_token (H, V) int64, a persistent buffer: head m's row holds experts of group m, [m*G, (m+1)*G)
top_k_index_TK = expert_of_token[:, input_id_T % V].T      (T, H): one expert per head
top_k_weights_TK = 1                                       the token's output is the sum of its H experts
```
With H = 1 this is the paper's Hash layer. With H > 1 and experts of width F / H (`moe_intermediate_size`) it is the
paper's MultiHash: the FFN's F hidden units are split into H segments, each segment's weights chosen by its own hash,
and the segments' outputs concatenated before the output projection. Concatenating before a linear projection equals
summing the segments' projections after it, and each expert here is one segment (its own columns of W_in, rows of
W_out), so the sum of the H experts is that FFN, at the FLOPs of one FFN of width F. (Up to the output bias: each
expert carries its own, so a token gets the sum of its H experts' biases.)

The table is a persistent buffer, so it is saved, loaded (also with `trust_remote_code` where hf_moe is not installed)
and stays int64 through `.to(dtype)`. A new model starts with `random_hash_table` of `config.hash_seed`, computed on the
CPU with a local generator: the same table on every rank and every machine with the same torch version (a saved table
is loaded as it was saved, whatever torch computes). `hf_moe.conversion.hash_tables` builds the balanced and clustered
tables of the paper and writes them (`set_hash_tables`, which also records `config.hash_kind`). Under expert
parallelism the router, and so its table, is replicated on every rank.

Token ids >= V (a vocabulary grown by `resize_token_embeddings` after the table was made) are routed as id % V: a fixed
rule, never an out-of-bounds read; `HashRouter.resize_table` widens the table by the same rule, so that a resized model
saves and loads with a table that fits its config. Routing by id needs the ids: `inputs_embeds` alone is a `ValueError`.

Hub portability: this file travels with every saved checkpoint; only torch / transformers and single-dot siblings.
"""

from __future__ import annotations

import torch
from transformers import initialization as init
from transformers.utils import logging

from .routing import TOKEN_CHOICE_SETTINGS, Router, RouterDecision, RoutingInputs, refuse_settings

__all__ = ["HashRouter", "check_hash_table_arguments", "random_hash_table"]

logger = logging.get_logger(__name__)

# The logit of the experts a token does not use (the recorded `router_logits`): exp() underflows to exactly 0 in float32,
# so softmax(logits_TE) is the routing distribution, uniform over the token's H experts, and topk(logits, H) gives the
# experts used; unlike -inf it makes no NaN in an entropy or a z-loss, unlike finfo.min it survives scaling.
_UNUSED_EXPERT_LOGIT = -1.0e4


def random_hash_table(vocab_size: int, num_experts: int, num_heads: int = 1, seed: int = 0) -> torch.Tensor:
    """The seeded random table, (H, V) int64 on the CPU: each head a random assignment of the V token ids to the G =
    E / H experts of its group, every expert getting floor(V / G) or ceil(V / G) ids (a shuffled round robin)."""
    check_hash_table_arguments(vocab_size, num_experts, num_heads)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    group_size = num_experts // num_heads
    rows = [torch.randperm(vocab_size, generator=generator, device="cpu") % group_size for _ in range(num_heads)]
    offsets_H1 = torch.arange(num_heads).unsqueeze(1) * group_size  # head m's experts are [m*G, (m+1)*G)
    return torch.stack(rows) + offsets_H1


def check_hash_table_arguments(vocab_size: int, num_experts: int, num_heads: int) -> None:
    """`ValueError` unless the three are ints >= 1 and the experts split into `num_heads` equal groups."""
    for name, value in (("vocab_size", vocab_size), ("num_experts", num_experts), ("num_heads", num_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if num_experts % num_heads:
        raise ValueError(
            f"num_experts={num_experts} must be a multiple of num_heads={num_heads}: each hash head picks among its "
            "own group of num_experts / num_heads experts"
        )


class HashRouter(Router):
    """Routes each token by its id through a fixed table (`expert_of_token`, (H, V)); no parameters, no losses."""

    # nothing to learn: the block computes no router losses (they would only add a constant to the loss)
    learned = False
    # balanced by the table (or not at all), never by a loss
    default_aux_loss_coef = 0.0

    def __init__(self, config, hidden_size: int):
        super().__init__(config, hidden_size)
        self.num_heads = config.num_hash_heads
        self.vocab_size = config.vocab_size
        self.seed = config.hash_seed
        table_HV = torch.empty(self.num_heads, self.vocab_size, dtype=torch.long)
        if not table_HV.is_meta:
            # a model built for loading lives on the meta device: its table comes from the checkpoint (or, if the
            # checkpoint lacks it, from `init_weights`); any other construction gets the seeded table right away
            table_HV.copy_(self.seeded_table())
            if config.hash_kind != "random":
                logger.warning_once(
                    f"hash_kind={config.hash_kind!r} says the hash table was built from data, but a new model starts "
                    f"with the seeded random table (hash_seed={self.seed}); load the saved model with from_pretrained, "
                    "or write the table with hf_moe.conversion.set_hash_tables"
                )
        self.register_buffer("expert_of_token", table_HV, persistent=True)

    def seeded_table(self) -> torch.Tensor:
        """`random_hash_table` of this router's config, (H, V) on the CPU."""
        return random_hash_table(self.vocab_size, self.num_experts, self.num_heads, self.seed)

    def forward(self, inputs: RoutingInputs) -> RouterDecision:
        if inputs.input_ids_T is None:
            raise ValueError(
                "router_type='hash' routes each token by its id: call the model with input_ids (or "
                "decoder_input_ids), not inputs_embeds alone"
            )
        table_HV = self.expert_of_token
        # ids >= V (a vocabulary grown after the table was made) wrap around: a fixed rule, never an out-of-bounds read
        ids_T = inputs.input_ids_T.to(device=table_HV.device, dtype=torch.long).remainder(table_HV.shape[1])
        top_k_index_TK = table_HV.t()[ids_T]  # (T, H), one expert per head; the heads' groups are disjoint
        with torch.autocast(device_type=table_HV.device.type, enabled=False):
            num_tokens = top_k_index_TK.shape[0]
            logits_TE = torch.full((num_tokens, self.num_experts), _UNUSED_EXPERT_LOGIT, device=table_HV.device)
            logits_TE = logits_TE.scatter(1, top_k_index_TK, 0.0)
            top_k_weights_TK = torch.ones(top_k_index_TK.shape, device=table_HV.device)
            probs_TE = torch.zeros_like(logits_TE).scatter(1, top_k_index_TK, 1.0 / self.num_heads)
        return RouterDecision(logits_TE, top_k_index_TK, top_k_weights_TK, probs_TE)

    @torch.no_grad()
    def resize_table(self, vocab_size: int) -> None:
        """Make the table `vocab_size` wide without changing any routing: a new id j gets the experts of j % V, which
        the forward gives it already. Call it after `resize_token_embeddings` and before saving, so that the saved
        table fits the config's new `vocab_size` (otherwise `from_pretrained` reports a size mismatch)."""
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
        table_HV = self.expert_of_token
        ids_V = torch.arange(vocab_size, device=table_HV.device) % table_HV.shape[1]
        self.expert_of_token = table_HV[:, ids_V].contiguous()  # a registered buffer stays registered (persistent)
        self.vocab_size = vocab_size

    def init_weights(self, std: float, generator: torch.Generator | None = None) -> None:
        """Writes the seeded table (`hash_seed`), never another random one: `std` and `generator` do not apply. A table
        loaded from a checkpoint is left alone (transformers' `init.copy_` skips loaded tensors)."""
        init.copy_(self.expert_of_token, self.seeded_table().to(self.expert_of_token.device))

    @classmethod
    def validate_config(cls, config) -> None:
        num_heads, num_experts = config.num_hash_heads, config.num_local_experts
        if num_experts % num_heads:
            raise ValueError(
                f"router_type='hash' splits the experts into num_hash_heads={num_heads} groups of equal size, one per "
                f"head: num_local_experts={num_experts} must be a multiple of num_hash_heads"
            )
        if config.num_experts_per_tok != num_heads:
            raise ValueError(
                f"router_type='hash' sends each token to num_hash_heads={num_heads} experts, one per head: set "
                f"num_experts_per_tok={num_heads} (got {config.num_experts_per_tok})"
            )
        # settings of learned routers, which would silently do nothing here
        refuse_settings(
            config,
            "hash",
            "it has no router to perturb or train: a fixed table, weight 1 per expert",
            {**TOKEN_CHOICE_SETTINGS, "router_aux_loss_coef": (None, 0)},
        )
        if getattr(config, "vocab_size", None) is None:
            raise ValueError("router_type='hash' needs the config's vocab_size (its table has one entry per token id)")

    @classmethod
    def experts_per_token(cls, config) -> float:
        return config.num_hash_heads

    @classmethod
    def settings(cls, config) -> dict[str, str]:
        built = {
            "random": f"seeded random, hash_seed {config.hash_seed}",
            "balanced": "greedy bin packing of a corpus's token frequencies",
            "clustered": "k-means clusters of the input token embeddings",
        }
        heads = f"{config.num_hash_heads} (MultiHash)" if config.num_hash_heads > 1 else "1"
        return {"Hash table": f"{config.hash_kind} ({built.get(config.hash_kind, 'unknown')})", "Hash heads": heads}
