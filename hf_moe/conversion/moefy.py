"""moefy: turn a dense GPT-2 or T5 checkpoint into the matching hf_moe Mixture-of-Experts model.

What moefy knows about a family is its declared `FamilyMapping` (`gpt2.py`, `t5.py`; the protocol is in `family.py`)
plus the `moe_part` markers of the MoE model: no module path is written here. Every non-FFN weight is copied exactly
(checked name by name: a dense weight with no place in the MoE model is an error, never silently dropped). Each chosen
layer's FFN becomes E experts by a dense-to-sparse init method (`init_methods.py`); routers start small and random
from the seed (hash routers: the token -> expert table `hash_kind` names, `hash_tables.py`). The MoE model is
allocated without random init and filled layer by layer, so peak memory is the dense model plus the MoE model.

Sources: a model object, a local folder, or a Hub id (`source.resolve_source`: from the local Hub cache without any
network request when it is there, else downloaded if one quick request finds it on the Hub; a missing folder or an
unknown id is named at once, never after a minute of retries).
"""

from __future__ import annotations

import copy
import difflib
import importlib.metadata
import json
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from ..modeling._compat import from_config_without_init
from ..modeling.configuration_moe import HASH_KINDS
from ..modeling.moe_parts import moe_blocks, moe_parts
from ..modeling.registry import ROUTERS
from ..modeling.routing import TopKRouter
from . import gpt2, t5
from .family import FamilyMapping, LayerPlan, router_and_expert_weight_names
from .hash_tables import balanced_hash_table, clustered_hash_table, set_hash_tables, token_frequencies
from .init_methods import (
    INIT_METHODS,
    check_granularity,
    choose_output_scale,
    init_experts,
    scale_expert_outputs,
    shared_experts_from_dense,
    virtual_group_router_weight,
)
from .report import ConversionReport
from .router_init import (
    check_router_init_arguments,
    check_router_takes_rows,
    data_router_rows,
    prepare_calibration,
    set_router_rows,
)
from .shared_blocks import check_shared_block_init, shared_block_start
from .source import looks_like_repo_id, resolve_source

__all__ = ["FAMILIES", "SUPPORTED_MODEL_TYPES", "moefy"]

FAMILIES: dict[str, FamilyMapping] = {
    model_type: family for family in (gpt2.FAMILY, t5.FAMILY) for model_type in family.model_types
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

# MoE config fields that moefy sets from its own named arguments: an override of them would be ambiguous
_SET_BY_ARGUMENT = {
    "num_local_experts": "num_experts",
    "num_experts_per_layer": "num_experts",
    "num_experts_per_tok": "top_k",
    "router_type": "router_type",
    "hash_kind": "hash_kind",
}
# what a saved tokenizer leaves in a folder (`save_pretrained` writes the config; Hub repos may have only the others)
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "spiece.model", "tokenizer.model")
# config fields that only the hash router reads: given with another router they would do nothing
_HASH_FIELDS = ("num_hash_heads", "hash_seed")


def moefy(
    model_or_path: PreTrainedModel | str | Path,
    *,
    num_experts: int | list[int] = 8,
    top_k: int = 2,
    router_type: str = "topk",
    hash_kind: str | None = None,
    hash_corpus=None,
    router_init: str = "random",
    calibration_data=None,
    expert_prompts=None,
    calibration_tokens: int | None = None,
    init: str = "copy",
    noise_scale: float = 0.01,
    drop_ratio: float = 0.5,
    split_partition: str = "random",
    granularity: int | None = None,
    scale_weights: bool | None = None,
    moe_layers: str | list[int] | None = None,
    encoder_moe_layers: str | list[int] | None = None,
    decoder_moe_layers: str | list[int] | None = None,
    shared_block_init: str | int = "mean",
    seed: int = 0,
    progress: bool = False,
    **config_overrides,
) -> PreTrainedModel:
    """Convert a dense model (object, local folder, or Hub id from the local Hub cache) into an MoE model of the
    matching family. Nothing is downloaded: a Hub id that is not cached is a `FileNotFoundError`.

    Args:
        num_experts, top_k, router_type: experts per MoE layer, experts per token, router by registry name.
            A list gives each MoE layer its own count, in module order (a PR-MoE pyramid, `num_experts_per_layer`),
            with init "copy", "noise" or "drop_upcycle", the random router init and no weight scaling.
        hash_kind: router_type="hash" only: how the token -> expert table is built: "random" (the default: seeded by
            `seed`, or the `hash_seed` override), "balanced" (greedy bin packing of the token frequencies of
            `hash_corpus`, counted with the source folder's tokenizer) or "clustered" (k-means of the dense model's
            input embeddings). See `hf_moe.conversion.hash_tables`. With `num_hash_heads=H` (MultiHash), top_k=H.
        hash_corpus: hash_kind="balanced" only: text files (paths) or a `datasets.Dataset` with a "text" column.
        router_init: how learned routers start (`hf_moe.conversion.router_init`): "random" (small random rows from
            `seed`), "kmeans" (rows along the spherical k-means centroids of each layer's dense FFN inputs on
            `calibration_data`) or "hidden_prompts" (rows along the mean FFN input of each expert's prompts). The
            data is tokenized with the source folder's tokenizer.
        calibration_data: router_init="kmeans" only: texts (str), text files (`pathlib.Path`) or a
            `datasets.Dataset` with a "text" column.
        expert_prompts: router_init="hidden_prompts" only: num_experts entries, each a prompt or a list of prompts.
        calibration_tokens: router_init="kmeans" only: how many (non-padding) tokens of calibration_data the dense
            model reads, the first ones in order (default 8192).
        init: dense-to-sparse initialization, one of "copy", "noise", "drop_upcycle", "split", "granular"
            (`hf_moe.conversion.init_methods`). "split" defaults to unit combine weights (with top_k == num_experts
            that is the dense FFN exactly; overriding the weights then warns). "granular" defaults to normalized
            weights and is function-preserving.
        noise_scale: "noise" only: noise std as a fraction of each weight's std.
        drop_ratio: "drop_upcycle" only: fraction of each expert's intermediate neurons re-initialized.
        split_partition: "split" only: "random" or "clustered" partition of the intermediate neurons.
        granularity: "granular" only: G, the shards each dense FFN is cut into (experts of F / G neurons, each shard
            copied num_experts / G times); num_experts and top_k must be multiples of G.
        scale_weights: multiply every expert's output projection and output bias by c = 1 / (K * w * u) so the MoE
            output keeps the dense output's magnitude (w: a selected expert's combine weight at a uniform router, u:
            its share of the dense FFN; `init_methods.expert_output_scale`). True for copies with raw softmax
            weights (normalize_top_k_weights=False: c = E/K, He et al. 2024) or unit weights (c = 1/K); a
            `ValueError` where the weights already sum to 1. None: the method's default ("split": c = E/K, LLaMA-MoE;
            "granular": its exact factor; copies: none); False turns split's factor off.
        moe_layers: layers to convert ('all', 'every_other', 'top:N', 'bottom:N', '0,2' or a list); for T5 the
            default of both stacks.
        encoder_moe_layers, decoder_moe_layers: the same for one of T5's two stacks.
        shared_block_init: with the override share_blocks_across_layers=True (WideNet) only: how the one block of each
            stack starts: "mean" (every shared weight the mean over the dense layers that apply it) or a block index
            j (dense block j's weights); each layer keeps its own LayerNorms (`hf_moe.conversion.shared_blocks`).
        seed: seeds every random choice (noise, re-initialized subsets, partitions, router init).
        progress: show a tqdm bar over layers.
        config_overrides: other MoE config fields (capacity_factor, router_aux_loss_coef, expert_dropout, ...); any
            other name is a `ValueError` listing the allowed ones. Dense fields come from the source model.

    Returns the MoE model; `model.moefy_report` holds the `ConversionReport`.
    """
    if init not in INIT_METHODS:
        raise ValueError(f"init must be one of {tuple(INIT_METHODS)}, got {init!r}")
    pyramid = _check_pyramid_arguments(num_experts, init, router_init, scale_weights, hash_kind)
    if pyramid is not None:
        num_experts = max(pyramid)  # the model-wide bound (the config's num_local_experts)
    hash_kind, hash_corpus = _check_hash_arguments(router_type, hash_kind, hash_corpus, top_k, config_overrides)
    router_data = check_router_init_arguments(
        router_init,
        calibration_data=calibration_data,
        expert_prompts=expert_prompts,
        calibration_tokens=calibration_tokens,
        num_experts=num_experts,
    )
    # everything that can be checked on the config is checked before the (possibly long) weight load
    dense_config, source_class, load_dense, source_name, location = _resolve_source(model_or_path)
    family = _family_for(dense_config.model_type)
    target_class = family.target_classes.get(source_class)
    if target_class is None:
        got = f"{source_name} is a {source_class}" if source_name != source_class else f"got {source_class}"
        raise ValueError(
            f"moefy converts {', '.join(family.target_classes)} for model type {dense_config.model_type!r}; {got}"
        )
    _check_overrides(family, target_class, config_overrides)
    layer_specs = {
        "moe_layers": moe_layers,
        "encoder_moe_layers": encoder_moe_layers,
        "decoder_moe_layers": decoder_moe_layers,
    }
    selected_layers = family.select_moe_layers(dense_config, layer_specs)
    init_options = {
        "noise": {"noise_scale": noise_scale},
        "drop_upcycle": {"drop_ratio": drop_ratio},
        "split": {"partition": split_partition},
        "granular": {"granularity": granularity},
    }.get(init, {})
    _check_recipe_arguments(init, granularity, num_experts, top_k, router_init, config_overrides)

    moe_fields = {"num_local_experts": num_experts, "num_experts_per_tok": top_k, "router_type": router_type}
    if pyramid is not None:
        moe_fields["num_experts_per_layer"] = pyramid
    if hash_kind is not None:
        moe_fields["hash_seed"] = seed  # `seed` seeds every random choice, the random table too
    moe_fields.update(config_overrides)
    moe_fields.update(_recipe_combine_defaults(init, router_type, num_experts, top_k, config_overrides))
    # built once before the weights load only to validate it: a bad value is reported at once, not minutes later
    validated = family.build_config(dense_config, {**selected_layers, **moe_fields})
    check_shared_block_init(shared_block_init, validated, router_init, family)
    output_scale = choose_output_scale(
        init,
        scale_weights,
        combine=_combine_rule(validated),
        num_experts=num_experts,
        top_k=top_k,
        granularity=granularity or 1,
    )
    if hash_kind == "balanced":
        # counted before the weights load: a missing tokenizer or an unreadable corpus is reported at once
        tokenizer = _source_tokenizer(location, source_name)
        counts_V = token_frequencies(tokenizer, hash_corpus, vocab_size=dense_config.vocab_size, progress=progress)
    if router_data is not None:
        # tokenized before the weights load: a router without rows, a missing tokenizer or too little text fail at once
        check_router_takes_rows(family.build_config(dense_config, {**selected_layers, **moe_fields}), router_init)
        why = f"router_init={router_init!r} feeds its text to the dense model"
        calibration = prepare_calibration(
            router_init,
            router_data,
            _source_tokenizer(location, source_name, why=why),
            dense_config,
            num_experts=num_experts,
            calibration_tokens=calibration_tokens,
        )

    dense = load_dense()
    if init == "split":
        # each expert keeps F / E of the dense neurons
        moe_fields.setdefault("moe_intermediate_size", family.dense_intermediate_size(dense) // num_experts)
    elif init == "granular":
        # each expert is one of G shards of F / G neurons
        dense_size = family.dense_intermediate_size(dense)
        check_granularity(num_experts, top_k, granularity, dense_size)
        moe_fields["moe_intermediate_size"] = dense_size // granularity
    config = family.build_config(dense.config, {**selected_layers, **moe_fields})
    routed_scale, shared_share = _shared_experts_mix(family, dense, config)

    moe, plans = _empty_moe(family, target_class, config, dense, selected_layers)
    dense_state = dense.state_dict()
    if config.share_blocks_across_layers:
        # WideNet: the layers that share a weight read one value of it (their mean, or one block's)
        dense_state = shared_block_start(dense_state, moe, plans, shared_block_init)
    _copy_shared_weights(dense_state, moe, plans)

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for plan in _progress(plans, progress):
            ffn = plan.kind.dense_ffn(dense_state, plan.dense_names)  # float32 on the CPU: seeded, device-independent
            # the layer's own count (a pyramid's layers differ)
            layer_experts = _one_part(plan, "experts").num_experts
            experts_tensors = init_experts(ffn, layer_experts, init, generator, **init_options)
            scale_expert_outputs(experts_tensors, ffn, output_scale * routed_scale)
            _write_experts(family, plan, plan.kind.expert_parameters(experts_tensors))
            if shared_share:
                _write_shared_experts(family, plan, ffn, config, shared_share)
            # small and random, never all zero: with identical experts, equal logits would tie every routing decision
            router = _one_part(plan, "router")
            router.init_weights(config.router_init_std, generator=generator)
            if init == "granular":
                weight_ED = router.weight
                weight_ED.copy_(
                    virtual_group_router_weight(
                        num_experts, granularity, weight_ED.shape[1], config.router_init_std, generator
                    )
                )
        if hash_kind == "balanced":
            set_hash_tables(
                moe, balanced_hash_table(counts_V, num_experts, config.num_hash_heads, config.hash_seed), "balanced"
            )
        elif hash_kind == "clustered":
            embeddings_VD = dense.get_input_embeddings().weight
            set_hash_tables(
                moe,
                clustered_hash_table(embeddings_VD, num_experts, config.num_hash_heads, config.hash_seed),
                "clustered",
            )
    if router_data is not None:
        # after the random init above, which also zeroes a router's other parameters and keeps the seeded draws of
        # the experts the same whatever router_init is
        rows = data_router_rows(
            dense,
            family,
            selected_layers,
            calibration,
            num_experts=num_experts,
            router_init_std=config.router_init_std,
            seed=seed,
            progress=progress,
        )
        set_router_rows(moe, rows)
    if getattr(dense, "generation_config", None) is not None:
        moe.generation_config = copy.deepcopy(dense.generation_config)
    moe.to(dense.device)
    moe.train(dense.training)

    moe.moefy_report = ConversionReport(
        source_model=source_name,
        source_model_type=dense.config.model_type,
        source_class=type(dense).__name__,
        target_class=type(moe).__name__,
        init_method=init,
        # the scale is part of how the experts were made: recorded (and shown on the model card) where it is not 1
        init_options={
            **init_options,
            **({"expert_output_scale": output_scale} if output_scale != 1.0 else {}),
            **({"shared_experts_share": shared_share} if shared_share else {}),
            **({"shared_block_init": shared_block_init} if config.share_blocks_across_layers else {}),
        },
        seed=seed,
        num_experts=pyramid if pyramid is not None else num_experts,
        top_k=top_k,
        router_type=router_type,
        router_init=router_init,
        moe_layers=family.report_layers(selected_layers),
        parameters=config.parameter_counts(),
        dense_parameters=dense.num_parameters(),
        versions={
            "hf_moe": importlib.metadata.version("hf-moe"),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    )
    return moe


def _empty_moe(
    family: FamilyMapping,
    target_class: type,
    config,
    dense: PreTrainedModel,
    selected_layers: dict,
    tool: str = "moefy",
) -> tuple[PreTrainedModel, list[LayerPlan]]:
    """The MoE model allocated without random init (every weight is written by the caller) and its layer plans."""
    moe = from_config_without_init(target_class, config, dtype=dense.dtype)
    moe.tie_weights()  # post_init's tying is skipped with the init under no_init_weights
    plans = family.layer_plans(dense, moe, selected_layers)
    unplanned = [name for name, block in moe_blocks(moe) if all(block is not plan.block for plan in plans)]
    if unplanned:
        # their experts would keep the uninitialized memory of `torch.empty`
        raise RuntimeError(
            f"{tool}: the {family.name} mapping finds no dense FFN for the MoE blocks {unplanned} "
            f"(is its block template {family.block!r} right?)"
        )
    return moe, plans


def _resolve_source(
    model_or_path, tool: str = "moefy"
) -> tuple[PretrainedConfig, str, Callable[[], PreTrainedModel], str, str | None]:
    """(dense config, source class name, loader of the dense model, source name, the local folder it is in, if any),
    without loading any weights. `tool` names the caller in error messages (moefy, merge_experts)."""
    if isinstance(model_or_path, PreTrainedModel):
        name = getattr(model_or_path, "name_or_path", "") or type(model_or_path).__name__
        folder = name if Path(name).is_dir() else None  # a model loaded from a folder remembers it
        return model_or_path.config, type(model_or_path).__name__, lambda: model_or_path, name, folder
    if not isinstance(model_or_path, (str, Path)):
        raise TypeError(f"{tool} takes a transformers model, a folder or a Hub id; got {type(model_or_path).__name__}")
    source = str(model_or_path)
    path = Path(source).expanduser()
    location = source  # the folder transformers loads from (for a Hub id: its snapshot in the local Hub cache)
    if path.is_dir():
        location = str(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ValueError(
                f"{source} has no config.json; {tool} converts saved transformers models of model types "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}"
            )
    elif path.exists():
        raise FileNotFoundError(f"{tool} takes a model folder; {source} is a file, not a folder")
    elif isinstance(model_or_path, Path) or not looks_like_repo_id(source):
        raise FileNotFoundError(f"{source} not found: not a folder (and not a Hub id)")
    else:
        # a snapshot folder of the local Hub cache (loaded as a folder: no network at all), or an id the Hub has
        location = resolve_source(source, option=f"{tool} source")
        config_file = Path(location) / "config.json"
    is_local = Path(location).is_dir()
    if is_local:
        # the model type first, from the file itself: an unsupported or unknown type gets moefy's message, not
        # AutoConfig's (which needs the type registered)
        _family_for(json.loads(config_file.read_text()).get("model_type"), tool)
    config = AutoConfig.from_pretrained(location, local_files_only=is_local)
    family = _family_for(config.model_type, tool)
    source_class = (getattr(config, "architectures", None) or [family.default_source_class])[0]

    def load() -> PreTrainedModel:
        try:
            return getattr(transformers, source_class).from_pretrained(location, local_files_only=is_local)
        except OSError as error:
            if not is_local or path.is_dir():
                raise
            raise FileNotFoundError(
                f"{source}: the config is in the local Hub cache ({location}) but not all of the weights; run "
                f"`hf download {source}`"
            ) from error

    return config, source_class, load, source, location if is_local else None


def _check_hash_arguments(router_type: str, hash_kind, hash_corpus, top_k: int, overrides: dict) -> tuple:
    """(hash_kind, hash_corpus as a list of Paths or a Dataset); None, None for another router."""
    if router_type != "hash":
        given = [name for name, value in (("hash_kind", hash_kind), ("hash_corpus", hash_corpus)) if value is not None]
        given += [name for name in _HASH_FIELDS if name in overrides]
        if given:
            raise ValueError(
                f"{', '.join(given)} apply only with router_type='hash' (hash layers), got router_type={router_type!r}"
            )
        return None, None
    hash_kind = "random" if hash_kind is None else hash_kind
    if hash_kind not in HASH_KINDS:
        raise ValueError(f"hash_kind must be one of {HASH_KINDS}, got {hash_kind!r}")
    num_heads = overrides.get("num_hash_heads", 1)
    if top_k != num_heads:
        raise ValueError(
            f"router_type='hash' sends each token to num_hash_heads={num_heads} experts, one per head: pass "
            f"top_k={num_heads} (got top_k={top_k})"
        )
    if hash_kind != "balanced":
        if hash_corpus is not None:
            raise ValueError(f"hash_corpus applies only with hash_kind='balanced', got hash_kind={hash_kind!r}")
        return hash_kind, None
    if hash_corpus is None:
        raise ValueError(
            "hash_kind='balanced' balances the experts' loads on a corpus: pass hash_corpus (text files, or a "
            "datasets.Dataset with a 'text' column)"
        )
    if type(hash_corpus).__name__ in ("Dataset", "IterableDataset"):
        return hash_kind, hash_corpus
    files = [hash_corpus] if isinstance(hash_corpus, (str, Path)) else hash_corpus
    if not isinstance(files, (list, tuple)) or not files or not all(isinstance(f, (str, Path)) for f in files):
        raise TypeError(
            f"hash_corpus must be text files (a path or a list of paths) or a datasets.Dataset, got {hash_corpus!r}"
        )
    missing = [str(f) for f in files if not Path(f).expanduser().is_file()]
    if missing:
        raise FileNotFoundError(f"hash_corpus files not found: {', '.join(missing)}")
    return hash_kind, [Path(f).expanduser() for f in files]


def _source_tokenizer(location: str | None, source_name: str, why: str = "hash_kind='balanced' counts the corpus"):
    """The tokenizer saved with the dense model (a balanced hash counts the tokens the model will see; data-driven
    router inits feed text to it). `why` starts the error messages: who needs the tokenizer, for what."""
    from transformers import AutoTokenizer

    if location is None:
        raise ValueError(
            f"{why} with the source's tokenizer, but {source_name} is a model object that was not loaded from a "
            "folder; pass the model's folder (with its tokenizer files) instead"
        )
    # transformers 5 makes an empty tokenizer of the config's type from a folder without tokenizer files; that would
    # count every text as unknown tokens, so the files are looked for first
    if not any((Path(location) / name).is_file() for name in _TOKENIZER_FILES):
        raise ValueError(
            f"{why} with the source's tokenizer, but {source_name} has no tokenizer files "
            f"({', '.join(_TOKENIZER_FILES)}); save one in the folder (tokenizer.save_pretrained)"
        )
    try:
        return AutoTokenizer.from_pretrained(location, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        cause = " ".join(str(error).split())[:300] or type(error).__name__
        raise ValueError(
            f"{why} with the source's tokenizer, but {source_name} has no tokenizer that loads ({cause}); save one "
            "in the folder (tokenizer.save_pretrained)"
        ) from error


def _family_for(model_type: str | None, tool: str = "moefy") -> FamilyMapping:
    if model_type not in FAMILIES:
        already_moe = isinstance(model_type, str) and model_type.endswith("_moe")
        hint = " (it is already an MoE model)" if already_moe else ""
        raise ValueError(f"{tool} supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; got {model_type!r}{hint}")
    return FAMILIES[model_type]


def _check_overrides(family: FamilyMapping, target_class: type, overrides: dict, tool: str = "moefy") -> None:
    """Only MoE config fields of the family, and none that moefy sets from its own arguments: a config stores any
    keyword it is given, so a typo would otherwise be kept and do nothing."""
    aliases = getattr(target_class.config_class, "attribute_map", {})
    for name in overrides:
        field = aliases.get(name, name)
        argument = _SET_BY_ARGUMENT.get(field) or (field if field in family.layer_fields else None)
        if argument is not None:
            raise ValueError(
                f"{tool} sets {field} from its own {argument}= argument; pass {argument}={overrides[name]!r} "
                f"instead of {name}="
            )
    allowed = [n for n in family.moe_config_fields if n not in _SET_BY_ARGUMENT and n not in family.layer_fields]
    unknown = [name for name in overrides if name not in allowed]
    if unknown:
        described = []
        for name in unknown:
            hint = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
            described.append(f"{name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        raise ValueError(
            f"{tool} got {', '.join(described)}: not an MoE config field of {family.name} models (dense fields come "
            f"from the source model). Besides {tool}'s own arguments it takes: {', '.join(allowed)}"
        )


def _one_part(plan: LayerPlan, kind: str):
    parts = moe_parts(plan.block, kind)
    if len(parts) != 1:
        raise RuntimeError(f"moefy: the MoE block {plan.label} has {len(parts)} parts marked {kind!r}, expected one")
    return parts[0][1]


def _write_experts(family: FamilyMapping, plan: LayerPlan, tensors: dict[str, torch.Tensor]) -> None:
    parameters = dict(_one_part(plan, "experts").named_parameters())
    if set(parameters) != set(tensors):
        # an experts parameter the mapping does not fill would keep the uninitialized memory of `torch.empty`
        raise RuntimeError(
            f"moefy: the {family.name} mapping ({plan.kind.name}) makes {sorted(tensors)} for {plan.label}.experts, "
            f"which holds {sorted(parameters)}"
        )
    for name, tensor in tensors.items():
        if parameters[name].shape != tensor.shape:
            raise RuntimeError(
                f"moefy: {plan.label}.experts.{name} is {tuple(parameters[name].shape)}, the {family.name} mapping "
                f"makes {tuple(tensor.shape)} (a missing or wrong `transpose` in the mapping?)"
            )
        parameters[name].copy_(tensor)


def _check_pyramid_arguments(num_experts, init: str, router_init: str, scale_weights, hash_kind) -> list[int] | None:
    """A per-layer expert list (PR-MoE) as a list of ints, or None for one count; `ValueError` for the recipes that
    make every layer alike (their checks and tables take one expert count)."""
    if not isinstance(num_experts, (list, tuple)):
        return None
    if not num_experts or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in num_experts):
        raise ValueError(f"num_experts must be an int or a list of ints >= 1 (one per MoE layer), got {num_experts!r}")
    unsupported = {
        "init": (init, ("copy", "noise", "drop_upcycle")),
        "router_init": (router_init, ("random",)),
        "scale_weights": (scale_weights, (None, False)),
        "hash_kind": (hash_kind, (None, "random")),
    }
    for name, (value, allowed) in unsupported.items():
        if value not in allowed:
            raise ValueError(
                f"a per-layer num_experts list (PR-MoE) works with {name} in {allowed}, got {name}={value!r}: those "
                "recipes build every layer with one expert count"
            )
    return list(num_experts)


def _shared_experts_mix(family: FamilyMapping, dense: PreTrainedModel, config) -> tuple[float, float]:
    """(the scale of the routed experts' outputs, the share of each MoE layer's output the shared experts give) at
    step 0, with every shared expert a copy of the dense FFN; (1, 0) without shared experts.

    N shared experts: the copies give N / (N + 1) and the routed experts, scaled, 1 / (N + 1). Residual-MoE: its
    coefficient starts at (1/2, 1/2), so the dense MLP gives 1/2 and the routed expert, unscaled, the other 1/2. Either
    way the layer's output is

        share * dense(x) + (1 - share) * routed(x)

    where routed(x) is what the same conversion without them gives: wherever that is the dense FFN (copies with
    combine weights summing to 1, split with top_k == num_experts, granular), so is this. Raises `ValueError` when
    the shared experts are not of the dense FFN's width (copies need it)."""
    num_shared = config.num_shared_experts or int(config.residual_moe)
    if not num_shared:
        return 1.0, 0.0
    dense_width = family.dense_intermediate_size(dense)
    shared_width = config.shared_expert_intermediate_size or config.expert_intermediate_size
    if shared_width != dense_width:
        what = "Residual-MoE's dense MLP" if config.residual_moe else "each shared expert"
        raise ValueError(
            f"moefy starts {what} as a copy of the dense FFN ({dense_width} neurons), but it would have "
            f"{shared_width} (shared_expert_intermediate_size, else the routed experts' width); pass "
            f"shared_expert_intermediate_size={dense_width}"
        )
    if config.residual_moe:
        return 1.0, 0.5
    return 1.0 / (num_shared + 1), num_shared / (num_shared + 1)


def _write_shared_experts(family: FamilyMapping, plan: LayerPlan, ffn, config, shared_share: float) -> None:
    """Fill the layer's shared experts with copies of the dense FFN giving `shared_share` of the output at step 0
    (gate and Residual-MoE coefficient at 0)."""
    shared = plan.block.shared_experts
    # a gate or Residual-MoE's coefficient starts at 1/2 for every token: the copies' output is doubled to make up
    # for it (the coefficient also halves the routed output, whose scale is therefore left alone)
    starts_at = 0.5 if shared.gate is not None or config.residual_moe else 1.0
    output_scale = shared_share / (shared.num_shared_experts * starts_at)
    tensors = shared_experts_from_dense(ffn, shared.num_shared_experts, output_scale)
    with_expert_dim = plan.kind.expert_parameters({name: tensor.unsqueeze(0) for name, tensor in tensors.items()})
    parameters = dict(shared.named_parameters())
    if shared.gate is not None:
        parameters.pop("gate.weight").zero_()
    if set(parameters) != set(with_expert_dim):
        raise RuntimeError(
            f"moefy: the {family.name} mapping makes {sorted(with_expert_dim)} for {plan.label}.shared_experts, which "
            f"holds {sorted(parameters)}"
        )
    for name, tensor in with_expert_dim.items():
        parameters[name].copy_(tensor.squeeze(0))
    if plan.block.residual_coefficient is not None:
        plan.block.residual_coefficient.weight.zero_()
        plan.block.residual_coefficient.bias.zero_()


def _copy_shared_weights(dense_state: dict, moe: PreTrainedModel, plans: list[LayerPlan]) -> None:
    """Copy every dense weight that keeps its name; fail loudly on any weight that would be lost."""
    moe_state = moe.state_dict()
    consumed = {name for plan in plans for name in plan.dense_names.values()}
    # routers and experts are written by the router init and the init method, whatever their tensors are called; the
    # shared experts and Residual-MoE's coefficient by `_write_shared_experts`
    initialized = router_and_expert_weight_names(moe) | {
        f"{name}.{part}.{key}" for name, block in moe_blocks(moe) for part in ("shared_experts", "residual_coefficient")
        if getattr(block, part, None) is not None for key in getattr(block, part).state_dict()
    }  # fmt: skip
    with torch.no_grad():
        for name, target in moe_state.items():
            if name in initialized:
                continue
            if name not in dense_state or dense_state[name].shape != target.shape:
                raise RuntimeError(f"moefy: the MoE weight {name} {tuple(target.shape)} has no dense counterpart")
            target.copy_(dense_state[name])
    lost = set(dense_state) - set(moe_state) - consumed
    if lost:
        raise RuntimeError(f"moefy: these dense weights have no place in the MoE model: {sorted(lost)}")


def _progress(plans: list[LayerPlan], enabled: bool):
    if not enabled:
        return plans
    from tqdm.auto import tqdm

    return tqdm(plans, desc="moefy", unit="layer")


def _check_recipe_arguments(
    init: str, granularity, num_experts: int, top_k: int, router_init: str, overrides: dict
) -> None:
    """granularity belongs to "granular", which needs it, the random router init and its own expert width."""
    if init != "granular":
        if granularity is not None:
            raise ValueError(f"granularity applies only with init='granular', got init={init!r}")
        return
    if granularity is None:
        raise ValueError(
            "init='granular' needs granularity=G: the shards each dense FFN is cut into (a divisor of num_experts "
            "and of top_k)"
        )
    check_granularity(num_experts, top_k, granularity)
    if router_init != "random":
        raise ValueError(
            f"init='granular' gives the experts of each virtual group one shared router row (that is what makes it "
            f"function-preserving); router_init={router_init!r} would set rows per expert: use router_init='random'"
        )
    if "moe_intermediate_size" in overrides:
        raise ValueError(
            "init='granular' sets moe_intermediate_size to the dense intermediate size / granularity; do not pass it"
        )


def _recipe_combine_defaults(init: str, router_type: str, num_experts: int, top_k: int, overrides: dict) -> dict:
    """The combine-weight config fields an init method needs and the user did not set: "split" unit weights (with
    top_k == num_experts the parts then sum to the dense FFN), "granular" normalized weights (exact with its scale)."""
    entry = ROUTERS.get(router_type)
    if entry is None or not issubclass(entry.router_class, TopKRouter) or init not in ("split", "granular"):
        return {}  # an unknown router_type gets the config's own error; other routers refuse these fields
    combine_fields = ("unit_combine_weights", "normalize_top_k_weights")
    given = {name: overrides[name] for name in combine_fields if name in overrides}
    if not given:
        return {"unit_combine_weights": True} if init == "split" else {"normalize_top_k_weights": True}
    if init == "split" and top_k == num_experts and not given.get("unit_combine_weights"):
        chosen = ", ".join(f"{name}={value!r}" for name, value in given.items())
        warnings.warn(
            f"moefy: init='split' with top_k == num_experts is the dense FFN only with unit combine weights; with "
            f"{chosen} the MoE model is no longer function-preserving",
            UserWarning,
            stacklevel=3,
        )
    return {}


def _combine_rule(config) -> str | None:
    """How the config's router weighs its selected experts (`init_methods.COMBINE_RULES`); None for a router that is
    not token-choice softmax top-k."""
    if not issubclass(ROUTERS.entry(config.router_type).router_class, TopKRouter):
        return None
    if config.unit_combine_weights:
        return "unit"
    return "normalized" if config.normalizes_top_k_weights else "softmax"
