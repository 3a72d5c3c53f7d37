"""A saved folder carries its code and loads with trust_remote_code=True where hf_moe cannot be imported."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.conftest import tiny_gpt2_moe_config

# Runs in a fresh interpreter in which any import of hf_moe fails, as on a machine where it is not installed.
LOAD_WITHOUT_HF_MOE = textwrap.dedent(
    """
    import importlib.abc, os, sys

    class NoHfMoe(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_moe" or name.startswith("hf_moe."):
                raise ImportError("hf_moe is not installed here")

    sys.meta_path.insert(0, NoHfMoe())
    import torch, transformers

    folder, auto_class, out = sys.argv[1], sys.argv[2], sys.argv[3]
    model = getattr(transformers, auto_class).from_pretrained(folder, trust_remote_code=True).eval()
    assert not any(name.startswith("hf_moe") for name in sys.modules), "hf_moe was imported"
    input_ids = torch.load(folder + "/input_ids.pt")
    with torch.no_grad():
        output = model(input_ids)
    result = output.logits if hasattr(output, "logits") else output.last_hidden_state
    # the balancing state as loaded, and where the folder has micro-batches, their balance losses in training (one
    # optimizer step: the global-batch scope counts the earlier ones)
    expert_bias = {name: b for name, b in model.named_buffers() if name.endswith("expert_bias")}
    aux_losses = []
    if os.path.exists(folder + "/micro_batches.pt"):
        model.train()
        for ids in torch.load(folder + "/micro_batches.pt"):
            aux_losses.append(model(ids, labels=ids).aux_loss.detach())
    result = {"result": result, "class": type(model).__name__, "expert_bias": expert_bias, "aux_losses": aux_losses}
    torch.save(result, out)
    """
)


def load_without_hf_moe(folder, auto_class, tmp_path):
    out = tmp_path / "result.pt"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-c", LOAD_WITHOUT_HF_MOE, str(folder), auto_class, str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return torch.load(out)


def test_saved_folder_carries_the_flat_modeling_files_and_auto_map(tmp_path):
    from hf_moe import GPT2MoeForCausalLM

    GPT2MoeForCausalLM(tiny_gpt2_moe_config()).save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    expected = {"configuration_gpt2_moe.py", "modeling_gpt2_moe.py", "routing.py", "experts.py", "losses.py"}
    core = {"configuration_moe.py", "sparse_moe.py", "registry.py", "dispatch.py", "moe_parts.py", "_compat.py"}
    assert expected | core <= files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_gpt2_moe.GPT2MoeConfig"
    assert auto_map["AutoModelForCausalLM"] == "modeling_gpt2_moe.GPT2MoeForCausalLM"
    assert auto_map["AutoModel"] == "modeling_gpt2_moe.GPT2MoeModel"
    # the modeling files import nothing of hf_moe: they must work without it
    for name in files:
        if name.endswith(".py"):
            source = (tmp_path / name).read_text()
            assert not re.search(r"^\s*(from|import)\s+hf_moe", source, re.MULTILINE), name


# the routers from the literature travel in their own files (routing_<name>.py, imported by registry.py); hash is
# loaded without hf_moe in tests/modeling/test_router_hash.py
ROUTERS_FROM_THE_LITERATURE = {
    "base": dict(router_type="base", num_experts_per_tok=1),
    "dense_to_sparse": dict(router_type="dense_to_sparse", num_experts_per_tok=3, gate_threshold=0.05),
    "expert_choice": dict(router_type="expert_choice", capacity_factor=2.0, allow_noncausal_routing=True),
}


@pytest.mark.parametrize("router", sorted(ROUTERS_FROM_THE_LITERATURE))
def test_every_router_loads_without_hf_moe(router, tmp_path):
    from hf_moe import GPT2MoeForCausalLM

    model = GPT2MoeForCausalLM(tiny_gpt2_moe_config(**ROUTERS_FROM_THE_LITERATURE[router])).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    assert (folder / f"routing_{router}.py").exists()
    input_ids = torch.randint(2, 99, (2, 7))
    torch.save(input_ids, folder / "input_ids.pt")
    loaded = load_without_hf_moe(folder, "AutoModelForCausalLM", tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded["result"], model(input_ids).logits)


def test_remote_code_load_without_hf_moe_gives_identical_logits(tmp_path):
    from hf_moe import GPT2MoeForCausalLM

    model = GPT2MoeForCausalLM(tiny_gpt2_moe_config(router_type="noisy_topk", moe_layers=[1])).eval()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    input_ids = torch.randint(2, 99, (2, 7))
    torch.save(input_ids, folder / "input_ids.pt")
    loaded = load_without_hf_moe(folder, "AutoModelForCausalLM", tmp_path)
    assert loaded["class"] == "GPT2MoeForCausalLM"
    with torch.no_grad():
        assert torch.equal(loaded["result"], model(input_ids).logits)
    base = load_without_hf_moe(folder, "AutoModel", tmp_path)
    assert base["class"] == "GPT2MoeModel"


# DeepSeek-V3's recipe (bias balancing plus a small sequence-wise balance loss), and the global-batch balance loss:
# both keep state or compute their loss in code that travels with the folder
BALANCING = {
    "bias_and_sequence": dict(router_bias_update_rate=1e-3, aux_loss_scope="sequence", router_aux_loss_coef=1e-4),
    "global_batch": dict(aux_loss_scope="global_batch"),
}


def training_aux_losses(model, micro_batches) -> list[torch.Tensor]:
    model.train()
    with torch.no_grad():
        losses = [model(ids, labels=ids).aux_loss for ids in micro_batches]
    model.eval()
    return losses


@pytest.mark.parametrize("setting", sorted(BALANCING))
def test_balancing_settings_load_without_hf_moe(setting, tmp_path):
    from hf_moe import GPT2MoeForCausalLM

    model = GPT2MoeForCausalLM(tiny_gpt2_moe_config(**BALANCING[setting])).eval()
    input_ids = torch.randint(2, 99, (2, 7))
    with torch.no_grad():
        unbiased = model(input_ids).logits
    biases = {name: b for name, b in model.named_buffers() if name.endswith("expert_bias")}
    assert len(biases) == (2 if "router_bias_update_rate" in BALANCING[setting] else 0)
    for bias_E in biases.values():  # as training would leave it: small next to the 4 experts' probabilities, near 1/4
        bias_E.copy_(torch.randn(bias_E.shape) * 0.01)
    with torch.no_grad():
        expected = model(input_ids).logits
    if biases:
        assert not torch.allclose(expected, unbiased)  # the bias changes which experts run
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    torch.save(input_ids, folder / "input_ids.pt")
    micro_batches = [torch.randint(2, 99, (2, 7)) for _ in range(2)]
    torch.save(micro_batches, folder / "micro_batches.pt")

    loaded = load_without_hf_moe(folder, "AutoModelForCausalLM", tmp_path)
    assert torch.equal(loaded["result"], expected)
    assert loaded["expert_bias"].keys() == biases.keys()
    for name, bias_E in biases.items():
        assert loaded["expert_bias"][name].dtype == torch.float32 and torch.equal(loaded["expert_bias"][name], bias_E)
    aux_losses = training_aux_losses(model, micro_batches)
    assert all(torch.equal(a, b) for a, b in zip(loaded["aux_losses"], aux_losses, strict=True))
    # the losses are those of the scope, checked against the per-micro-batch loss of the same weights
    plain_config = tiny_gpt2_moe_config(**{**BALANCING[setting], "aux_loss_scope": "micro_batch"})
    per_micro_batch = GPT2MoeForCausalLM(plain_config)
    per_micro_batch.load_state_dict(model.state_dict())
    plain = training_aux_losses(per_micro_batch, micro_batches)
    if setting == "global_batch":
        # the first micro-batch is the whole global batch so far; the second also counts the first one's loads
        torch.testing.assert_close(aux_losses[0], plain[0])
    else:
        # each sequence's loss, averaged: the per-micro-batch loss of one sequence at a time
        for ids, loss in zip(micro_batches, aux_losses, strict=True):
            torch.testing.assert_close(loss, torch.stack(training_aux_losses(per_micro_batch, ids[:, None])).mean())
        assert not torch.isclose(aux_losses[0], plain[0], rtol=1e-4)
    assert not torch.isclose(aux_losses[1], plain[1], rtol=1e-4)
