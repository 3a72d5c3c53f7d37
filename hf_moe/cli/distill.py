"""`hf-moe distill TEACHER OUT --student dense|mos --text-files F ...`: distill a GPT-2 MoE teacher into a dense model
(`dense_from_moe`, Fedus et al. 2021) or a Mixture-of-Students (`mixture_of_students`, Rajbhandari et al. 2022) on
local text, and measure both on held-out text (thin over `hf_moe.training.distill_run`).

Every check that needs no model runs first: argument ranges at parse time, then the options' combinations, OUT, the
text files, TEACHER's config, weights headers and tokenizer files. Only then are the models loaded and trained. The
student, its tokenizer and `metrics.json` are written atomically (`save_converted`): a failure or Ctrl-C anywhere
leaves nothing on disk.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from . import LAYER_SPEC_SHORT, mean_or_index, positive_float, positive_int
from .moefy import _check_out

METRICS_FILENAME = "metrics.json"
STUDENTS = ("dense", "mos")
# tokenizer files a folder may hold (hf_moe.conversion.save.TOKENIZER_FILES minus the config-only ones, which alone
# make no tokenizer; tests/cli check that they are among those)
TOKENIZER_VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "spiece.model")


def unit_ratio(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    return _number_in(text, "[0, 1]", lambda value: 0 <= value <= 1)


def open_fraction(text: str) -> float:
    """argparse type: a number strictly between 0 and 1."""
    return _number_in(text, "(0, 1)", lambda value: 0 < value < 1)


def stop_fraction(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    return _number_in(text, "(0, 1]", lambda value: 0 < value <= 1)


def _number_in(text: str, interval: str, inside) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not inside(value):  # nan is inside no interval
        raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text!r}")
    return value


def add_parser(subparsers, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="distill a GPT-2 MoE into a dense model or a Mixture-of-Students",
        description="Distill a local hf_moe GPT-2 MoE folder (TEACHER, with its tokenizer) into a smaller student on "
        "local text files: a dense GPT-2 made from the experts (--student dense) or a Mixture-of-Students of some of "
        "its layers and experts (--student mos). The text is cut into blocks; the last --eval-fraction of them is "
        "held out. OUT gets the trained student, the tokenizer and metrics.json (teacher, student-before and "
        "student-after perplexity on the held-out blocks). Writes atomically: on any error or Ctrl-C nothing is "
        "left on disk.",
    )
    parser.add_argument("teacher", metavar="TEACHER", help="local hf_moe GPT-2 MoE model folder with a tokenizer")
    parser.add_argument(
        "out", metavar="OUT", type=Path, help="output folder (must be absent or empty, unless --overwrite)"
    )
    parser.add_argument(
        "--student",
        choices=STUDENTS,
        required=True,
        help="dense: the dense GPT-2 of the teacher (dense_from_moe); mos: a smaller MoE of the teacher's layers and "
        "experts (mixture_of_students)",
    )
    parser.add_argument(
        "--ffn",
        metavar="mean|I",
        type=mean_or_index("an expert index >= 0"),
        default=None,
        help="with --student dense: each dense FFN is the mean of the layer's experts, or expert I (default: mean)",
    )
    parser.add_argument(
        "--layers",
        metavar="SPEC",
        default=None,
        help=f"with --student mos: the teacher layers kept, {LAYER_SPEC_SHORT} (default: every_other)",
    )
    parser.add_argument(
        "--experts",
        metavar="K",
        type=positive_int,
        default=None,
        help="with --student mos: the first K experts of each MoE layer are kept, at least the teacher's top-k "
        "(default: all)",
    )
    parser.add_argument(
        "--text-files", metavar="FILE", nargs="+", type=Path, required=True, help="UTF-8 text files to train on"
    )
    parser.add_argument(
        "--eval-fraction",
        metavar="X",
        type=open_fraction,
        default=0.1,
        help="fraction of the text's blocks (the last ones) held out for the perplexities",
    )
    parser.add_argument("--max-steps", metavar="N", type=positive_int, default=200, help="optimizer steps")
    parser.add_argument("--batch-size", metavar="B", type=positive_int, default=8, help="blocks per step")
    parser.add_argument(
        "--block-size",
        metavar="L",
        type=positive_int,
        default=None,
        help="tokens per block, at most the teacher's n_positions (default: min(128, n_positions))",
    )
    parser.add_argument(
        "--learning-rate", metavar="LR", type=positive_float, default=5e-4, help="peak learning rate (cosine)"
    )
    parser.add_argument(
        "--alpha", metavar="A", type=unit_ratio, default=0.25, help="the teacher's share of the loss, in [0, 1]"
    )
    parser.add_argument(
        "--temperature", metavar="T", type=positive_float, default=1.0, help="softmax temperature of the KD term"
    )
    parser.add_argument(
        "--kd-stop-fraction",
        metavar="X",
        type=stop_fraction,
        default=None,
        help="staged KD: a fraction in (0, 1] of --max-steps after which the loss is the plain cross-entropy "
        "(default: KD to the end)",
    )
    parser.add_argument("--seed", metavar="N", type=int, default=0, help="seeds the training")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT folder")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        out, metrics = _distill_and_save(args)
    except KeyboardInterrupt as interrupt:
        # save_converted removes its temp folder on the way out, so unless it says otherwise nothing is on disk
        raise KeyboardInterrupt(str(interrupt) or "nothing written") from None
    print(
        f"wrote {out}: {metrics['student_class']} student after {metrics['steps']} steps; held-out perplexity: "
        f"teacher {metrics['teacher_perplexity']:.2f}, student {metrics['student_perplexity_before']:.2f} -> "
        f"{metrics['student_perplexity_after']:.2f}"
    )
    return 0


def _distill_and_save(args: argparse.Namespace) -> tuple[Path, dict]:
    _check_arguments(args)
    out = _check_out(Path(args.out), overwrite=args.overwrite)
    missing = [str(path) for path in args.text_files if not path.expanduser().is_file()]
    if missing:
        raise FileNotFoundError(f"--text-files: no such file: {', '.join(missing)}")
    config = _check_teacher(args)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..conversion import save_converted
    from ..training import read_corpus
    from ..training.distill_run import distill_and_measure, text_blocks

    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"TEACHER {args.teacher}'s tokenizer has {len(tokenizer)} tokens but the model only "
            f"vocab_size={config.vocab_size}; TEACHER must hold the tokenizer it was trained with"
        )
    block_size = args.block_size or min(128, config.n_positions)
    train_NS, eval_NS = text_blocks(
        tokenizer, read_corpus([path.expanduser() for path in args.text_files]), block_size, args.eval_fraction
    )
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher)
    student = _build_student(args, teacher)
    metrics = distill_and_measure(
        student,
        teacher,
        train_NS,
        eval_NS,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        alpha=args.alpha,
        temperature=args.temperature,
        kd_stop_fraction=args.kd_stop_fraction,
        seed=args.seed,
    )
    metrics = {
        "teacher": str(args.teacher),
        "student": args.student,
        "student_class": type(student).__name__,
        **({"ffn": args.ffn} if args.student == "dense" else {"layers": args.layers, "experts": args.experts}),
        "text_files": [str(path) for path in args.text_files],
        "eval_fraction": args.eval_fraction,
        **metrics,
    }

    def write_metrics(folder: Path) -> None:
        (folder / METRICS_FILENAME).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")

    save_converted(student.cpu(), out, tokenizer=tokenizer, overwrite=args.overwrite, write_extras=write_metrics)
    return out, metrics


def _check_arguments(args: argparse.Namespace) -> None:
    """Options that belong to the other student are errors, not no-ops; fills in the defaults of the chosen one."""
    other = {"dense": (("--layers", args.layers), ("--experts", args.experts)), "mos": (("--ffn", args.ffn),)}
    given = [option for option, value in other[args.student] if value is not None]
    if given:
        wanted = "mos" if args.student == "dense" else "dense"
        raise ValueError(f"{', '.join(given)} applies only with --student {wanted}, got --student {args.student}")
    if args.student == "dense":
        args.ffn = "mean" if args.ffn is None else args.ffn
    else:
        args.layers = "every_other" if args.layers is None else args.layers


def _check_teacher(args: argparse.Namespace):
    """TEACHER's config, once it is known to be a local GPT-2 MoE folder with readable weights and a tokenizer, and
    the options that depend on it (expert counts, block size) are in range."""
    folder = Path(args.teacher).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"TEACHER {args.teacher} not found; TEACHER must be a local hf_moe MoE model folder")
    if not folder.is_dir():
        raise NotADirectoryError(f"TEACHER {args.teacher} is a file; TEACHER must be a local hf_moe MoE model folder")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"TEACHER {args.teacher} has no config.json; TEACHER must be a folder written by save_pretrained"
        )

    from transformers import AutoConfig

    from ..modeling.configuration_moe import MoeConfigFields
    from .inspect import check_weights

    config = AutoConfig.from_pretrained(folder)
    if not isinstance(config, MoeConfigFields):
        raise ValueError(
            f"TEACHER {args.teacher} is a {config.model_type!r} model, not an hf_moe MoE model (`hf-moe moefy` "
            "converts GPT-2 and T5)"
        )
    if config.model_type != "gpt2_moe":
        raise ValueError(
            f"TEACHER {args.teacher} is a {config.model_type!r} model; hf-moe distill takes causal GPT-2 MoE "
            "teachers (model_type 'gpt2_moe') only"
        )
    check_weights(folder, config, option="TEACHER")
    if not any((folder / name).is_file() for name in TOKENIZER_VOCABULARY_FILES):
        raise FileNotFoundError(
            f"TEACHER {args.teacher} has no tokenizer (none of {', '.join(TOKENIZER_VOCABULARY_FILES)}); save the "
            "teacher's tokenizer into it (tokenizer.save_pretrained(TEACHER))"
        )
    num_experts, top_k = config.num_local_experts, config.num_experts_per_tok
    if args.experts is not None and not top_k <= args.experts <= num_experts:
        raise ValueError(
            f"--experts {args.experts}: TEACHER has {num_experts} experts per MoE layer and routes each token to "
            f"{top_k}; choose {top_k}..{num_experts}"
        )
    if isinstance(args.ffn, int) and args.ffn >= num_experts:
        raise ValueError(f"--ffn {args.ffn}: TEACHER has {num_experts} experts; choose 'mean' or 0..{num_experts - 1}")
    if args.block_size is not None and args.block_size > config.n_positions:
        raise ValueError(
            f"--block-size {args.block_size} exceeds TEACHER's n_positions={config.n_positions}; choose "
            f"1..{config.n_positions}"
        )
    return config


def _build_student(args: argparse.Namespace, teacher):
    from ..conversion import dense_from_moe, mixture_of_students

    if args.student == "dense":
        return dense_from_moe(teacher, ffn=args.ffn)
    return mixture_of_students(teacher, args.layers, args.experts)
