"""`hf-moe moefy SRC OUT`: convert a dense GPT-2 / T5 checkpoint into an MoE model folder (thin over `moefy`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..conversion import INIT_METHODS, moefy, save_converted
from ..conversion.layer_selection import LAYER_SPEC_HELP
from ..modeling.configuration_moe import DROP_POLICIES, ROUTER_TYPES


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="convert a dense GPT-2 / T5 checkpoint into an MoE model",
        description="Convert a dense GPT-2 or T5 checkpoint (folder or Hub id) into an hf_moe MoE model folder "
        "with safetensors weights, config, tokenizer, conversion report and model card. Writes atomically.",
    )
    parser.add_argument("src", help="dense model: a local folder or a Hub id")
    parser.add_argument("out", type=Path, help="output folder (must be empty or absent unless --overwrite)")
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2, help="experts per token")
    parser.add_argument("--router-type", choices=ROUTER_TYPES, default="topk")
    parser.add_argument("--init", choices=tuple(INIT_METHODS), default="copy", help="dense-to-sparse init")
    parser.add_argument("--noise-scale", type=float, default=0.01, help="--init noise: std / weight std")
    parser.add_argument("--drop-ratio", type=float, default=0.5, help="--init drop_upcycle: re-initialized ratio")
    parser.add_argument("--split-partition", choices=("random", "clustered"), default="random")
    parser.add_argument("--moe-layers", default=None, help=f"GPT-2 layers to convert: {LAYER_SPEC_HELP}")
    parser.add_argument("--encoder-moe-layers", default=None, help="T5 encoder layers (same syntax)")
    parser.add_argument("--decoder-moe-layers", default=None, help="T5 decoder layers (same syntax)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--capacity-factor", type=float, default=None, help="training capacity (default dropless)")
    parser.add_argument("--eval-capacity-factor", type=float, default=None)
    parser.add_argument("--drop-policy", choices=DROP_POLICIES, default=None)
    parser.add_argument("--aux-loss-coef", type=float, default=None, help="router_aux_loss_coef")
    parser.add_argument("--z-loss-coef", type=float, default=None, help="router_z_loss_coef")
    parser.add_argument("--expert-dropout", type=float, default=None)
    parser.add_argument(
        "--normalize-top-k-weights", action=argparse.BooleanOptionalAction, default=None, help="default: k>=2"
    )
    parser.add_argument("--unit-combine-weights", action="store_true", help="weight 1 per selected expert")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    parser.add_argument("--license", default=None, help="license for the model card (default: the source's)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="upload the folder to this Hub repo")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repo")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    overrides = {
        "capacity_factor": args.capacity_factor,
        "eval_capacity_factor": args.eval_capacity_factor,
        "drop_policy": args.drop_policy,
        "router_aux_loss_coef": args.aux_loss_coef,
        "router_z_loss_coef": args.z_loss_coef,
        "expert_dropout": args.expert_dropout,
        "normalize_top_k_weights": args.normalize_top_k_weights,
    }
    overrides = {key: value for key, value in overrides.items() if value is not None}
    if args.unit_combine_weights:
        overrides["unit_combine_weights"] = True
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:  # fail before the (long) conversion
        raise FileExistsError(f"{out} is not empty; pass --overwrite to replace it")
    model = moefy(
        args.src,
        num_experts=args.num_experts,
        top_k=args.top_k,
        router_type=args.router_type,
        init=args.init,
        noise_scale=args.noise_scale,
        drop_ratio=args.drop_ratio,
        split_partition=args.split_partition,
        moe_layers=args.moe_layers,
        encoder_moe_layers=args.encoder_moe_layers,
        decoder_moe_layers=args.decoder_moe_layers,
        seed=args.seed,
        progress=True,
        **overrides,
    )
    report = model.moefy_report

    def write_card(folder: Path) -> None:
        from ..hub import render_model_card, save_model_card

        base_model = None if Path(args.src).exists() else args.src
        card = render_model_card(
            model.config,
            report=report.to_dict(),
            base_model=base_model,
            license=args.license or _source_license(args.src),
            model_name=out.name,
            repo_id=args.push_to_hub,
        )
        save_model_card(folder, card)

    save_converted(model, out, source=args.src, overwrite=args.overwrite, write_extras=write_card)
    counts = report.parameters
    print(
        f"wrote {out}: {report.target_class}, {report.num_experts} experts, top-{report.top_k}, init={report.init_method}, "
        f"{counts['total']:,} parameters ({counts['active']:,} active per token)"
    )
    if args.push_to_hub:
        from ..hub import push_folder_to_hub

        print(f"uploaded: {push_folder_to_hub(out, args.push_to_hub, private=args.private or None)}")
    return 0


def _source_license(src: str) -> str | None:
    """The license in a local source folder's model card, if it has one (a Hub source is not looked up)."""
    readme = Path(src) / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    return getattr(ModelCard.load(readme).data, "license", None)
