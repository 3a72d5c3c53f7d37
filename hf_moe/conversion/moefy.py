"""moefy: turn a dense GPT-2 or T5 checkpoint into the matching hf_moe Mixture-of-Experts model.

Every non-FFN weight is copied exactly (checked name by name: a dense weight with no place in the MoE model is an
error, never silently dropped). Each chosen layer's FFN becomes E experts by a dense-to-sparse init method
(`init_methods.py`); routers start small and random from the seed. The MoE model is allocated without random init and
filled layer by layer, so peak memory is the dense model plus the MoE model.
"""

from __future__ import annotations

import copy
import importlib.metadata
from pathlib import Path
from types import ModuleType

import torch
import transformers
from transformers import AutoConfig, PreTrainedModel

from ..modeling._compat import from_config_without_init
from . import gpt2, t5
from .init_methods import INIT_METHODS, init_experts
from .report import ConversionReport

__all__ = ["SUPPORTED_MODEL_TYPES", "moefy"]

FAMILIES: dict[str, ModuleType] = {model_type: family for family in (gpt2, t5) for model_type in family.MODEL_TYPES}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)


def moefy(
    model_or_path: PreTrainedModel | str | Path,
    *,
    num_experts: int = 8,
    top_k: int = 2,
    router_type: str = "topk",
    init: str = "copy",
    noise_scale: float = 0.01,
    drop_ratio: float = 0.5,
    split_partition: str = "random",
    moe_layers: str | list[int] | None = None,
    encoder_moe_layers: str | list[int] | None = None,
    decoder_moe_layers: str | list[int] | None = None,
    seed: int = 0,
    progress: bool = False,
    **config_overrides,
) -> PreTrainedModel:
    """Convert a dense model (object, local folder or Hub id) into an MoE model of the matching family.

    Args:
        num_experts, top_k, router_type: experts per MoE layer, experts per token, router by registry name.
        init: dense-to-sparse initialization, one of "copy", "noise", "drop_upcycle", "split".
        noise_scale: "noise" only: noise std as a fraction of each weight's std.
        drop_ratio: "drop_upcycle" only: fraction of each expert's intermediate neurons re-initialized.
        split_partition: "split" only: "random" or "clustered" partition of the intermediate neurons.
        moe_layers: GPT-2 layers to convert ('all', 'every_other', 'top:N', 'bottom:N', '0,2' or a list).
        encoder_moe_layers, decoder_moe_layers: the same for T5's two stacks.
        seed: seeds every random choice (noise, re-initialized subsets, partitions, router init).
        progress: show a tqdm bar over layers.
        config_overrides: any other MoE config field (capacity_factor, router_aux_loss_coef, expert_dropout, ...).

    Returns the MoE model; `model.moefy_report` holds the `ConversionReport`.
    """
    if init not in INIT_METHODS:
        raise ValueError(f"init must be one of {tuple(INIT_METHODS)}, got {init!r}")
    dense, source_name = _load_dense(model_or_path)
    family = _family_for(dense.config.model_type)
    target_class = family.TARGET_CLASSES.get(type(dense).__name__)
    if target_class is None:
        raise ValueError(
            f"moefy converts {', '.join(family.TARGET_CLASSES)} for model type {dense.config.model_type!r}; "
            f"got {type(dense).__name__}"
        )
    init_options = {
        "noise": {"noise_scale": noise_scale},
        "drop_upcycle": {"drop_ratio": drop_ratio},
        "split": {"partition": split_partition},
    }.get(init, {})
    moe_fields = {"num_local_experts": num_experts, "num_experts_per_tok": top_k, "router_type": router_type}
    moe_fields.update(config_overrides)
    if init == "split":
        # each expert keeps F / E of the dense neurons
        moe_fields.setdefault("moe_intermediate_size", family.dense_intermediate_size(dense.config) // num_experts)
    layer_specs = {
        "moe_layers": moe_layers,
        "encoder_moe_layers": encoder_moe_layers,
        "decoder_moe_layers": decoder_moe_layers,
    }
    config = family.moe_config(dense.config, moe_fields, layer_specs)

    moe = from_config_without_init(target_class, config, dtype=dense.dtype)  # every weight is written below
    moe.tie_weights()  # post_init's tying is skipped with the init under no_init_weights
    pairs = list(family.layer_pairs(dense, moe, config))
    _copy_shared_weights(dense, moe, dense_ffn_modules=[ffn_module for _, ffn_module, _, _ in pairs])

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _label, _, ffn, block in _progress(pairs, progress):
            # initialized on the CPU (seeded, device-independent), then written to the experts' device
            ffn.tensors = {name: t.detach().to("cpu", torch.float32) for name, t in ffn.tensors.items()}
            experts = family.expert_parameters(init_experts(ffn, num_experts, init, generator, **init_options))
            for name, tensor in experts.items():
                getattr(block.experts, name).copy_(tensor)
            # small and random, never all zero: with identical experts, equal logits would tie every routing decision
            block.router.init_weights(config.router_init_std, generator=generator)
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
        init_options=init_options,
        seed=seed,
        num_experts=num_experts,
        top_k=top_k,
        router_type=router_type,
        moe_layers=family.moe_layers_of(config),
        parameters=config.parameter_counts(),
        dense_parameters=dense.num_parameters(),
        versions={
            "hf_moe": importlib.metadata.version("hf-moe"),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    )
    return moe


def _load_dense(model_or_path) -> tuple[PreTrainedModel, str]:
    if isinstance(model_or_path, PreTrainedModel):
        return model_or_path, getattr(model_or_path, "name_or_path", "") or type(model_or_path).__name__
    if not isinstance(model_or_path, (str, Path)):
        raise TypeError(f"moefy takes a transformers model, a folder or a Hub id; got {type(model_or_path).__name__}")
    source = str(model_or_path)
    config = AutoConfig.from_pretrained(source)
    family = _family_for(config.model_type)
    architecture = (getattr(config, "architectures", None) or [None])[0]
    if architecture is None:
        model_class = family.DEFAULT_SOURCE_CLASS
    elif architecture in family.TARGET_CLASSES:
        model_class = getattr(transformers, architecture)
    else:
        raise ValueError(
            f"moefy converts {', '.join(family.TARGET_CLASSES)} for model type {config.model_type!r}; "
            f"{source} is a {architecture}"
        )
    return model_class.from_pretrained(source), source


def _family_for(model_type: str) -> ModuleType:
    if model_type not in FAMILIES:
        already_moe = model_type.endswith("_moe")
        hint = " (it is already an MoE model)" if already_moe else ""
        raise ValueError(f"moefy supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; got {model_type!r}{hint}")
    return FAMILIES[model_type]


def _copy_shared_weights(dense: PreTrainedModel, moe: PreTrainedModel, dense_ffn_modules: list) -> None:
    """Copy every dense weight that keeps its name; fail loudly on any weight that would be lost."""
    dense_state, moe_state = dense.state_dict(), moe.state_dict()
    converted_ids = {id(p) for module in dense_ffn_modules for p in module.parameters()}
    converted = {name for name, p in dense.named_parameters() if id(p) in converted_ids}
    with torch.no_grad():
        for name, target in moe_state.items():
            if ".experts." in name or ".router." in name:
                continue  # written by the init method / router init
            if name not in dense_state or dense_state[name].shape != target.shape:
                raise RuntimeError(f"moefy: the MoE weight {name} {tuple(target.shape)} has no dense counterpart")
            target.copy_(dense_state[name])
    lost = set(dense_state) - set(moe_state) - converted
    if lost:
        raise RuntimeError(f"moefy: these dense weights have no place in the MoE model: {sorted(lost)}")


def _progress(pairs: list, enabled: bool):
    if not enabled:
        return pairs
    from tqdm.auto import tqdm

    return tqdm(pairs, desc="moefy", unit="layer")
