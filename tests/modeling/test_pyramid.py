"""PR-MoE pyramids (DeepSpeed-MoE): a different number of experts in each MoE layer (`num_experts_per_layer`), in
both families: the counts appear in the weights, the routers, the parameter counts, the load-balance metrics and
save / load; the configuration is checked layer by layer."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import TrainingArguments

import hf_moe
from hf_moe.modeling import moe_blocks
from tests.conftest import tiny_gpt2_moe_config
from tests.modeling.test_hub_portability import load_without_hf_moe
from tests.modeling.test_t5_moe import tiny_config as tiny_t5_config

GPT2_PYRAMID = [2, 6]  # more experts in the deeper layer, as the paper finds they benefit more
# T5: the encoder's MoE layers, then the decoder's (module order)
T5_PYRAMID = [2, 4, 4, 8]


def _expert_counts(model) -> list[tuple[int, int, int]]:
    # (experts' weights, router rows, the block's own count) of every MoE layer, in module order
    return [
        (block.experts.down_proj.shape[0], block.router.weight.shape[0], block.num_experts)
        for _, block in moe_blocks(model)
    ]


def test_gpt2_layers_have_their_own_expert_counts():
    config = tiny_gpt2_moe_config(num_experts_per_layer=GPT2_PYRAMID)
    assert config.num_local_experts == 6 and config.experts_per_layer == GPT2_PYRAMID
    model = hf_moe.GPT2MoeForCausalLM(config)
    assert _expert_counts(model) == [(2, 2, 2), (6, 6, 6)]
    counts = config.parameter_counts()
    assert counts["total"] == model.num_parameters()
    routed = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    per_expert = routed // sum(GPT2_PYRAMID)
    assert counts["experts"] == routed and counts["active"] == counts["total"] - routed + 2 * 2 * per_expert
    ids = torch.randint(2, 99, (2, 7))
    assert torch.isfinite(model(ids, labels=ids).loss)


def test_t5_layers_have_their_own_expert_counts():
    config = tiny_t5_config(num_experts_per_layer=T5_PYRAMID)
    model = hf_moe.T5MoeForConditionalGeneration(config)
    assert [n for n, _, _ in _expert_counts(model)] == T5_PYRAMID
    assert config.parameter_counts()["total"] == model.num_parameters()
    ids = torch.randint(2, 99, (2, 7))
    assert torch.isfinite(model(input_ids=ids, labels=ids[:, :4]).loss)


def test_load_balance_metrics_have_each_layers_experts(tmp_path):
    model = hf_moe.GPT2MoeForCausalLM(tiny_gpt2_moe_config(num_experts_per_layer=GPT2_PYRAMID))
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(2, 99, (8, 7))]
    args = TrainingArguments(
        str(tmp_path), max_steps=2, per_device_train_batch_size=4, logging_steps=1, report_to="none", use_cpu=True,
        save_strategy="no",
    )  # fmt: skip
    trainer = hf_moe.MoeTrainer(model=model, args=args, train_dataset=data, callbacks=[hf_moe.LoadBalanceCallback()])
    trainer.train()
    logged = trainer.state.log_history[0]
    fractions = {key for key in logged if "token_fraction_expert" in key}
    assert fractions == {f"moe/layer_00/token_fraction_expert_{e:02d}" for e in range(2)} | {
        f"moe/layer_01/token_fraction_expert_{e:02d}" for e in range(6)
    }
    for layer, experts in enumerate(GPT2_PYRAMID):
        total = sum(logged[f"moe/layer_{layer:02d}/token_fraction_expert_{e:02d}"] for e in range(experts))
        assert total == pytest.approx(1.0)


def test_experts_implementation_reaches_every_pyramid_layer():
    model = hf_moe.GPT2MoeForCausalLM(tiny_gpt2_moe_config(num_experts_per_layer=GPT2_PYRAMID)).eval()
    ids = torch.randint(2, 99, (2, 7))
    with torch.no_grad():
        reference = model(ids).logits
        for implementation in ("eager", "batched_mm", "grouped_mm"):
            model.set_experts_implementation(implementation)
            assert all(b.experts.config._experts_implementation == implementation for _, b in moe_blocks(model))
            torch.testing.assert_close(model(ids).logits, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_experts_per_layer=[2, 4, 8]), "has 3 entries, but the model has 2 MoE layers"),
        (dict(num_experts_per_layer=[1, 4]), "must be >= num_experts_per_tok=2"),
        (dict(num_experts_per_layer=[2, "4"]), "must be a list of ints"),
        (
            dict(num_experts_per_layer=[3, 4], router_type="hash", num_experts_per_tok=2, num_hash_heads=2),
            r"MoE layer 0 \(num_experts_per_layer\[0\]=3\)",
        ),
    ],
)
def test_bad_pyramids_are_refused_naming_the_layer(overrides, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        tiny_gpt2_moe_config(**overrides)


def test_pyramid_saves_and_loads_with_remote_code(tmp_path):
    model = hf_moe.GPT2MoeForCausalLM(tiny_gpt2_moe_config(num_experts_per_layer=GPT2_PYRAMID)).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    reloaded = hf_moe.GPT2MoeForCausalLM.from_pretrained(folder).eval()
    assert reloaded.config.num_experts_per_layer == GPT2_PYRAMID and _expert_counts(reloaded) == _expert_counts(model)
    ids = torch.randint(2, 99, (2, 7))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    torch.save(ids, folder / "input_ids.pt")
    with torch.no_grad():
        assert torch.equal(load_without_hf_moe(folder, "AutoModelForCausalLM", tmp_path)["result"], model(ids).logits)


def test_conversion_tools_without_pyramid_support_refuse_it():
    model = hf_moe.GPT2MoeForCausalLM(tiny_gpt2_moe_config(num_experts_per_layer=GPT2_PYRAMID))
    with pytest.raises(ValueError, match="PR-MoE pyramid"):
        hf_moe.mixture_of_students(model, "all", None)


def test_card_and_inspect_show_the_pyramid(tmp_path):
    from hf_moe.cli.inspect import describe
    from hf_moe.hub import render_model_card

    config = tiny_gpt2_moe_config(num_experts_per_layer=GPT2_PYRAMID)
    card = str(render_model_card(config))
    assert "2 to 6 experts" in card and "| Experts per MoE layer | [2, 6] (a PR-MoE pyramid" in card
    hf_moe.GPT2MoeForCausalLM(config).save_pretrained(tmp_path)
    summary = describe(str(tmp_path))
    assert summary["experts_per_layer"] == GPT2_PYRAMID and summary["weights"]["checked"]
    assert not summary["weights"].get("unexpected")
