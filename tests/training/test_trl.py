"""`MoeSFTTrainer` / `MoeDPOTrainer`: TRL's losses plus the model's router losses, checked against the model's own
loss (SFT) and against DPO's value at the reference (log 2 when policy == reference), end to end with
`LoadBalanceCallback`, a reference model and a PEFT reference adapter."""

from __future__ import annotations

import copy
import importlib
import math
import sys

import pytest
import torch

pytest.importorskip("trl")

import datasets  # noqa: E402
from peft import LoraConfig  # noqa: E402
from trl import DPOConfig, SFTConfig  # noqa: E402

import hf_moe  # noqa: E402
from hf_moe.training import MoeLoss  # noqa: E402
from hf_moe.training.trl_trainers import MoeDPOTrainer, MoeSFTTrainer  # noqa: E402
from tests.conftest import tiny_gpt2_moe_config, tiny_word_tokenizer  # noqa: E402

Z_LOSS_COEF = 0.01


def _model(**overrides):
    return hf_moe.GPT2MoeForCausalLM(tiny_gpt2_moe_config(router_z_loss_coef=Z_LOSS_COEF, **overrides))


def _texts(n=32):
    # rows of different lengths, so padding and the label counts of micro-batches differ
    return datasets.Dataset.from_dict(
        {"text": [" ".join(f"w{(i * 7 + j) % 90 + 3}" for j in range(8 + i % 6)) for i in range(n)]}
    )


def _preferences(n=16):
    rows = [
        {
            "prompt": " ".join(f"w{(i * 5 + j) % 90 + 3}" for j in range(4 + i % 3)),
            "chosen": " w5 w6 w7",
            "rejected": " w8",
        }
        for i in range(n)
    ]
    return datasets.Dataset.from_list(rows)


def _trl_args(config_class, folder, **overrides):
    fields = dict(
        output_dir=str(folder),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        logging_steps=1,
        use_cpu=True,
        # TRL defaults to bf16, and Accelerate leaves the model's forward under autocast after training: fp32 keeps
        # the trained model comparable with its reloaded copy
        bf16=False,
        max_length=32,
        save_strategy="no",
    )
    fields.update(overrides)
    return config_class(**fields)


def _sft_args(tmp_path, **overrides):
    return _trl_args(SFTConfig, tmp_path / "sft", **{"max_steps": 3, **overrides})


def _dpo_args(tmp_path, **overrides):
    return _trl_args(DPOConfig, tmp_path / "dpo", **{"max_steps": 2, **overrides})


def _first_batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


@pytest.mark.parametrize("accumulation", [1, 3])
def test_sft_loss_is_the_models_own_loss_with_router_losses(tmp_path, accumulation):
    model = _model()
    trainer = MoeSFTTrainer(model=model, args=_sft_args(tmp_path), train_dataset=_texts(), processing_class=_tok())
    batch = _first_batch(trainer)
    labels = batch["labels"]
    # num_items_in_batch as Trainer passes it under accumulation: the label tokens of the whole step
    num_items = labels[..., 1:].ne(-100).sum() * accumulation if accumulation > 1 else None
    model.train()
    torch.manual_seed(1)
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
    torch.manual_seed(1)
    own = model(**batch, num_items_in_batch=num_items)
    torch.testing.assert_close(loss, own.loss, rtol=1e-5, atol=1e-6)
    # the router losses are really in it: without them TRL's token loss alone is smaller by their weighted sum
    share = 1.0 if num_items is None else labels[..., 1:].ne(-100).sum() / num_items
    router_part = share * (model.config.aux_loss_coef * own.aux_loss + Z_LOSS_COEF * own.z_loss)
    assert router_part > 1e-3
    language_model_only = torch.nn.functional.cross_entropy(
        own.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum"
    ) / (labels[..., 1:].ne(-100).sum() if num_items is None else num_items)
    torch.testing.assert_close(loss - router_part, language_model_only, rtol=1e-5, atol=1e-6)


def test_sft_label_smoothing_keeps_the_router_losses(tmp_path):
    model = _model()
    args = _sft_args(tmp_path, label_smoothing_factor=0.1)
    trainer = MoeSFTTrainer(model=model, args=args, train_dataset=_texts(), processing_class=_tok())
    batch = _first_batch(trainer)
    model.train()
    loss = trainer.compute_loss(model, dict(batch))
    # independent reference: hf_moe's MoeLoss (label-smoothed CE + weighted router losses) on the model's outputs
    reference = MoeLoss(copy.deepcopy(model), label_smoothing=0.1)
    outputs = model(**{k: v for k, v in batch.items() if k != "labels"}, output_router_logits=True)
    torch.testing.assert_close(loss, reference(outputs, batch["labels"]), rtol=1e-5, atol=1e-6)


def test_sft_trains_logs_load_balance_and_leaves_the_config_alone(tmp_path):
    model = _model()
    before = model.config.to_dict()
    router_before = model.transformer.h[0].mlp.router.weight.detach().clone()
    trainer = MoeSFTTrainer(
        model=model,
        args=_sft_args(tmp_path, gradient_accumulation_steps=2),
        train_dataset=_texts(),
        processing_class=_tok(),
        callbacks=[hf_moe.LoadBalanceCallback()],
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3
    for entry in logs:
        assert entry["aux_loss"] > 0 and entry["z_loss"] > 0
        assert entry["moe/load_imbalance"] >= 1.0 and "moe/layer_01/token_fraction_expert_03" in entry
    # the router losses reach the router: it trained
    assert not torch.equal(model.transformer.h[0].mlp.router.weight, router_before)
    # TRL's own MoE loss switches output_router_logits / router_aux_loss_coef on the config; a saved config must not.
    # use_cache is TRL's own choice for every model it trains (off under gradient checkpointing), not a router setting
    after = model.config.to_dict()
    assert {k: v for k, v in after.items() if k != "use_cache"} == {
        k: v for k, v in before.items() if k != "use_cache"
    }
    model.save_pretrained(tmp_path / "saved")
    reloaded = hf_moe.GPT2MoeForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = torch.tensor([[3, 4, 5, 6]])
    torch.testing.assert_close(reloaded(ids).logits, model.eval()(ids).logits)


def test_sft_config_coefficient_replaces_the_models(tmp_path):
    model = _model()
    args = _sft_args(tmp_path, router_aux_loss_coef=0.5)
    trainer = MoeSFTTrainer(model=model, args=args, train_dataset=_texts(), processing_class=_tok())
    assert model.config.aux_loss_coef == 0.5
    batch = _first_batch(trainer)
    model.train()
    torch.manual_seed(2)
    loss = trainer.compute_loss(model, dict(batch))
    torch.manual_seed(2)
    torch.testing.assert_close(loss, model(**batch).loss, rtol=1e-5, atol=1e-6)


def test_sft_hash_router_adds_no_router_loss(tmp_path):
    # a hash router learns nothing: its layers report zero router losses, as the model's own aux_loss / z_loss do
    model = _model(router_type="hash", num_experts_per_tok=1)
    trainer = MoeSFTTrainer(
        model=model, args=_sft_args(tmp_path, max_steps=1), train_dataset=_texts(), processing_class=_tok()
    )
    batch = _first_batch(trainer)
    model.train()
    torch.testing.assert_close(trainer.compute_loss(model, dict(batch)), model(**batch).loss, rtol=1e-5, atol=1e-6)
    trainer.train()
    assert trainer.state.log_history[0]["aux_loss"] == 0.0 and trainer.state.log_history[0]["z_loss"] == 0.0


def _dpo_reference_value(trainer, model, batch):
    """DPO's sigmoid loss at policy == reference is exactly log 2; plus the policy's weighted router losses on the
    concatenated chosen + rejected batch, from the model's own forward."""
    outputs = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_router_logits=True,
        use_cache=False,
    )
    return math.log(2) + model.config.aux_loss_coef * outputs.aux_loss + Z_LOSS_COEF * outputs.z_loss


def test_dpo_loss_with_a_reference_model_adds_the_policys_router_losses(tmp_path):
    model = _model()
    trainer = MoeDPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=_dpo_args(tmp_path),
        train_dataset=_preferences(),
        processing_class=_tok(),
    )
    batch = _first_batch(trainer)
    model.eval()  # no dropout in the tiny config either way; eval keeps the comparison deterministic
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        torch.testing.assert_close(loss, _dpo_reference_value(trainer, model, batch), rtol=1e-5, atol=1e-6)


def test_dpo_without_a_reference_uses_a_frozen_copy_of_the_policy(tmp_path):
    # built in memory: no config._name_or_path for TRL to load a reference from
    model = _model()
    initial = {name: param.detach().clone() for name, param in model.named_parameters()}
    trainer = MoeDPOTrainer(
        model=model, args=_dpo_args(tmp_path), train_dataset=_preferences(), processing_class=_tok()
    )
    reference = trainer.accelerator.unwrap_model(trainer.ref_model)
    assert reference is not model and not reference.training
    assert not any(param.requires_grad for param in reference.parameters())
    trainer.train()
    # the policy moved away from its reference, which stayed the policy as it was when the trainer was made
    assert any(not torch.equal(param, initial[name]) for name, param in model.named_parameters())
    for name, param in reference.named_parameters():
        assert torch.equal(param, initial[name]), name


def test_dpo_with_a_peft_reference_adapter_trains_the_adapter_only(tmp_path):
    model = _model()
    base_weights = {name: param.detach().clone() for name, param in model.named_parameters()}
    trainer = MoeDPOTrainer(
        model=model,
        args=_dpo_args(tmp_path),
        train_dataset=_preferences(),
        processing_class=_tok(),
        peft_config=LoraConfig(r=4, target_modules=["c_attn"]),
        callbacks=[hf_moe.LoadBalanceCallback()],
    )
    batch = _first_batch(trainer)
    trainer.model.eval()
    with torch.no_grad():
        # LoRA starts at B = 0, so the policy is its reference (the adapter disabled); the router losses recorded are
        # the policy's forward's, not the reference forward's that follows it
        loss = trainer.compute_loss(trainer.model, dict(batch))
        torch.testing.assert_close(loss, _dpo_reference_value(trainer, trainer.model, batch), rtol=1e-5, atol=1e-6)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(entry["aux_loss"] > 0 and "moe/load_imbalance" in entry for entry in logs)
    lora = {name: p for name, p in trainer.model.named_parameters() if "lora_B" in name}
    assert lora and any(p.abs().sum() > 0 for p in lora.values())
    for name, param in trainer.model.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base_weights[name.replace(".base_layer", "")]), name


def test_refuses_t5_and_non_moe_models(tmp_path):
    t5 = hf_moe.T5MoeForConditionalGeneration(
        hf_moe.T5MoeConfig(vocab_size=99, d_model=16, d_ff=32, d_kv=4, num_heads=2, num_layers=1, num_experts=2)
    )
    with pytest.raises(ValueError, match="decoder-only models only"):
        MoeSFTTrainer(model=t5, args=_sft_args(tmp_path), train_dataset=_texts(), processing_class=_tok())
    from transformers import GPT2Config, GPT2LMHeadModel

    dense = GPT2LMHeadModel(GPT2Config(vocab_size=99, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(TypeError, match="trains hf_moe models"):
        MoeDPOTrainer(model=dense, args=_dpo_args(tmp_path), train_dataset=_preferences(), processing_class=_tok())


def test_import_without_trl_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises ImportError
    monkeypatch.delitem(sys.modules, "hf_moe.training.trl_trainers")
    with pytest.raises(ImportError, match=r"hf-moe\[trl\]"):
        importlib.import_module("hf_moe.training.trl_trainers")


def _tok():
    return tiny_word_tokenizer()
