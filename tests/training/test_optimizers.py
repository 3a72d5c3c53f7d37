"""MoE optimizer presets: which parameters each preset freezes, parameter groups, expert LR scaling, Trainer use."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import Trainer

from hf_moe.modeling import MoeExperts, Router
from hf_moe.training import (
    MoeTrainer,
    apply_moe_preset,
    classify_moe_parameters,
    create_moe_optimizer,
    moe_param_groups,
)

from .helpers import causal_examples, tiny_gpt2, tiny_t5, training_args


def names_by_kind(model) -> dict[str, set[str]]:
    # the expected answer, from module types directly
    kinds = {"experts": set(), "routers": set()}
    for module_name, module in model.named_modules():
        kind = "experts" if isinstance(module, MoeExperts) else "routers" if isinstance(module, Router) else None
        if kind:
            kinds[kind] |= {f"{module_name}.{n}" for n, _ in module.named_parameters()}
    kinds["other"] = {n for n, _ in model.named_parameters()} - kinds["experts"] - kinds["routers"]
    return kinds


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_t5], ids=["gpt2", "t5"])
@pytest.mark.parametrize(
    "preset, trained",
    [
        ("all", {"experts", "routers", "other"}),
        ("freeze_experts", {"routers", "other"}),
        ("train_non_experts_only", {"other"}),
        ("train_routers_only", {"routers"}),
    ],
)
def test_preset_freezes_exactly_the_intended_parameters(make_model, preset, trained):
    model = make_model()
    expected = names_by_kind(model)
    assert all(expected.values())  # every kind is present in the tiny models
    assert {n for n, k in classify_moe_parameters(model).items() if k == "experts"} == expected["experts"]
    frozen = apply_moe_preset(model, preset)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set().union(*(expected[k] for k in trained))
    assert set(frozen) == {n for n, _ in model.named_parameters()} - trainable


def test_preset_never_unfreezes_and_rejects_unknown_names():
    model = tiny_gpt2()
    model.transformer.wte.weight.requires_grad_(False)
    apply_moe_preset(model, "freeze_experts")
    assert not model.transformer.wte.weight.requires_grad
    with pytest.raises(ValueError, match="preset must be one of"):
        apply_moe_preset(model, "freeze_everything")


def test_param_groups_scale_expert_lr_by_sqrt_num_experts():
    model = tiny_gpt2()
    groups = moe_param_groups(model, learning_rate=1e-3, weight_decay=0.1, expert_lr_scale="sqrt_num_experts")
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"experts", "experts_no_decay", "routers", "other", "other_no_decay"}
    assert by_name["experts"]["lr"] == pytest.approx(1e-3 * math.sqrt(4))
    assert by_name["experts_no_decay"]["weight_decay"] == 0.0  # expert biases
    assert by_name["routers"]["lr"] == 1e-3 and by_name["routers"]["weight_decay"] == 0.1
    expected = names_by_kind(model)
    params = {id(p): n for n, p in model.named_parameters()}
    assert {params[id(p)] for g in groups if g["name"].startswith("experts") for p in g["params"]} == expected[
        "experts"
    ]
    assert sum(len(g["params"]) for g in groups) == len(params)  # each parameter in exactly one group
    with pytest.raises(ValueError, match="expert_lr_scale"):
        moe_param_groups(model, learning_rate=1e-3, expert_lr_scale="cubic")


def test_create_moe_optimizer_with_plain_trainer(tmp_path):
    model = tiny_gpt2()
    args = training_args(tmp_path, max_steps=2, lr_scheduler_type="constant", logging_steps=1)
    optimizer = create_moe_optimizer(model, args, preset="freeze_experts", expert_lr_scale=3.0)
    assert isinstance(optimizer, torch.optim.AdamW)  # args.optim's class, as Trainer would build it
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model=model, args=args, train_dataset=causal_examples(8), optimizers=(optimizer, None))
    trainer.train()
    kinds = classify_moe_parameters(model)
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == (kinds[name] != "experts"), name


def test_moe_trainer_builds_scaled_groups(tmp_path):
    model = tiny_gpt2()
    args = training_args(tmp_path, max_steps=1, lr_scheduler_type="constant", learning_rate=2e-3)
    trainer = MoeTrainer(
        model=model,
        args=args,
        train_dataset=causal_examples(4),
        moe_preset="train_routers_only",
        router_lr_scale=0.5,
    )
    trainer.train()
    groups = trainer.optimizer.param_groups
    assert {g["name"] for g in groups} == {"routers"}
    assert groups[0]["lr"] == pytest.approx(1e-3)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == names_by_kind(model)["routers"]
