"""Distill a GPT-2 Mixture-of-Experts teacher into a dense student or a Mixture-of-Students, offline.

The teacher is made here, so nothing is downloaded: a byte-level BPE tokenizer trained on the Python standard library's
source (`hf_moe.training.read_corpus`), a small dense GPT-2, upcycled with `moefy` (noise init, so the experts differ)
and trained for `--teacher-steps` as an MoE. Then, as `hf-moe distill` does for a saved teacher:

  * the student: `hf_moe.dense_from_moe` (`--student dense`, Fedus et al. 2021) or `hf_moe.mixture_of_students`
    (`--student mos`, Rajbhandari et al. 2022: some of the teacher's layers and experts);
  * `hf_moe.training.distill_run.distill_and_measure`: perplexity of teacher and student on held-out blocks, training
    with `hf_moe.DistillationTrainer` (Trainer's progress bar), the student's perplexity again.

`--output-dir` gets the teacher, the student (each with the tokenizer) and `metrics.json`.

    python examples/distill_moe.py --output-dir outputs/distill
    python examples/distill_moe.py --student dense --max-steps 300
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from moe_example_utils import write_json
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments, set_seed

import hf_moe
from hf_moe.conversion import moefy
from hf_moe.training import read_corpus, train_bpe_tokenizer
from hf_moe.training.distill_run import distill_and_measure, text_blocks

EOS = "<|endoftext|>"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    teacher = parser.add_argument_group("teacher (built here)")
    teacher.add_argument("--corpus-chars", type=int, default=1_000_000, help="characters of stdlib source read")
    teacher.add_argument("--vocab-size", type=int, default=2048, help="vocabulary of the BPE trained here")
    teacher.add_argument("--n-layer", type=int, default=4, help="transformer blocks")
    teacher.add_argument("--n-embd", type=int, default=128, help="hidden size")
    teacher.add_argument("--n-head", type=int, default=4, help="attention heads")
    teacher.add_argument("--num-experts", type=int, default=4, help="experts per MoE layer")
    teacher.add_argument("--top-k", type=int, default=2, help="experts per token")
    teacher.add_argument("--teacher-steps", type=int, default=300, help="optimizer steps of the teacher's training")

    student = parser.add_argument_group("student and distillation")
    student.add_argument("--student", choices=("dense", "mos"), default="mos", help="dense_from_moe or MoS")
    student.add_argument("--ffn", default="mean", help="--student dense: 'mean' of the experts or an expert index")
    student.add_argument("--layers", default="every_other", help="--student mos: teacher layers kept")
    student.add_argument("--experts", type=int, default=None, help="--student mos: first K experts kept (all)")
    student.add_argument("--max-steps", type=int, default=200, help="optimizer steps of the distillation")
    student.add_argument("--alpha", type=float, default=0.25, help="the teacher's share of the loss")
    student.add_argument("--temperature", type=float, default=1.0, help="softmax temperature of the KD term")
    student.add_argument("--kd-stop-fraction", type=float, default=None, help="staged KD: stop KD after this fraction")

    run = parser.add_argument_group("data and run")
    run.add_argument("--block-size", type=int, default=64, help="tokens per block")
    run.add_argument("--eval-fraction", type=float, default=0.1, help="blocks held out for the perplexities")
    run.add_argument("--batch-size", type=int, default=8, help="blocks per step")
    run.add_argument("--learning-rate", type=float, default=1e-3, help="peak learning rate (teacher and student)")
    run.add_argument("--seed", type=int, default=0, help="seeds the models, the conversion and the training")
    run.add_argument("--output-dir", type=Path, default=Path("outputs/distill"), help="where models and metrics go")
    return parser.parse_args(argv)


def build_teacher(args: argparse.Namespace, vocab_size: int, train_NS: torch.Tensor) -> hf_moe.GPT2MoeForCausalLM:
    """A small dense GPT-2, upcycled and trained as an MoE for `--teacher-steps` on the training blocks."""
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=args.block_size,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=args.n_head,
        bos_token_id=0,
        eos_token_id=0,
    )
    dense = GPT2LMHeadModel(config)
    # noise init: identical copies would give the student nothing to choose between (--experts, --ffn I)
    teacher = moefy(dense, num_experts=args.num_experts, top_k=args.top_k, init="noise", seed=args.seed)
    if args.teacher_steps > 0:
        blocks = [{"input_ids": block, "labels": block} for block in train_NS]
        with tempfile.TemporaryDirectory() as scratch:  # no checkpoints: the Trainer's folder stays empty
            training = TrainingArguments(
                output_dir=scratch,
                max_steps=args.teacher_steps,
                per_device_train_batch_size=args.batch_size,
                learning_rate=args.learning_rate,
                lr_scheduler_type="cosine",
                warmup_steps=args.teacher_steps // 10,
                save_strategy="no",
                report_to="none",
                seed=args.seed,
                use_cpu=not torch.cuda.is_available(),
            )
            hf_moe.MoeTrainer(model=teacher, args=training, train_dataset=blocks).train()
    return teacher.cpu().eval()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_seed(args.seed)
    texts = read_corpus(max_chars=args.corpus_chars)
    # trained on all the text, held-out blocks included: the vocabulary, not the model, sees them
    tokenizer = train_bpe_tokenizer(texts, args.vocab_size, [EOS], bos_token=EOS, eos_token=EOS, pad_token=EOS)
    train_NS, eval_NS = text_blocks(tokenizer, texts, args.block_size, args.eval_fraction)
    print(f"{len(train_NS)} training and {len(eval_NS)} held-out blocks of {args.block_size} tokens")

    teacher = build_teacher(args, len(tokenizer), train_NS)
    if args.student == "dense":
        student = hf_moe.dense_from_moe(teacher, ffn=args.ffn if args.ffn == "mean" else int(args.ffn))
    else:
        student = hf_moe.mixture_of_students(teacher, args.layers, args.experts)
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
    metrics = {"student": args.student, "student_class": type(student).__name__, **metrics}
    for name, model in (("teacher", teacher), ("student", student.cpu())):
        model.save_pretrained(args.output_dir / name)
        tokenizer.save_pretrained(args.output_dir / name)
    write_json(args.output_dir / "metrics.json", metrics)
    print(
        f"held-out perplexity: teacher {metrics['teacher_perplexity']:.2f}, {args.student} student "
        f"{metrics['student_perplexity_before']:.2f} -> {metrics['student_perplexity_after']:.2f} "
        f"after {metrics['steps']} steps; wrote {args.output_dir}"
    )
    return metrics


if __name__ == "__main__":
    main()
