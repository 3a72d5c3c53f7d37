"""`hf-moe inspect PATH`: what an MoE folder is (from its config), and whether its weights files can be loaded.

The weights check reads safetensors headers only, never tensor data, so it takes milliseconds for any model size: each
file's header must parse and cover the file exactly (a truncated or overwritten file fails here), and the tensors must
be the ones the config implies, with their shapes (the model is built on the meta device to know them). What headers
cannot show, flipped bits inside tensor data, goes unnoticed: safetensors stores no checksums.

The one tensor data read: a model with aux-loss-free balancing (`router_bias_update_rate > 0`) gets a summary of each
router's `expert_bias` (E numbers per layer, read by name), so that one can see whether training moved it.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# weights transformers still loads but whose contents cannot be checked without unpickling them
OTHER_WEIGHTS_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="describe an MoE model folder and check its weights",
        description="Describe an hf_moe model folder (or Hub id) from its config, and check its safetensors weights: "
        "every header readable and complete, every tensor the config implies present with its shape (headers only; "
        "no tensor data is read). A folder that fails the check is an error (exit code 2). A model with aux-loss-free "
        "balancing also gets min / max / norm of each router's saved expert bias.",
    )
    parser.add_argument("path", metavar="PATH", help="model folder or Hub id")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(run=run)


def describe(path: str) -> dict:
    """Family, MoE layers, experts per layer, routing, capacity, parameter counts and the weights check of the model at
    `path` (a folder, or a Hub id: its weights are then checked only if they are in the local Hub cache)."""
    from transformers import AutoConfig

    from ..conversion.report import REPORT_FILENAME
    from ..conversion.source import resolve_source
    from ..modeling.configuration_moe import MoeConfigFields
    from ..modeling.registry import BALANCE_LOSSES, ROUTERS

    source = resolve_source(path, option="PATH")
    config = AutoConfig.from_pretrained(source)
    if not isinstance(config, MoeConfigFields):
        raise ValueError(
            f"{path} is a {config.model_type!r} model, not an hf_moe MoE model (`hf-moe moefy` converts GPT-2 and T5)"
        )
    if hasattr(config, "moe_layer_indices"):
        moe_layers = {"layers": config.moe_layer_indices}
    else:
        moe_layers = {"encoder": config.encoder_moe_layer_indices, "decoder": config.decoder_moe_layer_indices}
    folder = Path(source)
    if folder.is_dir():
        weights = check_weights(folder, config, option="PATH")
    else:
        weights = {"checked": False, "why": "a Hub model that is not downloaded"}
    summary = {
        "model_type": config.model_type,
        "architectures": getattr(config, "architectures", None),
        "moe_layers": moe_layers,
        # a PR-MoE pyramid: one count per MoE layer, in module order
        "experts_per_layer": config.num_local_experts
        if config.num_experts_per_layer is None
        else list(config.num_experts_per_layer),
        # as the router counts them (expert choice: its capacity factor, on average)
        "experts_per_token": config.experts_per_token if config.router_type in ROUTERS else config.num_experts_per_tok,
        "router_type": config.router_type,
        "router_label": _label(ROUTERS, config.router_type),
        "router_settings": ROUTERS[config.router_type].router_class.settings(config)
        if config.router_type in ROUTERS
        else {},
        "combine_weights": "unit"
        if config.unit_combine_weights
        else ("normalized" if config.normalizes_top_k_weights else "probability"),
        # expert_capacity (fixed slots, training and evaluation) replaces the factors when set
        "expert_capacity": config.expert_capacity,
        "capacity_factor": "dropless" if config.capacity_factor is None else config.capacity_factor,
        "eval_capacity_factor": "dropless" if config.eval_capacity_factor is None else config.eval_capacity_factor,
        "min_capacity": config.min_capacity,
        "capacity_scope": config.capacity_scope,
        "drop_policy": config.drop_policy,
        "aux_loss": {
            "type": config.aux_loss_type,
            "label": _label(BALANCE_LOSSES, config.aux_loss_type),
            "coef": config.aux_loss_coef if config.router_type in ROUTERS else config.router_aux_loss_coef,
            "scope": config.aux_loss_scope,
        },
        "shared_experts": {
            "count": config.num_shared_experts,
            "intermediate_size": config.shared_experts_intermediate_size,  # all of a layer's together
            "gate": config.shared_expert_gate,
        },
        "residual_moe": config.residual_moe,
        # WideNet: every layer of a stack applies one block's weights
        "shared_blocks": {
            "across_layers": config.share_blocks_across_layers,
            "per_layer_router": config.per_layer_router,
        },
        "router_bias_update_rate": config.router_bias_update_rate,
        "z_loss_coef": config.router_z_loss_coef,
        "expert_dropout": config.expert_dropout,
        "parameters": config.parameter_counts(),
        "weights": weights,
    }
    if config.router_bias_update_rate > 0:
        summary["expert_bias"] = (
            {"read": True, "layers": expert_bias_summary(folder, weights["files"])}
            if weights["checked"]
            else {"read": False, "why": weights["why"]}
        )
    report = folder / REPORT_FILENAME
    if report.is_file():
        made = json.loads(report.read_text())
        summary["made_by_moefy"] = {key: made.get(key) for key in ("source_model", "init_method", "seed")}
    return summary


def check_weights(folder: Path, config=None, *, option: str = "PATH") -> dict:
    """Check the safetensors weights of `folder` from their headers (see the module docstring); with `config`, also
    that they hold the tensors its architecture implies. Returns what was checked; raises ValueError or
    FileNotFoundError naming the file and what is wrong. Folders with only PyTorch pickles are reported unchecked."""
    from safetensors import SafetensorError, safe_open

    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{option} {index} is not a safetensors index (JSON with a 'weight_map')") from None
    elif (folder / SAFETENSORS_FILE).is_file():
        names = [SAFETENSORS_FILE]
    else:
        others = [name for name in OTHER_WEIGHTS_FILES if (folder / name).is_file()]
        if others:
            return {"checked": False, "files": others, "why": "PyTorch pickle weights; only safetensors are checked"}
        raise FileNotFoundError(
            f"{option} {folder} has no weights: expected {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}"
        )

    shapes: dict[str, tuple[int, ...]] = {}
    for name in names:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{option} {path} is listed in {SAFETENSORS_INDEX} but missing")
        try:
            # framework "numpy": opening reads the header only; no tensor is materialized and torch is not needed
            with safe_open(path, framework="numpy") as weights:
                for key in weights.keys():  # noqa: SIM118 - safe_open objects are not iterable
                    shapes[key] = tuple(weights.get_slice(key).get_shape())
        except SafetensorError as error:
            raise ValueError(
                f"{option} {path} is not a readable safetensors file ({error}); save or download it again"
            ) from None
    checked = {"checked": True, "files": names, "tensors": len(shapes)}
    expected = _expected_tensors(config) if config is not None else None
    if expected is None:
        return checked
    prefix = expected.pop("__prefix__")
    # compared without the base model prefix, reported with the names as written
    found = {_strip(key, prefix): (key, shape) for key, shape in shapes.items()}
    missing, wrong_shape = [], []
    for tied_names, (name, shape) in expected.items():
        present = [found[n] for n in tied_names if n in found]
        if not present:
            missing.append(name)
        elif present[0][1] != shape:
            wrong_shape.append(f"{present[0][0]} is {list(present[0][1])}, the config implies {list(shape)}")
    where = f"{option} {folder}" if len(names) > 1 else f"{option} {folder / names[0]}"
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        noun = "tensor" if len(missing) == 1 else "tensors"
        raise ValueError(f"{where} lacks {len(missing)} {noun} that config.json implies: {shown}")
    if wrong_shape:
        raise ValueError(f"{where} does not match config.json: {wrong_shape[0]}")
    known = {n for tied_names in expected for n in tied_names}
    # extra tensors load with a warning (old GPT-2 checkpoints carry attention-mask buffers); reported, not an error
    checked["unexpected"] = sorted(found[n][0] for n in set(found) - known)
    return checked


def expert_bias_summary(folder: Path, files: list[str]) -> dict[str, dict[str, float]]:
    """Router (its tensor name without `.expert_bias`) -> min, max and L2 norm of its saved expert bias, routers in
    model order; `files` are the safetensors files `check_weights` found readable."""
    import numpy as np
    from safetensors import safe_open

    summary = {}
    for name in files:
        with safe_open(folder / name, framework="numpy") as weights:
            for key in weights.keys():  # noqa: SIM118 - safe_open objects are not iterable
                if key.endswith(".expert_bias"):
                    bias_E = weights.get_tensor(key).astype(np.float64)
                    summary[key.removesuffix(".expert_bias")] = {
                        "min": float(bias_E.min()),
                        "max": float(bias_E.max()),
                        "norm": float(np.linalg.norm(bias_E)),
                    }
    return dict(sorted(summary.items(), key=lambda item: _natural_key(item[0])))


def _natural_key(name: str) -> list:
    # safetensors lists keys alphabetically ("h.10" before "h.2"); layers read better in order
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _expected_tensors(config) -> dict | None:
    """{names sharing one tensor, without the base model prefix: (first name as the model has it, shape)} for the
    model `config.architectures` names, built on the meta device (no memory, no init), plus "__prefix__": the base
    model prefix that checkpoints may omit. None when the config names no architecture known here."""
    import torch
    import transformers

    import hf_moe

    from ..modeling._compat import from_config_without_init

    architecture = (getattr(config, "architectures", None) or [None])[0]
    if architecture is None:
        return None
    model_class = getattr(hf_moe, architecture, None) or getattr(transformers, architecture, None)
    if model_class is None:
        return None
    with torch.device("meta"):
        model = from_config_without_init(model_class, config, dtype=torch.float32)
        model.tie_weights()  # skipped under no_init_weights; tied names share one tensor in the file
    prefix = getattr(model, "base_model_prefix", "")
    by_tensor: dict[int, tuple[list[str], str, tuple[int, ...]]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(tensor), ([], name, tuple(tensor.shape)))[0].append(_strip(name, prefix))
    expected: dict = {tuple(names): (name, shape) for names, name, shape in by_tensor.values()}
    expected["__prefix__"] = prefix
    return expected


def _strip(name: str, prefix: str) -> str:
    # transformers loads a base model's checkpoint into a model with a head and back by adding / removing the prefix
    return name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else name


def _label(registry, name: str) -> str:
    return registry[name].card_label if name in registry else "(not registered here)"


def _capacity_line(summary: dict) -> str:
    per = f"per {summary['capacity_scope']}"
    policy = f"overflow dropped by {summary['drop_policy']}"
    if summary["expert_capacity"] is not None:
        return f"{summary['expert_capacity']} slots per expert {per}, training and evaluation ({policy})"
    train, evaluation = summary["capacity_factor"], summary["eval_capacity_factor"]
    if train == evaluation == "dropless":
        return "dropless (no token dropped)"
    return (
        f"factor {train} in training, {evaluation} in evaluation, {per} "
        f"(at least {summary['min_capacity']} slots; {policy})"
    )


def _print_bias_balancing(summary: dict) -> None:
    rate = summary["router_bias_update_rate"]
    if not rate:
        print("  bias balancing: off")
        return
    # the bias is a buffer no optimizer touches: say what moves it
    print(f"  bias balancing: rate {rate} per optimizer step (moved by hf_moe's MoeTrainer / RouterBalancingCallback)")
    bias = summary["expert_bias"]
    if not bias["read"]:
        print(f"    expert bias: not read ({bias['why']})")
    for router, stats in bias.get("layers", {}).items():
        print(f"    {router}.expert_bias: min {stats['min']:.4g}, max {stats['max']:.4g}, norm {stats['norm']:.4g}")


def run(args: argparse.Namespace) -> int:
    summary = describe(args.path)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    counts = summary["parameters"]
    print(f"{args.path}: {summary['model_type']} ({', '.join(summary['architectures'] or ['?'])})")
    for stack, layers in summary["moe_layers"].items():
        print(f"  MoE {stack}: {layers or 'none'}")
    print(
        f"  experts: {summary['experts_per_layer']} per layer, {summary['experts_per_token']:g} per token, "
        f"{summary['combine_weights']} combine weights"
    )
    shared = summary["shared_experts"]
    if summary["residual_moe"]:
        print(
            f"  residual MoE: a dense MLP {shared['intermediate_size']} wide beside the routed expert, mixed per token "
            "by a learned softmax coefficient"
        )
    elif shared["count"]:
        gate = ", sigmoid-gated" if shared["gate"] else ""
        print(
            f"  shared experts: {shared['count']} per layer, always active, {shared['intermediate_size']} wide{gate}"
        )
    if summary["shared_blocks"]["across_layers"]:
        own = "LayerNorms and router" if summary["shared_blocks"]["per_layer_router"] else "LayerNorms"
        print(f"  blocks shared across layers (WideNet): one block per stack, each layer with its own {own}")
    settings = "".join(f", {label.lower()} {value}" for label, value in summary["router_settings"].items())
    print(f"  router: {summary['router_type']} ({summary['router_label']}){settings}")
    print(f"  capacity: {_capacity_line(summary)}")
    aux = summary["aux_loss"]
    print(
        f"  losses: {aux['type']} ({aux['label']}) x {aux['coef']}, scope {aux['scope']}, "
        f"z-loss x {summary['z_loss_coef']}"
    )
    _print_bias_balancing(summary)
    print(
        f"  parameters: {counts['total']:,} total{' stored' if summary['shared_blocks']['across_layers'] else ''}, "
        f"{counts['active']:,} active per token "
        f"({counts['experts']:,} in routed experts"
        + (f", {counts['shared_experts']:,} in shared experts)" if counts["shared_experts"] else ")")
    )
    weights = summary["weights"]
    if weights["checked"]:
        extra = f", {len(weights['unexpected'])} unexpected" if weights.get("unexpected") else ""
        print(
            f"  weights: {len(weights['files'])} safetensors file(s), {weights['tensors']} tensors, headers OK{extra}"
        )
    else:
        print(f"  weights: not checked ({weights['why']})")
    if "made_by_moefy" in summary:
        made = summary["made_by_moefy"]
        print(f"  made by moefy from {made['source_model']} (init={made['init_method']}, seed={made['seed']})")
    return 0
