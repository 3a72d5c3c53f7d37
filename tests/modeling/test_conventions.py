"""transformers' conventions, as users hit them, for both families: dtype casts, torch.compile, tuple outputs,
fp32-kept modules, generation bases, label smoothing under Trainer, config typos. (Each of these once failed where
stock GPT-2 / T5 did not.)"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import (
    AutoModelForSeq2SeqLM,
    GenerationMixin,
    GPT2LMHeadModel,
    T5ForConditionalGeneration,
    Trainer,
    TrainingArguments,
)
from transformers.trainer_pt_utils import LabelSmoother

import hf_moe
from hf_moe import (
    GPT2MoeForCausalLM,
    GPT2MoeForSequenceClassification,
    GPT2MoeModel,
    T5MoeEncoderModel,
    T5MoeForConditionalGeneration,
    T5MoeModel,
)
from hf_moe.modeling import EXPERTS_IMPLEMENTATIONS, moe_blocks, moe_experts
from tests.conftest import tiny_gpt2_moe_config
from tests.modeling.test_t5_moe import tiny_config as tiny_t5_config

FAMILIES = ["gpt2", "t5"]


def tiny(family: str, **overrides):
    if family == "gpt2":
        return GPT2MoeForCausalLM(tiny_gpt2_moe_config(**overrides)).eval()
    return T5MoeForConditionalGeneration(tiny_t5_config(**overrides)).eval()


def inputs_for(model, batch: int = 2, length: int = 6) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(2, 99, (batch, length))
    if model.config.is_encoder_decoder:
        return {"input_ids": input_ids, "decoder_input_ids": torch.randint(2, 99, (batch, 4))}
    return {"input_ids": input_ids}


# --- dtype casts ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cast", ["bfloat16", "half", "to_float16"])
def test_a_cast_model_runs_forward_and_generate_and_keeps_float32_counters(family, cast):
    model = tiny(family)
    model = {"bfloat16": model.bfloat16, "half": model.half, "to_float16": lambda: model.to(torch.float16)}[cast]()
    out = model(**inputs_for(model))
    assert out.logits.dtype == next(model.parameters()).dtype
    generated = model.generate(inputs_for(model)["input_ids"], max_new_tokens=3, do_sample=False)
    assert generated.shape[0] == 2
    for _, block in moe_blocks(model):
        assert all(getattr(block, name).dtype == torch.float32 for name in block.COUNTERS)
        assert block.num_forwards.item() > 1  # counted in reduced precision too, without overflow


# --- torch.compile ----------------------------------------------------------------------------------------------

# torch's own compile stack imports its deprecated torch.jit.script_method helpers; nothing of ours
_TORCH_JIT_DEPRECATION = "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"


@pytest.fixture
def fresh_compiler():
    """Dynamo's caches emptied before and after: every compiled model of a test adds compilations of the same code
    objects (the blocks' forwards), and the recompile limit (8) is counted per code object across tests."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()


@pytest.mark.filterwarnings(_TORCH_JIT_DEPRECATION)
def test_fullgraph_compiled_forward_matches_eager_with_inductor():
    model = tiny("gpt2")
    batch = inputs_for(model)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings(_TORCH_JIT_DEPRECATION)
@pytest.mark.parametrize(
    "fields",
    [dict(router_bias_update_rate=0.01), dict(aux_loss_scope="sequence"), dict(aux_loss_scope="global_batch")],
    ids=["bias", "sequence", "global_batch"],
)
@pytest.mark.usefixtures("fresh_compiler")
def test_fullgraph_compiled_training_step_with_per_step_balancing(fields):
    # the expert load, the sequence-wise vmap and the global batch's counts all trace without a graph break
    model = tiny("gpt2", **fields).train()
    batch = inputs_for(model)
    eager_loss = copy.deepcopy(model)(**batch, labels=batch["input_ids"]).loss
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    loss = compiled(**batch, labels=batch["input_ids"]).loss
    torch.testing.assert_close(loss, eager_loss)
    loss.backward()
    assert all(router.weight.grad is not None for _, router in hf_moe.modeling.moe_routers(model))
    if "router_bias_update_rate" in fields:  # the compiled forward filled the expert load: k slots per token
        assert all(block.router.expert_load.sum().item() == 2 * 12 for _, block in moe_blocks(model))
    if fields.get("aux_loss_scope") == "global_batch":
        assert all(block.losses.global_slots.item() == 2 * 12 for _, block in moe_blocks(model))


# the architectures beside the routed experts: their extra weights must cast and trace like the rest
# the config overrides and the MoE block part whose weights the architecture adds or changes
ARCHITECTURES = {
    "shared_gated": (dict(num_shared_experts=2, shared_expert_gate=True), "shared_experts"),
    "residual_moe": (dict(residual_moe=True, num_experts_per_tok=1), "shared_experts"),
    # WideNet: the layers call one experts module and read tied weights
    "shared_blocks": (dict(share_blocks_across_layers=True), "experts"),
}


@pytest.mark.filterwarnings(_TORCH_JIT_DEPRECATION)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
@pytest.mark.usefixtures("fresh_compiler")
def test_architectures_cast_and_compile(family, architecture):
    overrides, part = ARCHITECTURES[architecture]
    model = tiny(family, **overrides).train()
    batch = inputs_for(model)
    labels = batch.get("decoder_input_ids", batch["input_ids"])
    eager_loss = copy.deepcopy(model)(**batch, labels=labels).loss
    loss = torch.compile(model, fullgraph=True, backend="eager")(**batch, labels=labels).loss
    torch.testing.assert_close(loss, eager_loss)
    loss.backward()
    parts = [getattr(block, part) for _, block in moe_blocks(model)]
    if architecture == "shared_blocks":
        assert len({id(module) for module in parts}) == (1 if family == "gpt2" else 2)  # one per stack
    assert all(module.down_proj.grad is not None for module in parts)
    model = model.eval().bfloat16()
    assert all(module.down_proj.dtype == torch.bfloat16 for module in parts)
    assert model(**batch).logits.dtype == torch.bfloat16


@pytest.mark.filterwarnings(_TORCH_JIT_DEPRECATION)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.usefixtures("fresh_compiler")
def test_fullgraph_compiled_training_step_and_generation(family):
    # the "eager" backend: dynamo traces the whole graph (fullgraph fails on any graph break), no codegen time
    model = tiny(family).train()
    batch = inputs_for(model)
    labels = batch.get("decoder_input_ids", batch["input_ids"])
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    loss = compiled(**batch, labels=labels).loss
    loss.backward()
    assert all(router.weight.grad is not None for _, router in hf_moe.modeling.moe_routers(model))
    assert all(block.num_forwards.item() == 1 for _, block in moe_blocks(model))

    model.eval()
    expected = model.generate(batch["input_ids"], max_new_tokens=4, do_sample=False)
    compiled_model = copy.deepcopy(model)
    compiled_model.forward = torch.compile(compiled_model.forward, fullgraph=True, backend="eager")
    generated = compiled_model.generate(
        batch["input_ids"], max_new_tokens=4, do_sample=False, cache_implementation="static"
    )
    assert torch.equal(generated, expected)


# --- tuple outputs --------------------------------------------------------------------------------------------------


def heads():
    return [
        ("gpt2", GPT2MoeForCausalLM, "logits"),
        ("gpt2", GPT2MoeForSequenceClassification, "logits"),
        ("gpt2", GPT2MoeModel, "last_hidden_state"),
        ("t5", T5MoeForConditionalGeneration, "logits"),
        ("t5", T5MoeModel, "last_hidden_state"),
        ("t5", T5MoeEncoderModel, "last_hidden_state"),
    ]


@pytest.mark.parametrize(("family", "head", "first"), heads())
def test_tuple_outputs_start_with_the_stock_first_field(family, head, first):
    config = tiny_gpt2_moe_config() if family == "gpt2" else tiny_t5_config()
    model = head(config).eval()
    batch = inputs_for(model)
    if head is T5MoeEncoderModel:
        batch.pop("decoder_input_ids", None)
    with torch.no_grad():
        as_dict = model(**batch)
        as_tuple = model(**batch, return_dict=False)
    assert torch.equal(as_tuple[0], getattr(as_dict, first))
    assert as_dict.to_tuple().__len__() == len(as_tuple)
    # nothing MoE-specific was asked: no MoE field is filled
    assert all(getattr(as_dict, name, None) is None for name in ("loss", "aux_loss", "z_loss", "router_logits"))


@pytest.mark.parametrize("family", FAMILIES)
def test_with_labels_the_tuple_starts_with_the_loss(family):
    model = tiny(family)
    batch = inputs_for(model)
    labels = batch.get("decoder_input_ids", batch["input_ids"])
    as_tuple = model(**batch, labels=labels, return_dict=False)
    as_dict = model(**batch, labels=labels)
    assert torch.equal(as_tuple[0], as_dict.loss)


def test_t5_returns_stock_t5_fields_when_nothing_moe_is_asked():
    moe = tiny("t5")
    dense = T5ForConditionalGeneration(
        hf_moe.T5MoeConfig(**{k: v for k, v in tiny_t5_config().to_dict().items() if k in _T5_KEYS})
    )
    batch = inputs_for(moe)
    with torch.no_grad():
        moe_fields = [name for name, value in moe(**batch).items() if value is not None]
        dense_fields = [name for name, value in dense(**batch).items() if value is not None]
    assert moe_fields == dense_fields


_T5_KEYS = ("vocab_size", "d_model", "d_ff", "num_layers", "num_heads", "d_kv", "decoder_start_token_id")


# --- fp32-kept modules, generation bases ----------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", EXPERTS_IMPLEMENTATIONS)
def test_t5_keeps_expert_output_projections_in_float32_when_loaded_in_float16(implementation, tmp_path):
    tiny("t5").save_pretrained(tmp_path)
    model = AutoModelForSeq2SeqLM.from_pretrained(
        tmp_path, dtype=torch.float16, experts_implementation=implementation
    ).eval()
    for _, experts in moe_experts(model):
        assert experts.down_proj.dtype == torch.float32  # like T5's `wo`
        assert experts.up_proj.dtype == torch.float16
    batch = inputs_for(model)
    assert torch.isfinite(model(**batch).logits).all()
    assert model.generate(batch["input_ids"], max_new_tokens=3, do_sample=False).shape[0] == 2


@pytest.mark.parametrize("model_class", [GPT2MoeForCausalLM, T5MoeForConditionalGeneration])
def test_generation_mixin_is_a_direct_base_of_every_generative_class(model_class):
    assert GenerationMixin in model_class.__bases__


# --- Trainer's label smoothing and compute_loss_func --------------------------------------------------------------


def smoothed_loss(logits, labels, epsilon, shift):
    return LabelSmoother(epsilon=epsilon)({"logits": logits}, labels, shift_labels=shift)


def trainer_loss(model, trainer_class, tmp_path, label_smoothing=0.0, **trainer_kwargs):
    args = TrainingArguments(
        output_dir=str(tmp_path), label_smoothing_factor=label_smoothing, report_to="none", use_cpu=True
    )
    trainer = trainer_class(model=model, args=args, **trainer_kwargs)
    batch = inputs_for(model)
    batch["labels"] = batch.get("decoder_input_ids", batch["input_ids"]).clone()
    return trainer.compute_loss(model, dict(batch)).detach(), batch


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("route", ["moe_trainer", "compute_loss_func"])
def test_label_smoothing_keeps_the_router_losses_and_shifts_causal_labels(family, route, tmp_path):
    model = tiny(family, router_aux_loss_coef=0.5, router_z_loss_coef=0.25).train()
    if route == "moe_trainer":
        loss, batch = trainer_loss(model, hf_moe.MoeTrainer, tmp_path, label_smoothing=0.1)
    else:
        loss_func = hf_moe.MoeLoss(model, label_smoothing=0.1)
        loss, batch = trainer_loss(model, Trainer, tmp_path, compute_loss_func=loss_func)
    labels = batch.pop("labels")
    with torch.no_grad():
        out = model(**batch, output_router_logits=True)
    shift = family == "gpt2"
    expected = smoothed_loss(out.logits, labels, 0.1, shift) + 0.5 * out.aux_loss + 0.25 * out.z_loss
    torch.testing.assert_close(loss, expected)


def test_plain_trainer_label_smoothing_shifts_gpt2_labels_and_says_the_router_losses_are_missing(tmp_path, caplog):
    model = tiny("gpt2", router_aux_loss_coef=0.5).train()
    from transformers.utils import logging as transformers_logging

    transformers_logging.enable_propagation()
    try:
        loss, batch = trainer_loss(model, Trainer, tmp_path, label_smoothing=0.1)
    finally:
        transformers_logging.disable_propagation()
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits
    # shifted (the causal LM's convention), not the unshifted loss Trainer gives classes it does not know
    torch.testing.assert_close(loss, smoothed_loss(logits, labels, 0.1, shift=True))
    assert not torch.allclose(loss, smoothed_loss(logits, labels, 0.1, shift=False))
    assert "router losses" in caplog.text and "MoeTrainer" in caplog.text


def test_text_generation_pipeline_knows_the_family(caplog):
    from transformers import pipeline
    from transformers.utils import logging as transformers_logging

    from tests.conftest import tiny_word_tokenizer

    transformers_logging.enable_propagation()
    try:
        generator = pipeline("text-generation", model=tiny("gpt2"), tokenizer=tiny_word_tokenizer())
    finally:
        transformers_logging.disable_propagation()
    assert "is not supported" not in caplog.text
    assert generator("w3 w4", max_new_tokens=2, do_sample=False)[0]["generated_text"].startswith("w3 w4")


# --- config typos -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "hint"),
    [("capacity_factr", "capacity_factor"), ("pyramid_experts", None), ("num_expert", "num_experts")],
)
def test_unknown_moe_looking_config_fields_warn(field, hint):
    with pytest.warns(UserWarning, match=field) as record:
        tiny_gpt2_moe_config(**{field: 1})
    if hint is not None:
        assert hint in str(record[0].message)


def test_known_and_non_moe_fields_do_not_warn(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = tiny_gpt2_moe_config(num_experts=4, summary_type="last", my_note="x")
        config.save_pretrained(tmp_path)
        hf_moe.GPT2MoeConfig.from_pretrained(tmp_path)
        tiny_t5_config().save_pretrained(tmp_path / "t5")
        hf_moe.T5MoeConfig.from_pretrained(tmp_path / "t5")


# --- labels, dense parity with dropout on ---------------------------------------------------------------------------


def test_t5_accepts_non_contiguous_labels():
    model = tiny("t5")
    ids = torch.randint(2, 99, (2, 9))
    labels = ids[:, :5]
    assert not labels.is_contiguous()
    torch.testing.assert_close(model(ids, labels=labels).loss, model(ids, labels=labels.contiguous()).loss)


def test_copy_upcycled_gpt2_equals_dense_gpt2_in_training_with_dropout_on():
    """With dropout on, the same seed gives the same masks: removing the MoE block's residual dropout breaks this."""
    dense = GPT2LMHeadModel(_dense_config(resid_pdrop=0.3, embd_pdrop=0.2, attn_pdrop=0.1))
    moe = hf_moe.moefy(dense, num_experts=4, top_k=2, init="copy")
    dense.train()
    moe.train()
    ids = torch.randint(2, 99, (2, 8))
    torch.manual_seed(5)
    dense_logits = dense(ids).logits
    torch.manual_seed(5)
    moe_logits = moe(ids).logits
    torch.testing.assert_close(moe_logits, dense_logits, rtol=1e-5, atol=1e-5)


def _dense_config(**overrides):
    from transformers import GPT2Config

    fields = dict(vocab_size=99, n_positions=64, n_embd=32, n_layer=2, n_head=4, n_inner=64)
    return GPT2Config(**{**fields, **overrides})


def test_t5_feed_forward_applies_its_residual_dropout_to_the_moe_output():
    model = tiny("t5", dropout_rate=0.5).train()
    layer = model.encoder.block[0].layer[-1]
    hidden = torch.randn(2, 6, 32)
    with torch.no_grad():
        moe_out = layer.DenseReluDense(layer.layer_norm(hidden))  # no expert dropout: deterministic
        delta = layer(hidden) - hidden
    ratio = delta / moe_out
    # every element is dropped (0) or kept and scaled by 1 / (1 - p) = 2
    assert torch.logical_or(ratio.abs() < 1e-4, (ratio - 2).abs() < 1e-3).all()
    assert 0.3 < (ratio.abs() < 1e-4).float().mean() < 0.7
