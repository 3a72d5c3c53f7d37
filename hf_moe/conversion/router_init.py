"""Routers initialized from data: moefy's `router_init` ("random" | "kmeans" | "hidden_prompts").

Shape legend: N captured tokens, D hidden size, E experts, P prompts, B batch, S sequence.

A router scores token x for expert e by the dot product w_e . x (no bias). "random" (the default) starts every w_e
small and random from the seed. The data-driven inits point w_e at a direction of the dense model's own hidden states
at that layer, the input of the dense FFN that becomes the layer's experts (the MoE block takes the FFN's place, so it
sees exactly these states):

- "kmeans": the dense model reads calibration text (the first `calibration_tokens` tokens, padding excluded) and the
  FFN inputs of every MoE layer are clustered into E groups by spherical k-means (cosine similarity; seeded k-means++
  start, Lloyd steps to convergence). Spherical, because a router without bias scores by the dot product: with
  rows of equal norm along the unit centroids, a token's best expert is exactly its k-means cluster.
- "hidden_prompts" (mergekit-moe's "hidden" gate mode, Goddard et al. 2024, arXiv 2403.13257): each expert has one
  or more prompts; its direction is the mean over its prompts of each prompt's mean FFN input (over the prompt's
  tokens), normalized.

How a layer's unit directions u_e become router rows: w_e = s * (u_e - mean_e u_e), s = router_init_std * sqrt(D).
s is the norm a random N(0, router_init_std^2) row has, so the routing starts as confident as the scaled directions
say, and `router_init_std` (a moefy config override) turns it up or down. Subtracting the mean row adds the same
amount to every expert's logit of a token, which changes no routing decision and no softmax over experts, but drops
the part of the logits that all experts share (the states of a layer share a large common direction), so the z-loss
starts small. Rows are computed in float32 and then cast to the router's dtype.

Encoder-decoder models (T5): the decoder reads the same text by teacher forcing: its inputs are the text's token ids
shifted right behind `decoder_start_token_id` (the pad id when the config has none), as in training with labels =
the text. Text is cut into sequences of at most 256 tokens (fewer where the model has fewer positions); each text or
prompt is tokenized as the tokenizer does by default (T5 appends </s>, GPT-2 adds nothing). The captured states are
held in float32 on the CPU: calibration_tokens x D x 4 bytes per MoE layer (8192 tokens, D=768: 25 MB a layer).
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from ..modeling.moe_parts import moe_parts
from ..modeling.registry import ROUTERS, build_router
from .family import FamilyMapping
from .text_source import check_text_source, iter_texts

__all__ = [
    "DEFAULT_CALIBRATION_TOKENS",
    "ROUTER_INITS",
    "Calibration",
    "capture_ffn_inputs",
    "check_router_init_arguments",
    "check_router_takes_rows",
    "data_router_rows",
    "ffn_input_modules",
    "kmeans_centroids",
    "prepare_calibration",
    "prompt_directions",
    "router_rows",
    "set_router_rows",
]

ROUTER_INITS = ("random", "kmeans", "hidden_prompts")
# enough tokens for E <= 64 centroids (over 100 tokens a cluster), for the cost of one batch's forward pass
DEFAULT_CALIBRATION_TOKENS = 8192
# tokens per calibration sequence: long enough for typical context, short enough for any model's positions
_SEQUENCE_LENGTH = 256
_BATCH_SEQUENCES = 8
# texts per tokenizer call (files arrive in pieces, `text_source.FILE_PIECE_CHARS`)
_BATCH_TEXTS = 64
# Lloyd steps at most; k-means on N <= ~10^4 points usually converges in well under this
_KMEANS_ITERATIONS = 100


@dataclass(frozen=True)
class Calibration:
    """Tokenized text for the dense model: sequences of at most L ids, and the text (prompt) each sequence came from."""

    router_init: str
    sequences: list[list[int]]
    # per sequence: the index of the text (for "hidden_prompts": the prompt) it is a piece of
    segments: list[int]
    pad_token_id: int
    # "hidden_prompts": the expert of each prompt, (P,) entries in [0, E)
    expert_of_prompt: tuple[int, ...] = ()

    @property
    def num_tokens(self) -> int:
        return sum(len(sequence) for sequence in self.sequences)


def check_router_init_arguments(
    router_init: str,
    *,
    calibration_data,
    expert_prompts,
    calibration_tokens: int | None,
    num_experts: int,
):
    """moefy's checks of its router_init arguments (no model needed). Returns the data to tokenize: the calibration
    source ("kmeans"), the prompts as E lists of strings ("hidden_prompts"), or None ("random")."""
    if router_init not in ROUTER_INITS:
        raise ValueError(f"router_init must be one of {ROUTER_INITS}, got {router_init!r}")
    given = {
        "calibration_data": calibration_data is not None,
        "calibration_tokens": calibration_tokens is not None,
        "expert_prompts": expert_prompts is not None,
    }
    uses = {"random": (), "kmeans": ("calibration_data", "calibration_tokens"), "hidden_prompts": ("expert_prompts",)}
    unused = [name for name, is_given in given.items() if is_given and name not in uses[router_init]]
    if unused:
        owners = {"calibration_data": "kmeans", "calibration_tokens": "kmeans", "expert_prompts": "hidden_prompts"}
        raise ValueError(
            "; ".join(f"{name} applies only with router_init={owners[name]!r}" for name in unused)
            + f", got router_init={router_init!r}"
        )
    if router_init == "random":
        return None
    if isinstance(num_experts, int) and num_experts < 2:
        raise ValueError(
            f"router_init={router_init!r} points each expert's router row at data; with num_experts={num_experts} "
            "there is nothing to route (use router_init='random')"
        )
    if router_init == "kmeans":
        if calibration_data is None:
            raise ValueError(
                "router_init='kmeans' clusters the dense model's hidden states on calibration text: pass "
                "calibration_data (a list of texts, pathlib.Path text files, or a datasets.Dataset with a 'text' "
                "column)"
            )
        if calibration_tokens is not None and (
            isinstance(calibration_tokens, bool) or not isinstance(calibration_tokens, int) or calibration_tokens < 1
        ):
            raise ValueError(f"calibration_tokens must be an int >= 1, got {calibration_tokens!r}")
        return check_text_source(calibration_data, "calibration_data")
    return _expert_prompt_lists(expert_prompts, num_experts)


def _expert_prompt_lists(expert_prompts, num_experts: int) -> list[list[str]]:
    if expert_prompts is None:
        raise ValueError(
            "router_init='hidden_prompts' points each expert's router row at the hidden states of its prompts: pass "
            f"expert_prompts, {num_experts} entries (num_experts), each a prompt or a list of prompts"
        )
    if isinstance(expert_prompts, str) or not isinstance(expert_prompts, (list, tuple)):
        raise TypeError(
            f"expert_prompts must be a list of {num_experts} prompts (str) or lists of prompts, got "
            f"{type(expert_prompts).__name__}"
        )
    if len(expert_prompts) != num_experts:
        raise ValueError(
            f"expert_prompts has {len(expert_prompts)} entries; it needs one per expert, num_experts={num_experts}"
        )
    prompts = []
    for expert, entry in enumerate(expert_prompts):
        entry = [entry] if isinstance(entry, str) else entry
        if not isinstance(entry, (list, tuple)) or not entry or not all(isinstance(p, str) for p in entry):
            raise TypeError(
                f"expert_prompts[{expert}] must be a prompt (str) or a non-empty list of prompts, got {entry!r:.100}"
            )
        blank = [p for p in entry if not p.strip()]
        if blank:
            raise ValueError(f"expert_prompts[{expert}] holds an empty prompt: every prompt needs some text")
        prompts.append(list(entry))
    return prompts


def check_router_takes_rows(config: PretrainedConfig, router_init: str) -> None:
    """`ValueError` unless `config.router_type` is a learned router with a (E, D) `weight` (built on the meta device:
    no memory, no init)."""
    expected = (config.num_local_experts, config.hidden_size)
    if ROUTERS.entry(config.router_type).router_class.learned:
        with torch.device("meta"):
            weight = getattr(build_router(config, config.hidden_size), "weight", None)
        if isinstance(weight, nn.Parameter) and tuple(weight.shape) == expected:
            return
        why = f"has no (num_experts, hidden_size) = {expected} weight"
    else:
        why = "learns nothing (it routes by a fixed rule)"
    raise ValueError(
        f"router_init={router_init!r} sets router rows, but router_type={config.router_type!r} {why}; use "
        "router_init='random' with it, or a router with rows (topk, noisy_topk, base, dense_to_sparse, "
        "expert_choice)"
    )


def prepare_calibration(
    router_init: str,
    data,
    tokenizer,
    dense_config: PretrainedConfig,
    *,
    num_experts: int,
    calibration_tokens: int | None = None,
) -> Calibration:
    """Tokenize the checked data (`check_router_init_arguments`) before any weights load: too little text, or ids
    outside the model's vocabulary, are reported at once."""
    length = min(_SEQUENCE_LENGTH, getattr(dense_config, "n_positions", None) or _SEQUENCE_LENGTH)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out: any valid id does
    if router_init == "kmeans":
        budget = DEFAULT_CALIBRATION_TOKENS if calibration_tokens is None else calibration_tokens
        sequences, segments = [], []
        remaining = budget
        for index, ids in enumerate(
            _token_ids(tokenizer, iter_texts(data, "calibration_data"), dense_config.vocab_size)
        ):
            for start in range(0, len(ids), length):
                piece = ids[start : start + min(length, remaining)]
                sequences.append(piece)
                segments.append(index)
                remaining -= len(piece)
                if remaining == 0:
                    break
            if remaining == 0:
                break
        calibration = Calibration(router_init, sequences, segments, pad_id)
        if calibration.num_tokens < num_experts:
            raise ValueError(
                f"router_init='kmeans' needs at least num_experts={num_experts} calibration tokens to find "
                f"{num_experts} clusters; calibration_data gave {calibration.num_tokens}"
            )
        return calibration
    if router_init != "hidden_prompts":
        raise ValueError(f"prepare_calibration makes data for 'kmeans' or 'hidden_prompts', got {router_init!r}")
    prompts = [prompt for entry in data for prompt in entry]
    expert_of_prompt = tuple(expert for expert, entry in enumerate(data) for _ in entry)
    sequences, segments = [], []
    for index, ids in enumerate(_token_ids(tokenizer, iter(prompts), dense_config.vocab_size)):
        if not ids:
            raise ValueError(f"the prompt {prompts[index]!r} of expert {expert_of_prompt[index]} has no tokens")
        for start in range(0, len(ids), length):
            sequences.append(ids[start : start + length])
            segments.append(index)
    return Calibration(router_init, sequences, segments, pad_id, expert_of_prompt)


def _token_ids(tokenizer, texts: Iterator[str], vocab_size: int) -> Iterator[list[int]]:
    """Each text's ids as the tokenizer makes them by default, a batch of texts per call (lazily: a token budget stops
    reading early)."""
    while batch := list(itertools.islice(texts, _BATCH_TEXTS)):
        # verbose=False: a long text is cut into sequences below, never fed whole
        for ids in tokenizer(batch, verbose=False)["input_ids"]:
            if ids and max(ids) >= vocab_size:
                raise ValueError(
                    f"the tokenizer produced token id {max(ids)}, outside the model's vocab_size={vocab_size}: is it "
                    "the model's tokenizer?"
                )
            yield list(ids)


def ffn_input_modules(
    family: FamilyMapping, dense: PreTrainedModel, selected_layers: Mapping[str, list[int]]
) -> list[str]:
    """The dense FFN module of each MoE layer (names relative to the base model), stacks in declared order, layers
    ascending (the order moefy's plans follow). The MoE block takes the FFN's place, so the mapping's block template
    names the dense FFN too; checked here against the FFN tensors the mapping declares."""
    base = dense.base_model
    names = []
    for stack in family.stacks:
        for layer in selected_layers[stack.layer_field]:
            values = {"layer": layer, **stack.placeholders}
            name = family.block.format(**values)
            try:
                module = base.get_submodule(name)
            except AttributeError:
                continue  # a head without this stack (T5EncoderModel has no decoder)
            owned = {f"{name}.{key}" for key in module.state_dict()}
            if not any(all(t.dense.format(**values) in owned for t in kind.tensors) for kind in family.ffn_kinds):
                raise RuntimeError(
                    f"moefy: {name} of the dense {type(dense).__name__} does not hold that layer's FFN weights; the "
                    f"{family.name} mapping's block template {family.block!r} must name the dense FFN module"
                )
            names.append(name)
    return names


@torch.no_grad()
def capture_ffn_inputs(
    model: PreTrainedModel, module_names: list[str], calibration: Calibration, *, progress: bool = False
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Run `model` (eval mode, restored after) on the calibration sequences and return the input of each named
    module (relative to the base model) at every non-padding token, {name: (N, D) float32 on the CPU}, and the
    segment (text / prompt index) of each token, (N,) int64. Tokens are in batch order, row by row; every module
    sees the same tokens (T5's decoder through teacher forcing, see the module docstring)."""
    from tqdm.auto import tqdm

    base = model.base_model
    config = model.config
    takes_decoder_inputs = "decoder_input_ids" in inspect.signature(base.forward).parameters
    # T5 starts the decoder with its pad id; a config without decoder_start_token_id means that one
    start_ids = (getattr(config, "decoder_start_token_id", None), getattr(config, "pad_token_id", None))
    start_id = next((i for i in start_ids if i is not None), calibration.pad_token_id)
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in module_names}
    current: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module, args, kwargs):
            hidden_BSD = args[0] if args else kwargs["hidden_states"]
            mask_BS = current["mask"]
            assert hidden_BSD.shape[:2] == mask_BS.shape, (name, hidden_BSD.shape, mask_BS.shape)
            captured[name].append(hidden_BSD[mask_BS].to("cpu", torch.float32))

        return hook

    handles = [
        base.get_submodule(name).register_forward_pre_hook(hook_for(name), with_kwargs=True) for name in module_names
    ]
    segments = []
    was_training = model.training
    model.eval()  # no dropout: the states the trained model sees
    device = next(model.parameters()).device
    batches = range(0, len(calibration.sequences), _BATCH_SEQUENCES)
    try:
        for first in tqdm(
            batches, desc=f"router init ({calibration.router_init})", unit="batch", disable=not progress
        ):
            sequences = calibration.sequences[first : first + _BATCH_SEQUENCES]
            width = max(len(sequence) for sequence in sequences)
            ids_BS = torch.full((len(sequences), width), calibration.pad_token_id, dtype=torch.long)
            mask_BS = torch.zeros(len(sequences), width, dtype=torch.bool)
            for row, sequence in enumerate(sequences):
                ids_BS[row, : len(sequence)] = torch.tensor(sequence)
                mask_BS[row, : len(sequence)] = True  # right padding: a causal model's real tokens never see it
            segment_BS = torch.tensor(calibration.segments[first : first + _BATCH_SEQUENCES]).unsqueeze(1)
            segments.append(segment_BS.expand(-1, width)[mask_BS])
            current["mask"] = mask_BS.to(device)
            inputs = {"input_ids": ids_BS.to(device), "attention_mask": mask_BS.long().to(device), "use_cache": False}
            if takes_decoder_inputs:
                # teacher forcing on the same text: decoder position t reads token t-1 and would predict token t
                start_B1 = torch.full((len(sequences), 1), start_id, dtype=torch.long)
                inputs["decoder_input_ids"] = torch.cat([start_B1, ids_BS[:, :-1]], dim=1).to(device)
                inputs["decoder_attention_mask"] = inputs["attention_mask"]
            base(**inputs)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    states = {name: torch.cat(parts) for name, parts in captured.items()}
    segment_N = torch.cat(segments)
    assert all(len(states_ND) == len(segment_N) for states_ND in states.values())
    return states, segment_N


def kmeans_centroids(
    points_ND: torch.Tensor, num_clusters: int, *, generator: torch.Generator, max_iterations: int = _KMEANS_ITERATIONS
) -> torch.Tensor:
    """Spherical k-means (cosine similarity) of the rows of `points_ND`: (E, D) float32 unit centroids.

    Seeded k-means++ start (`generator`, a CPU generator: the same centroids on every machine for the same points),
    then Lloyd steps until no point changes cluster (or `max_iterations`): every point is then most similar to its
    own cluster's centroid, the normalized mean of the cluster. A cluster left empty restarts at the point least
    similar to its own centroid."""
    if points_ND.dim() != 2 or not points_ND.is_floating_point():
        raise ValueError(
            f"points_ND must be a 2-D float tensor, got {points_ND.dtype} of shape {tuple(points_ND.shape)}"
        )
    num_points = points_ND.shape[0]
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or not 1 <= num_clusters <= num_points:
        raise ValueError(
            f"num_clusters must be an int in [1, {num_points}] (the number of points), got {num_clusters!r}"
        )
    unit_ND = _normalized(points_ND.detach().to("cpu", torch.float32))
    if not torch.isfinite(unit_ND).all():
        raise ValueError("points_ND must be finite")
    # k-means++: each next centroid drawn with probability proportional to its cosine distance to the nearest so far
    first = int(torch.randint(num_points, (1,), generator=generator))
    centroids_ED = unit_ND[first].repeat(num_clusters, 1)
    distance_N = (1.0 - unit_ND @ centroids_ED[0]).clamp_min(0.0)
    for cluster in range(1, num_clusters):
        if distance_N.sum() > 0:
            index = int(torch.multinomial(distance_N, 1, generator=generator))
        else:  # every point coincides with a centroid already: any point is as good
            index = int(torch.randint(num_points, (1,), generator=generator))
        centroids_ED[cluster] = unit_ND[index]
        distance_N = torch.minimum(distance_N, (1.0 - unit_ND @ unit_ND[index]).clamp_min(0.0))
    cluster_N = (unit_ND @ centroids_ED.T).argmax(dim=1)
    for _ in range(max_iterations):
        sums_ED = torch.zeros_like(centroids_ED).index_add_(0, cluster_N, unit_ND)
        counts_E = torch.bincount(cluster_N, minlength=num_clusters)
        centroids_ED = torch.where(counts_E.unsqueeze(1) > 0, _normalized(sums_ED), centroids_ED)
        if (counts_E == 0).any():
            own_N = (unit_ND * centroids_ED[cluster_N]).sum(dim=1)
            for empty in (counts_E == 0).nonzero().flatten().tolist():
                farthest = int(own_N.argmin())
                centroids_ED[empty] = unit_ND[farthest]
                own_N[farthest] = 2.0  # taken: the next empty cluster restarts elsewhere
        new_cluster_N = (unit_ND @ centroids_ED.T).argmax(dim=1)
        if torch.equal(new_cluster_N, cluster_N) and (counts_E > 0).all():
            break  # converged: the centroids are the normalized means of the clusters they define
        cluster_N = new_cluster_N
    return centroids_ED


def prompt_directions(
    states_ND: torch.Tensor, segment_N: torch.Tensor, expert_of_prompt: tuple[int, ...], num_experts: int
) -> torch.Tensor:
    """(E, D) unit rows: for each expert, the mean over its prompts of each prompt's mean state (over its tokens)."""
    states_ND = states_ND.float()
    num_prompts = len(expert_of_prompt)
    sums_PD = torch.zeros(num_prompts, states_ND.shape[1]).index_add_(0, segment_N, states_ND)
    means_PD = sums_PD / torch.bincount(segment_N, minlength=num_prompts).clamp_min(1).unsqueeze(1)
    expert_P = torch.tensor(expert_of_prompt, dtype=torch.long)
    sums_ED = torch.zeros(num_experts, states_ND.shape[1]).index_add_(0, expert_P, means_PD)
    return _normalized(sums_ED / torch.bincount(expert_P, minlength=num_experts).clamp_min(1).unsqueeze(1))


def router_rows(directions_ED: torch.Tensor, router_init_std: float) -> torch.Tensor:
    """Router rows from unit directions: s * (u_e - mean u), s = router_init_std * sqrt(D) (module docstring)."""
    directions_ED = directions_ED.float()
    scale = router_init_std * math.sqrt(directions_ED.shape[1])
    return scale * (directions_ED - directions_ED.mean(dim=0, keepdim=True))


def data_router_rows(
    dense: PreTrainedModel,
    family: FamilyMapping,
    selected_layers: Mapping[str, list[int]],
    calibration: Calibration,
    *,
    num_experts: int,
    router_init_std: float,
    seed: int,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """{MoE block name (relative to the base model): (E, D) float32 router rows} for `calibration.router_init`."""
    names = ffn_input_modules(family, dense, selected_layers)
    states, segment_N = capture_ffn_inputs(dense, names, calibration, progress=progress)
    generator = torch.Generator().manual_seed(seed)  # layers in plan order draw from it in turn
    rows = {}
    for name in names:
        if calibration.router_init == "kmeans":
            directions_ED = kmeans_centroids(states[name], num_experts, generator=generator)
        else:
            directions_ED = prompt_directions(states[name], segment_N, calibration.expert_of_prompt, num_experts)
        rows[name] = router_rows(directions_ED, router_init_std)
    return rows


@torch.no_grad()
def set_router_rows(moe: PreTrainedModel, rows_by_block: Mapping[str, torch.Tensor]) -> None:
    """Write each (E, D) row tensor into the `weight` of the router of the MoE block of that name (relative to the
    base model), cast to the router's dtype. Every shape is checked before anything is written."""
    targets = []
    for name, rows_ED in rows_by_block.items():
        routers = moe_parts(moe.base_model.get_submodule(name), "router")
        if len(routers) != 1:
            raise RuntimeError(f"moefy: the MoE block {name} has {len(routers)} routers, expected one")
        weight = routers[0][1].weight
        if weight.shape != rows_ED.shape:
            raise RuntimeError(f"moefy: {name}'s router weight is {tuple(weight.shape)}, rows {tuple(rows_ED.shape)}")
        targets.append((weight, rows_ED))
    for weight, rows_ED in targets:
        weight.copy_(rows_ED.to(weight.dtype))


def _normalized(vectors_ND: torch.Tensor) -> torch.Tensor:
    return vectors_ND / vectors_ND.norm(dim=-1, keepdim=True).clamp_min(1e-12)
