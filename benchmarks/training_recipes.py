"""Do hf_moe's training recipes help? Held-out loss of three recipes against their plain counterpart, over seeds, on
small local text, with the differences paired by seed.

Data: the Python standard library's source (`hf_moe.training.read_corpus`), and for the multi-task study two smaller
tasks of other text the standard library ships, so nothing is downloaded: "docs", the reST help topics of
`pydoc_data.topics` (English prose about Python), and "prose", the standard library's `.txt` files (the license,
IDLE's credits, history and news; plain English). One byte-level BPE (`train_bpe_tokenizer`) is trained on all three.
Every text is cut into blocks of `block_size` tokens and its last blocks are held out (`text_blocks`).

Studies (`--study`):
1. `kd`: MoE -> student distillation (Fedus et al. 2021; Rajbhandari et al. 2022). A GPT-2 MoE teacher (a dense GPT-2
   upcycled with noise init, trained `teacher_steps` as an MoE, as `examples/distill_moe.py` does) is made once, with
   seed 0. For every seed and student (`mixture_of_students(teacher, "every_other")`; `dense_from_moe(teacher)`),
   `distill_and_measure` trains a fresh student with alpha = 0 (the plain LM loss: the baseline), alpha = 0.25, and
   staged KD (alpha = 0.25 until half of the steps, then 0). Held-out perplexity.
2. `warmup`: dense warm-up (Dua et al. 2022, `DenseWarmupCallback`): a GPT-2 MoE from a config (random init, not
   upcycled), its experts tied for the first `warmup_steps`, against the same model and batches without it.
   Held-out LM loss (router losses excluded).
3. `temperature`: multi-task temperature sampling (Dua et al. 2022, `TemperatureMixture`,
   `TaskTemperatureCallback`): the same MoE on a mixture of the three tasks (training blocks about 52 : 4 : 1),
   sampled at a fixed T = 1 (in proportion to the sizes: the baseline) or at T rising linearly from 1 to
   `end_temperature`. Held-out LM loss of each task and their mean.

Within a seed, every arm starts from the same weights and (kd, warmup) reads the same batches in the same order; the
seed sets the init (warmup, temperature), the batch order and the mixture's draws. Training is transformers' `Trainer`
(`MoeTrainer`, `DistillationTrainer`): AdamW, cosine schedule with 10% warm-up, router losses in the training loss.
The table gives mean ± std over seeds and, for each arm, the difference to the study's baseline paired by seed (mean
± std of the per-seed differences); lower is better for every number.

    python benchmarks/training_recipes.py                     # all three studies (about 20 minutes on 2 cores)
    python benchmarks/training_recipes.py --study warmup      # one study
    python benchmarks/training_recipes.py --smoke             # seconds: every code path, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import torch
import transformers
from bench_env import environment, write_atomically
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

import hf_moe
from hf_moe.training import (
    TaskTemperatureCallback,
    TemperatureMixture,
    language_model_loss,
    read_corpus,
    train_bpe_tokenizer,
)
from hf_moe.training.distill_run import distill_and_measure, text_blocks

__all__ = ["KD_ARMS", "STUDIES", "Settings", "main", "run"]

EOS = "<|endoftext|>"
STUDIES = ("kd", "warmup", "temperature")
# each kd arm: distill_and_measure's (alpha, kd_stop_fraction); the first is the baseline
KD_ARMS: dict[str, tuple[float, float | None]] = {
    "alpha=0": (0.0, None),
    "alpha=0.25": (0.25, None),
    "staged KD 0.5": (0.25, 0.5),
}
STUDENTS = ("mos", "dense")


@dataclass
class Settings:
    studies: list[str] = field(default_factory=lambda: list(STUDIES))
    corpus_chars: int = 800_000  # stdlib source: the kd and warmup text, and the temperature study's large task
    docs_chars: int = 80_000  # pydoc topics: the middle task
    prose_chars: int = 30_000  # the stdlib's .txt files: the small task
    # training blocks kept of the two small tasks, spread evenly over their text: with python's ~3360, sizes about
    # 52 : 4 : 1, so T = 1 draws prose 1.7% of the time and T = 5 22%
    docs_blocks: int = 256
    prose_blocks: int = 64
    vocab_size: int = 2048
    block_size: int = 64
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    num_experts: int = 4
    top_k: int = 2
    batch_size: int = 8
    learning_rate: float = 1e-3
    teacher_steps: int = 1000  # well past the students' 200, so the teacher knows more than they can learn alone
    steps: int = 200  # optimizer steps of every measured run
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    students: list[str] = field(default_factory=lambda: list(STUDENTS))
    warmup_steps: int = 50  # a quarter of the run with tied experts
    end_temperature: float = 5.0  # Dua et al.'s 1 -> 5
    validation_blocks: int = 128  # held-out blocks per text (fewer when the text has fewer)


SMOKE = dict(
    corpus_chars=30_000, docs_chars=8_000, prose_chars=6_000, docs_blocks=64, prose_blocks=16, vocab_size=300, block_size=16, n_layer=2, n_embd=32,
    n_head=2, batch_size=4, teacher_steps=3, steps=4, seeds=[0, 1], warmup_steps=2, validation_blocks=4,
)  # fmt: skip


def task_texts(settings: Settings) -> dict[str, list[str]]:
    """The three texts, as documents: "python" (stdlib source), "docs" (pydoc's reST topics), "prose" (.txt files)."""
    from pydoc_data.topics import topics

    docs, size = [], 0
    for name in sorted(topics):  # documents never cut, as read_corpus does
        docs.append(topics[name])
        size += len(topics[name])
        if size >= settings.docs_chars:
            break
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    # lib2to3's grammars are not prose
    prose_files = sorted(p for p in stdlib.rglob("*.txt") if not {"lib2to3", "site-packages"} & set(p.parts))
    return {
        "python": read_corpus(max_chars=settings.corpus_chars),
        "docs": docs,
        "prose": read_corpus(prose_files, max_chars=settings.prose_chars),
    }


def data(settings: Settings):
    """(tokenizer, {task: (train_NS, validation_NS)}): one BPE on all the text (the vocabulary, not the models, sees
    the held-out blocks); the python text holds out 10% of its blocks, the smaller ones 20% (at most
    `validation_blocks` kept), and keep `docs_blocks` / `prose_blocks` of their training blocks."""
    texts = task_texts(settings)
    everything = [text for documents in texts.values() for text in documents]
    tokenizer = train_bpe_tokenizer(
        everything, settings.vocab_size, [EOS], bos_token=EOS, eos_token=EOS, pad_token=EOS
    )
    kept = {"docs": settings.docs_blocks, "prose": settings.prose_blocks}
    blocks = {}
    for name, documents in texts.items():
        train_NS, validation_NS = text_blocks(
            tokenizer, documents, settings.block_size, 0.1 if name == "python" else 0.2
        )
        if name in kept:
            if len(train_NS) < kept[name]:
                raise ValueError(f"{name} has {len(train_NS)} training blocks, fewer than the {kept[name]} asked for")
            # evenly spaced, so the kept blocks span every document, as the held-out tail's neighbours do
            train_NS = train_NS[torch.linspace(0, len(train_NS) - 1, kept[name]).long()]
        blocks[name] = (train_NS, validation_NS[: settings.validation_blocks])
    return tokenizer, blocks


def gpt2_config(settings: Settings, vocab_size: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        n_positions=settings.block_size,
        n_embd=settings.n_embd,
        n_layer=settings.n_layer,
        n_head=settings.n_head,
        bos_token_id=0,
        eos_token_id=0,
    )


def training_arguments(settings: Settings, scratch: str, seed: int, steps: int) -> TrainingArguments:
    """distill_and_measure's arguments, so every study trains alike; no logs, no checkpoints."""
    return TrainingArguments(
        output_dir=scratch,
        max_steps=steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=steps // 10,
        weight_decay=0.01,
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )


def train_moe(model, train_dataset, settings: Settings, seed: int, steps: int, callbacks=()) -> float:
    """`MoeTrainer` for `steps` steps; returns the training seconds."""
    with tempfile.TemporaryDirectory(prefix="hf-moe-recipes-") as scratch:
        trainer = hf_moe.MoeTrainer(
            model=model,
            args=training_arguments(settings, scratch, seed, steps),
            train_dataset=train_dataset,
            callbacks=list(callbacks),
        )
        # the end-of-training summary only: nothing to print
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)
        start = time.perf_counter()
        trainer.train()
    model.eval()
    return time.perf_counter() - start


def as_examples(blocks_NS: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": block, "labels": block} for block in blocks_NS]


def heldout_loss(model, validation_NS: torch.Tensor) -> float:
    return language_model_loss(model, [{"input_ids": block} for block in validation_NS], batch_size=16)


def random_moe(settings: Settings, vocab_size: int, seed: int) -> hf_moe.GPT2MoeForCausalLM:
    """A GPT-2 MoE with every block MoE, initialized from `seed` (so every arm of a seed starts from these weights)."""
    config = hf_moe.GPT2MoeConfig(
        **gpt2_config(settings, vocab_size), num_experts=settings.num_experts, num_experts_per_tok=settings.top_k
    )
    torch.manual_seed(seed)
    return hf_moe.GPT2MoeForCausalLM(config)


def kd_study(settings: Settings, tokenizer, blocks, log) -> list[dict]:
    train_NS, validation_NS = blocks["python"]
    torch.manual_seed(0)
    dense = GPT2LMHeadModel(GPT2Config(**gpt2_config(settings, len(tokenizer))))
    # noise init, as examples/distill_moe.py: identical copies would make the dense student's mean of the experts
    # the upcycled FFN itself
    teacher = hf_moe.moefy(
        dense, num_experts=settings.num_experts, top_k=settings.top_k, init="noise", seed=0, progress=False
    )
    seconds = train_moe(teacher, as_examples(train_NS), settings, seed=0, steps=settings.teacher_steps)
    log(f"kd: teacher trained {settings.teacher_steps} steps ({seconds:.0f} s)")
    builders = {
        "mos": lambda: hf_moe.mixture_of_students(teacher, "every_other"),
        "dense": lambda: hf_moe.dense_from_moe(teacher),
    }
    runs = []
    for seed in settings.seeds:
        for student_name in settings.students:
            for arm, (alpha, kd_stop_fraction) in KD_ARMS.items():
                student = builders[student_name]()
                start = time.perf_counter()
                metrics = distill_and_measure(
                    student, teacher, train_NS, validation_NS, max_steps=settings.steps,
                    batch_size=settings.batch_size, learning_rate=settings.learning_rate, alpha=alpha,
                    kd_stop_fraction=kd_stop_fraction, seed=seed, progress=False,
                )  # fmt: skip
                runs.append(
                    {
                        "study": "kd",
                        "group": f"{student_name} student",
                        "arm": arm,
                        "seed": seed,
                        "metrics": {"perplexity": metrics["student_perplexity_after"]},
                        "teacher_perplexity": metrics["teacher_perplexity"],
                        "perplexity_before": metrics["student_perplexity_before"],
                        "seconds": time.perf_counter() - start,
                    }
                )
                log(
                    f"kd seed {seed} {student_name} {arm}: perplexity {metrics['student_perplexity_before']:.2f} -> "
                    f"{metrics['student_perplexity_after']:.2f} (teacher {metrics['teacher_perplexity']:.2f})"
                )
    return runs


def warmup_study(settings: Settings, tokenizer, blocks, log) -> list[dict]:
    train_NS, validation_NS = blocks["python"]
    runs = []
    for seed in settings.seeds:
        for arm in ("none", f"dense warm-up {settings.warmup_steps}"):
            model = random_moe(settings, len(tokenizer), seed)
            callbacks = [] if arm == "none" else [hf_moe.DenseWarmupCallback(settings.warmup_steps)]
            seconds = train_moe(model, as_examples(train_NS), settings, seed, settings.steps, callbacks)
            loss = heldout_loss(model, validation_NS)
            runs.append(
                {"study": "warmup", "group": "random-init MoE", "arm": arm, "seed": seed, "metrics": {"loss": loss},
                 "seconds": seconds}
            )  # fmt: skip
            log(f"warmup seed {seed} {arm}: held-out loss {loss:.4f} ({seconds:.0f} s)")
    return runs


def temperature_study(settings: Settings, tokenizer, blocks, log) -> list[dict]:
    tasks = {
        name: datasets.Dataset.from_dict({"input_ids": train_NS.tolist(), "labels": train_NS.tolist()})
        for name, (train_NS, _) in blocks.items()
    }
    runs = []
    for seed in settings.seeds:
        for arm in ("T=1", f"T 1->{settings.end_temperature:g}"):
            model = random_moe(settings, len(tokenizer), seed)
            mixture = TemperatureMixture(tasks, temperature=1.0, seed=seed)
            callbacks = [] if arm == "T=1" else [TaskTemperatureCallback(mixture, 1.0, settings.end_temperature)]
            mixture.take_drawn()
            seconds = train_moe(model, mixture, settings, seed, settings.steps, callbacks)
            drawn = mixture.take_drawn()  # the DataLoader's batches (one or two fetched ahead included)
            losses = {name: heldout_loss(model, validation_NS) for name, (_, validation_NS) in blocks.items()}
            metrics = {f"loss {name}": loss for name, loss in losses.items()}
            metrics["mean loss"] = statistics.mean(losses.values())
            runs.append(
                {
                    "study": "temperature",
                    "group": "3-task mixture",
                    "arm": arm,
                    "seed": seed,
                    "metrics": metrics,
                    "drawn_share": {name: count / sum(drawn.values()) for name, count in drawn.items()},
                    "seconds": seconds,
                }
            )
            log(
                f"temperature seed {seed} {arm}: "
                + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
                + " | drawn "
                + ", ".join(f"{name} {share:.0%}" for name, share in runs[-1]["drawn_share"].items())
            )
    return runs


def run(settings: Settings, log=print) -> dict:
    unknown = [name for name in settings.studies if name not in STUDIES]
    unknown += [name for name in settings.students if name not in STUDENTS]
    if unknown:
        raise ValueError(f"unknown studies or students {unknown}; choose from {list(STUDIES)} and {list(STUDENTS)}")
    tokenizer, blocks = data(settings)
    log(
        "data: "
        + ", ".join(f"{name} {len(t)} training / {len(v)} held-out blocks" for name, (t, v) in blocks.items())
        + f" of {settings.block_size} tokens"
    )
    studies = {"kd": kd_study, "warmup": warmup_study, "temperature": temperature_study}
    runs, seconds = [], {}
    for name in settings.studies:
        start = time.perf_counter()
        runs += studies[name](settings, tokenizer, blocks, log)
        seconds[name] = time.perf_counter() - start
        log(f"{name}: {seconds[name]:.0f} s")
    return {
        "settings": asdict(settings),
        "environment": environment(),
        "task_sizes": {name: {"train": len(t), "held_out": len(v)} for name, (t, v) in blocks.items()},
        "study_seconds": seconds,
        "runs": runs,
        "rows": summarize(runs),
    }


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (study, group, arm, metric): mean ± std over seeds, and the gap to the group's first arm (its
    baseline) paired by seed."""
    rows = []
    groups = list(dict.fromkeys((run["study"], run["group"]) for run in runs))
    for study, group in groups:
        mine = [run for run in runs if (run["study"], run["group"]) == (study, group)]
        arms = list(dict.fromkeys(run["arm"] for run in mine))
        baseline = {run["seed"]: run for run in mine if run["arm"] == arms[0]}
        for arm in arms:
            arm_runs = [run for run in mine if run["arm"] == arm]
            for metric in arm_runs[0]["metrics"]:
                values = [run["metrics"][metric] for run in arm_runs]
                gaps = [run["metrics"][metric] - baseline[run["seed"]]["metrics"][metric] for run in arm_runs]
                rows.append(
                    {
                        "study": study,
                        "group": group,
                        "arm": arm,
                        "baseline": arms[0],
                        "metric": metric,
                        "seeds": [run["seed"] for run in arm_runs],
                        "values": values,
                        "mean_std": _mean_std(values),
                        "vs_baseline": _mean_std(gaps),
                    }
                )
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def markdown_table(rows: list[dict]) -> str:
    lines = ["| study | model | arm | metric | mean ± std | vs baseline (paired) |", "|---|---|---|---|---|---|"]
    for row in rows:
        (mean, std), (gap, gap_std) = row["mean_std"], row["vs_baseline"]
        versus = "(baseline)" if row["arm"] == row["baseline"] else f"{gap:+.4f} ± {gap_std:.4f}"
        lines.append(
            f"| {row['study']} | {row['group']} | {row['arm']} | {row['metric']} | {mean:.4f} ± {std:.4f} | {versus} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", choices=(*STUDIES, "all"), default="all", help="which study (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: 0 1 2")
    parser.add_argument("--steps", type=int, default=None, help="steps of every measured run (default: 200)")
    parser.add_argument("--students", nargs="+", choices=STUDENTS, default=None, help="kd: default both")
    parser.add_argument("--teacher-steps", type=int, default=None, help="kd: the teacher's steps (default: 1000)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="warmup: tied steps (default: 50)")
    parser.add_argument("--end-temperature", type=float, default=None, help="temperature: final T (default: 5)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and steps: every code path in seconds")
    parser.add_argument("--json", default="outputs/training_recipes.json", help="where to save the runs and rows")
    args = parser.parse_args(argv)
    settings = Settings(**(SMOKE if args.smoke else {}))
    if args.study != "all":
        settings.studies = [args.study]
    for name in ("seeds", "steps", "students", "teacher_steps", "warmup_steps", "end_temperature"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    result = run(settings)
    environment_line = ", ".join(f"{key} {value}" for key, value in result["environment"].items())
    print(f"{environment_line}\n\n{markdown_table(result['rows'])}")
    write_atomically(Path(args.json), json.dumps(result, indent=2))
    print(f"saved {args.json}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
