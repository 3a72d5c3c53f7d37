"""`hf-moe merge A B [C ...] OUT`: Branch-Train-MiX, several dense models -> one MoE folder (thin over `merge_experts`).

As for `hf-moe moefy`, every check that needs no weights runs before anything slow: argument ranges at parse time,
then OUT, then each SOURCE (a local folder or a Hub id), the router name and the sources' weights headers, then
`merge_experts`' own comparison of the sources (model type, head, config, tokenizer files). Only then are the weights
merged and written, atomically (`save_converted`): a failure or Ctrl-C anywhere leaves nothing on disk.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import add_balancing_options, add_moe_layer_options, non_negative_float, positive_int
from .moefy import ROUTER_HELP, _check_name, _check_out, _source_license


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="merge dense models into one MoE model, one expert per model (Branch-Train-MiX)",
        description="Branch-Train-MiX (Sukhbaatar et al. 2024): merge 2 or more dense GPT-2 / T5 models of one "
        "architecture (e.g. fine-tunes of one base on different domains) into one hf_moe MoE model folder. In each "
        "MoE layer expert i is the i-th SOURCE's feed-forward network, bit for bit; every other weight (and the "
        "feed-forward network of each layer that stays dense) is the mean of the sources'; the routers start small "
        "and random from --seed and are learned by fine-tuning the result. The folder gets the first SOURCE's "
        "tokenizer, a conversion report and a model card. Writes atomically: on any error or Ctrl-C nothing is left "
        "on disk.",
    )
    parser.add_argument(
        "sources", metavar="SOURCE", nargs="+", help="2 or more dense models: local folders or Hub ids; then OUT"
    )
    parser.add_argument(
        "out", metavar="OUT", type=Path, help="output folder (must be absent or empty, unless --overwrite)"
    )
    parser.add_argument(
        "--top-k", metavar="K", type=positive_int, default=2, help="experts per token, at most the number of sources"
    )
    parser.add_argument("--router-type", default="topk", metavar="NAME", help=ROUTER_HELP)
    add_moe_layer_options(parser, "make MoE")
    parser.add_argument("--seed", metavar="N", type=int, default=0, help="seeds the routers' init")
    parser.add_argument(
        "--normalize-top-k-weights",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="renormalize the k combine weights to sum to 1 (default: on for --top-k >= 2)",
    )
    parser.add_argument(
        "--aux-loss-coef",
        metavar="X",
        type=non_negative_float,
        default=None,
        help="router_aux_loss_coef (default: the router's)",
    )
    add_balancing_options(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT folder")
    parser.add_argument(
        "--license", metavar="ID", default=None, help="license for the model card (default: the sources' common one)"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        model, report, out = _merge_and_save(args)
    except KeyboardInterrupt as interrupt:
        # save_converted removes its temp folder on the way out, so unless it says otherwise nothing is on disk
        raise KeyboardInterrupt(str(interrupt) or "nothing written") from None
    counts = report.parameters
    print(
        f"wrote {out}: {report.target_class}, {report.num_experts} experts (one per source), top-{report.top_k}, "
        f"{counts['total']:,} parameters ({counts['active']:,} active per token)"
    )
    return 0


def _merge_and_save(args: argparse.Namespace):
    if len(args.sources) < 2:
        raise ValueError(
            f"merge needs 2 or more SOURCE models before OUT, got {len(args.sources)} ({args.sources[0]}); "
            "usage: hf-moe merge A B [C ...] OUT"
        )
    if args.top_k > len(args.sources):
        raise ValueError(
            f"--top-k {args.top_k} exceeds the {len(args.sources)} experts (one per SOURCE); choose "
            f"1..{len(args.sources)}"
        )
    out = _check_out(Path(args.out), overwrite=args.overwrite)
    for source in args.sources:
        path = Path(source).expanduser()
        if path.exists() and out.exists() and path.resolve() == out.resolve():
            raise ValueError(f"OUT {out} is also a SOURCE; write the merged model to another folder")

    from ..conversion import merge_experts, save_converted
    from ..conversion.source import resolve_source
    from ..modeling.registry import ROUTERS

    _check_name("--router-type", args.router_type, tuple(ROUTERS))
    located = [resolve_source(source, option=f"SOURCE {i + 1}") for i, source in enumerate(args.sources)]
    for i, folder in enumerate(located):
        if Path(folder).is_dir():
            _check_source_weights(folder, option=f"SOURCE {i + 1}")

    overrides = {
        "normalize_top_k_weights": args.normalize_top_k_weights,
        "router_aux_loss_coef": args.aux_loss_coef,
        "aux_loss_scope": args.aux_loss_scope,
        "router_bias_update_rate": args.router_bias_update_rate,
    }
    model = merge_experts(
        located,
        top_k=args.top_k,
        router_type=args.router_type,
        moe_layers=args.moe_layers,
        encoder_moe_layers=args.encoder_moe_layers,
        decoder_moe_layers=args.decoder_moe_layers,
        seed=args.seed,
        progress=True,
        **{key: value for key, value in overrides.items() if value is not None},
    )
    report = model.moefy_report
    # a Hub id loaded from its cache folder: record the id, not the cache path
    hub_ids = [source for source in args.sources if not Path(source).expanduser().exists()]
    report.sources = list(args.sources)
    report.source_model = ", ".join(report.sources)

    def write_card(folder: Path) -> None:
        from ..hub import render_model_card, save_model_card

        card = render_model_card(
            model.config,
            report=report.to_dict(),
            # the Hub sources are the base models of a merge (`base_model_relation: merge`)
            base_model=hub_ids or None,
            license=args.license or _common_license(located),
            model_name=out.name,
        )
        save_model_card(folder, card)

    save_converted(model, out, source=located[0], overwrite=args.overwrite, write_extras=write_card)
    return model, report, out


def _check_source_weights(folder: str, option: str) -> None:
    """A truncated or foreign weights file would fail deep inside loading; read the headers first and name the file."""
    from transformers import AutoConfig

    from ..conversion import SUPPORTED_MODEL_TYPES
    from .inspect import check_weights

    config = AutoConfig.from_pretrained(folder)
    if config.model_type in SUPPORTED_MODEL_TYPES:  # anything else gets merge_experts' "supports model types" error
        check_weights(Path(folder), config, option=option)


def _common_license(folders: list[str]) -> str | None:
    """The license the local sources' model cards state, if they all state the same one."""
    licenses = {_source_license(folder) for folder in folders}
    return licenses.pop() if len(licenses) == 1 else None
