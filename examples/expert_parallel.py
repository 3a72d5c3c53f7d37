"""Train an MoE model with expert parallelism: transformers' `DistributedConfig` shards the experts, `Trainer` trains.

Runs on CPU with gloo (2 processes) and on GPUs with NCCL, unchanged:

    torchrun --nproc_per_node 2 examples/expert_parallel.py --output-dir /tmp/ep_run
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
        examples/expert_parallel.py --output-dir /tmp/ep_run   # --cpu would start ONE process
    torchrun --nproc_per_node 8 examples/expert_parallel.py --num-experts 8 --ep-size 8 ...   # 8 GPUs

Each process holds a distinct batch (`fsdp_size` = number of processes: FSDP2 shards the dense weights) and
`num_experts / ep_size` whole experts; tokens reach their experts through all-to-all inside each group of `ep_size`
ranks. The script builds a tiny model on rank 0 (or takes --model), trains it on random tokens with hf_moe's
`MoeTrainer` (whose checkpoints of a sharded model can resume: add `--resume-from-checkpoint last`), saves a
consolidated checkpoint and checks that it loads on one process.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from moe_example_utils import shut_down_distributed
from transformers import TrainingArguments
from transformers.distributed import DistributedConfig

import hf_moe
from hf_moe.parallel import describe_layout, validate_expert_parallel


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True, help="where the model, checkpoints and the final save go")
    parser.add_argument("--model", help="an hf_moe GPT-2 MoE or T5 MoE folder; default: a tiny fresh GPT-2 MoE")
    parser.add_argument("--num-experts", type=int, default=4, help="experts per MoE layer of the fresh model")
    parser.add_argument("--ep-size", type=int, default=None, help="expert-parallel ranks; default: all processes")
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per process and step")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--resume-from-checkpoint",
        default=None,
        help="a checkpoint folder of an earlier run, or 'last' for the newest one under --output-dir/checkpoints",
    )
    return parser.parse_args(argv)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, vocab_size: int, seq_len: int, size: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, vocab_size, (size, seq_len), generator=generator)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def tiny_model_folder(output_dir: str, num_experts: int, seed: int) -> str:
    """A fresh tiny GPT-2 MoE, written by rank 0 (every rank waits for it)."""
    folder = os.path.join(output_dir, "initial")
    if int(os.environ.get("RANK", 0)) == 0 and not os.path.isdir(folder):
        torch.manual_seed(seed)
        config = hf_moe.GPT2MoeConfig(
            vocab_size=128,
            n_positions=64,
            n_embd=64,
            n_layer=2,
            n_head=4,
            num_experts=num_experts,
            bos_token_id=0,
            eos_token_id=0,
        )
        hf_moe.GPT2MoeForCausalLM(config).save_pretrained(folder)
    return folder


def main(argv=None) -> None:
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and not dist.is_initialized():
        # gloo on CPU; transformers would pick nccl on GPUs by itself
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        train(args, world_size)
    finally:
        shut_down_distributed()  # train()'s model and trainer are freed by now, as it needs


def train(args: argparse.Namespace, world_size: int) -> None:
    folder = args.model or tiny_model_folder(args.output_dir, args.num_experts, args.seed)
    if dist.is_initialized():
        dist.barrier()
    config = hf_moe.GPT2MoeConfig.from_pretrained(folder) if args.model is None else None
    from transformers import AutoConfig

    config = config or AutoConfig.from_pretrained(folder)
    layout = DistributedConfig(fsdp_size=world_size, ep_size=args.ep_size or world_size)
    validate_expert_parallel(config, layout, world_size)  # a clear error before any weight is read
    if int(os.environ.get("RANK", 0)) == 0:
        print(describe_layout(layout, config.num_local_experts))

    model_class = hf_moe.T5MoeForConditionalGeneration if config.model_type == "t5_moe" else hf_moe.GPT2MoeForCausalLM
    distributed = dict(distributed_config=layout) if world_size > 1 else {}
    # distributed, the model also flattens the experts' 2D (efsdp, ep) mesh: their gradient norm is one all_reduce
    model = model_class.from_pretrained(folder, **distributed)

    training_args = TrainingArguments(
        output_dir=os.path.join(args.output_dir, "checkpoints"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.max_steps,
        learning_rate=1e-3,
        save_steps=max(1, args.max_steps // 2),
        logging_steps=1,
        seed=args.seed,
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        dataloader_drop_last=True,
    )
    dataset = RandomTokens(config.vocab_size, args.seq_len, size=64 * world_size, seed=args.seed)
    # MoeTrainer, not Trainer: transformers' Trainer refuses full checkpoints of a model sharded at load time;
    # MoeTrainer writes the sharded optimizer state with PyTorch Distributed Checkpoint, so the run can resume
    trainer = hf_moe.MoeTrainer(model=model, args=training_args, train_dataset=dataset)
    resume = True if args.resume_from_checkpoint == "last" else args.resume_from_checkpoint
    final = os.path.join(args.output_dir, "final")
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(final)  # collective: every rank joins the gather, rank 0 writes one consolidated folder

    if int(os.environ.get("RANK", 0)) == 0:
        single = model_class.from_pretrained(final)  # one process, no DistributedConfig
        print(f"saved a consolidated checkpoint to {final} ({sum(p.numel() for p in single.parameters())} params)")


if __name__ == "__main__":
    main()
