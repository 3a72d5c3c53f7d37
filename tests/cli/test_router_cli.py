"""`hf-moe moefy --router-type` with the routers from the literature: each converts, trains a step, and its card and
inspect line say what it is; expert choice in GPT-2 needs the opt-in, and says so."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_moe.cli.main import main
from hf_moe.modeling import moe_routers
from tests.cli.conftest import error_lines, snapshot

ROUTER_OPTIONS = {
    "base": ["--top-k", "1"],
    "dense_to_sparse": ["--top-k", "4", "--gate-threshold", "0.05"],
    "expert_choice": ["--capacity-factor", "2", "--allow-noncausal-routing"],
}
CARD_ROWS = {
    "base": "| Router | `base`: BASE layers",
    "dense_to_sparse": "| Gate threshold | 0.05 |",
    "expert_choice": "| Router | `expert_choice`: expert choice",
}


@pytest.mark.parametrize("router", sorted(ROUTER_OPTIONS))
def test_moefy_with_each_router_converts_and_trains(workspace, capsys, router):
    out = workspace / "out"
    argv = ["moefy", str(workspace / "dense"), str(out), "--num-experts", "4", "--router-type", router]
    assert main([*argv, *ROUTER_OPTIONS[router]]) == 0
    model = AutoModelForCausalLM.from_pretrained(out).train()
    assert model.config.router_type == router and model.config.aux_loss_coef == 0.0
    if router == "dense_to_sparse":
        assert model.config.gate_threshold == 0.05
    ids = torch.randint(2, 99, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    # moefy initialized every router (small random centroids / gates), and they learn
    assert all(r.weight.abs().sum() > 0 and r.weight.grad.abs().sum() > 0 for _, r in moe_routers(model))
    assert CARD_ROWS[router] in (out / "README.md").read_text()
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    assert f"router: {router} (" in capsys.readouterr().out


def test_expert_choice_in_gpt2_without_the_opt_in_is_one_line_naming_the_flag(workspace, capsys):
    before = snapshot(workspace)
    argv = ["moefy", str(workspace / "dense"), str(workspace / "out"), "--router-type", "expert_choice"]
    code = main([*argv, "--capacity-factor", "2"])
    lines = error_lines(capsys.readouterr().err)
    assert code == 2 and len(lines) == 1
    assert "allow_noncausal_routing=True" in lines[0] and "leaks the future" in lines[0]
    assert snapshot(workspace) == before
