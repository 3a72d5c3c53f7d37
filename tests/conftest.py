"""Shared fixtures: tiny configs (hidden 32, 2 layers, vocab 99, 4 experts), CPU fp32, seeded."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import hf_moe


def tiny_gpt2_moe_config(**overrides) -> hf_moe.GPT2MoeConfig:
    fields = dict(
        vocab_size=99,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_inner=64,
        num_experts=4,
        num_experts_per_tok=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    fields.update(overrides)
    return hf_moe.GPT2MoeConfig(**fields)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_word_tokenizer(vocab_size: int = 99):
    """An offline word-level tokenizer over `vocab_size` ids: "<pad>"=1, "<eos>"=0, then "w2", "w3", ..."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<pad>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", bos_token="<eos>"
    )


def load_benchmark(script: str):
    """A script of benchmarks/ loaded as a module (`"moe_layer"` -> benchmarks/moe_layer.py). benchmarks/ is a folder
    of scripts, not a package: it goes on sys.path first, since the scripts import their sibling helpers
    (bench_env.py) as `python benchmarks/x.py` lets them."""
    import importlib.util

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(f"{script}_benchmark", folder / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    # dataclasses resolve string annotations through sys.modules, so the module must be registered first
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
