"""merge_experts (Branch-Train-MiX): experts are the sources' FFNs bit for bit, the rest their mean; copies of one
model keep its function; sources that differ in what matters are refused, naming the source and the difference."""

from __future__ import annotations

import json
import re

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model, T5Config, T5ForConditionalGeneration

from hf_moe import GPT2MoeForCausalLM, T5MoeForConditionalGeneration, merge_experts
from hf_moe.conversion import MergeReport, save_converted
from tests.conftest import tiny_word_tokenizer

from . import tiny_dense
from .tiny_dense import INPUT_IDS, T5_INPUTS, T5_KINDS

GPT2_FIELDS = dict(vocab_size=99, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=64, pad_token_id=1)
T5_FIELDS = {**tiny_dense.T5_FIELDS, "num_decoder_layers": 2}


def dense_gpt2(seed: int = 0, cls=GPT2LMHeadModel, **overrides):
    torch.manual_seed(seed)
    return cls(GPT2Config(**{**GPT2_FIELDS, **overrides})).eval()


def dense_t5(seed: int = 0, kind: str = "v1.1", **overrides):
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(**T5_FIELDS, **T5_KINDS[kind], **overrides)).eval()


def fine_tuned(base: nn.Module, seed: int) -> nn.Module:
    """A stand-in for a fine-tune of `base`: every tensor moved by its own seeded noise, so no two sources agree on
    any weight (not even on the layer norms and zero biases a fresh init gives every seed)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in base.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return base


def sequential_mean(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The mean the docs promise: a float64 sum in source order, divided by the count, cast back."""
    total = tensors[0].double().clone()
    for tensor in tensors[1:]:
        total += tensor.double()
    return (total / len(tensors)).to(tensors[0].dtype)


def check_shared_weights_are_the_mean(moe, sources, ffn_names: set[str]) -> int:
    """Every source weight outside the MoE layers' FFNs equals the sources' mean in the MoE; returns how many."""
    states = [source.state_dict() for source in sources]
    moe_state = moe.state_dict()
    checked = 0
    for name in states[0]:
        if name in ffn_names:
            continue
        values = [state[name] for state in states]
        assert not any(torch.equal(values[0], value) for value in values[1:]), f"the sources agree on {name}"
        assert torch.equal(moe_state[name], sequential_mean(values)), name
        checked += 1
    return checked


def test_gpt2_experts_are_each_sources_ffn_and_the_rest_is_the_mean():
    sources = [fine_tuned(dense_gpt2(), seed) for seed in (1, 2, 3)]
    before = [{name: t.clone() for name, t in source.state_dict().items()} for source in sources]
    moe = merge_experts(sources, top_k=2, moe_layers=[1], progress=False)
    assert isinstance(moe, GPT2MoeForCausalLM) and moe.config.num_local_experts == 3
    experts = moe.transformer.h[1].mlp.experts
    for i, source in enumerate(sources):
        mlp = source.transformer.h[1].mlp
        assert torch.equal(experts.up_proj[i], mlp.c_fc.weight)
        assert torch.equal(experts.up_proj_bias[i], mlp.c_fc.bias)
        assert torch.equal(experts.down_proj[i], mlp.c_proj.weight)
        assert torch.equal(experts.down_proj_bias[i], mlp.c_proj.bias)
    assert not torch.equal(experts.up_proj[0], experts.up_proj[1])  # the sources differ, so the order is tested
    # layer 0 stays dense: its FFN is the mean of the sources' FFNs, like every other shared weight
    ffn_names = {f"transformer.h.1.mlp.{n}" for n in ("c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias")}
    assert check_shared_weights_are_the_mean(moe, sources, ffn_names) == len(before[0]) - 4
    assert torch.equal(
        moe.transformer.h[0].mlp.c_fc.weight, sequential_mean([s.transformer.h[0].mlp.c_fc.weight for s in sources])
    )
    assert moe.lm_head.weight.data_ptr() == moe.transformer.wte.weight.data_ptr()  # still tied
    for source, state in zip(sources, before, strict=True):  # the sources are untouched
        assert all(torch.equal(source.state_dict()[name], tensor) for name, tensor in state.items())


@pytest.mark.parametrize("kind", ["v1.0", "v1.1"])
def test_t5_experts_are_each_sources_ffn_and_the_rest_is_the_mean(kind):
    sources = [fine_tuned(dense_t5(0, kind), seed) for seed in (1, 2, 3)]
    moe = merge_experts(sources, top_k=2, encoder_moe_layers=[1], progress=False)
    assert isinstance(moe, T5MoeForConditionalGeneration)
    ffn_names = set()
    for stack, layers, sublayer in (("encoder", [1], 1), ("decoder", [0, 1], 2)):
        for layer in layers:
            experts = getattr(moe, stack).block[layer].layer[sublayer].DenseReluDense.experts
            for i, source in enumerate(sources):
                dense = getattr(source, stack).block[layer].layer[sublayer].DenseReluDense
                if kind == "v1.0":
                    assert torch.equal(experts.up_proj[i], dense.wi.weight)
                else:  # [wi_0; wi_1]: the layout transformers' gated experts split with chunk(2)
                    assert torch.equal(experts.gate_up_proj[i], torch.cat([dense.wi_0.weight, dense.wi_1.weight]))
                assert torch.equal(experts.down_proj[i], dense.wo.weight)
            prefix = f"{stack}.block.{layer}.layer.{sublayer}.DenseReluDense"
            ffn_names |= {name for name in sources[0].state_dict() if name.startswith(prefix)}
    assert check_shared_weights_are_the_mean(moe, sources, ffn_names) > 0
    # encoder layer 0 stays dense: the mean of the sources' FFNs
    dense_ffn = moe.encoder.block[0].layer[1].DenseReluDense.wo.weight
    assert torch.equal(
        dense_ffn, sequential_mean([s.encoder.block[0].layer[1].DenseReluDense.wo.weight for s in sources])
    )


def test_bf16_sources_keep_their_experts_bit_for_bit_and_the_mean_is_cast_back():
    sources = [fine_tuned(dense_gpt2(), seed).to(torch.bfloat16) for seed in (1, 2, 3)]
    moe = merge_experts(sources, top_k=1, progress=False)
    assert moe.dtype == torch.bfloat16
    for i, source in enumerate(sources):
        assert torch.equal(moe.transformer.h[0].mlp.experts.down_proj[i], source.transformer.h[0].mlp.c_proj.weight)
    wte = [s.transformer.wte.weight for s in sources]
    assert torch.equal(moe.transformer.wte.weight, sequential_mean(wte))  # float64 mean, then bf16
    assert not torch.equal(moe.transformer.wte.weight, (wte[0] + wte[1] + wte[2]) / 3)  # not bf16 sums (rounded each)


def assert_shared_weights_are_the_sources(moe, dense) -> None:
    """The mean of copies is the copied weight itself, bit for bit (a float32 (x + x + x) / 3 often is not)."""
    moe_state = moe.state_dict()
    shared = [name for name in dense.state_dict() if name in moe_state]
    assert len(shared) > 10
    for name in shared:
        assert torch.equal(moe_state[name], dense.state_dict()[name]), name


@pytest.mark.parametrize(("num_copies", "top_k"), [(2, 1), (3, 2), (3, 3)])
def test_copies_of_one_gpt2_keep_its_logits(num_copies, top_k):
    dense = dense_gpt2()
    moe = merge_experts([dense] * num_copies, top_k=top_k, normalize_top_k_weights=True, progress=False).eval()
    torch.testing.assert_close(moe(INPUT_IDS).logits, dense(INPUT_IDS).logits, rtol=1e-5, atol=1e-5)
    assert_shared_weights_are_the_sources(moe, dense)


@pytest.mark.parametrize("kind", ["v1.0", "v1.1"])
def test_copies_of_one_t5_keep_its_logits(kind):
    dense = dense_t5(0, kind)
    moe = merge_experts([dense] * 3, top_k=2, normalize_top_k_weights=True, progress=False).eval()
    torch.testing.assert_close(moe(**T5_INPUTS).logits, dense(**T5_INPUTS).logits, rtol=1e-5, atol=1e-5)
    assert_shared_weights_are_the_sources(moe, dense)


def test_routers_are_seeded_and_learn():
    sources = [dense_gpt2(seed) for seed in (0, 1)]
    first = merge_experts(sources, top_k=1, seed=5, progress=False)
    again = merge_experts(sources, top_k=1, seed=5, progress=False)
    other = merge_experts(sources, top_k=1, seed=6, progress=False)
    router = "transformer.h.0.mlp.router.weight"
    assert torch.equal(first.state_dict()[router], again.state_dict()[router])
    assert not torch.equal(first.state_dict()[router], other.state_dict()[router])
    first.train()(INPUT_IDS, labels=INPUT_IDS).loss.backward()
    assert first.transformer.h[0].mlp.router.weight.grad.abs().sum() > 0


def test_the_report_names_each_experts_source(tmp_path):
    folders = []
    for seed in (0, 1):
        folders.append(tmp_path / f"domain{seed}")
        dense_gpt2(seed).save_pretrained(folders[-1])
    moe = merge_experts([str(f) for f in folders], top_k=1, moe_layers="top:1", progress=False)
    report = moe.moefy_report
    assert isinstance(report, MergeReport)
    assert report.sources == [str(f) for f in folders] and report.num_experts == 2
    assert report.init_method == "btx" and report.moe_layers == [1]
    save_converted(moe, tmp_path / "merged")
    saved = json.loads((tmp_path / "merged" / "moefy_report.json").read_text())
    assert saved["sources"] == report.sources
    assert MergeReport.load(tmp_path / "merged") == report


def test_function_neutral_config_fields_may_differ():
    moe = merge_experts([dense_gpt2(0), dense_gpt2(1, resid_pdrop=0.3, initializer_range=0.05)], progress=False)
    assert moe.config.resid_pdrop == 0.1  # sources[0]'s


def test_too_few_sources_and_wrong_arguments_are_named():
    with pytest.raises(ValueError, match="2 or more dense models .* got 1 source"):
        merge_experts([dense_gpt2()], progress=False)
    with pytest.raises(TypeError, match="list of 2 or more"):
        merge_experts(dense_gpt2(), progress=False)
    with pytest.raises(TypeError, match=r"sources\[1\]: merge_experts takes a transformers model"):
        merge_experts([dense_gpt2(), 42], progress=False)
    with pytest.raises(ValueError, match="one expert per source: num_local_experts is the number of sources"):
        merge_experts([dense_gpt2(), dense_gpt2(1)], num_local_experts=4, progress=False)
    with pytest.raises(ValueError, match="merge_experts got 'capacity_facto'"):
        merge_experts([dense_gpt2(), dense_gpt2(1)], capacity_facto=1.0, progress=False)


def test_shared_blocks_are_refused():
    # each MoE layer is made from the sources' own layer; one block for every layer cannot hold them
    with pytest.raises(ValueError, match="share_blocks_across_layers=True .* is not supported"):
        merge_experts([dense_gpt2(), dense_gpt2(1)], share_blocks_across_layers=True, progress=False)


def test_different_model_types_and_heads_are_refused():
    with pytest.raises(ValueError, match=r"sources\[1\] \(T5ForConditionalGeneration\) is a 't5' model"):
        merge_experts([dense_gpt2(), dense_t5()], progress=False)
    with pytest.raises(ValueError, match=r"sources\[2\] \(GPT2Model\) is a GPT2Model, .* same head"):
        merge_experts([dense_gpt2(), dense_gpt2(1), dense_gpt2(2, GPT2Model)], progress=False)


@pytest.mark.parametrize(
    ("field", "value", "label"),
    [
        ("n_embd", 64, "n_embd (hidden size) is 64 (sources[0]: 32)"),
        ("n_layer", 3, "n_layer (layers) is 3"),
        ("n_inner", 128, "n_inner (FFN size) is 128"),
        ("vocab_size", 100, "vocab_size (vocabulary size) is 100"),
        ("activation_function", "relu", "activation_function is 'relu'"),
    ],
)
def test_different_config_shapes_are_refused_before_any_weight_loads(tmp_path, field, value, label):
    dense_gpt2(0).save_pretrained(tmp_path / "a")
    dense_gpt2(1, **{field: value}).save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "model.safetensors").write_bytes(b"not weights")  # never read: the config check comes first
    with pytest.raises(
        ValueError,
        match=rf"the config of sources\[1\] \({re.escape(str(tmp_path / 'b'))}\) differs .*{re.escape(label)}",
    ):
        merge_experts([str(tmp_path / "a"), str(tmp_path / "b")], progress=False)


def test_different_tensors_are_refused():
    extra = dense_gpt2(1)
    extra.transformer.adapter = nn.Linear(32, 32)  # a name sources[0] lacks
    with pytest.raises(
        ValueError, match=r"sources\[1\] .* has tensors that sources\[0\] .* lacks: transformer.adapter"
    ):
        merge_experts([dense_gpt2(0), extra], progress=False)
    reshaped = dense_gpt2(1)
    reshaped.transformer.h[0].attn.c_attn.bias = nn.Parameter(torch.zeros(97))
    with pytest.raises(ValueError, match=r"sources\[1\] .*'s transformer.h.0.attn.c_attn.bias is \(97,\)"):
        merge_experts([dense_gpt2(0), reshaped], progress=False)
    with pytest.raises(ValueError, match=r"sources\[1\] .* holds torch.float16 weights"):
        merge_experts([dense_gpt2(0), dense_gpt2(1).half()], progress=False)


def other_word_tokenizer():
    """Same size and special tokens as `tiny_word_tokenizer`, other words: another vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<pad>": 1, "<unk>": 2, **{f"v{i}": i for i in range(3, 99)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", bos_token="<eos>"
    )


def test_tokenizers_must_be_identical_and_are_compared_before_any_weight_loads(tmp_path):
    for name, tokenizer in (("a", tiny_word_tokenizer()), ("b", tiny_word_tokenizer()), ("c", other_word_tokenizer())):
        dense_gpt2(ord(name)).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    folders = [str(tmp_path / name) for name in "abc"]
    assert merge_experts(folders[:2], top_k=1, progress=False).config.num_local_experts == 2  # same tokenizer: fine
    (tmp_path / "c" / "model.safetensors").write_bytes(b"not weights")  # never read: the tokenizers differ first
    with pytest.raises(
        ValueError, match=r"tokenizer of sources\[2\] \(.*c\) differs from sources\[0\].* in tokenizer.json 'model'"
    ):
        merge_experts(folders, top_k=1, progress=False)
    # another special token: named by its file and key
    config = json.loads((tmp_path / "b" / "tokenizer_config.json").read_text())
    (tmp_path / "b" / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<unk>"}))
    with pytest.raises(ValueError, match=r"sources\[1\].* in tokenizer_config.json 'pad_token'"):
        merge_experts(folders[:2], top_k=1, progress=False)
