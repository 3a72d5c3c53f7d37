"""moefy on GPT-2: function preservation, init methods' defining properties, layer choice, errors, report."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2DoubleHeadsModel, GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Model

from hf_moe import GPT2MoeForCausalLM, GPT2MoeForSequenceClassification, GPT2MoeModel
from hf_moe.conversion import ConversionReport, DenseFFN, init_experts, moefy, select_layers


def dense_gpt2(cls=GPT2LMHeadModel, **overrides):
    torch.manual_seed(0)
    fields = dict(vocab_size=99, n_positions=64, n_embd=32, n_layer=3, n_head=4, n_inner=64, pad_token_id=1)
    fields.update(overrides)
    return cls(GPT2Config(**fields)).eval()


INPUT_IDS = torch.randint(2, 99, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("top_k", [1, 2])
def test_copy_upcycling_preserves_the_dense_logits(top_k):
    dense = dense_gpt2()
    moe = moefy(dense, num_experts=4, top_k=top_k, normalize_top_k_weights=True).eval()
    assert isinstance(moe, GPT2MoeForCausalLM)
    torch.testing.assert_close(moe(INPUT_IDS).logits, dense(INPUT_IDS).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("partition", ["random", "clustered"])
def test_split_with_all_experts_and_unit_weights_preserves_the_dense_logits(partition):
    dense = dense_gpt2()
    moe = moefy(dense, num_experts=4, top_k=4, init="split", split_partition=partition, unit_combine_weights=True)
    assert moe.config.moe_intermediate_size == 16
    torch.testing.assert_close(moe.eval()(INPUT_IDS).logits, dense(INPUT_IDS).logits, rtol=1e-5, atol=1e-5)


def test_upcycled_routers_still_learn():
    moe = moefy(dense_gpt2(), num_experts=4, top_k=2).train()
    moe(INPUT_IDS, labels=INPUT_IDS).loss.backward()
    for block in moe.transformer.h:
        assert block.mlp.router.weight.grad.abs().sum() > 0


def test_non_ffn_weights_are_copied_exactly_and_the_dense_model_is_untouched():
    dense = dense_gpt2()
    before = {name: tensor.clone() for name, tensor in dense.state_dict().items()}
    moe = moefy(dense, num_experts=4, top_k=2, init="noise", moe_layers=[1])
    moe_state = moe.state_dict()
    for name, tensor in before.items():
        assert torch.equal(dense.state_dict()[name], tensor), f"moefy changed the dense {name}"
        if ".h.1.mlp." not in name:
            assert torch.equal(moe_state[name], tensor), name
    assert moe.lm_head.weight.data_ptr() == moe.transformer.wte.weight.data_ptr()  # still tied
    # the MoE model owns its weights: training it cannot change the user's dense model
    assert moe.transformer.wte.weight.data_ptr() != dense.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize(
    ("source_class", "target_class"),
    [
        (GPT2LMHeadModel, GPT2MoeForCausalLM),
        (GPT2Model, GPT2MoeModel),
        (GPT2ForSequenceClassification, GPT2MoeForSequenceClassification),
    ],
)
def test_each_gpt2_head_maps_to_its_moe_head(source_class, target_class):
    dense = dense_gpt2(source_class)
    moe = moefy(dense, num_experts=2, top_k=1, normalize_top_k_weights=True).eval()
    assert type(moe) is target_class
    dense_out, moe_out = dense(INPUT_IDS), moe(INPUT_IDS)
    key = "logits" if hasattr(dense_out, "logits") else "last_hidden_state"
    torch.testing.assert_close(moe_out[key], dense_out[key], rtol=1e-5, atol=1e-5)


def test_unsupported_models_and_heads_are_named():
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        moefy(dense_gpt2(GPT2DoubleHeadsModel))
    from transformers import BertConfig, BertModel

    with pytest.raises(ValueError, match="supports model types gpt2"):
        moefy(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)))
    with pytest.raises(ValueError, match="already an MoE model"):
        moefy(moefy(dense_gpt2(), num_experts=2, top_k=1))
    with pytest.raises(ValueError, match="init must be one of"):
        moefy(dense_gpt2(), init="magic")
    with pytest.raises(TypeError, match="folder or a Hub id"):
        moefy(42)


def test_from_a_folder_keeps_generation_config(tmp_path):
    dense = dense_gpt2()
    dense.generation_config.max_new_tokens = 7
    dense.save_pretrained(tmp_path)
    moe = moefy(str(tmp_path), num_experts=2, top_k=1)
    assert moe.generation_config.max_new_tokens == 7
    assert moe.moefy_report.source_model == str(tmp_path)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, [0, 1, 2, 3, 4, 5]),
        ("all", [0, 1, 2, 3, 4, 5]),
        ("none", []),
        ("every_other", [1, 3, 5]),
        ("top:2", [4, 5]),
        ("bottom:2", [0, 1]),
        ("5, 0,2", [0, 2, 5]),
        ([3, 1], [1, 3]),
    ],
)
def test_layer_selection(spec, expected):
    assert select_layers(spec, 6) == expected


@pytest.mark.parametrize("spec", ["top:9", "0,0", "7", "middle", "top:x"])
def test_bad_layer_specs_are_rejected(spec):
    with pytest.raises(ValueError, match="layers"):
        select_layers(spec, 6)


def test_layer_choice_reaches_the_model():
    moe = moefy(dense_gpt2(), num_experts=2, top_k=1, moe_layers="every_other")
    assert [block.is_moe for block in moe.transformer.h] == [False, True, False]
    assert moe.moefy_report.moe_layers == [1]


def toy_ffn(num_neurons=40, hidden=8) -> DenseFFN:
    generator = torch.Generator().manual_seed(0)
    return DenseFFN(
        tensors={
            "up_proj": torch.randn(hidden, num_neurons, generator=generator),
            "up_proj_bias": torch.randn(num_neurons, generator=generator),
            "down_proj": torch.randn(num_neurons, hidden, generator=generator),
            "down_proj_bias": torch.randn(hidden, generator=generator),
        },
        neuron_axes={"up_proj": 1, "up_proj_bias": 0, "down_proj": 0, "down_proj_bias": None},
        output_biases=("down_proj_bias",),
    )


def test_noise_is_scaled_to_each_weight_std_and_differs_per_expert():
    ffn = toy_ffn(num_neurons=400, hidden=50)
    experts = init_experts(ffn, 4, "noise", torch.Generator().manual_seed(0), noise_scale=0.1)
    for name in ("up_proj", "down_proj"):
        noise = experts[name] - ffn.tensors[name]
        assert noise.std().item() == pytest.approx(0.1 * ffn.tensors[name].std().item(), rel=0.05)
        assert not torch.equal(noise[0], noise[1])
    assert torch.equal(experts["up_proj_bias"][2], ffn.tensors["up_proj_bias"])


def test_drop_upcycle_reinitializes_the_ratio_with_distinct_subsets():
    ffn = toy_ffn(num_neurons=40)
    experts = init_experts(ffn, 4, "drop_upcycle", torch.Generator().manual_seed(0), drop_ratio=0.25)
    subsets = []
    for expert in range(4):
        changed_up = (experts["up_proj"][expert] != ffn.tensors["up_proj"]).any(dim=0)
        changed_down = (experts["down_proj"][expert] != ffn.tensors["down_proj"]).any(dim=1)
        assert torch.equal(changed_up, changed_down)  # a dropped neuron is new in both projections
        assert changed_up.sum().item() == 10  # 25% of 40
        subsets.append(frozenset(changed_up.nonzero().flatten().tolist()))
    assert len(set(subsets)) == 4
    assert torch.equal(experts["down_proj_bias"][0], ffn.tensors["down_proj_bias"])


def test_split_partitions_every_neuron_exactly_once():
    ffn = toy_ffn(num_neurons=40)
    for partition in ("random", "clustered"):
        experts = init_experts(ffn, 4, "split", torch.Generator().manual_seed(0), partition=partition)
        assert experts["up_proj"].shape == (4, 8, 10)
        columns = experts["up_proj"].permute(0, 2, 1).reshape(40, 8)
        assert torch.equal(
            columns[columns[:, 0].argsort()], ffn.tensors["up_proj"].t()[ffn.tensors["up_proj"][0].argsort()]
        )
        torch.testing.assert_close(experts["down_proj_bias"].sum(0), ffn.tensors["down_proj_bias"])
    with pytest.raises(ValueError, match="divides"):
        init_experts(toy_ffn(num_neurons=42), 4, "split", torch.Generator())


def test_report_counts_and_json_round_trip(tmp_path):
    dense = dense_gpt2()
    moe = moefy(dense, num_experts=4, top_k=2, init="drop_upcycle", drop_ratio=0.3, seed=5)
    report = moe.moefy_report
    assert report.parameters["total"] == moe.num_parameters()
    assert report.dense_parameters == dense.num_parameters()
    assert report.init_options == {"drop_ratio": 0.3} and report.seed == 5
    report.save(tmp_path)
    assert ConversionReport.load(tmp_path) == report


def test_seed_makes_conversion_reproducible():
    dense = dense_gpt2()
    first = moefy(dense, num_experts=4, init="drop_upcycle", seed=3).state_dict()
    second = moefy(dense, num_experts=4, init="drop_upcycle", seed=3).state_dict()
    third = moefy(dense, num_experts=4, init="drop_upcycle", seed=4).state_dict()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["transformer.h.0.mlp.experts.up_proj"], third["transformer.h.0.mlp.experts.up_proj"])
