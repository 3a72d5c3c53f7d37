"""The T5 MoE family and the Switch Transformers import: config, equivalence with dense T5, losses, padding,
generation, experts kernels, save/load (also without hf_moe installed), Switch parity."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import (
    AutoModel,
    AutoModelForSeq2SeqLM,
    AutoModelForTextEncoding,
    SwitchTransformersConfig,
    SwitchTransformersForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
    pipeline,
)
from transformers.modeling_outputs import Seq2SeqMoEOutput

from hf_moe import (
    T5MoeConfig,
    T5MoeEncoderModel,
    T5MoeForConditionalGeneration,
    T5MoeModel,
    from_switch_transformers,
)
from hf_moe.modeling import (
    AUTO_EXPERTS_IMPLEMENTATION,
    EXPERTS_IMPLEMENTATIONS,
    NoisyTopKRouter,
    Router,
    SparseMoeBlock,
    T5MoeExperts,
    T5MoeGatedExperts,
)
from tests.conftest import tiny_word_tokenizer

FEED_FORWARD_KINDS = ["relu", "gated-gelu"]  # T5 v1.0, T5 v1.1 / Flan-T5
EXPERTS_CLASSES = (T5MoeExperts, T5MoeGatedExperts)

T5_FIELDS = dict(
    vocab_size=99,
    d_model=32,
    d_ff=64,  # multiples of 4: grouped_mm on CPU needs 16-byte strides
    d_kv=8,
    num_heads=4,
    num_layers=2,
    dropout_rate=0.0,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)


def tiny_config(**overrides) -> T5MoeConfig:
    return T5MoeConfig(**{**T5_FIELDS, "num_experts": 4, "num_experts_per_tok": 2, **overrides})


def tiny_model(**overrides) -> T5MoeForConditionalGeneration:
    return T5MoeForConditionalGeneration(tiny_config(**overrides)).eval()


def random_batch(batch: int = 2, source: int = 7, target: int = 5) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(2, 99, (batch, source)), "labels": torch.randint(2, 99, (batch, target))}


def moe_blocks(model) -> list[SparseMoeBlock]:
    return [module for module in model.modules() if isinstance(module, SparseMoeBlock)]


# --- config ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(encoder_moe_layers=[0, 2]), "encoder_moe_layers"),
        (dict(decoder_moe_layers=[1, 1]), "decoder_moe_layers"),
        (dict(num_decoder_layers=1, decoder_moe_layers=[1]), "decoder_moe_layers"),
        (dict(num_experts_per_tok=5), "num_experts_per_tok"),
    ],
)
def test_config_validation_names_the_field(overrides, field):
    with pytest.raises(StrictDataclassClassValidationError, match=field):
        tiny_config(**overrides)


@pytest.mark.parametrize("feed_forward_proj", FEED_FORWARD_KINDS)
@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(encoder_moe_layers=[1], decoder_moe_layers=[], num_decoder_layers=3),
        dict(router_type="noisy_topk", moe_intermediate_size=48, num_experts_per_tok=1),
    ],
)
def test_parameter_counts_without_building_equal_the_model(feed_forward_proj, overrides):
    config = tiny_config(feed_forward_proj=feed_forward_proj, **overrides)
    counts = config.parameter_counts()
    model = T5MoeForConditionalGeneration(config)
    experts_modules = [module for module in model.modules() if isinstance(module, EXPERTS_CLASSES)]
    experts = sum(p.numel() for module in experts_modules for p in module.parameters())
    per_expert = experts // (len(experts_modules) * config.num_local_experts)
    inactive = len(experts_modules) * (config.num_local_experts - config.num_experts_per_tok) * per_expert
    assert counts["total"] == model.num_parameters()
    assert counts["experts"] == experts
    assert counts["active"] == counts["total"] - inactive


def test_auto_classes_build_the_family():
    config = tiny_config()
    assert type(AutoModelForSeq2SeqLM.from_config(config)) is T5MoeForConditionalGeneration
    assert type(AutoModel.from_config(config)) is T5MoeModel
    # a fresh config: T5EncoderModel edits its config in place (is_encoder_decoder=False)
    assert type(AutoModelForTextEncoding.from_config(tiny_config())) is T5MoeEncoderModel


# --- equivalence with dense T5 ----------------------------------------------------------------------------------


def copy_dense_into_experts(dense: T5ForConditionalGeneration, moe: T5MoeForConditionalGeneration) -> None:
    """Every expert becomes the dense FFN of its block; every other weight is copied by name."""
    result = moe.load_state_dict(dense.state_dict(), strict=False)
    moe_names = {name for name, _ in moe.named_parameters(remove_duplicate=False) if ".DenseReluDense." in name}
    assert set(result.missing_keys) == {n for n in moe_names if ".router." in n or ".experts." in n}
    assert all(".DenseReluDense.w" in name for name in result.unexpected_keys)
    with torch.no_grad():
        for stack in ("encoder", "decoder"):
            for dense_block, moe_block in zip(getattr(dense, stack).block, getattr(moe, stack).block, strict=True):
                if not moe_block.is_moe:
                    continue
                ffn, experts = dense_block.layer[-1].DenseReluDense, moe_block.layer[-1].DenseReluDense.experts
                if experts.has_gate:
                    # [gate; up]: the activation side (wi_0) first
                    experts.gate_up_proj.copy_(
                        torch.cat([ffn.wi_0.weight, ffn.wi_1.weight]).expand_as(experts.gate_up_proj)
                    )
                else:
                    experts.up_proj.copy_(ffn.wi.weight.expand_as(experts.up_proj))
                experts.down_proj.copy_(ffn.wo.weight.expand_as(experts.down_proj))


@pytest.mark.parametrize("feed_forward_proj", FEED_FORWARD_KINDS)
@pytest.mark.parametrize(
    "placement",
    [dict(), dict(decoder_moe_layers=[]), dict(encoder_moe_layers=[], decoder_moe_layers=[1])],
    ids=["both", "encoder-only", "decoder-only"],
)
def test_copies_of_the_dense_ffn_give_the_dense_logits_and_gradients(feed_forward_proj, placement):
    dense = T5ForConditionalGeneration(T5Config(**T5_FIELDS, feed_forward_proj=feed_forward_proj)).eval()
    # router losses off: the dense model has none; normalized top-2 weights make copies sum to one FFN
    moe = tiny_model(
        feed_forward_proj=feed_forward_proj, router_aux_loss_coef=0.0, router_z_loss_coef=0.0, **placement
    )
    copy_dense_into_experts(dense, moe)
    batch = random_batch()
    dense_out, moe_out = dense(**batch), moe(**batch)
    assert (moe_out.logits - dense_out.logits).abs().max() < 1e-5
    dense_out.loss.backward()
    moe_out.loss.backward()
    for name in ("shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight", "decoder.final_layer_norm.weight"):
        torch.testing.assert_close(moe.get_parameter(name).grad, dense.get_parameter(name).grad, atol=1e-5, rtol=1e-4)
    # the placement is what the config says, in each stack
    assert [b.is_moe for b in moe.encoder.block] == [i in moe.config.encoder_moe_layer_indices for i in range(2)]
    assert [b.is_moe for b in moe.decoder.block] == [i in moe.config.decoder_moe_layer_indices for i in range(2)]
    assert (moe_out.encoder_aux_loss is None) == (moe.config.encoder_moe_layers == [])
    assert (moe_out.decoder_aux_loss is None) == (moe.config.decoder_moe_layers == [])


# --- losses -------------------------------------------------------------------------------------------------------


def test_loss_is_cross_entropy_plus_both_stacks_router_losses_and_trains_every_router():
    # two encoder MoE layers, one decoder MoE layer: aux_loss is the mean over the three layers
    model = tiny_model(
        encoder_moe_layers=[0, 1], decoder_moe_layers=[1], router_aux_loss_coef=0.3, router_z_loss_coef=0.2
    )
    model.train()
    batch = random_batch()
    out = model(**batch, output_router_logits=True)
    assert isinstance(out, Seq2SeqMoEOutput)
    assert len(out.encoder_router_logits) == 2 and len(out.decoder_router_logits) == 1
    assert out.encoder_router_logits[0].shape == (2 * 7, 4)
    torch.testing.assert_close(out.aux_loss, (2 * out.encoder_aux_loss + out.decoder_aux_loss) / 3)
    torch.testing.assert_close(out.z_loss, (2 * out.encoder_z_loss + out.decoder_z_loss) / 3)
    cross_entropy = torch.nn.functional.cross_entropy(out.logits.view(-1, 99), batch["labels"].view(-1))
    torch.testing.assert_close(out.loss, cross_entropy + 0.3 * out.aux_loss + 0.2 * out.z_loss)
    out.loss.backward()
    routers = [m for m in model.modules() if isinstance(m, Router)]
    assert len(routers) == 3
    assert all(router.weight.grad is not None and router.weight.grad.abs().sum() > 0 for router in routers)

    # under gradient accumulation (`num_items_in_batch`), the router losses take this micro-batch's share of labels
    num_labels = batch["labels"].numel()
    halved = model(**batch, num_items_in_batch=torch.tensor(2 * num_labels))
    torch.testing.assert_close(halved.loss, out.loss / 2)


def test_gradient_checkpointing_keeps_router_gradients_and_refuses_reentrant():
    model = tiny_model().train()
    model.activation_checkpointing_enable()
    model(**random_batch()).loss.backward()
    assert all(router.weight.grad is not None for router in model.modules() if isinstance(router, Router))
    # reentrant checkpointing would differentiate the blocks' outputs only, not the recorded router losses
    with pytest.raises(ValueError, match="non-reentrant"):
        model.activation_checkpointing_enable({"use_reentrant": True})


def test_padding_does_not_change_the_router_losses():
    model = tiny_model()
    batch = random_batch()
    padded = {
        "input_ids": torch.cat([batch["input_ids"], torch.zeros(2, 3, dtype=torch.long)], dim=1),
        "attention_mask": torch.cat([torch.ones(2, 7), torch.zeros(2, 3)], dim=1).long(),
        # `DataCollatorForSeq2Seq` pads labels with -100 and passes no decoder mask
        "labels": torch.cat([batch["labels"], torch.full((2, 4), -100)], dim=1),
    }
    with torch.no_grad():
        plain, with_padding = model(**batch), model(**padded)
    for name in ("encoder_aux_loss", "encoder_z_loss", "decoder_aux_loss", "decoder_z_loss"):
        torch.testing.assert_close(getattr(with_padding, name), getattr(plain, name), atol=1e-6, rtol=1e-5)
    # an explicit decoder_attention_mask is used the same way
    decoder_input_ids = model._shift_right(padded["labels"])
    decoder_mask = padded["labels"].ne(-100).long()
    with torch.no_grad():
        masked = model(
            padded["input_ids"], padded["attention_mask"], decoder_input_ids, decoder_mask, output_router_logits=True
        )
    torch.testing.assert_close(masked.decoder_aux_loss, plain.decoder_aux_loss, atol=1e-6, rtol=1e-5)


def test_init_follows_t5_for_experts_and_routers():
    model = tiny_model(router_type="noisy_topk", router_init_std=0.05, d_model=64, d_ff=128)
    experts = model.encoder.block[0].layer[-1].DenseReluDense.experts
    assert experts.up_proj.std().item() == pytest.approx(64**-0.5, rel=0.05)
    assert experts.down_proj.std().item() == pytest.approx(128**-0.5, rel=0.05)
    router = model.encoder.block[0].layer[-1].DenseReluDense.router
    assert isinstance(router, NoisyTopKRouter)
    assert router.weight.std().item() == pytest.approx(0.05, rel=0.1)
    assert torch.count_nonzero(router.noise_weight) == 0


# --- generation, experts kernels --------------------------------------------------------------------------------


@pytest.mark.parametrize("feed_forward_proj", FEED_FORWARD_KINDS)
def test_generate_greedy_and_beam_with_and_without_cache(feed_forward_proj):
    model = tiny_model(feed_forward_proj=feed_forward_proj)
    input_ids = torch.randint(2, 99, (2, 7))
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    greedy = model.generate(input_ids, **kwargs)
    torch.testing.assert_close(greedy, model.generate(input_ids, use_cache=False, **kwargs))
    beams = model.generate(input_ids, num_beams=3, num_return_sequences=2, **kwargs)
    torch.testing.assert_close(
        beams, model.generate(input_ids, num_beams=3, num_return_sequences=2, use_cache=False, **kwargs)
    )
    assert greedy.shape == (2, 7) and beams.shape == (4, 7)
    # greedy decoding with the cache picks each step's argmax of the full (uncached) forward
    with torch.no_grad():
        logits = model(input_ids, decoder_input_ids=greedy[:, :-1]).logits
    torch.testing.assert_close(logits.argmax(-1), greedy[:, 1:])


def test_text_in_text_out_with_tokenizer_and_generate():
    # transformers 5 removed the "text2text-generation" pipeline (and "summarization", "translation"), and its
    # "text-generation" pipeline takes decoder-only models; T5's text path is tokenizer -> generate -> decode
    with pytest.raises(KeyError, match="removed"):
        pipeline("text2text-generation", model=tiny_model())
    tokenizer = tiny_word_tokenizer()
    ids = dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = tiny_model(**ids, decoder_start_token_id=tokenizer.pad_token_id)
    kwargs = dict(max_new_tokens=4, num_beams=2, do_sample=False)
    batch = tokenizer(["w3 w4 w5 w6", "w7 w8"], return_tensors="pt", padding=True)
    texts = tokenizer.batch_decode(model.generate(**batch, **kwargs), skip_special_tokens=True)
    alone = tokenizer(["w7 w8"], return_tensors="pt")
    # the padded row generates what it generates alone
    assert texts[1] == tokenizer.batch_decode(model.generate(**alone, **kwargs), skip_special_tokens=True)[0]
    assert all(word.startswith("w") for text in texts for word in text.split())


@pytest.mark.parametrize("feed_forward_proj", FEED_FORWARD_KINDS)
def test_experts_implementations_agree_in_forward_and_gradients(feed_forward_proj):
    # T5's factor-1 init (embeddings with std 1) saturates the first attention's softmax, which amplifies float
    # reordering in the gradients to ~3e-4 relative; a smaller factor keeps the comparison at ~1e-6
    model = tiny_model(feed_forward_proj=feed_forward_proj, initializer_factor=0.3)
    assert model.config._experts_implementation == AUTO_EXPERTS_IMPLEMENTATION
    batch = random_batch()
    results = {}
    for implementation in EXPERTS_IMPLEMENTATIONS:
        model.set_experts_implementation(implementation)
        # the stacks hold copies of the config; every experts module must follow
        assert {m.config._experts_implementation for m in model.modules() if isinstance(m, EXPERTS_CLASSES)} == {
            implementation
        }
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        results[implementation] = (out.logits, {n: p.grad.clone() for n, p in model.named_parameters()})
    logits, grads = results["eager"]
    for implementation in EXPERTS_IMPLEMENTATIONS:
        torch.testing.assert_close(results[implementation][0], logits, atol=1e-5, rtol=1e-5)
        for name, grad in grads.items():
            torch.testing.assert_close(results[implementation][1][name], grad, atol=1e-5, rtol=1e-4)


def test_experts_kernels_do_not_depend_on_a_dense_t5_being_built_first(monkeypatch):
    # transformers caches "may this class switch experts kernels?" as a class attribute that subclasses inherit; every
    # dense T5 init caches False on its class. Simulate a process that built a dense T5 before any T5 MoE model.
    cache = "_can_set_experts_implementation_cached_value"
    family = {cls for model_class in (T5MoeForConditionalGeneration, T5MoeModel) for cls in model_class.__mro__}
    for cls in family:
        if cache in cls.__dict__:
            monkeypatch.delattr(cls, cache)
    T5ForConditionalGeneration(T5Config(**T5_FIELDS))
    assert T5ForConditionalGeneration.__dict__[cache] is False
    model = tiny_model()
    assert model.config._experts_implementation == AUTO_EXPERTS_IMPLEMENTATION
    model.set_experts_implementation("eager")
    assert model.config._experts_implementation == model.encoder.config._experts_implementation == "eager"
    assert T5MoeModel(tiny_config()).config._experts_implementation == AUTO_EXPERTS_IMPLEMENTATION


# --- save / load ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("feed_forward_proj", FEED_FORWARD_KINDS)
def test_save_load_round_trip_is_exact_through_every_auto_class(feed_forward_proj, tmp_path):
    model = tiny_model(feed_forward_proj=feed_forward_proj, decoder_moe_layers=[0], router_type="noisy_topk")
    model.save_pretrained(tmp_path)
    batch = random_batch()
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is T5MoeForConditionalGeneration
    assert {**loaded.config.to_dict(), "_name_or_path": ""} == model.config.to_dict()
    with torch.no_grad():
        expected = model(**batch)
        assert torch.equal(loaded(**batch).logits, expected.logits)
        encoder = AutoModelForTextEncoding.from_pretrained(tmp_path).eval()
        assert type(encoder) is T5MoeEncoderModel
        encoded = encoder(batch["input_ids"], output_router_logits=True)
        assert torch.equal(encoded.last_hidden_state, expected.encoder_last_hidden_state)
        torch.testing.assert_close(encoded.aux_loss, expected.encoder_aux_loss)
        base = AutoModel.from_pretrained(tmp_path).eval()
        decoder_input_ids = model._shift_right(batch["labels"])
        base_out = base(batch["input_ids"], decoder_input_ids=decoder_input_ids, output_router_logits=True)
        assert torch.equal(base_out.aux_loss, expected.aux_loss)


# Runs in a fresh interpreter in which any import of hf_moe fails, as on a machine where it is not installed.
LOAD_WITHOUT_HF_MOE = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoHfMoe(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_moe" or name.startswith("hf_moe."):
                raise ImportError("hf_moe is not installed here")

    sys.meta_path.insert(0, NoHfMoe())
    import torch, transformers

    folder, out = sys.argv[1], sys.argv[2]
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert not any(name.startswith("hf_moe") for name in sys.modules), "hf_moe was imported"
    model.set_experts_implementation("eager")
    batch = torch.load(folder + "/batch.pt")
    with torch.no_grad():
        logits = model(**batch).logits
    torch.save({"logits": logits, "class": type(model).__name__}, out)
    """
)


def test_remote_code_load_without_hf_moe_gives_identical_logits(tmp_path):
    model = tiny_model(feed_forward_proj="gated-gelu", encoder_moe_layers=[1])
    model.set_experts_implementation("eager")
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    batch = random_batch()
    torch.save(batch, folder / "batch.pt")
    out = tmp_path / "result.pt"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_HF_MOE, str(folder), str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    loaded = torch.load(out)
    assert loaded["class"] == "T5MoeForConditionalGeneration"
    with torch.no_grad():
        assert torch.equal(loaded["logits"], model(**batch).logits)


# --- Switch Transformers import -------------------------------------------------------------------------------------


def tiny_switch(expert_capacity: int, tie_word_embeddings: bool = True) -> SwitchTransformersForConditionalGeneration:
    config = SwitchTransformersConfig(
        **{k: v for k, v in T5_FIELDS.items() if k != "decoder_start_token_id"},
        num_decoder_layers=2,
        num_experts=4,
        expert_capacity=expert_capacity,
        # Switch's sparse-step rule: one sparse encoder layer -> block 1; two sparse decoder layers -> blocks 0 and 1
        num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=2,
        router_jitter_noise=0.1,
        tie_word_embeddings=tie_word_embeddings,
        decoder_start_token_id=0,
    )
    switch = SwitchTransformersForConditionalGeneration(config).eval()
    # untied Switch also leaves its stacks' input embeddings untied; T5 always shares one
    switch.encoder.embed_tokens = switch.decoder.embed_tokens = switch.shared
    return switch


def dropped_slots(model) -> float:
    return sum(block.dropped_tokens_per_expert.sum().item() for block in moe_blocks(model))


@pytest.mark.parametrize(
    ("expert_capacity", "batch", "encoder_length", "decoder_length", "tie_word_embeddings"),
    [
        (64, 3, 6, 6, True),  # capacity never binds
        (64, 3, 6, 6, False),  # Switch's own LM head, no output scaling
        (4, 3, 9, 5, True),  # capacity 4 binds in the longer encoder sequences, not in the decoder's
        (2, 3, 6, 6, True),  # binds everywhere, several sequences per batch
        (1, 2, 11, 3, True),  # one slot per expert per sequence, different lengths per stack
    ],
)
def test_switch_import_gives_switch_logits(
    expert_capacity, batch, encoder_length, decoder_length, tie_word_embeddings
):
    switch = tiny_switch(expert_capacity, tie_word_embeddings)
    model = from_switch_transformers(switch)
    config = model.config
    assert (config.encoder_moe_layers, config.decoder_moe_layers) == ([1], [0, 1])
    assert config.num_experts_per_tok == 1 and not config.normalizes_top_k_weights
    assert (config.router_jitter_noise, config.router_z_loss_coef) == (0.1, switch.config.router_z_loss_coef)
    assert (config.expert_capacity, config.capacity_scope) == (expert_capacity, "sequence")
    assert not model.training
    inputs = {
        "input_ids": torch.randint(2, 99, (batch, encoder_length)),
        "decoder_input_ids": torch.randint(2, 99, (batch, decoder_length)),
    }
    with torch.no_grad():
        expected, logits = switch(**inputs).logits, model(**inputs).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    binds = expert_capacity < max(encoder_length, decoder_length)
    assert (dropped_slots(model) > 0) == binds, "the case must (or must not) drop tokens, as its comment says"


def test_switch_import_generates_as_switch_does_with_a_binding_capacity():
    switch = tiny_switch(expert_capacity=2)
    model = from_switch_transformers(switch)
    input_ids = torch.randint(2, 99, (2, 8))
    with torch.no_grad():
        expected = switch.generate(input_ids, max_new_tokens=6, do_sample=False)
        generated = model.generate(input_ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(generated, expected)


def test_switch_import_from_a_folder_and_save_load_of_an_own_lm_head(tmp_path):
    switch = tiny_switch(expert_capacity=64)
    switch.save_pretrained(tmp_path / "switch")
    inputs = {"input_ids": torch.randint(2, 99, (2, 6)), "decoder_input_ids": torch.randint(2, 99, (2, 6))}
    with torch.no_grad():
        expected = switch(**inputs).logits
        torch.testing.assert_close(from_switch_transformers(tmp_path / "switch")(**inputs).logits, expected)
    # a Switch model with its own LM head keeps it through save / load (T5 unties it when both are saved)
    model = from_switch_transformers(tiny_switch(expert_capacity=64, tie_word_embeddings=False))
    assert model.lm_head.weight is not model.shared.weight
    model.save_pretrained(tmp_path / "moe")
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "moe").eval()
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)


def test_switch_import_rejects_what_it_cannot_represent():
    with pytest.raises(TypeError, match="model_or_path"):
        from_switch_transformers(tiny_model())
    switch = tiny_switch(expert_capacity=64)
    switch.encoder.embed_tokens = torch.nn.Embedding(99, 32)
    with pytest.raises(ValueError, match="encoder.embed_tokens"):
        from_switch_transformers(switch)
