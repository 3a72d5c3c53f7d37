"""Tiny models, data and Trainer arguments for the training tests (CPU, fp32, seconds per run)."""

from __future__ import annotations

import torch
from transformers import TrainingArguments

import hf_moe
from tests.conftest import tiny_gpt2_moe_config

T5_FIELDS = dict(
    vocab_size=99,
    d_model=32,
    d_ff=64,
    d_kv=8,
    num_heads=4,
    num_layers=2,
    dropout_rate=0.0,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
    num_experts=4,
    num_experts_per_tok=2,
)


def tiny_gpt2(**overrides) -> hf_moe.GPT2MoeForCausalLM:
    return hf_moe.GPT2MoeForCausalLM(tiny_gpt2_moe_config(**overrides))


def tiny_t5(**overrides) -> hf_moe.T5MoeForConditionalGeneration:
    return hf_moe.T5MoeForConditionalGeneration(hf_moe.T5MoeConfig(**{**T5_FIELDS, **overrides}))


def causal_examples(num: int = 16, length: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(3, 99, (num, length), generator=generator)
    return [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row.clone()} for row in rows]


def seq2seq_examples(num: int = 16, source: int = 10, target: int = 6, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randint(2, 99, (num, source), generator=generator)
    labels = torch.randint(2, 99, (num, target), generator=generator)
    return [
        {"input_ids": i, "attention_mask": torch.ones_like(i), "labels": t}
        for i, t in zip(inputs, labels, strict=True)
    ]


def training_args(output_dir, **overrides) -> TrainingArguments:
    fields = dict(
        output_dir=str(output_dir),
        max_steps=4,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        logging_steps=2,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
    )
    fields.update(overrides)
    return TrainingArguments(**fields)


class RoutingRecorder:
    """Counts (token, expert) assignments per MoE layer with forward hooks on the routers, apart from the counters.

    An independent witness for the callback's numbers: counts by training mode, so train and eval stay apart.
    """

    def __init__(self, model):
        self.routers = [block.router for _, block in hf_moe.training.moe_blocks(model)]
        self.counts = {
            True: [torch.zeros(r.num_experts) for r in self.routers],
            False: [torch.zeros(r.num_experts) for r in self.routers],
        }
        self.handles = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]

    def _hook(self, index):
        def hook(module, inputs, output):
            if torch._C._current_graph_task_id() != -1:  # recomputation inside backward
                return
            mask = inputs[1] if len(inputs) > 1 and inputs[1] is not None else None
            weights = torch.ones(output.top_k_index_TK.shape[0]) if mask is None else mask.reshape(-1).float()
            slots = weights.repeat_interleave(output.top_k_index_TK.shape[1])
            self.counts[module.training][index].scatter_add_(0, output.top_k_index_TK.reshape(-1), slots)

        return hook

    def take(self, training: bool) -> list[torch.Tensor]:
        counts = self.counts[training]
        self.counts[training] = [torch.zeros_like(c) for c in counts]
        return counts
