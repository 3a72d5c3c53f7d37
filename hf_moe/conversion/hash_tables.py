"""Token -> expert tables for hash layers (Roller et al. 2021, arXiv 2106.04426) and writing them into a model.

Shape legend: V vocabulary size, E experts, H hash heads, G = E / H experts per head, D embedding width.

A table is (H, V) int64: row m maps every token id to one expert of head m's group [m*G, (m+1)*G)
(`hf_moe.modeling.routing_hash` explains the routing and MultiHash). The paper's kinds:

- "random": `random_hash_table`, the seeded table a new hash model starts with (one implementation, in routing_hash).
- "balanced": `balanced_hash_table` of a corpus's token counts (`token_frequencies`): greedy bin packing, so every
  expert gets about the same number of the corpus's tokens.
- "clustered": `clustered_hash_table` of the input token embeddings: k-means, one cluster per expert, so similar
  tokens share an expert.

`set_hash_tables` writes a table into every hash router of a model and records its kind in `config.hash_kind` (the
model card shows it). Not Hub-portable (datasets, tqdm): this module builds tables; the saved table is what travels.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn

from ..modeling.configuration_moe import HASH_KINDS
from ..modeling.moe_parts import moe_routers
from ..modeling.routing_hash import check_hash_table_arguments, random_hash_table
from .text_source import check_text_source, count_texts, iter_texts

__all__ = [
    "balanced_hash_table",
    "clustered_hash_table",
    "random_hash_table",
    "set_hash_tables",
    "token_frequencies",
]

# texts handed to the tokenizer per call (fast tokenizers parallelize over a batch)
_BATCH_TEXTS = 256


def token_frequencies(
    tokenizer,
    texts_or_files_or_dataset,
    text_column: str = "text",
    *,
    vocab_size: int | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """How often each token id occurs in a corpus, (V,) int64.

    Args:
        tokenizer: a transformers tokenizer; the special tokens it would add (BOS / EOS) are not counted.
        texts_or_files_or_dataset: a `datasets.Dataset` (its `text_column`), or an iterable whose items are texts
            (`str`) or text files (`pathlib.Path` / `os.PathLike`, read as UTF-8). A file name must be a `Path`: a
            `str` is always text (a `str` that names an existing file gets a warning).
        text_column: the column of a Dataset that holds the text.
        vocab_size: V, the model's vocabulary size (it may exceed the tokenizer's); default `len(tokenizer)`.
        progress: show a tqdm bar over the texts.
    """
    vocab_size = len(tokenizer) if vocab_size is None else vocab_size
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
    source = check_text_source(texts_or_files_or_dataset, "texts_or_files_or_dataset", text_column)
    texts = iter_texts(source, "hash corpus", text_column)
    total = count_texts(source)
    from tqdm.auto import tqdm

    counts_V = np.zeros(vocab_size, dtype=np.int64)
    with tqdm(total=total, desc="token frequencies", unit="text", disable=not progress) as bar:
        for batch in _batches(texts, _BATCH_TEXTS):
            # verbose=False: a long document is fine here, it is only counted, never fed to the model
            encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
            ids_N = np.fromiter((i for ids in encoded for i in ids), dtype=np.int64)
            if ids_N.size and ids_N.max() >= vocab_size:
                raise ValueError(
                    f"the tokenizer produced token id {ids_N.max()}, outside vocab_size={vocab_size}: is it the "
                    "model's tokenizer?"
                )
            counts_V += np.bincount(ids_N, minlength=vocab_size)
            bar.update(len(batch))
    return torch.from_numpy(counts_V)


def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    batch = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def balanced_hash_table(counts_V, num_experts: int, num_heads: int = 1, seed: int = 0) -> torch.Tensor:
    """The balanced hash of the paper, (H, V) int64: greedy bin packing of the token frequencies `counts_V`.

    Tokens are taken in decreasing frequency, each to the currently least-loaded expert of its head's group (load:
    the corpus tokens it received), so every expert receives about T / G of the corpus's T tokens (exactly, up to one
    token's count, when no token is more frequent than that). Tokens with count 0 (never seen) go, in turn, to the
    experts that hold the fewest token ids, so they are spread evenly too.

    With H > 1 the heads must route differently, or MultiHash would be one hash H times: head 0 takes the tokens in
    exact frequency order; every other head shuffles them (seeded) within rounds of G consecutive ranks and breaks
    ties between equally loaded experts in a seeded order. Tokens of a round have similar counts, so each head stays
    as balanced as head 0, but which tokens share an expert differs from head to head.
    """
    counts_V = torch.as_tensor(counts_V)
    if counts_V.dim() != 1 or counts_V.is_complex() or counts_V.dtype == torch.bool:
        raise ValueError(f"counts_V must be a 1-D tensor of token counts, got shape {tuple(counts_V.shape)}")
    counts_V = counts_V.double().cpu()
    if not torch.isfinite(counts_V).all() or (counts_V < 0).any():
        raise ValueError("counts_V must be finite and >= 0 (token counts)")
    vocab_size = counts_V.numel()
    check_hash_table_arguments(vocab_size, num_experts, num_heads)
    group_size = num_experts // num_heads
    generator = torch.Generator(device="cpu").manual_seed(seed)
    by_frequency_V = torch.argsort(counts_V, descending=True, stable=True)  # ties: lower id first
    rounds_V = torch.arange(vocab_size, dtype=torch.float64) // group_size
    counts = counts_V.tolist()
    table_HV = torch.empty(num_heads, vocab_size, dtype=torch.long)
    for head in range(num_heads):
        if head == 0:
            order_V, tie_break_G = by_frequency_V, torch.arange(group_size)
        else:
            # round r + U(0, 1) sorts by round first, randomly within a round
            shuffle_V = torch.argsort(rounds_V + torch.rand(vocab_size, generator=generator, dtype=torch.float64))
            order_V, tie_break_G = by_frequency_V[shuffle_V], torch.randperm(group_size, generator=generator)
        experts_V = _greedy_packing(order_V.tolist(), counts, tie_break_G.tolist())
        table_HV[head] = torch.tensor(experts_V, dtype=torch.long) + head * group_size
    return table_HV


def _greedy_packing(order: list[int], counts: list[float], tie_break: list[int]) -> list[int]:
    """Each token of `order` to the least-loaded of len(tie_break) experts (then the one with fewest ids, then
    `tie_break` order); the tokens of count 0 to the expert with fewest ids (then least load). A heap: O(V log G)."""
    experts = [0] * len(counts)
    # (load, ids, tie rank, expert)
    heap = [(0.0, 0, rank, expert) for expert, rank in enumerate(tie_break)]
    heapq.heapify(heap)
    unseen = []
    for token in order:
        if counts[token] == 0:
            unseen.append(token)
            continue
        load, num_ids, rank, expert = heapq.heappop(heap)
        experts[token] = expert
        heapq.heappush(heap, (load + counts[token], num_ids + 1, rank, expert))
    # the loads no longer change: order the experts by how many ids they hold
    heap = [(num_ids, load, rank, expert) for load, num_ids, rank, expert in heap]
    heapq.heapify(heap)
    for token in unseen:
        num_ids, load, rank, expert = heapq.heappop(heap)
        experts[token] = expert
        heapq.heappush(heap, (num_ids + 1, load, rank, expert))
    return experts


def clustered_hash_table(
    embeddings_VD, num_experts: int, num_heads: int = 1, seed: int = 0, max_iterations: int = 100
) -> torch.Tensor:
    """The clustered hash of the paper, (H, V) int64: k-means of the token embeddings into G = E / H clusters per
    head, cluster c of head m -> expert m*G + c, so tokens in one cluster share an expert.

    k-means++ seeding from a local `torch.Generator(seed)`, then Lloyd iterations until no token changes cluster (or
    `max_iterations`); an emptied cluster takes the token farthest from its centroid. Float32 on the CPU: the same
    table for the same seed on one machine (another BLAS may order sums differently and break a near-tie otherwise).
    With H > 1 each head draws its own k-means++ seeding from the generator, so the heads' clusterings differ unless
    the embeddings hold G clusters so clear that every seeding finds them.
    """
    embeddings_VD = torch.as_tensor(embeddings_VD)
    if embeddings_VD.dim() != 2 or not embeddings_VD.is_floating_point():
        raise ValueError(
            f"embeddings_VD must be a 2-D float tensor (one row per token id), got {embeddings_VD.dtype} of shape "
            f"{tuple(embeddings_VD.shape)}"
        )
    vocab_size = embeddings_VD.shape[0]
    check_hash_table_arguments(vocab_size, num_experts, num_heads)
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 1:
        raise ValueError(f"max_iterations must be an int >= 1, got {max_iterations!r}")
    group_size = num_experts // num_heads
    if vocab_size < group_size:
        raise ValueError(f"k-means into {group_size} clusters per head needs at least {group_size} token embeddings")
    points_VD = embeddings_VD.detach().to(device="cpu", dtype=torch.float32)
    if not torch.isfinite(points_VD).all():
        raise ValueError("embeddings_VD must be finite")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    rows = [_kmeans(points_VD, group_size, generator, max_iterations) + head * group_size for head in range(num_heads)]
    return torch.stack(rows)


def _squared_distances(points_VD: torch.Tensor, centroids_GD: torch.Tensor) -> torch.Tensor:
    # |x|^2 - 2 x.c + |c|^2: one matmul, no (V, G, D) tensor; clamped at 0 against rounding
    return (
        points_VD.pow(2).sum(1, keepdim=True) - 2 * points_VD @ centroids_GD.t() + centroids_GD.pow(2).sum(1)
    ).clamp_(min=0)


def _kmeans(points_VD: torch.Tensor, k: int, generator: torch.Generator, max_iterations: int) -> torch.Tensor:
    """Cluster of each point, (V,) int64: k-means++ seeding, then Lloyd iterations."""
    vocab_size = points_VD.shape[0]
    first = torch.randint(vocab_size, (1,), generator=generator)
    centroids_GD = points_VD[first]
    nearest_V = _squared_distances(points_VD, centroids_GD).squeeze(1)
    for _ in range(1, k):
        # the next seed with probability proportional to the squared distance to the nearest seed so far; when every
        # point sits on a seed (repeated embeddings), uniformly
        weights_V = nearest_V if nearest_V.sum() > 0 else torch.ones(vocab_size)
        chosen = torch.multinomial(weights_V, 1, generator=generator)
        centroids_GD = torch.cat([centroids_GD, points_VD[chosen]])
        nearest_V = torch.minimum(nearest_V, _squared_distances(points_VD, points_VD[chosen]).squeeze(1))
    cluster_V = _squared_distances(points_VD, centroids_GD).argmin(1)
    for _ in range(max_iterations):
        sizes_G = torch.bincount(cluster_V, minlength=k)
        sums_GD = torch.zeros(k, points_VD.shape[1]).index_add_(0, cluster_V, points_VD)
        centroids_GD = torch.where(sizes_G.unsqueeze(1) > 0, sums_GD / sizes_G.clamp(min=1).unsqueeze(1), centroids_GD)
        distances_VG = _squared_distances(points_VD, centroids_GD)
        empty_G = sizes_G == 0
        if empty_G.any():
            # an emptied cluster restarts at the point farthest from its own centroid (each at a different point)
            own_V = distances_VG.gather(1, cluster_V.unsqueeze(1)).squeeze(1)
            for empty in empty_G.nonzero().flatten().tolist():
                farthest = int(own_V.argmax())
                centroids_GD[empty] = points_VD[farthest]
                own_V[farthest] = -1.0
            distances_VG = _squared_distances(points_VD, centroids_GD)
        new_cluster_V = distances_VG.argmin(1)
        # converged: every point is nearest to the mean of its own cluster
        if torch.equal(new_cluster_V, cluster_V):
            break
        cluster_V = new_cluster_V
    return cluster_V


@torch.no_grad()
def set_hash_tables(model: nn.Module, table_HV, kind: str) -> None:
    """Write `table_HV` ((num_hash_heads, vocab_size) expert ids) into every hash router of `model` and record how it
    was built in `config.hash_kind` (`kind`: "random", "balanced" or "clustered"). Every layer gets the same table."""
    if kind not in HASH_KINDS:
        raise ValueError(f"kind must be one of {HASH_KINDS}, got {kind!r}")
    config = getattr(model, "config", None)
    router_type = getattr(config, "router_type", None)
    routers = [(name, router) for name, router in moe_routers(model) if hasattr(router, "expert_of_token")]
    if router_type != "hash" or not routers:
        raise ValueError(
            f"set_hash_tables writes the tables of hash routers; this {type(model).__name__} has router_type="
            f"{router_type!r} (build or moefy the model with router_type='hash')"
        )
    table_HV = torch.as_tensor(table_HV)
    if table_HV.is_floating_point() or table_HV.is_complex() or table_HV.dtype == torch.bool:
        raise TypeError(f"table_HV must hold integer expert ids, got {table_HV.dtype}")
    num_heads, vocab_size = routers[0][1].expert_of_token.shape
    if tuple(table_HV.shape) != (num_heads, vocab_size):
        raise ValueError(
            f"table_HV must have shape (num_hash_heads, vocab_size) = ({num_heads}, {vocab_size}), got "
            f"{tuple(table_HV.shape)}"
            + (" (a single head's table needs .unsqueeze(0))" if table_HV.dim() == 1 else "")
        )
    table_HV = table_HV.long().cpu()
    group_size = config.num_local_experts // num_heads
    for head in range(num_heads):
        low, high = head * group_size, (head + 1) * group_size
        outside_V = (table_HV[head] < low) | (table_HV[head] >= high)
        if outside_V.any():
            token = int(outside_V.nonzero()[0])
            raise ValueError(
                f"head {head} of table_HV must hold experts of its group [{low}, {high}) (E / H = {group_size} "
                f"experts per head); token {token} has expert {int(table_HV[head, token])}"
            )
    for name, router in routers:  # all checked before any is written: no model is left half changed
        if tuple(router.expert_of_token.shape) != (num_heads, vocab_size):
            raise ValueError(f"{name} has a table of shape {tuple(router.expert_of_token.shape)}, the others' differ")
    for _, router in routers:
        router.expert_of_token.copy_(table_HV)
    # T5's stacks hold copies of the config; every copy says the same
    for module in model.modules():
        if getattr(getattr(module, "config", None), "router_type", None) == "hash":
            module.config.hash_kind = kind
