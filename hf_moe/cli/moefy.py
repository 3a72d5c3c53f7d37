"""`hf-moe moefy SRC OUT`: convert a dense GPT-2 / T5 checkpoint into an MoE model folder (thin over `moefy`).

Every check that needs no model runs before anything slow: argument ranges at parse time, then OUT, then SRC (a local
folder, or a Hub id decided in one short request), then the names the registries know and the source's weights
headers. Only then is the model converted and written, atomically (`save_converted`): a failure or Ctrl-C anywhere
leaves nothing on disk.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import (
    add_balancing_options,
    add_moe_layer_options,
    mean_or_index,
    non_negative_float,
    positive_float,
    positive_int,
)

# The registries (routers, balance losses, drop policies, capacity scopes, init methods) import torch, so they are not
# argparse `choices`: the help names the built-in entries, and `run` checks the value against the registry itself,
# listing what it holds. tests/cli check that this text names every registered entry.
ROUTER_HELP = (
    "router by registry name; built in: topk (token-choice top-k softmax), noisy_topk (Shazeer et al. 2017), "
    "hash (hash layers, Roller et al. 2021), base (BASE layers, Lewis et al. 2021), dense_to_sparse (Nie et al. "
    "2021), expert_choice (Zhou et al. 2022)"
)
AUX_LOSS_HELP = "balance loss by registry name; built in: switch (Fedus et al. 2021), cv_squared (Shazeer et al. 2017)"
INIT_HELP = "dense-to-sparse init: copy, noise, drop_upcycle, split, granular (needs --granularity)"
# hf_moe.modeling.configuration_moe.HASH_KINDS (tests/cli check that they match)
HASH_KINDS = ("random", "balanced", "clustered")
# hf_moe.conversion.router_init.ROUTER_INITS (tests/conversion/test_router_init.py checks that they match)
ROUTER_INITS = ("random", "kmeans", "hidden_prompts")
# the layer spec language of hf_moe.conversion.layer_selection (not imported here: that package imports torch)


def ratio(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    value = non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text}")
    return value


def expert_counts(text: str) -> int | list[int]:
    """argparse type: E (every MoE layer) or E1,E2,... (one count per MoE layer: a PR-MoE pyramid)."""
    counts = [positive_int(part.strip()) for part in text.split(",")]
    return counts[0] if len(counts) == 1 else counts


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="convert a dense GPT-2 / T5 checkpoint into an MoE model",
        description="Convert a dense GPT-2 or T5 checkpoint (folder or Hub id) into an hf_moe MoE model folder "
        "with safetensors weights, config, tokenizer, conversion report and model card. Writes atomically: on any "
        "error or Ctrl-C nothing is left on disk.",
    )
    parser.add_argument("src", metavar="SRC", help="dense model: a local folder or a Hub id")
    parser.add_argument(
        "out", metavar="OUT", type=Path, help="output folder (must be absent or empty, unless --overwrite)"
    )
    parser.add_argument(
        "--num-experts",
        metavar="E",
        type=expert_counts,
        default=8,
        help="experts per MoE layer, or one count per MoE layer, comma-separated in module order (a PR-MoE pyramid, "
        "e.g. 4,4,8,8; with --init copy, noise or drop_upcycle)",
    )
    # None: not given; 2, or with --router-type hash one expert per hash head
    parser.add_argument(
        "--top-k",
        metavar="K",
        type=positive_int,
        default=None,
        help="experts per token, at most --num-experts (default: 2); with --router-type hash: --num-hash-heads",
    )
    parser.add_argument("--router-type", default="topk", metavar="NAME", help=ROUTER_HELP)
    parser.add_argument(
        "--hash-kind",
        choices=HASH_KINDS,
        default=None,
        help="with --router-type hash: how the token -> expert table is built: random (seeded by --seed), balanced "
        "(greedy bin packing of the token counts of --hash-corpus, counted with SRC's tokenizer) or clustered "
        "(k-means of SRC's input embeddings) (default: random)",
    )
    parser.add_argument(
        "--hash-corpus",
        metavar="FILE",
        nargs="+",
        type=Path,
        default=None,
        help="with --hash-kind balanced: the text files whose token frequencies the experts' loads are balanced on",
    )
    parser.add_argument(
        "--num-hash-heads",
        metavar="H",
        type=positive_int,
        default=None,
        help="with --router-type hash: independent hashes per token (MultiHash; each picks one expert of its own "
        "group of --num-experts / H) (default: 1)",
    )
    parser.add_argument(
        "--router-init",
        choices=ROUTER_INITS,
        default="random",
        help="how learned routers start: random (small random rows from --seed), kmeans (rows along the k-means "
        "centroids of each layer's dense FFN inputs on --calibration-data) or hidden_prompts (rows along the mean "
        "FFN input of each expert's prompts, --expert-prompts-file); texts are tokenized with SRC's tokenizer",
    )
    parser.add_argument(
        "--calibration-data",
        metavar="FILE",
        nargs="+",
        type=Path,
        default=None,
        help="with --router-init kmeans: UTF-8 text files the dense model reads",
    )
    parser.add_argument(
        "--calibration-tokens",
        metavar="N",
        type=positive_int,
        default=None,
        help="with --router-init kmeans: tokens of --calibration-data read, the first N in order (default: 8192)",
    )
    parser.add_argument(
        "--expert-prompts-file",
        metavar="FILE",
        type=Path,
        default=None,
        help="with --router-init hidden_prompts: a JSON list of one entry per expert, each a prompt or a list of "
        'prompts, e.g. ["def f(x):", ["Bonjour", "Merci"]]',
    )
    parser.add_argument("--init", default="copy", metavar="METHOD", help=INIT_HELP)
    # None: not given; the library's default applies, and giving one with another --init is an error, not a no-op
    parser.add_argument(
        "--noise-scale",
        metavar="STD",
        type=non_negative_float,
        default=None,
        help="with --init noise: noise std as a fraction of each weight's std (default: 0.01)",
    )
    parser.add_argument(
        "--drop-ratio",
        metavar="R",
        type=ratio,
        default=None,
        help="with --init drop_upcycle: fraction of each expert's neurons re-initialized (default: 0.5)",
    )
    parser.add_argument(
        "--split-partition",
        choices=("random", "clustered"),
        default=None,
        help="with --init split: how the dense neurons are partitioned (default: random)",
    )
    parser.add_argument(
        "--granularity",
        metavar="G",
        type=positive_int,
        default=None,
        help="with --init granular: cut each dense FFN into G shards of F/G neurons, each copied E/G times, with one "
        "router row per virtual group of G experts (He et al. 2024): function-preserving; --num-experts and --top-k "
        "must be multiples of G",
    )
    parser.add_argument(
        "--scale-weights",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="scale the experts' output projections so the MoE output keeps the dense magnitude at init: E/K with "
        "--no-normalize-top-k-weights (He et al. 2024), 1/K with --unit-combine-weights; an error where the weights "
        "already sum to 1 (default: on for --init split, E/K for top-k < E, LLaMA-MoE; --init granular always "
        "applies its exact factor)",
    )
    add_moe_layer_options(parser, "convert")
    parser.add_argument("--seed", metavar="N", type=int, default=0, help="seeds every random choice of the conversion")
    parser.add_argument(
        "--capacity-factor",
        metavar="F",
        type=positive_float,
        default=None,
        help="training capacity factor, a number > 0 (default: dropless, no token dropped)",
    )
    parser.add_argument(
        "--eval-capacity-factor",
        metavar="F",
        type=positive_float,
        default=None,
        help="the same at evaluation (default: dropless)",
    )
    parser.add_argument(
        "--expert-capacity",
        metavar="C",
        type=positive_int,
        default=None,
        help="fixed slots per expert per capacity unit, training and evaluation (excludes the factors)",
    )
    parser.add_argument(
        "--capacity-scope",
        default=None,
        metavar="SCOPE",
        help="what a capacity counts over: batch or sequence (default: batch)",
    )
    parser.add_argument(
        "--drop-policy",
        default=None,
        metavar="POLICY",
        help="which slots win when an expert overflows: position or probability (default: position)",
    )
    parser.add_argument("--aux-loss-type", default=None, metavar="NAME", help=f"{AUX_LOSS_HELP} (default: switch)")
    parser.add_argument(
        "--aux-loss-coef",
        metavar="X",
        type=non_negative_float,
        default=None,
        help="router_aux_loss_coef (default: the router's: 0.01 for topk, noisy_topk; "
        "0 for hash, base, dense_to_sparse, expert_choice)",
    )
    add_balancing_options(parser)
    parser.add_argument(
        "--z-loss-coef", metavar="X", type=non_negative_float, default=None, help="router_z_loss_coef (default: 0.001)"
    )
    parser.add_argument(
        "--gate-threshold",
        metavar="X",
        type=ratio,
        default=None,
        help="dense_to_sparse only: experts whose gate weight exceeds X are active (default: 0.01)",
    )
    parser.add_argument(
        "--allow-noncausal-routing",
        action="store_true",
        help="expert_choice in a causal stack (GPT-2, T5's decoder): accept that a token's output then depends on "
        "later tokens of the batch",
    )
    parser.add_argument(
        "--expert-dropout",
        metavar="P",
        type=ratio,
        default=None,
        help="dropout on the experts' hidden activation (default: 0)",
    )
    parser.add_argument(
        "--num-shared-experts",
        metavar="N",
        type=positive_int,
        default=None,
        help="N always-active shared experts per MoE layer, each a copy of the dense FFN (DeepSeekMoE; default: none)",
    )
    parser.add_argument(
        "--shared-expert-gate",
        action="store_true",
        help="with --num-shared-experts: scale their output per token by a learned sigmoid gate (Qwen2-MoE)",
    )
    parser.add_argument(
        "--residual-moe",
        action="store_true",
        help="Residual-MoE (DeepSpeed-MoE; needs --top-k 1): a copy of the dense FFN beside the routed expert, mixed "
        "per token by a learned coefficient that starts at (1/2, 1/2)",
    )
    parser.add_argument(
        "--share-blocks-across-layers",
        action="store_true",
        help="WideNet: every layer of a stack applies one block's weights (attention and MoE layer), keeping its own "
        "LayerNorms; the block starts as --shared-block-init",
    )
    parser.add_argument(
        "--per-layer-router",
        action="store_true",
        help="with --share-blocks-across-layers: each layer keeps its own router",
    )
    parser.add_argument(
        "--shared-block-init",
        metavar="mean|J",
        type=mean_or_index("a block index (an integer >= 0)"),
        default=None,
        help="with --share-blocks-across-layers: each shared weight starts as the mean over the dense layers (mean, "
        "the default) or as dense block J's",
    )
    parser.add_argument(
        "--normalize-top-k-weights",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="renormalize the k combine weights to sum to 1 (default: on for --top-k >= 2 and for --init granular; "
        "--init split combines with unit weights)",
    )
    parser.add_argument(
        "--unit-combine-weights",
        action="store_true",
        help="weight 1 per selected expert (the default of --init split)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT folder")
    parser.add_argument(
        "--license", metavar="ID", default=None, help="license for the model card (default: the source's)"
    )
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="upload the folder to this Hub repo")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repo")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        model, report, out = _convert_and_save(args)
    except KeyboardInterrupt as interrupt:
        # save_converted removes its temp folder on the way out, so unless it says otherwise nothing is on disk
        raise KeyboardInterrupt(str(interrupt) or "nothing written") from None
    counts = report.parameters
    print(
        f"wrote {out}: {report.target_class}, {report.num_experts} experts, top-{report.top_k}, init={report.init_method}, "
        f"{counts['total']:,} parameters ({counts['active']:,} active per token)"
    )
    if args.push_to_hub:
        from ..hub import push_folder_to_hub

        try:
            url = push_folder_to_hub(out, args.push_to_hub, private=args.private or None)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"{out} is complete but the upload to {args.push_to_hub} did not finish") from None
        print(f"uploaded: {url}")
    return 0


def _convert_and_save(args: argparse.Namespace):
    _check_arguments(args)
    out = _check_out(Path(args.out), overwrite=args.overwrite)

    from ..conversion import INIT_METHODS, moefy, save_converted
    from ..conversion.source import resolve_source
    from ..modeling.dispatch import CAPACITY_SCOPES, DROP_POLICIES
    from ..modeling.registry import BALANCE_LOSSES, ROUTERS

    source = resolve_source(args.src)
    _check_name("--router-type", args.router_type, tuple(ROUTERS))
    _check_name("--init", args.init, tuple(INIT_METHODS))
    _check_name("--aux-loss-type", args.aux_loss_type, tuple(BALANCE_LOSSES))
    _check_name("--capacity-scope", args.capacity_scope, CAPACITY_SCOPES)
    _check_name("--drop-policy", args.drop_policy, DROP_POLICIES)
    if Path(source).is_dir():
        _check_source_weights(source)

    overrides = {
        "capacity_factor": args.capacity_factor,
        "eval_capacity_factor": args.eval_capacity_factor,
        "expert_capacity": args.expert_capacity,
        "capacity_scope": args.capacity_scope,
        "drop_policy": args.drop_policy,
        "aux_loss_type": args.aux_loss_type,
        "aux_loss_scope": args.aux_loss_scope,
        "router_aux_loss_coef": args.aux_loss_coef,
        "router_bias_update_rate": args.router_bias_update_rate,
        "router_z_loss_coef": args.z_loss_coef,
        "expert_dropout": args.expert_dropout,
        "normalize_top_k_weights": args.normalize_top_k_weights,
        "unit_combine_weights": True if args.unit_combine_weights else None,
        "num_hash_heads": args.num_hash_heads,
        "gate_threshold": args.gate_threshold,
        "allow_noncausal_routing": True if args.allow_noncausal_routing else None,
        "num_shared_experts": args.num_shared_experts,
        "shared_expert_gate": True if args.shared_expert_gate else None,
        "residual_moe": True if args.residual_moe else None,
        "share_blocks_across_layers": True if args.share_blocks_across_layers else None,
        "per_layer_router": True if args.per_layer_router else None,
    }
    init_options = {
        "noise_scale": args.noise_scale,
        "drop_ratio": args.drop_ratio,
        "split_partition": args.split_partition,
        "granularity": args.granularity,
        "scale_weights": args.scale_weights,
        "shared_block_init": args.shared_block_init,
    }
    model = moefy(
        source,
        num_experts=args.num_experts,
        top_k=args.top_k,
        router_type=args.router_type,
        hash_kind=args.hash_kind,
        hash_corpus=args.hash_corpus,
        router_init=args.router_init,
        calibration_data=args.calibration_data,
        expert_prompts=args.expert_prompts,
        calibration_tokens=args.calibration_tokens,
        init=args.init,
        moe_layers=args.moe_layers,
        encoder_moe_layers=args.encoder_moe_layers,
        decoder_moe_layers=args.decoder_moe_layers,
        seed=args.seed,
        progress=True,
        **{key: value for key, value in {**init_options, **overrides}.items() if value is not None},
    )
    report = model.moefy_report
    if not Path(args.src).expanduser().exists():
        report.source_model = args.src  # a Hub id loaded from its cache folder: record the id, not the cache path

    def write_card(folder: Path) -> None:
        from ..hub import render_model_card, save_model_card

        card = render_model_card(
            model.config,
            report=report.to_dict(),
            base_model=None if Path(args.src).expanduser().exists() else args.src,  # a Hub id, even if cached
            license=args.license or _source_license(source),
            model_name=out.name,
            repo_id=args.push_to_hub,
        )
        save_model_card(folder, card)

    save_converted(model, out, source=source, overwrite=args.overwrite, write_extras=write_card)
    return model, report, out


def _check_arguments(args: argparse.Namespace) -> None:
    """Checks across arguments (each one's own range was checked by its argparse type); fills in --top-k."""
    if isinstance(args.num_experts, list) and args.router_init != "random":
        # the data inits fit one row per expert of every layer alike (moefy's own check says which recipes remain)
        raise ValueError(
            f"a per-layer --num-experts list (PR-MoE) works with --router-init random, got {args.router_init}"
        )
    _check_hash_arguments(args)
    _check_router_init_arguments(args)
    if args.top_k is None:
        args.top_k = (args.num_hash_heads or 1) if args.router_type == "hash" else 2
    fewest_experts = min(_per_layer_counts(args))
    if args.top_k > fewest_experts:
        raise ValueError(
            f"--top-k {args.top_k} exceeds the experts of some MoE layer (--num-experts {args.num_experts}); choose "
            f"1..{fewest_experts}"
        )
    for option, given in (
        ("--per-layer-router", args.per_layer_router),
        ("--shared-block-init", args.shared_block_init),
    ):
        if given and not args.share_blocks_across_layers:
            raise ValueError(f"{option} applies only with --share-blocks-across-layers")
    for option, value, init in (
        ("--noise-scale", args.noise_scale, "noise"),
        ("--drop-ratio", args.drop_ratio, "drop_upcycle"),
        ("--split-partition", args.split_partition, "split"),
        ("--granularity", args.granularity, "granular"),
    ):
        if value is not None and args.init != init:
            raise ValueError(f"{option} applies only with --init {init}, got --init {args.init}")
    if args.init == "granular" and args.granularity is None:
        raise ValueError(
            "--init granular needs --granularity G (shards per dense FFN; divides --num-experts, --top-k)"
        )
    # the other cross-field rules (--expert-capacity vs the factors, unit vs normalized weights) are the config's
    if args.private and not args.push_to_hub:
        raise ValueError("--private applies only with --push-to-hub REPO_ID")
    if args.push_to_hub:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(args.push_to_hub)
        except HFValidationError:
            raise ValueError(
                f"--push-to-hub {args.push_to_hub!r} is not a Hub repo id; use 'name' or 'namespace/name' "
                "(letters, digits, '-', '_', '.')"
            ) from None


def _per_layer_counts(args: argparse.Namespace) -> list[int]:
    return args.num_experts if isinstance(args.num_experts, list) else [args.num_experts]


def _check_hash_arguments(args: argparse.Namespace) -> None:
    hash_options = (
        ("--hash-kind", args.hash_kind),
        ("--hash-corpus", args.hash_corpus),
        ("--num-hash-heads", args.num_hash_heads),
    )
    if args.router_type != "hash":
        given = [option for option, value in hash_options if value is not None]
        if given:
            raise ValueError(
                f"{', '.join(given)} applies only with --router-type hash, got --router-type {args.router_type}"
            )
        return
    heads = args.num_hash_heads or 1
    if args.top_k is not None and args.top_k != heads:
        raise ValueError(
            f"--router-type hash sends each token to one expert per hash head: --top-k must be --num-hash-heads "
            f"({heads}), got --top-k {args.top_k} (or leave --top-k out)"
        )
    if any(count % heads for count in _per_layer_counts(args)):
        raise ValueError(
            f"--num-hash-heads {heads} splits the experts into equal groups: --num-experts {args.num_experts} must be "
            "a multiple of it"
        )
    balanced = args.hash_kind == "balanced"
    if balanced and args.hash_corpus is None:
        raise ValueError(
            "--hash-kind balanced balances the experts' loads on a corpus: give --hash-corpus FILE [FILE ...]"
        )
    if args.hash_corpus is not None and not balanced:
        raise ValueError(
            f"--hash-corpus applies only with --hash-kind balanced, got --hash-kind {args.hash_kind or 'random'}"
        )
    missing = [str(path) for path in args.hash_corpus or () if not path.expanduser().is_file()]
    if missing:
        raise FileNotFoundError(f"--hash-corpus: no such file: {', '.join(missing)}")


def _check_router_init_arguments(args: argparse.Namespace) -> None:
    """--router-init's options, and the prompts file read into `args.expert_prompts` (None without one)."""
    args.expert_prompts = None
    for option, value, router_init in (
        ("--calibration-data", args.calibration_data, "kmeans"),
        ("--calibration-tokens", args.calibration_tokens, "kmeans"),
        ("--expert-prompts-file", args.expert_prompts_file, "hidden_prompts"),
    ):
        if value is not None and args.router_init != router_init:
            raise ValueError(
                f"{option} applies only with --router-init {router_init}, got --router-init {args.router_init}"
            )
    if args.router_init == "random":
        return
    if args.router_type == "hash":
        raise ValueError(
            f"--router-init {args.router_init} sets router rows; --router-type hash has none (it routes by token id)"
        )
    if args.router_init == "kmeans":
        if args.calibration_data is None:
            raise ValueError(
                "--router-init kmeans clusters hidden states of calibration text: give --calibration-data FILE [FILE ...]"
            )
        missing = [str(path) for path in args.calibration_data if not path.expanduser().is_file()]
        if missing:
            raise FileNotFoundError(f"--calibration-data: no such file: {', '.join(missing)}")
        return
    path = args.expert_prompts_file
    if path is None:
        raise ValueError(
            "--router-init hidden_prompts needs the experts' prompts: give --expert-prompts-file FILE (a JSON list of "
            f"{args.num_experts} entries, each a prompt or a list of prompts)"
        )
    if not path.expanduser().is_file():
        raise FileNotFoundError(f"--expert-prompts-file: no such file: {path}")
    import json

    try:
        prompts = json.loads(path.expanduser().read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"--expert-prompts-file {path} is not JSON ({error})") from None
    entries_ok = isinstance(prompts, list) and all(
        isinstance(entry, str) or (isinstance(entry, list) and entry and all(isinstance(p, str) for p in entry))
        for entry in prompts
    )
    if not entries_ok:
        raise ValueError(
            f"--expert-prompts-file {path} must hold a JSON list whose entries are prompts (strings) or non-empty "
            "lists of prompts"
        )
    if len(prompts) != args.num_experts:
        raise ValueError(
            f"--expert-prompts-file {path} has {len(prompts)} entries; it needs one per expert, --num-experts "
            f"{args.num_experts}"
        )
    args.expert_prompts = prompts


def _check_out(out: Path, *, overwrite: bool) -> Path:
    """OUT must be a folder we may fill: absent, empty, or (with --overwrite) a folder to replace; never a file."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(
            f"OUT {out} is a file; OUT must be a folder that is absent or empty (or, with --overwrite, a folder)"
        )
    if out.is_dir() and any(out.iterdir()) and not overwrite:  # fail before the (long) conversion
        raise FileExistsError(f"OUT {out} is not empty; pass --overwrite to replace it, or choose a new folder")
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise FileExistsError(f"OUT {out} cannot be created: {ancestor} is a file, not a folder")
    return out


def _check_name(option: str, value: str | None, allowed: tuple[str, ...]) -> None:
    if value is not None and value not in allowed:
        raise ValueError(f"{option} {value!r} is not known; choose one of {', '.join(allowed)}")


def _check_source_weights(folder: str) -> None:
    """A truncated or foreign weights file would fail deep inside loading (or, for missing tensors, load as random
    weights with a warning); read the headers first and name the file."""
    from transformers import AutoConfig

    from ..conversion import SUPPORTED_MODEL_TYPES
    from .inspect import check_weights

    config = AutoConfig.from_pretrained(folder)
    if config.model_type in SUPPORTED_MODEL_TYPES:  # anything else gets moefy's own "supports model types" error
        check_weights(Path(folder), config, option="SRC")


def _source_license(src: str) -> str | None:
    """The license in a local source folder's model card, if it has one (a Hub source is not looked up)."""
    readme = Path(src) / "README.md"
    if not readme.is_file():
        return None
    from huggingface_hub import ModelCard

    return getattr(ModelCard.load(readme).data, "license", None)
