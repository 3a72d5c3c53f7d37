"""One distillation run, measured: text -> token blocks, held-out perplexity of teacher and student, training with
`DistillationTrainer`, the student's perplexity again. `hf-moe distill` and `examples/distill_moe.py` share it.

The student is built by the caller (`hf_moe.dense_from_moe`, `hf_moe.mixture_of_students`: conversion code, which
training does not import). Perplexities leave out the router losses (`perplexity`), so teacher, MoE student and dense
student compare directly.

Shape legend: N blocks, S block size (tokens).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, TrainingArguments, set_seed

from .distillation import DistillationTrainer
from .perplexity import perplexity

__all__ = ["distill_and_measure", "text_blocks"]


def text_blocks(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], block_size: int, eval_fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train_NS, eval_NS): the texts tokenized in order, each followed by the tokenizer's eos token (when it has one),
    cut into blocks of `block_size` tokens (the remainder dropped); the last ceil(`eval_fraction` * N) blocks are the
    held-out ones, so no token is in both. Raises ValueError when there are not two blocks, one for each side."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    ids = [token for text in texts for token in tokenizer(text)["input_ids"] + eos]
    num_blocks = len(ids) // block_size
    if num_blocks < 2:
        raise ValueError(
            f"the text has {len(ids)} tokens: too few for one training and one held-out block of {block_size} tokens; "
            "give more text or a smaller block size"
        )
    blocks_NS = torch.tensor(ids[: num_blocks * block_size]).view(num_blocks, block_size)
    # at least one held-out block and at least one training block
    num_eval = min(num_blocks - 1, max(1, math.ceil(eval_fraction * num_blocks)))
    return blocks_NS[:-num_eval], blocks_NS[-num_eval:]


def distill_and_measure(
    student: nn.Module,
    teacher: nn.Module,
    train_NS: torch.Tensor,
    eval_NS: torch.Tensor,
    *,
    max_steps: int,
    batch_size: int = 8,
    learning_rate: float = 5e-4,
    alpha: float = 0.25,
    temperature: float = 1.0,
    kd_stop_fraction: float | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train `student` (in place) on `train_NS` against `teacher` for `max_steps` optimizer steps; return the metrics:
    `teacher_perplexity`, `student_perplexity_before`, `student_perplexity_after` on `eval_NS`, and the settings.

    Causal language models only (every block token is a target). Training is `DistillationTrainer` (Trainer's tqdm
    bar when `progress`), AdamW with a cosine schedule; nothing is written to disk (no checkpoints, no logs to report
    to: its output folder is a temporary one). Each perplexity pass reads the held-out blocks in order."""
    train = [{"input_ids": block, "labels": block} for block in train_NS]
    held_out = [{"input_ids": block} for block in eval_NS]
    metrics = {
        "teacher_perplexity": perplexity(teacher, held_out, batch_size=batch_size),
        "student_perplexity_before": perplexity(student, held_out, batch_size=batch_size),
    }
    set_seed(seed)
    with tempfile.TemporaryDirectory(prefix="hf-moe-distill-") as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=max_steps,
            per_device_train_batch_size=batch_size,
            learning_rate=learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=max_steps // 10,
            weight_decay=0.01,
            logging_steps=max(1, max_steps // 10),
            save_strategy="no",
            report_to="none",
            seed=seed,
            data_seed=seed,
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=not progress,
        )
        trainer = DistillationTrainer(
            model=student,
            args=args,
            train_dataset=train,
            teacher=teacher,
            alpha=alpha,
            temperature=temperature,
            kd_stop_fraction=kd_stop_fraction,
        )
        result = trainer.train()
    metrics["student_perplexity_after"] = perplexity(student, held_out, batch_size=batch_size)
    metrics.update(
        steps=trainer.state.global_step,
        train_loss=result.training_loss,
        train_blocks=len(train),
        eval_blocks=len(held_out),
        block_size=int(train_NS.shape[1]),
        batch_size=batch_size,
        learning_rate=learning_rate,
        alpha=alpha,
        temperature=temperature,
        kd_stop_fraction=kd_stop_fraction,
        seed=seed,
    )
    return metrics
