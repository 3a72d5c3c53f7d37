"""Hash layers (Roller et al. 2021, `router_type="hash"`): a fixed token-id -> expert table, in both families.

The defining property, checked against the table itself: the same token id reaches the same experts in every batch,
every cached generation step (GPT-2, and T5's encoder and decoder) and after save / load, also through the Auto
classes and with trust_remote_code where hf_moe is not installed. MultiHash (H heads) is checked against a manual
computation of the paper's segmented FFN.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
from transformers.activations import ACT2FN

import hf_moe
from hf_moe.cli.inspect import describe
from hf_moe.conversion import random_hash_table, set_hash_tables
from hf_moe.hub import render_model_card
from hf_moe.modeling import HashRouter, RoutingInputs, moe_blocks, moe_routers
from tests.conftest import tiny_gpt2_moe_config
from tests.modeling.test_t5_moe import tiny_config as tiny_t5_config

VOCAB, EXPERTS = 99, 4


def tiny(family: str, **overrides):
    fields = {"router_type": "hash", "num_experts_per_tok": overrides.get("num_hash_heads", 1), **overrides}
    if family == "gpt2":
        return hf_moe.GPT2MoeForCausalLM(tiny_gpt2_moe_config(**fields))
    return hf_moe.T5MoeForConditionalGeneration(tiny_t5_config(**fields))


def auto_class(model):
    return AutoModelForSeq2SeqLM if model.config.is_encoder_decoder else AutoModelForCausalLM


def batch_for(model, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (2, 8), generator=generator)
    labels = torch.randint(2, VOCAB, (2, 5), generator=generator) if model.config.is_encoder_decoder else input_ids
    return {"input_ids": input_ids, "labels": labels}


def reversed_table(num_heads: int = 1) -> torch.Tensor:
    """A table no seed gives (token id t -> (V - 1 - t) mod G in each head's group)."""
    group = EXPERTS // num_heads
    ids_V = torch.arange(VOCAB - 1, -1, -1) % group
    return torch.stack([ids_V + head * group for head in range(num_heads)])


def record_routing(model) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(token ids, routed experts, the router's table) of every router call, appended by forward hooks."""
    seen = []

    def record(router, args, decision):
        seen.append((args[0].input_ids_T.clone(), decision.top_k_index_TK.clone(), router.expert_of_token.clone()))

    for _, router in moe_routers(model):
        router.register_forward_hook(record)
    return seen


def assert_routed_by_table(seen, table_HV: torch.Tensor) -> None:
    assert seen
    for ids_T, experts_TH, router_table_HV in seen:
        assert torch.equal(router_table_HV, table_HV)
        assert torch.equal(experts_TH, table_HV[:, ids_T].t())


# --- the table, the config ------------------------------------------------------------------------------------


def test_a_new_model_starts_with_the_seeded_table_in_every_layer_and_int64_through_dtype_casts():
    model = tiny("gpt2", num_hash_heads=2, hash_seed=7)
    expected_HV = random_hash_table(VOCAB, EXPERTS, num_heads=2, seed=7)
    assert expected_HV.shape == (2, VOCAB) and expected_HV.dtype == torch.int64
    routers = moe_routers(model)
    assert len(routers) == 2 and all(torch.equal(r.expert_of_token, expected_HV) for _, r in routers)
    assert not torch.equal(random_hash_table(VOCAB, EXPERTS, num_heads=2, seed=8), expected_HV)
    for head in range(2):  # head m's experts are [2m, 2m + 2), each with floor or ceil of V / 2 token ids
        counts_G = torch.bincount(expected_HV[head] - 2 * head, minlength=2)
        assert counts_G.numel() == 2 and sorted(counts_G.tolist()) == [49, 50]
    assert sum(p.numel() for _, r in routers for p in r.parameters()) == 0
    model.to(torch.bfloat16)
    assert all(r.expert_of_token.dtype == torch.int64 for _, r in moe_routers(model))
    assert all(torch.equal(r.expert_of_token, expected_HV) for _, r in moe_routers(model))


def test_init_weights_writes_the_seeded_table_whatever_the_generator():
    model = tiny("gpt2")
    set_hash_tables(model, reversed_table(), "balanced")
    router = moe_routers(model)[0][1]
    router.expert_of_token._is_hf_initialized = False  # as for a table missing from a checkpoint
    router.init_weights(0.5, generator=torch.Generator().manual_seed(123))
    assert torch.equal(router.expert_of_token, random_hash_table(VOCAB, EXPERTS, seed=0))
    # transformers' own init pass (post_init, from_pretrained) leaves a written table alone
    other = moe_routers(model)[1][1]
    model.init_weights()
    assert torch.equal(other.expert_of_token, reversed_table())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(num_experts_per_tok=2), "sends each token to num_hash_heads=1 experts, one per head: set num_experts_per_tok=1"),
        (dict(num_hash_heads=2, num_experts_per_tok=1), "set num_experts_per_tok=2"),
        (dict(num_hash_heads=3, num_experts_per_tok=3), "num_local_experts=4 must be a multiple of num_hash_heads"),
        (dict(normalize_top_k_weights=True), "normalize_top_k_weights"),
        (dict(router_jitter_noise=0.1), "router_jitter_noise"),
        (dict(router_aux_loss_coef=0.01), "router_aux_loss_coef"),
    ],
)  # fmt: skip
def test_config_errors_name_the_field(overrides, message):
    fields = {"router_type": "hash", "num_experts_per_tok": 1, **overrides}
    with pytest.raises(Exception) as error:  # transformers wraps the ValueError in its strict-dataclass error
        tiny_gpt2_moe_config(**fields)
    assert message in str(error.value) + str(error.value.__cause__)


def test_experts_per_token_parameter_counts_and_default_coefficients():
    config = tiny_gpt2_moe_config(router_type="hash", num_experts_per_tok=2, num_hash_heads=2)
    assert config.experts_per_token == 2 and config.aux_loss_coef == 0.0
    assert config.router_parameters(32) == 0
    assert config.parameter_counts()["total"] == hf_moe.GPT2MoeForCausalLM(config).num_parameters()


def test_a_new_model_from_a_data_built_kind_warns_that_its_table_is_random(caplog):
    with caplog.at_level("WARNING"):
        tiny("gpt2", hash_kind="clustered")
    assert "starts with the seeded random table" in caplog.text


# --- routing ----------------------------------------------------------------------------------------------------


def test_the_same_token_reaches_the_same_expert_across_batches():
    model = tiny("gpt2").eval()
    set_hash_tables(model, reversed_table(), "balanced")
    seen = record_routing(model)
    with torch.no_grad():
        model(batch_for(model, seed=1)["input_ids"])
        model(torch.tensor([[5, 5, 17, 98, 2]]))  # a different batch shape and contents
    assert len(seen) == 4
    assert_routed_by_table(seen, reversed_table())
    # the token 5 went to one expert both times
    assert seen[2][1][0].item() == seen[2][1][1].item() == reversed_table()[0, 5].item()


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_cached_generation_routes_every_new_token_by_the_table(family):
    model = tiny(family, num_hash_heads=2).eval()
    table_HV = reversed_table(2)
    set_hash_tables(model, table_HV, "balanced")
    seen = record_routing(model)
    model.generate(batch_for(model)["input_ids"], max_new_tokens=4, do_sample=False)
    assert_routed_by_table(seen, table_HV)
    assert any(ids_T.numel() == 2 for ids_T, _, _ in seen)  # cached steps route only each row's new token
    if family == "t5":  # the decoder routes its own ids (decoder start, then the generated tokens)
        assert any(ids_T.numel() == 2 and (ids_T == model.config.decoder_start_token_id).all() for ids_T, _, _ in seen)


def test_ids_beyond_the_table_wrap_around_and_resize_keeps_routing():
    model = tiny("gpt2").eval()
    table_HV = reversed_table()
    set_hash_tables(model, table_HV, "balanced")
    router = moe_routers(model)[0][1]
    ids_T = torch.tensor([VOCAB, VOCAB + 3, 5 * VOCAB + 7, 0])
    decision = router(RoutingInputs(torch.zeros(4, 32), input_ids_T=ids_T))
    assert torch.equal(decision.top_k_index_TK[:, 0], table_HV[0, ids_T % VOCAB])
    # a grown vocabulary: resize_token_embeddings widens every table by the same rule, so routing does not change
    with torch.no_grad():
        before = model(torch.tensor([[3, 5, 7]])).logits
    model.resize_token_embeddings(120, mean_resizing=False)
    for _, hash_router in moe_routers(model):
        assert hash_router.expert_of_token.shape == (1, 120)
        assert torch.equal(hash_router.expert_of_token[0], table_HV[0, torch.arange(120) % VOCAB])
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([[3, 5, 7]])).logits[..., :VOCAB], before)
    # and the resized model saves and loads (the table fits the config's new vocab_size)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
        assert torch.equal(moe_routers(loaded)[0][1].expert_of_token, moe_routers(model)[0][1].expert_of_token)


def test_inputs_embeds_alone_is_an_error_naming_input_ids():
    model = tiny("gpt2").eval()
    with pytest.raises(ValueError, match="routes each token by its id: call the model with input_ids"):
        model(inputs_embeds=torch.randn(1, 3, 32))


def test_multi_hash_sums_one_expert_per_head_as_the_segmented_ffn():
    model = tiny("gpt2", num_local_experts=4, num_hash_heads=2, moe_intermediate_size=32).eval()
    block = moe_blocks(model)[0][1]
    experts = block.experts
    with torch.no_grad():  # nonzero biases, so that they are checked too
        experts.up_proj_bias.normal_()
        experts.down_proj_bias.normal_()
    ids_T = torch.randint(0, VOCAB, (12,))
    hidden_TD = torch.randn(12, 32)
    decision = block.router(RoutingInputs(hidden_TD, input_ids_T=ids_T))
    index_TH = decision.top_k_index_TK
    assert index_TH.shape == (12, 2) and torch.equal(decision.top_k_weights_TK, torch.ones(12, 2))
    assert ((index_TH[:, 0] >= 0) & (index_TH[:, 0] < 2)).all() and (
        (index_TH[:, 1] >= 2) & (index_TH[:, 1] < 4)
    ).all()
    # the paper's MultiHash: one FFN whose hidden units are the heads' segments, concatenated before W_out
    act = ACT2FN[model.config.activation_function]
    expected = []
    for token in range(12):
        chosen = index_TH[token]
        w_in = torch.cat([experts.up_proj[e] for e in chosen], dim=1)  # (D, 2 F/H)
        b_in = torch.cat([experts.up_proj_bias[e] for e in chosen])
        w_out = torch.cat([experts.down_proj[e] for e in chosen], dim=0)  # (2 F/H, D)
        b_out = sum(experts.down_proj_bias[e] for e in chosen)  # each expert brings its own output bias
        expected.append(act(hidden_TD[token] @ w_in + b_in) @ w_out + b_out)
    with torch.no_grad():
        out_TD = block(hidden_TD, input_ids=ids_T)
    torch.testing.assert_close(out_TD, torch.stack(expected), rtol=1e-5, atol=1e-5)


# --- losses, training, saving -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_router_losses_are_zero_and_the_loss_is_the_lm_loss(family):
    model = tiny(family).train()
    batch = batch_for(model)
    out = model(**batch)
    assert out.aux_loss.item() == 0.0 and out.z_loss.item() == 0.0
    if model.config.is_encoder_decoder:
        lm_loss = F.cross_entropy(out.logits.reshape(-1, VOCAB), batch["labels"].reshape(-1))
    else:
        lm_loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, lm_loss, rtol=0, atol=1e-6)
    for _, block in moe_blocks(model):
        assert block.balance_loss_sum.item() == 0.0 and block.z_loss_sum.item() == 0.0


# Loads saved folders in a fresh interpreter in which any import of hf_moe fails (as test_hub_portability.py does)
# and saves each one's logits and hash tables.
LOAD_WITHOUT_HF_MOE = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoHfMoe(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_moe" or name.startswith("hf_moe."):
                raise ImportError("hf_moe is not installed here")

    sys.meta_path.insert(0, NoHfMoe())
    import torch, transformers

    results = {}
    for folder, auto_class in zip(sys.argv[2::2], sys.argv[3::2]):
        model = getattr(transformers, auto_class).from_pretrained(folder, trust_remote_code=True).eval()
        batch = torch.load(folder + "/batch.pt")
        with torch.no_grad():
            logits = model(**batch).logits
        tables = {n: b for n, b in model.named_buffers() if n.endswith("expert_of_token")}
        results[folder] = {"logits": logits, "tables": tables, "class": type(model).__name__}
    assert not any(name.startswith("hf_moe") for name in sys.modules), "hf_moe was imported"
    torch.save(results, sys.argv[1])
    """
)


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_train_save_load_card_and_describe(family, tmp_path):
    model = tiny(family, num_hash_heads=2).train()
    table_HV = reversed_table(2)
    set_hash_tables(model, table_HV, "balanced")
    assert model.config.hash_kind == "balanced"
    assert model.config.parameter_counts()["total"] == model.num_parameters()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    experts = moe_blocks(model)[0][1].experts
    before = experts.down_proj.detach().clone()
    batch = batch_for(model)
    model(**batch).loss.backward()
    optimizer.step()
    assert not torch.equal(experts.down_proj, before)  # the experts train; the table does not move
    assert all(torch.equal(r.expert_of_token, table_HV) for _, r in moe_routers(model))

    model.eval()
    model.save_pretrained(tmp_path)
    loaded = auto_class(model).from_pretrained(tmp_path).eval()
    assert all(torch.equal(r.expert_of_token, table_HV) for _, r in moe_routers(loaded))
    assert loaded.config.hash_kind == "balanced"
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    card = str(render_model_card(loaded.config))
    assert "| Router | `hash`: hash layers: fixed token-id -> expert table (Roller et al. 2021) |" in card
    assert "| Hash table | balanced (greedy bin packing of a corpus's token frequencies) |" in card
    assert "| Hash heads | 2 (MultiHash) |" in card
    summary = describe(str(tmp_path))
    assert summary["router_type"] == "hash" and summary["experts_per_token"] == 2
    assert summary["router_settings"]["Hash table"].startswith("balanced")
    assert summary["weights"]["checked"] is True


def test_remote_code_loads_of_both_families_without_hf_moe_keep_the_table_and_logits(tmp_path):
    folders = {}
    for family in ("gpt2", "t5"):
        model = tiny(family, num_hash_heads=2).eval()
        set_hash_tables(model, reversed_table(2), "balanced")
        folder = tmp_path / family
        model.save_pretrained(folder)
        batch = batch_for(model)
        remote_batch = {"input_ids": batch["input_ids"]}
        if model.config.is_encoder_decoder:
            remote_batch["decoder_input_ids"] = batch["labels"]
        torch.save(remote_batch, folder / "batch.pt")
        with torch.no_grad():
            folders[family] = (folder, model(**remote_batch).logits)

    out = tmp_path / "results.pt"
    arguments = [str(out)]
    for family, (folder, _) in folders.items():
        arguments += [str(folder), "AutoModelForSeq2SeqLM" if family == "t5" else "AutoModelForCausalLM"]
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_HF_MOE, *arguments], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = torch.load(out)
    for family, (folder, logits) in folders.items():
        remote = results[str(folder)]
        assert remote["class"] == ("T5MoeForConditionalGeneration" if family == "t5" else "GPT2MoeForCausalLM")
        assert remote["tables"] and all(torch.equal(t, reversed_table(2)) for t in remote["tables"].values())
        assert torch.equal(remote["logits"], logits)


def test_a_checkpoint_without_the_table_loads_the_seeded_one(tmp_path):
    model = tiny("gpt2", hash_seed=3)
    set_hash_tables(model, reversed_table(), "random")
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    without_table = {name: tensor for name, tensor in tensors.items() if not name.endswith("expert_of_token")}
    assert len(without_table) == len(tensors) - 2
    save_file(without_table, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    # the missing buffer is initialized by init_weights, from the seed: never left uninitialized (torch.empty)
    expected_HV = random_hash_table(VOCAB, EXPERTS, seed=3)
    assert all(torch.equal(r.expert_of_token, expected_HV) for _, r in moe_routers(loaded))
    assert isinstance(moe_routers(loaded)[0][1], HashRouter)
