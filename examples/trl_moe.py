"""Fine-tune a GPT-2 Mixture-of-Experts with TRL, offline: SFT with `hf_moe.MoeSFTTrainer`, then DPO with
`hf_moe.MoeDPOTrainer`, the model's router losses in both losses and `hf_moe.LoadBalanceCallback` logging.

Everything is made here, so nothing is downloaded: a byte-level BPE tokenizer trained on the Python standard library's
source (`hf_moe.training.read_corpus`), a small random dense GPT-2 upcycled with `moefy` (noise init), and the data:

  * SFT: the source cut into blocks of `--block-size` tokens (language modeling; TRL's "already tokenized" input);
  * DPO: offline preference pairs from blocks: the prompt is a block's first half (cut at a word boundary, so TRL's
    tokenization of prompt + completion keeps the prompt's tokens), "chosen" its true continuation, "rejected" the
    continuation of the next block. A model that reads the prompt prefers the true continuation.

The last `--eval-fraction` of the blocks is held out, for the perplexity and for held-out preference pairs. The
reference of DPO (`--reference`) is a frozen copy of the SFT model ("model", TRL makes it) or the SFT model with a LoRA
adapter disabled ("adapter": only the LoRA on `c_attn` trains, then it is merged into the weights).

`--output-dir` gets `sft/` and `dpo/` (each a model that `AutoModelForCausalLM.from_pretrained` loads, with the
tokenizer) and `metrics.json`: held-out perplexity and preference accuracy (the share of held-out pairs whose chosen
continuation has the higher log-likelihood) before SFT, after SFT and after DPO, and the load-balance metrics.

    python examples/trl_moe.py --output-dir outputs/trl
    python examples/trl_moe.py --reference adapter --dpo-steps 200
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import datasets
import torch
from moe_example_utils import moe_metrics, print_short_logs, write_json
from peft import LoraConfig
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast, set_seed
from trl import DPOConfig, SFTConfig

import hf_moe
from hf_moe.conversion import moefy
from hf_moe.training import perplexity, read_corpus, train_bpe_tokenizer
from hf_moe.training.distill_run import text_blocks

EOS = "<|endoftext|>"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model (built here)")
    model.add_argument("--corpus-chars", type=int, default=1_000_000, help="characters of stdlib source read")
    model.add_argument("--vocab-size", type=int, default=2048, help="vocabulary of the BPE trained here")
    model.add_argument("--n-layer", type=int, default=2, help="transformer blocks")
    model.add_argument("--n-embd", type=int, default=128, help="hidden size")
    model.add_argument("--n-head", type=int, default=4, help="attention heads")
    model.add_argument("--num-experts", type=int, default=4, help="experts per MoE layer")
    model.add_argument("--top-k", type=int, default=2, help="experts per token")

    training = parser.add_argument_group("SFT and DPO")
    training.add_argument("--sft-steps", type=int, default=300, help="optimizer steps of SFT")
    training.add_argument("--sft-learning-rate", type=float, default=1e-3, help="peak learning rate of SFT")
    training.add_argument("--dpo-steps", type=int, default=100, help="optimizer steps of DPO")
    training.add_argument("--dpo-learning-rate", type=float, default=1e-4, help="peak learning rate of DPO")
    training.add_argument("--beta", type=float, default=0.1, help="DPO's beta (strength of the reference)")
    training.add_argument(
        "--reference",
        choices=("model", "adapter"),
        default="model",
        help="DPO's reference: a frozen copy of the SFT model, or the SFT model under a disabled LoRA adapter",
    )
    training.add_argument("--lora-rank", type=int, default=8, help="--reference adapter: LoRA rank")

    run = parser.add_argument_group("data and run")
    run.add_argument("--block-size", type=int, default=64, help="tokens per block (SFT sequence, prompt + answer)")
    run.add_argument("--eval-fraction", type=float, default=0.05, help="blocks held out for the measurements")
    run.add_argument("--batch-size", type=int, default=8, help="sequences (SFT) or pairs (DPO) per step")
    run.add_argument("--seed", type=int, default=0, help="seeds the model, the conversion and the training")
    run.add_argument("--output-dir", type=Path, default=Path("outputs/trl"), help="where models and metrics go")
    args = parser.parse_args(argv)
    for name in ("sft_steps", "dpo_steps", "block_size", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def preference_pairs(tokenizer: PreTrainedTokenizerFast, blocks_NS: torch.Tensor) -> list[dict]:
    """Pairs from consecutive blocks: prompt = a block up to the word boundary nearest its middle, chosen = the rest
    of the block, rejected = as many tokens of the next block, from a word boundary of its own. Token ids and text of
    each part.

    Both answers have the same number of tokens, so neither wins the log-likelihood comparison by being shorter. Both
    start with a token that begins a word (" name") and the prompt ends without whitespace: byte-level BPE does not
    merge across that boundary, so TRL's tokenization of prompt + answer starts with the prompt's tokens. A block
    without such a boundary, or whose next block has none early enough, gives no pair."""
    blocks = blocks_NS.tolist()
    boundaries = [_word_boundaries(tokenizer, block) for block in blocks]
    pairs = []
    for index, (block, cuts) in enumerate(zip(blocks, boundaries, strict=True)):
        if not cuts:
            continue
        cut = min(cuts, key=lambda cut: abs(cut - len(block) // 2))
        following = (index + 1) % len(blocks)
        answer_length = len(block) - cut
        # the next block's boundaries with a whole answer after them; the latest one, nearest the text that follows
        other_cuts = [other for other in boundaries[following] if other + answer_length <= len(blocks[following])]
        if not other_cuts:
            continue
        other_cut = max(other_cuts)
        parts = {
            "prompt": block[:cut],
            "chosen": block[cut:],
            "rejected": blocks[following][other_cut : other_cut + answer_length],
        }
        pairs.append(
            {**{f"{k}_ids": v for k, v in parts.items()}, **{k: tokenizer.decode(v) for k, v in parts.items()}}
        )
    return pairs


def _word_boundaries(tokenizer: PreTrainedTokenizerFast, ids: list[int]) -> list[int]:
    """Positions `cut` (0 < cut < len(ids) - 1) where ids[cut] begins a word and ids[cut - 1] does not end in
    whitespace."""
    pieces = tokenizer.convert_ids_to_tokens(ids)  # byte-level pieces: "Ġ" is a space, "Ċ" a newline, "ĉ" a tab
    return [
        cut
        for cut in range(1, len(ids) - 1)
        if pieces[cut].startswith("Ġ") and len(pieces[cut]) > 1 and not pieces[cut - 1].endswith(("Ġ", "Ċ", "ĉ"))
    ]


@torch.no_grad()
def preference_accuracy(model, pairs: list[dict]) -> dict[str, float]:
    """The share of `pairs` whose chosen answer has a higher log-likelihood than the rejected one, given the prompt,
    and the mean difference of the two (nats); from the logits, router losses left out."""
    model.eval()
    device = next(model.parameters()).device
    wins, margins = 0, []
    for pair in pairs:
        scores = []
        for answer in ("chosen_ids", "rejected_ids"):
            ids_S = torch.tensor(pair["prompt_ids"] + pair[answer], device=device)
            log_probs_SV = model(ids_S[None]).logits[0, :-1].log_softmax(-1)
            answer_positions = range(len(pair["prompt_ids"]) - 1, len(ids_S) - 1)
            scores.append(log_probs_SV[list(answer_positions), ids_S[len(pair["prompt_ids"]) :]].sum())
        margins.append((scores[0] - scores[1]).item())
        wins += margins[-1] > 0
    return {"accuracy": wins / len(pairs), "mean_margin": sum(margins) / len(margins)}


def measure(model, held_out_blocks: list[dict], held_out_pairs: list[dict], batch_size: int) -> dict[str, float]:
    return {
        "perplexity": perplexity(model, held_out_blocks, batch_size=batch_size),
        **{f"preference_{k}": v for k, v in preference_accuracy(model, held_out_pairs).items()},
    }


def trl_arguments(config_class, args: argparse.Namespace, scratch: str, steps: int, learning_rate: float, **extra):
    return config_class(
        output_dir=scratch,  # no checkpoints (save_strategy="no"): the trainer's folder is a temporary one
        max_steps=steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=steps // 10,
        logging_steps=max(1, steps // 10),
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        # TRL defaults to bf16; the measurements before and after are in fp32, so training is too
        bf16=False,
        disable_tqdm=True,  # one short line per log (print_short_logs): the per-expert metrics go to metrics.json
        **extra,
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_seed(args.seed)
    texts = read_corpus(max_chars=args.corpus_chars)
    tokenizer = train_bpe_tokenizer(texts, args.vocab_size, [EOS], bos_token=EOS, eos_token=EOS, pad_token=EOS)
    train_NS, eval_NS = text_blocks(tokenizer, texts, args.block_size, args.eval_fraction)
    train_pairs, held_out_pairs = preference_pairs(tokenizer, train_NS), preference_pairs(tokenizer, eval_NS)
    held_out_blocks = [{"input_ids": block} for block in eval_NS]
    print(f"{len(train_NS)} training and {len(eval_NS)} held-out blocks of {args.block_size} tokens")

    dense = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=args.block_size + 1,  # DPO adds an EOS to every answer
            n_embd=args.n_embd,
            n_layer=args.n_layer,
            n_head=args.n_head,
            bos_token_id=tokenizer.eos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    model = moefy(dense, num_experts=args.num_experts, top_k=args.top_k, init="noise", seed=args.seed)
    metrics = {"reference": args.reference, "before_sft": measure(model, held_out_blocks, held_out_pairs, 8)}

    scratch = tempfile.mkdtemp(prefix="hf-moe-trl-")
    sft = hf_moe.MoeSFTTrainer(
        model=model,
        args=trl_arguments(
            SFTConfig, args, scratch, args.sft_steps, args.sft_learning_rate, max_length=args.block_size
        ),
        train_dataset=datasets.Dataset.from_dict({"input_ids": train_NS.tolist()}),
        processing_class=tokenizer,
        callbacks=[hf_moe.LoadBalanceCallback()],
    )
    print_short_logs(sft)
    sft.train()
    metrics["after_sft"] = measure(model, held_out_blocks, held_out_pairs, 8)
    metrics["sft_moe"] = moe_metrics(sft.state.log_history)
    _save(model, tokenizer, args.output_dir / "sft")

    dpo_data = datasets.Dataset.from_list(
        [{k: pair[k] for k in ("prompt", "chosen", "rejected")} for pair in train_pairs]
    )
    # LoRA on GPT-2's fused attention projection (a Conv1D); without it TRL copies the model as the frozen reference
    lora = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, target_modules=["c_attn"], fan_in_fan_out=True)
    dpo = hf_moe.MoeDPOTrainer(
        model=model,
        args=trl_arguments(
            DPOConfig,
            args,
            scratch,
            args.dpo_steps,
            args.dpo_learning_rate,
            beta=args.beta,
            max_length=args.block_size + 1,
        ),
        train_dataset=dpo_data,
        processing_class=tokenizer,
        peft_config=lora if args.reference == "adapter" else None,
        callbacks=[hf_moe.LoadBalanceCallback()],
    )
    print_short_logs(dpo)
    dpo.train()
    # the adapter merged into the weights: a plain hf_moe model again, loadable without PEFT
    model = dpo.model.merge_and_unload() if args.reference == "adapter" else dpo.model
    metrics["after_dpo"] = measure(model, held_out_blocks, held_out_pairs, 8)
    metrics["dpo_moe"] = moe_metrics(dpo.state.log_history)
    metrics["dpo_train_log"] = [entry for entry in dpo.state.log_history if "loss" in entry][-1]
    metrics.update(
        sft_steps=sft.state.global_step,
        dpo_steps=dpo.state.global_step,
        train_blocks=len(train_NS),
        held_out_blocks=len(eval_NS),
        held_out_pairs=len(held_out_pairs),
        block_size=args.block_size,
        seed=args.seed,
    )
    shutil.rmtree(scratch, ignore_errors=True)
    _save(model, tokenizer, args.output_dir / "dpo")
    write_json(args.output_dir / "metrics.json", metrics)
    print(
        "held-out perplexity {:.2f} -> {:.2f} (SFT) -> {:.2f} (DPO); preference accuracy {:.2f} -> {:.2f} -> {:.2f} "
        "on {} pairs; wrote {}".format(
            *(metrics[stage]["perplexity"] for stage in ("before_sft", "after_sft", "after_dpo")),
            *(metrics[stage]["preference_accuracy"] for stage in ("before_sft", "after_sft", "after_dpo")),
            len(held_out_pairs),
            args.output_dir,
        )
    )
    return metrics


def _save(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


if __name__ == "__main__":
    main()
