"""examples/peft_lora_moe.py: LoRA on attention and on the 3D experts, save, reload, merge, on both families; and
the PEFT limitations the README states (if PEFT lifts one, a test here fails and the README needs an update)."""

from __future__ import annotations

import contextlib
import json
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

import hf_moe
from tests.conftest import tiny_gpt2_moe_config

EXPERT_TARGETS = ["mlp.experts.up_proj", "mlp.experts.down_proj"]
# peft 0.21.2's PeftModel.__init__ reads `is_gradient_checkpointing`, deprecated in transformers 5.24 (FutureWarning);
# the tests that call get_peft_model directly ignore that one message, as examples/peft_lora_moe.py does
quiet_peft = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_lora_round_trip(example, tmp_path, family, capsys):
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        example("peft_lora_moe").main(
            [
                "--family", family, "--max-steps", "6", "--batch-size", "4", "--block-size", "32",
                "--logging-steps", "3", "--corpus-bytes", "60000", "--vocab-size", "400", "--learning-rate", "5e-3",
                "--output-dir", str(out),
            ]
        )  # fmt: skip
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    assert max(map(len, capsys.readouterr().out.splitlines())) <= 300
    metrics = json.loads((out / "metrics.json").read_text())
    # training moved the model, so the equalities below are not those of two untouched copies
    assert metrics["max_abs_diff_adapter_vs_base"] > 1e-3
    assert metrics["max_abs_diff_reloaded_vs_adapter"] <= 1e-5
    assert metrics["max_abs_diff_merged_vs_adapter"] <= 1e-5
    assert metrics["max_abs_diff_merged_saved_vs_adapter"] <= 1e-5

    attention = json.loads((out / "adapters" / "attention" / "adapter_config.json").read_text())
    experts = json.loads((out / "adapters" / "experts" / "adapter_config.json").read_text())
    assert attention["fan_in_fan_out"] is (family == "gpt2") and attention["lora_dropout"] > 0
    assert experts["lora_dropout"] == 0 and experts["target_parameters"]
    assert set(experts["target_parameters"]) == {"experts.up_proj", "experts.down_proj"}

    # the merge changed both the attention weights and the expert weights, and left no LoRA behind
    base, merged = load_file(out / "base" / "model.safetensors"), load_file(out / "merged" / "model.safetensors")
    assert set(base) == set(merged)
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    attention_names = ("c_attn.weight",) if family == "gpt2" else ("q.weight", "v.weight")
    assert any(name.endswith(attention_names) for name in changed)
    assert any(name.endswith("experts.up_proj") for name in changed)
    assert any(name.endswith("experts.down_proj") for name in changed)
    assert all(name.endswith(attention_names + ("experts.up_proj", "experts.down_proj")) for name in changed)


def test_expert_targets_follow_the_experts_layout(example):
    """Gated T5 experts keep their up and gate projections in one `gate_up_proj`; biases are never targets."""
    from tests.modeling.test_t5_moe import tiny_model

    expert_parameter_targets = example("peft_lora_moe").expert_parameter_targets
    assert expert_parameter_targets(tiny_model(feed_forward_proj="gated-gelu")) == [
        "experts.down_proj",
        "experts.gate_up_proj",
    ]
    assert expert_parameter_targets(tiny_gpt2_moe()) == ["experts.down_proj", "experts.up_proj"]


def tiny_gpt2_moe():
    return hf_moe.GPT2MoeForCausalLM(tiny_gpt2_moe_config())


@pytest.mark.parametrize(
    ("config", "message"),
    [
        # GPT-2's Conv1D attention needs fan_in_fan_out, which parameter targets refuse: one config cannot hold both
        (dict(target_modules=["c_attn"], fan_in_fan_out=True, target_parameters=EXPERT_TARGETS), "fan_in_fan_out"),
        # ...even without asking: PEFT turns fan_in_fan_out on for Conv1D in the shared config
        (dict(target_modules=["c_attn"], target_parameters=EXPERT_TARGETS), "fan_in_fan_out"),
        (dict(target_modules=[], target_parameters=EXPERT_TARGETS, lora_dropout=0.1), "lora_dropout"),
        (dict(target_modules=[], target_parameters=EXPERT_TARGETS, lora_bias=True), "lora_bias"),
        (dict(target_modules=[], target_parameters=EXPERT_TARGETS, use_dora=True), "DoRA|dora"),
    ],
)
@quiet_peft
def test_peft_limitations_stated_in_the_readme(config, message):
    # on Conv1D attention without fan_in_fan_out PEFT says it turns fan_in_fan_out on, then fails on the experts
    turns_it_on = bool(config["target_modules"]) and not config.get("fan_in_fan_out")
    warns = pytest.warns(UserWarning, match="fan_in_fan_out") if turns_it_on else contextlib.nullcontext()
    with pytest.raises(ValueError, match=message), warns:
        get_peft_model(tiny_gpt2_moe(), LoraConfig(r=4, **config))


@quiet_peft
def test_peft_requires_one_parameter_set_for_all_adapters():
    model = get_peft_model(tiny_gpt2_moe(), LoraConfig(r=4, target_modules=[], target_parameters=EXPERT_TARGETS))
    with pytest.raises(ValueError, match="same set of parameters"):
        model.add_adapter("second", LoraConfig(r=4, target_modules=[], target_parameters=EXPERT_TARGETS[:1]))


@quiet_peft
def test_attention_weight_as_a_parameter_target_is_one_adapter_workaround():
    """The README's workaround for a single GPT-2 adapter: target `attn.c_attn.weight` as a parameter (a low-rank
    update of the (in, out) matrix is still a low-rank update), with the experts; merges exactly."""
    config = LoraConfig(r=4, target_modules=[], target_parameters=["attn.c_attn.weight", *EXPERT_TARGETS])
    config.init_lora_weights = False  # random B: the adapter changes the output from the start
    base = tiny_gpt2_moe().eval()
    input_ids = torch.randint(3, 99, (2, 12))
    with torch.no_grad():
        base_logits = base(input_ids).logits
        model = get_peft_model(base, config).eval()
        adapter_logits = model(input_ids).logits
        merged_logits = model.merge_and_unload()(input_ids).logits
    assert (adapter_logits - base_logits).abs().max() > 1e-3
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-5, rtol=0)
