"""Branch-Train-MiX merge: several dense GPT-2 / T5 models of one architecture -> one MoE model, one expert per model.

Branch-Train-MiX (BTX, Sukhbaatar et al. 2024, arXiv 2403.07816) branches a seed model, trains each branch on its own
domain, then mixes the branches into one MoE: each branch's feed-forward network becomes one expert of every MoE layer,
every other weight is the average of the branches', and a final MoE fine-tune learns the routers. `merge_experts` is the
mixing step; the fine-tune is an ordinary `Trainer` run on the result.

```
sources s_0 .. s_{E-1} (same architecture, e.g. fine-tunes of one base)
MoE layer l:  expert i = s_i's FFN of layer l, bit for bit (in the experts' layout: `gpt2.py`, `t5.py`)
              router   = small and random from the seed (as moefy's), learned by the MoE fine-tune
every other weight (embeddings, attention, norms, heads, and the FFN of a layer that stays dense):
              the mean of the sources' weights, summed in float64 and cast back to the sources' dtype (float64:
              every float32 sum is exact enough that N copies of one weight average back to that weight, bit for bit)
```

It reuses moefy's machinery: the family mappings (`FamilyMapping.layer_plans` finds each layer's FFN tensors), the
MoE model allocated without random init, moefy's expert writer and its name-by-name copy of the shared weights (which
fails on any weight that would be lost). Everything that can be compared without weights is compared before the first
weight loads: model types, architectures, config fields, tokenizer files. Sources then load one at a time, so peak
memory is the MoE model, one source, a float64 running sum of the shared weights and the float32 FFNs of the MoE layers.

Shape legend: E experts (= the number of sources), D hidden size, F intermediate size.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import PretrainedConfig, PreTrainedModel

from .family import dense_config_fields
from .moefy import (
    _check_hash_arguments,
    _check_overrides,
    _copy_shared_weights,
    _empty_moe,
    _family_for,
    _one_part,
    _resolve_source,
    _write_experts,
)
from .report import ConversionReport

__all__ = ["MERGE_METHOD", "MergeReport", "merge_experts"]

# `ConversionReport.init_method` of a merged model
MERGE_METHOD = "btx"
_TOOL = "merge_experts"

# config fields that do not change what the merged weights compute, or only at training time: where sources differ in
# them, the MoE takes sources[0]'s. Every other field must be equal (a config stores any keyword, so unknown ones count)
_NEUTRAL_CONFIG_FIELDS = frozenset(
    {
        "dtype",
        "torch_dtype",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "initializer_range",
        "initializer_factor",
        "chunk_size_feed_forward",
        "task_specific_params",
        "finetuning_task",
    }
)
_NEUTRAL_SUFFIXES = ("_pdrop", "dropout", "dropout_rate")
# what the shape-defining fields are called in the messages (GPT-2 and T5 names)
_FIELD_MEANINGS = {
    "n_embd": "hidden size",
    "d_model": "hidden size",
    "n_layer": "layers",
    "num_layers": "layers",
    "num_decoder_layers": "decoder layers",
    "n_inner": "FFN size",
    "d_ff": "FFN size",
    "vocab_size": "vocabulary size",
    "n_head": "attention heads",
    "num_heads": "attention heads",
    "d_kv": "attention head size",
    "n_positions": "positions",
}

# tokenizer files whose bytes define the vocabulary; the JSON files are compared by the keys that define tokenization
# (not e.g. `model_max_length` or a saved padding setting)
_TOKENIZER_VOCAB_FILES = ("vocab.json", "merges.txt", "spiece.model", "tokenizer.model", "added_tokens.json")
_SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
    "additional_special_tokens",
    "extra_ids",
    "added_tokens_decoder",
)
_TOKENIZER_JSON_KEYS = {
    "tokenizer.json": ("model", "added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder"),
    "tokenizer_config.json": _SPECIAL_TOKEN_KEYS,
    "special_tokens_map.json": _SPECIAL_TOKEN_KEYS,
}


@dataclass
class MergeReport(ConversionReport):
    """The conversion report of a merge (`init_method="btx"`): expert i of every MoE layer is `sources[i]`'s FFN;
    `source_model` lists them all, comma-separated."""

    sources: list[str] = field(default_factory=list)


@dataclass
class _Source:
    index: int
    config: PretrainedConfig
    class_name: str
    load: Callable[[], PreTrainedModel]
    name: str
    folder: str | None

    @property
    def label(self) -> str:
        return f"sources[{self.index}] ({self.name})"


def merge_experts(
    sources: Sequence[PreTrainedModel | str | Path],
    *,
    top_k: int = 2,
    router_type: str = "topk",
    moe_layers: str | list[int] | None = None,
    encoder_moe_layers: str | list[int] | None = None,
    decoder_moe_layers: str | list[int] | None = None,
    seed: int = 0,
    progress: bool = True,
    **config_fields,
) -> PreTrainedModel:
    """Branch-Train-MiX: merge 2+ dense models of one architecture (e.g. fine-tunes of one base, each on its own
    domain) into one MoE model with one expert per source.

    In each MoE layer expert i is source i's FFN, bit for bit; every other weight, including the FFN of each layer
    that stays dense (not in the layer choice), is the mean of the sources' (a float64 mean, cast back); the routers are
    small and random from `seed` and need the MoE fine-tune of BTX to learn. With identical sources, k <= E and
    normalized (or unit) combine weights, the MoE computes what the source does (its shared weights are the
    source's, bit for bit).

    Args:
        sources: 2 or more dense models of the same model type, head and config (models, local folders or Hub ids,
            as moefy takes them). Config fields that only matter in training (dropout, init ranges) or output flags
            may differ: the MoE takes sources[0]'s. If sources are folders with tokenizer files, these must define the
            same tokenizer.
        top_k, router_type: experts per token, router by registry name (router_type="hash": top_k=1, a random table
            seeded by `seed`).
        moe_layers, encoder_moe_layers, decoder_moe_layers: the layers that become MoE, as for moefy (default: all).
        seed: seeds the routers' init.
        progress: show a tqdm bar over the sources as they load.
        config_fields: other MoE config fields (capacity_factor, normalize_top_k_weights, router_aux_loss_coef, ...);
            num_local_experts is the number of sources.

    Returns the MoE model; `model.moefy_report` holds the `MergeReport`. Raises ValueError naming the source and what
    differs (model type, head, config field, tokenizer file, tensor name, shape or dtype); all but the tensor checks
    run before any weight loads.
    """
    resolved = _resolve_sources(sources)
    num_experts = len(resolved)
    _check_num_experts_field(config_fields, num_experts)
    hash_kind, _ = _check_hash_arguments(router_type, None, None, top_k, config_fields)
    first = resolved[0]
    family = _family_for(first.config.model_type, _TOOL)
    _check_same_architecture(resolved)
    target_class = family.target_classes.get(first.class_name)
    if target_class is None:
        raise ValueError(
            f"{_TOOL} converts {', '.join(family.target_classes)} for model type {first.config.model_type!r}; "
            f"{first.label} is a {first.class_name}"
        )
    _check_overrides(family, target_class, config_fields, tool=_TOOL)
    if config_fields.get("share_blocks_across_layers"):
        raise ValueError(
            f"{_TOOL} makes each MoE layer from the sources' own layer, so its layers differ; "
            "share_blocks_across_layers=True (one block for every layer, WideNet) is not supported here: moefy "
            "with share_blocks_across_layers=True collapses one dense model's layers"
        )
    layer_specs = {
        "moe_layers": moe_layers,
        "encoder_moe_layers": encoder_moe_layers,
        "decoder_moe_layers": decoder_moe_layers,
    }
    selected_layers = family.select_moe_layers(first.config, layer_specs)
    moe_fields = {"num_local_experts": num_experts, "num_experts_per_tok": top_k, "router_type": router_type}
    if hash_kind is not None:
        moe_fields["hash_seed"] = seed
    moe_fields.update(config_fields)
    # built once before any weight loads only to validate it: a bad value is reported at once
    family.build_config(first.config, {**selected_layers, **moe_fields})
    _check_same_tokenizers(resolved)

    moe = plans = config = reference = None
    ffns: list[list[dict[str, torch.Tensor]]] = []  # per plan, per source: the FFN tensors in float32
    sums: dict[str, torch.Tensor] = {}  # float64 sums of the shared weights (integer tensors: sources[0]'s)
    for source in _progress(resolved, progress):
        dense = source.load()
        state = dense.state_dict()
        if moe is None:
            reference = (source, _signature(state), dense.dtype)
            config = family.build_config(dense.config, {**selected_layers, **moe_fields})
            # names are checked equal across sources below, so sources[0]'s plans hold for all of them
            moe, plans = _empty_moe(family, target_class, config, dense, selected_layers, tool=_TOOL)
            consumed = {name for plan in plans for name in plan.dense_names.values()}
            ffns = [[] for _ in plans]
            kept = {
                "generation_config": copy.deepcopy(getattr(dense, "generation_config", None)),
                "device": dense.device,
                "training": dense.training,
                "class_name": type(dense).__name__,
                "parameters": dense.num_parameters(),
            }
        else:
            _check_same_tensors(source, state, dense.dtype, reference)
        for plan, per_source in zip(plans, ffns, strict=True):
            per_source.append(plan.kind.dense_ffn(state, plan.dense_names).tensors)
        _accumulate(sums, state, consumed, source, first_source=source is first)
        del dense, state  # a loaded source is freed before the next one loads

    with torch.no_grad():
        mean_state = {
            name: total.div_(num_experts) if total.is_floating_point() else total for name, total in sums.items()
        }
        _copy_shared_weights(mean_state, moe, plans)  # cast back to the MoE's (the sources') dtype by `copy_`
        del mean_state, sums
        generator = torch.Generator().manual_seed(seed)
        for plan, per_source in zip(plans, ffns, strict=True):
            # E x (D, F) -> (E, D, F): expert i is source i's FFN
            experts_tensors = {key: torch.stack([ffn[key] for ffn in per_source]) for key in per_source[0]}
            _write_experts(family, plan, plan.kind.expert_parameters(experts_tensors))
            # small and random, never all zero: identical experts (copies of one source) would tie every decision
            _one_part(plan, "router").init_weights(config.router_init_std, generator=generator)
    if kept["generation_config"] is not None:
        moe.generation_config = kept["generation_config"]
    moe.to(kept["device"])
    moe.train(kept["training"])

    names = [source.name for source in resolved]
    moe.moefy_report = MergeReport(
        source_model=", ".join(names),
        source_model_type=first.config.model_type,
        source_class=kept["class_name"],
        target_class=type(moe).__name__,
        init_method=MERGE_METHOD,
        init_options={},
        seed=seed,
        num_experts=num_experts,
        top_k=top_k,
        router_type=router_type,
        moe_layers=family.report_layers(selected_layers),
        parameters=config.parameter_counts(),
        dense_parameters=kept["parameters"],
        versions={
            "hf_moe": importlib.metadata.version("hf-moe"),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        sources=names,
    )
    return moe


def _resolve_sources(sources) -> list[_Source]:
    if isinstance(sources, (str, Path, PreTrainedModel)) or not isinstance(sources, Sequence):
        raise TypeError(
            f"{_TOOL} takes a list of 2 or more dense models (models, folders or Hub ids), got "
            f"{type(sources).__name__}"
        )
    if len(sources) < 2:
        raise ValueError(f"{_TOOL} merges 2 or more dense models into one expert each; got {len(sources)} source(s)")
    resolved = []
    for index, source in enumerate(sources):
        try:
            resolved.append(_Source(index, *_resolve_source(source, tool=_TOOL)))
        except (ValueError, TypeError, FileNotFoundError) as error:
            raise type(error)(f"sources[{index}]: {error}") from error
    return resolved


def _check_num_experts_field(config_fields: dict, num_experts: int) -> None:
    for name in ("num_local_experts", "num_experts"):
        if name in config_fields:
            raise ValueError(
                f"{_TOOL} makes one expert per source: num_local_experts is the number of sources ({num_experts}); "
                f"do not pass {name}="
            )


def _check_same_architecture(resolved: list[_Source]) -> None:
    """Model type, head and every config field that shapes the weights or what they compute, against sources[0]."""
    first = resolved[0]
    first_fields = dense_config_fields(first.config)
    for source in resolved[1:]:
        if source.config.model_type != first.config.model_type:
            raise ValueError(
                f"{_TOOL}: {source.label} is a {source.config.model_type!r} model, {first.label} a "
                f"{first.config.model_type!r} one; all sources must share one architecture"
            )
        if source.class_name != first.class_name:
            raise ValueError(
                f"{_TOOL}: {source.label} is a {source.class_name}, {first.label} a {first.class_name}; all sources "
                "must have the same head"
            )
        fields = dense_config_fields(source.config)
        differences = [
            f"{_field_label(name)} is {fields.get(name, '<unset>')!r} (sources[0]: {first_fields.get(name, '<unset>')!r})"
            for name in sorted(set(fields) | set(first_fields))
            if not _is_neutral(name) and fields.get(name, _UNSET) != first_fields.get(name, _UNSET)
        ]
        if differences:
            raise ValueError(
                f"{_TOOL}: the config of {source.label} differs from {first.label}'s: {'; '.join(differences)}. "
                "All sources must share one architecture (e.g. fine-tunes of one base model)"
            )


_UNSET = object()


def _is_neutral(name: str) -> bool:
    return name in _NEUTRAL_CONFIG_FIELDS or name.endswith(_NEUTRAL_SUFFIXES)


def _field_label(name: str) -> str:
    meaning = _FIELD_MEANINGS.get(name)
    return f"{name} ({meaning})" if meaning else name


def _check_same_tokenizers(resolved: list[_Source]) -> None:
    """Sources in folders with tokenizer files must define the same tokenizer: the experts share one embedding and
    one vocabulary. Compared by the files that define it (see `_tokenizer_contents`); sources without such files
    (model objects not loaded from a folder, Hub ids not in the local cache, folders without a tokenizer) are not."""
    with_tokenizer = []
    for source in resolved:
        if source.folder is not None:
            contents = _tokenizer_contents(Path(source.folder), source)
            if contents:
                with_tokenizer.append((source, contents))
    if len(with_tokenizer) < 2:
        return
    reference, reference_contents = with_tokenizer[0]
    for source, contents in with_tokenizer[1:]:
        common = [key for key in reference_contents if key in contents]
        differing = [key for key in common if contents[key] != reference_contents[key]]
        if differing:
            raise ValueError(
                f"{_TOOL}: the tokenizer of {source.label} differs from {reference.label}'s in "
                f"{', '.join(differing)}; the sources must share one tokenizer (one vocabulary for the shared "
                "embeddings)"
            )
        if not common:  # saved in different formats (e.g. slow vocab files vs tokenizer.json): compare vocabularies
            _check_same_vocabulary(reference, source)


def _tokenizer_contents(folder: Path, source: _Source) -> dict[str, str]:
    """What defines the tokenization in a folder's tokenizer files: 'file' or 'file key' -> a digest or JSON text."""
    contents = {}
    for name in _TOKENIZER_VOCAB_FILES:
        if (folder / name).is_file():
            contents[name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    for name, keys in _TOKENIZER_JSON_KEYS.items():
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except ValueError:
            raise ValueError(f"{_TOOL}: {source.label}: {path} is not a JSON file") from None
        for key in keys:
            if isinstance(data, dict) and key in data:
                contents[f"{name} {key!r}"] = json.dumps(data[key], sort_keys=True)
    return contents


def _check_same_vocabulary(reference: _Source, source: _Source) -> None:
    from transformers import AutoTokenizer

    vocabularies = [
        AutoTokenizer.from_pretrained(s.folder, local_files_only=True).get_vocab() for s in (reference, source)
    ]
    if vocabularies[0] != vocabularies[1]:
        raise ValueError(
            f"{_TOOL}: the tokenizer of {source.label} has another vocabulary than {reference.label}'s; the sources "
            "must share one tokenizer"
        )


def _signature(state: dict[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in state.items()}


def _check_same_tensors(source: _Source, state: dict, dtype: torch.dtype, reference: tuple) -> None:
    first, first_signature, first_dtype = reference
    if dtype != first_dtype:
        raise ValueError(
            f"{_TOOL}: {source.label} holds {dtype} weights, {first.label} {first_dtype}; load the sources in one "
            "dtype (from_pretrained(..., dtype=...)) and pass the models"
        )
    signature = _signature(state)
    for names, whose, lacking in (
        (sorted(set(signature) - set(first_signature)), source, first),
        (sorted(set(first_signature) - set(signature)), first, source),
    ):
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            raise ValueError(f"{_TOOL}: {whose.label} has tensors that {lacking.label} lacks: {shown}")
    for name, (shape, tensor_dtype) in signature.items():
        first_shape, first_tensor_dtype = first_signature[name]
        if (shape, tensor_dtype) != (first_shape, first_tensor_dtype):
            raise ValueError(
                f"{_TOOL}: {source.label}'s {name} is {shape} {tensor_dtype}, {first.label}'s {first_shape} "
                f"{first_tensor_dtype}"
            )


def _accumulate(sums: dict, state: dict, consumed: set[str], source: _Source, *, first_source: bool) -> None:
    """Add a source's shared weights (all but the MoE layers' FFNs) to the float64 sums."""
    for name, tensor in state.items():
        if name in consumed:
            continue
        if not tensor.is_floating_point():  # an index or a count has no mean: it must agree across sources
            value = tensor.detach().to("cpu")
            if first_source:
                sums[name] = value.clone()
            elif not torch.equal(sums[name], value):
                raise ValueError(
                    f"{_TOOL}: {source.label}'s {name} ({tensor.dtype}, not averaged) differs from sources[0]'s"
                )
            continue
        value = tensor.detach().to("cpu", torch.float64)
        if first_source:
            sums[name] = value.clone()  # `.to` may return the source's own tensor, which must stay untouched
        else:
            sums[name].add_(value)


def _progress(resolved: list[_Source], enabled: bool):
    if not enabled:
        return resolved
    from tqdm.auto import tqdm

    return tqdm(resolved, desc="merge", unit="source")
