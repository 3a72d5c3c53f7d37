"""WideNet (`share_blocks_across_layers`): every layer of a stack applies one block's weights and keeps its own
LayerNorms. One copy in `named_parameters()` and in the safetensors file; the model computes what an unshared model
with equal blocks computes, and the gradient of a shared weight is the sum of every layer's; per-layer LayerNorms
part after a step; counts, save / load, remote code, generation and config checks."""

from __future__ import annotations

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from safetensors import safe_open

import hf_moe
from tests.conftest import tiny_gpt2_moe_config
from tests.modeling.test_hub_portability import load_without_hf_moe
from tests.modeling.test_shared_experts import _t5_config


def _gpt2(**overrides):
    # block 1 stays dense: MoE layers share with MoE layers, dense MLPs with dense MLPs
    config = tiny_gpt2_moe_config(n_layer=3, moe_layers=[0, 2], share_blocks_across_layers=True, **overrides)
    return hf_moe.GPT2MoeForCausalLM(config)


def _t5(**overrides):
    config = _t5_config(
        num_layers=3, num_decoder_layers=2, decoder_moe_layers=[1], share_blocks_across_layers=True, **overrides
    )
    return hf_moe.T5MoeForConditionalGeneration(config)


def _inputs(model):
    ids = torch.randint(2, 99, (2, 7))
    if model.config.is_encoder_decoder:
        return dict(input_ids=ids, decoder_input_ids=ids[:, :5], labels=ids[:, :5])
    return dict(input_ids=ids, labels=ids)


def _unshared_twin(model):
    """The same model without sharing, every layer holding a copy of the shared weights."""
    config = model.config.to_dict()
    config.update(share_blocks_across_layers=False, per_layer_router=False)
    twin = type(model)(type(model.config).from_dict(config))
    twin.load_state_dict(model.state_dict())
    return twin.train(model.training)


def _block_names(model):
    """Parameter names inside the blocks of every stack, as `named_parameters()` lists them (one per tensor)."""
    return [name for name, _ in model.named_parameters() if ".h." in name or ".block." in name]


FAMILIES = {"gpt2": _gpt2, "t5": _t5}


@pytest.mark.parametrize("family", FAMILIES)
def test_one_copy_of_the_block_weights_in_named_parameters_and_in_the_file(family, tmp_path):
    model = FAMILIES[family]()
    shared = {name for name in _block_names(model) if "norm" not in name and ".ln_" not in name}
    if family == "gpt2":
        # attention and experts of block 0, the dense MLP of block 1 (the only dense block); nothing of block 2
        assert {name.split(".")[2] for name in shared} == {"0", "1"}
        assert all(".mlp.c_" in name for name in shared if ".h.1." in name)
        assert model.transformer.h[2].attn.c_attn.weight is model.transformer.h[0].attn.c_attn.weight
        assert model.transformer.h[2].mlp.router.weight is model.transformer.h[0].mlp.router.weight
    else:
        # each stack shares within itself: encoder block 0, decoder block 0 (dense) and block 1's MoE FFN
        assert {name.split(".")[2] for name in shared if name.startswith("encoder")} == {"0"}
        decoder_1 = {name for name in shared if name.startswith("decoder.block.1.")}
        assert decoder_1 and all("DenseReluDense" in name for name in decoder_1)
    # every layer keeps its own LayerNorms
    own_norm = "transformer.h.{}.ln_1.weight" if family == "gpt2" else "encoder.block.{}.layer.0.layer_norm.weight"
    assert all(own_norm.format(layer) in _block_names(model) for layer in range(3))
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        stored = set(saved.keys())
    assert {name for name in stored if ".h." in name or ".block." in name} == set(_block_names(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_model_equals_unshared_model_and_gradients_sum_over_layers(family):
    model = FAMILIES[family]().train()
    twin = _unshared_twin(model)
    inputs = _inputs(model)
    loss, twin_loss = model(**inputs).loss, twin(**inputs).loss
    torch.testing.assert_close(loss, twin_loss)
    loss.backward()
    twin_loss.backward()
    twin_grads = {name: param.grad for name, param in twin.named_parameters()}
    groups: dict[str, list[str]] = {}
    for target, source in model.all_tied_weights_keys.items():
        groups.setdefault(source, [source]).append(target)
    block_groups = {source: names for source, names in groups.items() if ".h." in source or ".block." in source}
    assert block_groups
    for source, names in block_groups.items():
        summed = sum(twin_grads[name] for name in names)
        torch.testing.assert_close(model.get_parameter(source).grad, summed, msg=source)
        # not a layer's own gradient: the shared weight learns from every layer that applies it
        assert not torch.allclose(model.get_parameter(source).grad, twin_grads[source]), source


@pytest.mark.parametrize("family", FAMILIES)
def test_per_layer_layer_norms_part_after_a_training_step(family):
    model = FAMILIES[family]().train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(**_inputs(model)).loss.backward()
    optimizer.step()
    stack = model.transformer.h if family == "gpt2" else model.encoder.block
    norms = [layer.ln_2.weight if family == "gpt2" else layer.layer[-1].layer_norm.weight for layer in stack]
    for first in range(len(norms)):
        for second in range(first + 1, len(norms)):
            assert not torch.equal(norms[first], norms[second]), (first, second)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("overrides", [{}, {"per_layer_router": True}, {"num_shared_experts": 1}])
def test_parameter_counts_count_the_shared_block_once(family, overrides):
    model = FAMILIES[family](**overrides)
    counts = model.config.parameter_counts()
    assert counts["total"] == model.num_parameters()
    twin = _unshared_twin(model)
    # active: what a token's forward applies, a shared weight once per layer, as without sharing
    assert counts["active"] == twin.config.parameter_counts()["active"]
    assert counts["experts"] == sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)


def test_per_layer_router_keeps_a_router_per_layer_and_shares_the_experts():
    model = _gpt2(per_layer_router=True)
    first, last = model.transformer.h[0].mlp, model.transformer.h[2].mlp
    assert first.router.weight is not last.router.weight
    assert first.experts.up_proj is last.experts.up_proj


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_and_remote_code_keep_the_sharing(family, tmp_path):
    model = FAMILIES[family]().eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    reloaded, info = type(model).from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.all_tied_weights_keys == model.all_tied_weights_keys
    for target, source in model.all_tied_weights_keys.items():
        assert reloaded.get_parameter(target) is reloaded.get_parameter(source), target
    inputs = _inputs(model)
    inputs.pop("labels")
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(**inputs).logits, model(**inputs).logits)
    # the remote-code loader feeds input ids only: GPT-2's LM, T5's encoder (the same folder as a text encoder)
    torch.save(inputs["input_ids"], folder / "input_ids.pt")
    auto_class = "AutoModelForCausalLM" if family == "gpt2" else "AutoModelForTextEncoding"
    remote = load_without_hf_moe(folder, auto_class, tmp_path)["result"]
    with torch.no_grad():
        if family == "gpt2":
            expected = model(inputs["input_ids"]).logits
        else:
            expected = model.get_encoder()(inputs["input_ids"]).last_hidden_state
    assert torch.equal(remote, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_with_a_cache_equals_the_unshared_model(family):
    # each layer keeps its attention module and so its cache slot: sharing weights must not share the KV cache
    model = FAMILIES[family]().eval()
    twin = _unshared_twin(model)
    ids = torch.randint(2, 99, (2, 5))
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=model.config.pad_token_id)
    assert torch.equal(model.generate(ids, **kwargs), twin.generate(ids, **kwargs))


def test_casts_keep_the_sharing():
    model = _gpt2().to(torch.bfloat16)
    assert model.transformer.h[2].mlp.experts.up_proj is model.transformer.h[0].mlp.experts.up_proj
    assert model.transformer.h[2].mlp.experts.up_proj.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(per_layer_router=True), "set share_blocks_across_layers=True"),
        (dict(share_blocks_across_layers=True, num_experts_per_layer=[2, 4]), "cannot have different expert counts"),
        (dict(share_blocks_across_layers="yes"), "share_blocks_across_layers must be True or False"),
    ],
)
def test_bad_sharing_settings_are_refused(overrides, message):
    with pytest.raises(StrictDataclassClassValidationError, match=message):
        tiny_gpt2_moe_config(**overrides)


def test_trainer_trains_the_shared_block_and_logs_every_layers_balance(tmp_path):
    from transformers import TrainingArguments

    model = _gpt2()
    before = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(2, 99, (8, 7))]
    args = TrainingArguments(
        str(tmp_path), max_steps=2, per_device_train_batch_size=4, logging_steps=1, report_to="none", use_cpu=True,
        save_strategy="no", learning_rate=1e-2,
    )  # fmt: skip
    trainer = hf_moe.MoeTrainer(model=model, args=args, train_dataset=data, callbacks=[hf_moe.LoadBalanceCallback()])
    trainer.train()
    # one parameter in the optimizer for the shared weight (a duplicate would be refused or stepped twice)
    optimized = [param for group in trainer.optimizer.param_groups for param in group["params"]]
    assert len(optimized) == len({id(param) for param in optimized}) == len(list(model.parameters()))
    assert not torch.equal(model.transformer.h[0].attn.c_attn.weight, before)
    assert model.transformer.h[2].attn.c_attn.weight is model.transformer.h[0].attn.c_attn.weight
    logged = trainer.state.log_history[0]
    for layer in range(2):  # the two MoE layers, each routing its own inputs with the shared router
        total = sum(logged[f"moe/layer_{layer:02d}/token_fraction_expert_{e:02d}"] for e in range(4))
        assert total == pytest.approx(1.0)
    trainer.save_model(str(tmp_path / "final"))
    reloaded = hf_moe.GPT2MoeForCausalLM.from_pretrained(tmp_path / "final")
    assert torch.equal(reloaded.transformer.h[2].attn.c_attn.weight, model.transformer.h[0].attn.c_attn.weight)
