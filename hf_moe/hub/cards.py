"""Model cards for hf_moe models: Hub metadata plus a body that records how the MoE was made and how to load it.

The body comes from a Jinja template shipped inside the package (`templates/moe_model_card.md`, package data, so a
`pip install` has it). This module turns the config and the conversion report into plain rows and strings; the
template only lays them out.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from transformers import PreTrainedConfig

from ..modeling import (
    GPT2MoeForCausalLM,
    GPT2MoeForSequenceClassification,
    GPT2MoeModel,
    MoeConfigFields,
    T5MoeEncoderModel,
    T5MoeForConditionalGeneration,
    T5MoeModel,
)
from ..modeling.registry import BALANCE_LOSSES, ROUTERS

__all__ = ["MODEL_CARD_TEMPLATE", "render_model_card", "save_model_card"]

MODEL_CARD_TEMPLATE = Path(__file__).parent / "templates" / "moe_model_card.md"

# architecture -> (Hub pipeline tag, Auto class). Seq2seq LMs keep the Hub task "text2text-generation": transformers 5
# removed that pipeline, but the Hub still files encoder-decoder LMs under it and transformers' own `modelcard.py`
# still tags them so.
_HEADS: dict[str, tuple[str | None, str]] = {
    GPT2MoeForCausalLM.__name__: ("text-generation", "AutoModelForCausalLM"),
    GPT2MoeForSequenceClassification.__name__: ("text-classification", "AutoModelForSequenceClassification"),
    GPT2MoeModel.__name__: ("feature-extraction", "AutoModel"),
    T5MoeForConditionalGeneration.__name__: ("text2text-generation", "AutoModelForSeq2SeqLM"),
    T5MoeModel.__name__: ("feature-extraction", "AutoModel"),
    T5MoeEncoderModel.__name__: ("feature-extraction", "AutoModelForTextEncoding"),
}
_GENERATING_AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForSeq2SeqLM")
_FAMILY_NAMES = {"gpt2": "GPT-2", "t5": "T5"}

_INIT_METHOD_NAMES = {
    "copy": "every expert is a copy of the dense FFN (sparse upcycling, Komatsuzaki et al. 2022)",
    "noise": "copies of the dense FFN plus small independent Gaussian noise per expert",
    "drop_upcycle": "copies with a random subset of intermediate neurons re-initialized per expert "
    "(Drop-Upcycling, Nakamura et al. 2025)",
    "split": "the dense FFN's intermediate neurons partitioned among the experts (MoEfication, Zhang et al. 2022)",
    "btx": "expert i is source model i's FFN; every other weight the sources' mean (Branch-Train-MiX)",
    "granular": "each dense FFN cut into G shards, each copied E/G times, routed by virtual groups (He et al. 2024)",
}
# aux_loss_scope -> what the card says; "micro_batch", the usual per-forward loss, gets no row
_AUX_LOSS_SCOPE_NAMES = {
    "global_batch": "expert loads counted over the global batch, every micro-batch and data-parallel rank of an "
    "optimizer step (Qiu et al. 2025)",
    "sequence": "the loss of each sequence, averaged over sequences (sequence-wise balance loss, DeepSeek-V3)",
}
# training code that moves per-step balancing state (a plain Trainer runs no hook once per optimizer step for it)
_BALANCER = "hf_moe's `MoeTrainer` or `RouterBalancingCallback`"
_ROUTER_INIT_NAMES = {
    "kmeans": "rows along the k-means centroids of each layer's FFN inputs on calibration text",
    "hidden_prompts": "rows along the mean FFN input of each expert's prompts (mergekit-moe style)",
}


def render_model_card(
    config: PreTrainedConfig,
    *,
    report: dict | None = None,
    base_model: str | list[str] | None = None,
    license: str | None = None,
    model_name: str | None = None,
    training_results: dict | None = None,
    eval_results: dict | None = None,
    repo_id: str | None = None,
) -> ModelCard:
    """The model card of an hf_moe model.

    Args:
        config: the model's config (`GPT2MoeConfig`, `T5MoeConfig`); routing settings and parameter counts come from
            it, the Hub pipeline tag and Auto class from `config.architectures` (a causal or seq2seq LM when unset).
        report: the conversion report as a dict (`ConversionReport.to_dict()`); None for a model not made by moefy.
            Missing keys leave their rows out.
        base_model: Hub id of the dense model it was made from (metadata `base_model`); None for a local source. A
            merge (a report with `sources`, `merge_experts`) may name several, with `base_model_relation: merge`.
        license: Hub license id, usually the base model's.
        model_name: the card's title; default: the last part of `repo_id`, else the family's name.
        training_results, eval_results: metric name -> value, shown as tables.
        repo_id: the Hub repo the card's usage snippets load from; default: a placeholder path.
    """
    if not isinstance(config, MoeConfigFields):
        raise TypeError(
            f"render_model_card takes the config of an hf_moe model (GPT2MoeConfig, T5MoeConfig), "
            f"got {type(config).__name__}"
        )
    report = _require_mapping("report", report)
    training_results = _require_mapping("training_results", training_results)
    eval_results = _require_mapping("eval_results", eval_results)

    family = _dense_model_type(config)
    family_name = _FAMILY_NAMES.get(family, family)
    # a config that never saw a model (built by hand for a card) gets the family's language-model head
    default_head = T5MoeForConditionalGeneration if config.is_encoder_decoder else GPT2MoeForCausalLM
    architecture = (config.architectures or [default_head.__name__])[0]
    # an unknown head gets no pipeline tag and loads with AutoModel
    pipeline_tag, auto_class = _HEADS.get(architecture, (None, "AutoModel"))
    counts = config.parameter_counts()
    merged = bool(report and report.get("sources"))  # merge_experts' report: one expert per source model
    made_by = ["branch-train-mix", "merge"] if merged else ["upcycling"] if report else []
    card_data = ModelCardData(
        base_model=base_model,
        base_model_relation="merge" if merged and base_model else None,
        license=license,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=["hf_moe", "moe", "mixture-of-experts", family, *made_by],
    )
    model_ref = repo_id or "path/to/this/model"
    return ModelCard.from_template(
        card_data,
        template_path=str(MODEL_CARD_TEMPLATE),
        title=model_name or (repo_id.split("/")[-1] if repo_id else f"{family_name} MoE"),
        family_name=family_name,
        architecture=architecture,
        model_type=config.model_type,
        # a pyramid: "4 to 8" experts (each layer its own count)
        num_experts=config.num_local_experts
        if config.num_experts_per_layer is None
        else f"{min(config.num_experts_per_layer)} to {max(config.num_experts_per_layer)}",
        top_k=config.num_experts_per_tok,
        total_parameters=_count(counts["total"]),
        active_parameters=_count(counts["active"]),
        shared_blocks=config.share_blocks_across_layers,
        detail_rows=_detail_rows(config),
        routing_rows=_routing_rows(config),
        parameter_rows=_parameter_rows(counts, report, config.share_blocks_across_layers),
        conversion_rows=_conversion_rows(report) if report else [],
        merged=merged,
        merge_rows=[
            (f"Expert {i}", f"the feed-forward networks of `{source}`") for i, source in enumerate(report["sources"])
        ]
        if merged
        else [],
        auto_class=auto_class,
        generates=auto_class in _GENERATING_AUTO_CLASSES,
        model_ref=model_ref,
        # an upcycled model keeps its base's vocabulary, and the base's tokenizer is there even when the folder has none
        tokenizer_ref=base_model or model_ref,
        prompt="translate English to German: The house is wonderful." if config.is_encoder_decoder else "Hello, I am",
        training_rows=_result_rows(training_results),
        eval_rows=_result_rows(eval_results),
        drops_tokens=any(
            value is not None
            for value in (config.capacity_factor, config.eval_capacity_factor, config.expert_capacity)
        ),
    )


def save_model_card(folder: str | os.PathLike, card: ModelCard) -> Path:
    """Write `card` as `folder/README.md` (the file the Hub shows), replacing any previous card in one rename."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NotADirectoryError(f"save_model_card: {folder} is not an existing folder")
    path = folder / "README.md"
    partial = folder / ".README.md.partial"
    card.save(partial)
    partial.replace(path)
    return path


def _require_mapping(name: str, value) -> Mapping | None:
    if value is not None and not isinstance(value, Mapping):
        hint = " (pass report.to_dict())" if hasattr(value, "to_dict") else ""
        raise TypeError(f"{name} must be a dict or None, got {type(value).__name__}{hint}")
    return value


def _dense_model_type(config: PreTrainedConfig) -> str:
    """The dense family this MoE config extends ("gpt2" for GPT2MoeConfig, a GPT2Config subclass)."""
    for cls in type(config).__mro__[1:]:
        model_type = getattr(cls, "model_type", "")
        if model_type and model_type != config.model_type:
            return model_type
    return config.model_type


def _detail_rows(config) -> list[tuple[str, str]]:
    rows = [("Hidden size", str(config.hidden_size))]
    for label, (indices, num_layers) in _moe_layers(config).items():
        rows.append((f"MoE layers{label}", _layers(indices, num_layers)))
    rows.append(("Expert FFN size", str(config.expert_intermediate_size)))
    if config.residual_moe:
        rows.append(
            (
                "Residual MoE",
                f"a dense MLP ({config.shared_experts_intermediate_size} neurons) beside the routed top-1 expert, "
                "mixed per token by a learned 2-way softmax coefficient (DeepSpeed-MoE)",
            )
        )
    elif config.num_shared_experts:
        gate = ", scaled per token by a learned sigmoid gate" if config.shared_expert_gate else ""
        rows.append(
            (
                "Shared experts",
                f"{config.num_shared_experts} per MoE layer, always active beside the routed ones "
                f"({config.shared_experts_intermediate_size} neurons together){gate}",
            )
        )
    if config.share_blocks_across_layers:
        own = "LayerNorms and router" if config.per_layer_router else "LayerNorms"
        rows.append(
            (
                "Blocks shared across layers",
                "WideNet: every layer of a stack applies the weights of one block (attention and MoE layer, stored "
                f"once); each layer has its own {own}",
            )
        )
    return rows


def _moe_layers(config) -> dict[str, tuple[list[int], int]]:
    """Stack label -> (MoE block indices, blocks in the stack); read through getattr so any family fits."""
    if hasattr(config, "moe_layer_indices"):
        return {"": (config.moe_layer_indices, config.num_hidden_layers)}
    return {
        " (encoder)": (config.encoder_moe_layer_indices, config.num_layers),
        " (decoder)": (config.decoder_moe_layer_indices, config.num_decoder_layers),
    }


def _routing_rows(config) -> list[tuple[str, str]]:
    if config.unit_combine_weights:
        combine = "weight 1 for each selected expert"
    elif config.normalizes_top_k_weights:
        combine = "router probabilities renormalized over the top-k"
    else:
        combine = "router probability of each selected expert"
    noise = [
        f"jitter {config.router_jitter_noise}" if config.router_jitter_noise else "",
        f"logit noise std {config.router_logit_noise_std}" if config.router_logit_noise_std else "",
    ]
    return [
        (
            "Experts per MoE layer",
            str(config.num_local_experts)
            if config.num_experts_per_layer is None
            else f"{config.num_experts_per_layer} (a PR-MoE pyramid, layer by layer)",
        ),
        ("Experts per token", _experts_per_token(config)),
        ("Router", f"`{config.router_type}`: {_registry_label(ROUTERS, config.router_type)}"),
        *_router_settings(config).items(),
        ("Combine weights", combine),
        ("Router noise in training", ", ".join(n for n in noise if n) or "none"),
        *_capacity_rows(config),
        (
            "Load-balancing loss",
            f"`{config.aux_loss_type}`: {_registry_label(BALANCE_LOSSES, config.aux_loss_type)}, "
            f"coefficient {_aux_loss_coef(config)}",
        ),
        *_balancing_rows(config),
        ("Router z-loss coefficient", str(config.router_z_loss_coef)),
        ("Expert dropout", str(config.expert_dropout)),
    ]


def _balancing_rows(config) -> list[tuple[str, str]]:
    rows = []
    if config.aux_loss_scope != "micro_batch":
        scope = f"`{config.aux_loss_scope}`: {_AUX_LOSS_SCOPE_NAMES[config.aux_loss_scope]}"
        if config.aux_loss_scope == "global_batch":
            scope += f"; the count restarts at each optimizer step when training with {_BALANCER}"
        rows.append(("Load-balancing loss scope", scope))
    if config.router_bias_update_rate > 0:
        rows.append(
            (
                "Aux-loss-free balancing",
                f"a per-expert bias on the selection scores (not on the combine weights), moved after each optimizer "
                f"step by {config.router_bias_update_rate} towards balance (Wang et al. 2024; DeepSeek-V3); it moves "
                f"only when training with {_BALANCER}",
            )
        )
    return rows


def _experts_per_token(config) -> str:
    # as the router counts it (expert choice: its capacity factor, on average); top-k for an unregistered router
    if config.router_type not in ROUTERS:
        return str(config.num_experts_per_tok)
    return f"{config.experts_per_token:g}"


def _router_settings(config) -> dict[str, str]:
    # the router's own settings (`Router.settings`); none for a router not registered here
    if config.router_type not in ROUTERS:
        return {}
    return ROUTERS[config.router_type].router_class.settings(config)


def _aux_loss_coef(config) -> str:
    # the effective coefficient needs the router's registry entry when the field is None (the router's default)
    if config.router_aux_loss_coef is None and config.router_type not in ROUTERS:
        return f"the default of router `{config.router_type}`"
    return str(config.aux_loss_coef)


def _registry_label(registry, name: str) -> str:
    # a folder made with a router registered at run time may be described where that router is not registered
    return registry[name].card_label if name in registry else "(not registered here)"


def _capacity_rows(config) -> list[tuple[str, str]]:
    per = "per sequence" if config.capacity_scope == "sequence" else "per batch"
    policy = f"drop policy `{config.drop_policy}`"
    if config.expert_capacity is not None:
        return [("Capacity (training and evaluation)", f"{config.expert_capacity} slots per expert {per}; {policy}")]
    return [
        ("Capacity factor (training)", _capacity(config.capacity_factor, config, per, policy)),
        ("Capacity factor (evaluation)", _capacity(config.eval_capacity_factor, config, per, policy)),
    ]


def _capacity(factor: float | None, config, per: str, policy: str) -> str:
    if factor is None:
        return "dropless (no token is dropped)"
    return f"{factor} {per} (at least {config.min_capacity} slots; {policy})"


def _parameter_rows(counts: dict[str, int], report: Mapping | None, shared_blocks: bool) -> list[tuple[str, str]]:
    if shared_blocks:
        # WideNet: the shared block is stored once but applied in every layer, so "active" can exceed the total
        total = ("Total (stored)", _count(counts["total"]))
        active = ("Applied per token", f"{_count(counts['active'])}, a shared weight counted once per layer")
    else:
        total = ("Total", _count(counts["total"]))
        active = (
            "Active per token",
            f"{_count(counts['active'])}, {100 * counts['active'] / counts['total']:.0f}% of total",
        )
    rows = [total, active, ("In experts", _count(counts["experts"]))]
    if counts.get("shared_experts"):
        rows[-1] = ("In routed experts", _count(counts["experts"]))
        rows.append(("In shared experts (always active)", _count(counts["shared_experts"])))
    dense = (report or {}).get("dense_parameters")
    if dense:
        rows.append(("Dense source model", f"{_count(dense)} (the MoE holds {counts['total'] / dense:.2f}x)"))
    return rows


def _conversion_rows(report: Mapping) -> list[tuple[str, str]]:
    rows = []
    if "source_model" in report and not report.get("sources"):  # a merge lists its sources expert by expert
        rows.append(("Source model", f"`{report['source_model']}`"))
    if "source_class" in report and "target_class" in report:
        rows.append(("Classes", f"`{report['source_class']}` -> `{report['target_class']}`"))
    if "init_method" in report:
        method = report["init_method"]
        described = _INIT_METHOD_NAMES.get(method)
        rows.append(("Init method", f"`{method}`: {described}" if described else f"`{method}`"))
    if report.get("init_options"):
        rows.append(("Init options", ", ".join(f"`{k}={v}`" for k, v in sorted(report["init_options"].items()))))
    for key, label in (("seed", "Seed"), ("num_experts", "Experts per MoE layer"), ("top_k", "Experts per token")):
        if key in report:
            rows.append((label, str(report[key])))
    if "router_type" in report:
        rows.append(("Router", f"`{report['router_type']}`"))
    if report.get("router_init", "random") != "random":
        rows.append(("Router init", f"`{report['router_init']}`: {_ROUTER_INIT_NAMES.get(report['router_init'], '')}"))
    layers = report.get("moe_layers")
    if isinstance(layers, Mapping):  # encoder-decoder: one list per stack
        rows.extend((f"MoE layers ({stack})", _index_list(indices)) for stack, indices in layers.items())
    elif layers is not None:
        rows.append(("MoE layers", _index_list(layers)))
    versions = _versions(report)
    if versions:
        rows.append(("Made with", ", ".join(f"{name} {version}" for name, version in versions.items())))
    return rows


def _versions(report: Mapping) -> dict[str, str]:
    # ConversionReport nests them under "versions"; a flat "<name>_version" key is read too
    versions = dict(report.get("versions") or {})
    for name in ("hf_moe", "transformers", "torch"):
        if f"{name}_version" in report:
            versions.setdefault(name, report[f"{name}_version"])
    return versions


def _layers(indices: list[int], num_layers: int) -> str:
    if len(indices) == num_layers:
        return f"all {num_layers}"
    return f"{_index_list(indices)} (of {num_layers})"


def _index_list(indices) -> str:
    return ", ".join(str(i) for i in indices) or "none"


def _result_rows(results: Mapping | None) -> list[tuple[str, str]]:
    return [(_cell(name), _cell(_value(value))) for name, value in (results or {}).items()]


def _value(value) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.4g}"
    return str(value)


def _cell(text: str) -> str:
    # a "|" would end the Markdown table cell
    return str(text).replace("|", "\\|")


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n:,} ({n / size:.1f}{unit})"
    return f"{n:,}"
