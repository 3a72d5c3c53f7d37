"""The declared family mappings: complete (every dense weight has a place, every MoE weight a source), truthful
(copy init puts each dense FFN tensor, as declared, into every expert) and guarded (a wrong declaration fails loudly)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import GPT2ForSequenceClassification, GPT2Model, MT5Config, MT5EncoderModel, T5EncoderModel, T5Model

from hf_moe.conversion import moefy
from hf_moe.conversion.family import FamilyMapping
from hf_moe.conversion.moefy import FAMILIES
from hf_moe.modeling.moe_parts import moe_blocks, moe_experts, moe_routers

from .test_moefy import dense_gpt2
from .test_moefy_t5 import dense_t5
from .tiny_dense import T5_FIELDS


def dense_mt5_encoder():
    torch.manual_seed(0)
    return MT5EncoderModel(MT5Config(**T5_FIELDS)).eval()


CASES = {
    "gpt2 lm, all layers": (dense_gpt2, {}),
    "gpt2 lm, layer 1": (dense_gpt2, {"moe_layers": [1]}),
    "gpt2 base": (lambda: dense_gpt2(GPT2Model), {}),
    "gpt2 classification": (lambda: dense_gpt2(GPT2ForSequenceClassification), {"moe_layers": "every_other"}),
    "t5 v1.0": (dense_t5, {}),
    "t5 v1.1, some layers": (lambda: dense_t5("v1.1"), {"encoder_moe_layers": "none", "decoder_moe_layers": [0, 2]}),
    "t5 base v1.1": (lambda: dense_t5("v1.1", T5Model), {}),
    "t5 encoder": (lambda: dense_t5(cls=T5EncoderModel), {"moe_layers": "bottom:1"}),
    "mt5 encoder": (dense_mt5_encoder, {}),
}


def convert(case):
    make_dense, layers = CASES[case]
    dense = make_dense()
    moe = moefy(dense, num_experts=3, top_k=2, init="copy", **layers)
    family = FAMILIES[dense.config.model_type]
    return dense, moe, family, family.layer_plans(dense, moe, family.select_moe_layers(dense.config, layers))


@pytest.mark.parametrize("case", list(CASES))
def test_every_weight_has_a_place_and_a_source(case):
    dense, moe, family, plans = convert(case)
    dense_state, moe_state = dense.state_dict(), moe.state_dict()

    # dense side: each weight is consumed by exactly one FFN template, or copied under its own name
    consumed = [name for plan in plans for name in plan.dense_names.values()]
    assert len(consumed) == len(set(consumed))
    copied = set(dense_state) - set(consumed)
    assert copied <= set(moe_state), sorted(copied - set(moe_state))
    assert not set(consumed) & set(moe_state)
    for name in copied:
        assert torch.equal(moe_state[name], dense_state[name]), name

    # MoE side: each weight is copied by name, or belongs to a router (seeded init) or to experts a plan fills
    router_names = {f"{prefix}.{key}" for prefix, router in moe_routers(moe) for key in router.state_dict()}
    expert_names = {f"{prefix}.{key}" for prefix, experts in moe_experts(moe) for key in experts.state_dict()}
    assert set(moe_state) == copied | router_names | expert_names
    assert [plan.block for plan in plans] == [block for _, block in moe_blocks(moe)]
    planned = set()
    for plan in plans:
        ((experts_name, experts),) = moe_experts(plan.block)
        declared = {tensor.expert for tensor in plan.kind.tensors}
        assert set(dict(experts.named_parameters())) == declared, plan.label
        planned |= {f"{plan.label}.{experts_name}.{name}" for name in declared}
        # copy init: expert e is the dense FFN in the declared layout (no transpose), halves stacked as declared
        expected = plan.kind.expert_parameters(
            {key: dense_state[name].unsqueeze(0) for key, name in plan.dense_names.items()}
        )
        for name, tensor in expected.items():
            parameter = getattr(experts, name)
            for expert in range(parameter.shape[0]):
                assert torch.equal(parameter[expert], tensor[0]), f"{plan.label}.{name}[{expert}]"
    assert planned == expert_names


def test_the_cases_exercise_every_declared_ffn_tensor():
    used = set()
    for case in CASES:
        _, _, family, plans = convert(case)
        used |= {(family.name, tensor.dense) for plan in plans for tensor in plan.kind.tensors}
    declared = {
        (family.name, tensor.dense)
        for family in FAMILIES.values()
        for kind in family.ffn_kinds
        for tensor in kind.tensors
    }
    assert declared == used


def test_the_mappings_are_the_only_family_knowledge():
    assert set(FAMILIES) == {"gpt2", "t5", "mt5"}
    for family in FAMILIES.values():
        assert family.default_source_class in family.target_classes
        # both built-in families store FFN weights in their experts' layout
        assert not any(tensor.transpose for kind in family.ffn_kinds for tensor in kind.tensors)
    with pytest.raises(dataclasses.FrozenInstanceError):
        FAMILIES["gpt2"].block = "h.{layer}.attn"


def _broken_gpt2(**changes) -> FamilyMapping:
    return dataclasses.replace(FAMILIES["gpt2"], **changes)


def _gpt2_kind(**tensor_changes):
    (kind,) = FAMILIES["gpt2"].ffn_kinds
    tensors = tuple(
        dataclasses.replace(tensor, **tensor_changes.get(tensor.expert, {}))
        for tensor in kind.tensors
        if tensor_changes.get(tensor.expert) != "drop"
    )
    return (dataclasses.replace(kind, tensors=tensors),)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ffn_kinds": _gpt2_kind(down_proj_bias="drop")}, "no place in the MoE model"),
        ({"ffn_kinds": _gpt2_kind(up_proj={"transpose": True})}, "transpose"),
        ({"ffn_kinds": _gpt2_kind(up_proj={"expert": "gate_up_proj"})}, "makes"),
        ({"block": "h.{layer}.attn"}, "should be an MoE block"),
        ({"block": "blocks.{layer}.mlp"}, "finds no dense FFN for the MoE blocks"),
    ],
)
def test_a_wrong_mapping_fails_loudly(monkeypatch, changes, message):
    monkeypatch.setitem(FAMILIES, "gpt2", _broken_gpt2(**changes))
    with pytest.raises(RuntimeError, match=message):
        moefy(dense_gpt2(), num_experts=2, top_k=1)


def test_a_declaration_with_unknown_placeholders_or_default_fails_at_once():
    with pytest.raises(ValueError, match="sublayer"):
        _broken_gpt2(block="h.{layer}.layer.{sublayer}")
    with pytest.raises(ValueError, match="default_source_class"):
        _broken_gpt2(default_source_class="GPT2DoubleHeadsModel")
