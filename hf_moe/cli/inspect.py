"""`hf-moe inspect PATH`: what an MoE folder is, from its config alone (no weights are loaded)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from transformers import AutoConfig

from ..conversion.report import REPORT_FILENAME
from ..modeling.configuration_moe import MoeConfigFields


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name, help="describe an MoE model folder", description="Describe an hf_moe model folder from its config."
    )
    parser.add_argument("path", help="model folder (or Hub id)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(run=run)


def describe(path: str) -> dict:
    """Family, MoE layers, experts per layer, routing and parameter counts of the model at `path`."""
    config = AutoConfig.from_pretrained(path)
    if not isinstance(config, MoeConfigFields):
        raise ValueError(f"{path} is a {config.model_type!r} model, not an hf_moe MoE model")
    if hasattr(config, "moe_layer_indices"):
        moe_layers = {"layers": config.moe_layer_indices}
    else:
        moe_layers = {"encoder": config.encoder_moe_layer_indices, "decoder": config.decoder_moe_layer_indices}
    capacity = config.capacity_factor
    summary = {
        "model_type": config.model_type,
        "architectures": getattr(config, "architectures", None),
        "moe_layers": moe_layers,
        "experts_per_layer": config.num_local_experts,
        "experts_per_token": config.num_experts_per_tok,
        "router_type": config.router_type,
        "combine_weights": "unit"
        if config.unit_combine_weights
        else ("normalized" if config.normalizes_top_k_weights else "probability"),
        "capacity_factor": "dropless" if capacity is None else capacity,
        "eval_capacity_factor": "dropless" if config.eval_capacity_factor is None else config.eval_capacity_factor,
        "aux_loss": {"type": config.aux_loss_type, "coef": config.router_aux_loss_coef},
        "z_loss_coef": config.router_z_loss_coef,
        "expert_dropout": config.expert_dropout,
        "parameters": config.parameter_counts(),
    }
    report = Path(path) / REPORT_FILENAME
    if report.is_file():
        made = json.loads(report.read_text())
        summary["made_by_moefy"] = {key: made.get(key) for key in ("source_model", "init_method", "seed")}
    return summary


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
        f"  experts: {summary['experts_per_layer']} per layer, top-{summary['experts_per_token']} "
        f"({summary['router_type']} router, {summary['combine_weights']} combine weights)"
    )
    print(f"  capacity: train {summary['capacity_factor']}, eval {summary['eval_capacity_factor']}")
    aux = summary["aux_loss"]
    print(f"  losses: {aux['type']} aux x {aux['coef']}, z x {summary['z_loss_coef']}")
    print(
        f"  parameters: {counts['total']:,} total, {counts['active']:,} active per token "
        f"({counts['experts']:,} in experts)"
    )
    if "made_by_moefy" in summary:
        made = summary["made_by_moefy"]
        print(f"  made by moefy from {made['source_model']} (init={made['init_method']}, seed={made['seed']})")
    return 0
