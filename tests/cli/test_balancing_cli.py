"""`hf-moe moefy --aux-loss-scope / --router-bias-update-rate`: the settings reach the config and the card, and
`hf-moe inspect` shows them, with the expert bias as saved."""

from __future__ import annotations

import json
import math

import numpy as np
from safetensors.numpy import load_file, save_file
from transformers import AutoConfig

from hf_moe.cli.inspect import expert_bias_summary
from hf_moe.cli.main import main


def inspected(capsys, folder) -> tuple[dict, str]:
    capsys.readouterr()
    assert main(["inspect", str(folder), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert main(["inspect", str(folder)]) == 0
    return summary, capsys.readouterr().out


def test_moefy_with_bias_balancing_and_a_sequence_scope_then_inspect_reads_the_saved_bias(workspace, capsys):
    out = workspace / "out"
    argv = ["moefy", str(workspace / "dense"), str(out), "--num-experts", "4"]
    assert main([*argv, "--router-bias-update-rate", "0.001", "--aux-loss-scope", "sequence"]) == 0
    config = AutoConfig.from_pretrained(out)
    assert config.router_bias_update_rate == 0.001 and config.aux_loss_scope == "sequence"
    assert config.aux_loss_coef == 0.0  # the bias balances; the loss coefficient defaults to 0
    card = (out / "README.md").read_text()
    assert "| Aux-loss-free balancing |" in card and "| Load-balancing loss scope | `sequence`" in card

    # as a trained model would have it: a different bias per layer, written into the weights file directly
    tensors = load_file(out / "model.safetensors")
    biases = {
        "transformer.h.0.mlp.router": np.array([0.003, -0.001, -0.002, 0.0], dtype=np.float32),
        "transformer.h.1.mlp.router": np.array([-0.25, 0.5, 0.125, 1.5], dtype=np.float32),
    }
    assert {key for key in tensors if key.endswith("expert_bias")} == {f"{r}.expert_bias" for r in biases}
    for router, bias_E in biases.items():
        tensors[f"{router}.expert_bias"] = bias_E
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})

    summary, text = inspected(capsys, out)
    assert summary["aux_loss"]["scope"] == "sequence" and summary["router_bias_update_rate"] == 0.001
    assert list(summary["expert_bias"]["layers"]) == list(biases)  # model order
    for router, bias_E in biases.items():
        values = [float(v) for v in bias_E]
        stats = summary["expert_bias"]["layers"][router]
        assert stats["min"] == min(values) and stats["max"] == max(values)
        assert math.isclose(stats["norm"], math.sqrt(sum(v * v for v in values)), rel_tol=1e-12)
    assert "scope sequence" in text and "bias balancing: rate 0.001 per optimizer step" in text
    assert "RouterBalancingCallback" in text
    assert "transformer.h.1.mlp.router.expert_bias: min -0.25, max 1.5, norm 1.606\n" in text  # sqrt(2.578125)


def test_inspect_of_a_model_without_bias_says_so(workspace, capsys):
    summary, text = inspected(capsys, workspace / "moe")
    assert summary["aux_loss"]["scope"] == "micro_batch" and summary["router_bias_update_rate"] == 0.0
    assert "expert_bias" not in summary
    assert "scope micro_batch" in text and "bias balancing: off" in text


def test_moefy_global_batch_scope_reaches_the_config(workspace, capsys):
    out = workspace / "out"
    argv = ["moefy", str(workspace / "dense"), str(out), "--num-experts", "4"]
    assert main([*argv, "--aux-loss-scope", "global_batch"]) == 0
    config = AutoConfig.from_pretrained(out)
    assert config.aux_loss_scope == "global_batch" and config.router_bias_update_rate == 0.0
    summary, _ = inspected(capsys, out)
    assert summary["aux_loss"]["scope"] == "global_batch" and "expert_bias" not in summary


def test_the_bias_summary_lists_routers_in_layer_order(tmp_path):
    # safetensors stores keys sorted as text, where layer 10 comes before layer 2
    tensors = {f"h.{i}.router.expert_bias": np.full(2, float(i), dtype=np.float32) for i in (10, 2, 1)}
    tensors["h.2.router.weight"] = np.zeros((2, 3), dtype=np.float32)
    save_file(tensors, tmp_path / "model.safetensors")
    summary = expert_bias_summary(tmp_path, ["model.safetensors"])
    assert list(summary) == ["h.1.router", "h.2.router", "h.10.router"]
    assert summary["h.10.router"] == {"min": 10.0, "max": 10.0, "norm": math.sqrt(200.0)}


def test_the_cli_aux_loss_scopes_are_the_librarys():
    from hf_moe.cli import AUX_LOSS_SCOPES as CLI_AUX_LOSS_SCOPES
    from hf_moe.modeling.losses import AUX_LOSS_SCOPES

    assert CLI_AUX_LOSS_SCOPES == AUX_LOSS_SCOPES
