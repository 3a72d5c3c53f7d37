"""Layout checks and plans, on one process: clear errors before any process group exists."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers.distributed import DistributedConfig

import hf_moe
from hf_moe.parallel import describe_layout, validate_expert_parallel
from tests.conftest import tiny_gpt2_moe_config
from tests.parallel.conftest import tiny_t5_config
from tests.parallel.launch import ACCELERATE_TWO_PROCESSES, free_port


def test_indivisible_expert_count_is_refused_before_loading():
    with pytest.raises(ValueError, match=r"ep_size=2.*num_local_experts=3.*\[1, 3\]"):
        validate_expert_parallel(tiny_gpt2_moe_config(num_experts=3), DistributedConfig(fsdp_size=2, ep_size=2))


def test_a_pyramid_layer_that_ep_size_does_not_divide_is_refused_before_loading():
    config = tiny_gpt2_moe_config(num_experts_per_layer=[4, 6])
    validate_expert_parallel(config, DistributedConfig(fsdp_size=2, ep_size=2))
    # 4 divides the first layer's 4, not the second's 6: named before any weight loads
    with pytest.raises(ValueError, match=r"ep_size=4.*num_experts_per_layer=\[4, 6\] \(6 experts\)"):
        validate_expert_parallel(config, DistributedConfig(fsdp_size=4, ep_size=4))


def test_wrong_process_count_and_tensor_parallel_are_refused():
    config = tiny_gpt2_moe_config()
    with pytest.raises(ValueError, match="needs 2 processes, but the launcher started 4"):
        validate_expert_parallel(config, DistributedConfig(fsdp_size=2, ep_size=2), world_size=4)
    with pytest.raises(ValueError, match="no tensor-parallel plan"):
        validate_expert_parallel(config, DistributedConfig(tp_size=2, tp_plan={}, ep_size=2, fsdp_size=1))
    validate_expert_parallel(config, DistributedConfig(fsdp_size=4, ep_size=2), world_size=4)


def test_plans_name_every_expert_weight_and_bias():
    gpt2 = hf_moe.GPT2MoeForCausalLM(tiny_gpt2_moe_config())
    names = {name for name in gpt2.ep_plan}
    assert {
        f"transformer.h.*.mlp.experts.{p}" for p in ("up_proj", "up_proj_bias", "down_proj", "down_proj_bias")
    } < names
    for t5_config, weight in (
        (tiny_t5_config(), "up_proj"),
        (tiny_t5_config(feed_forward_proj="gated-gelu"), "gate_up_proj"),
    ):
        t5 = hf_moe.T5MoeForConditionalGeneration(t5_config)
        # the stacks' rules, prefixed; only the weights this variant has, so transformers warns about nothing
        assert set(t5.ep_plan) == {
            f"{stack}.block.*.layer.*.DenseReluDense.experts{suffix}"
            for stack in ("encoder", "decoder")
            for suffix in ("", f".{weight}", ".down_proj")
        }
        assert set(t5.fsdp_plan) == {"encoder.block.*", "decoder.block.*"}


def test_describe_layout_draws_ranks_experts_and_groups():
    text = describe_layout(DistributedConfig(fsdp_size=4, ep_size=2), num_experts=8)
    assert "E0-E3" in text and "E4-E7" in text and "ep group" in text and "efsdp group" in text


# the README's commands
LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "{port}"],
    "accelerate": [
        "-m",
        "accelerate.commands.accelerate_cli",
        *ACCELERATE_TWO_PROCESSES,
        "--main_process_port",
        "{port}",
    ],
}


def run_example(launcher: str, *example_args: str) -> subprocess.CompletedProcess:
    example = Path(__file__).resolve().parents[2] / "examples" / "expert_parallel.py"
    command = [sys.executable] + [part.format(port=free_port()) for part in LAUNCHERS[launcher]]
    command += [str(example), *example_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.multiprocess
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_example_trains_and_resumes_on_two_ranks(launcher, tmp_path):
    first = run_example(launcher, "--output-dir", str(tmp_path), "--max-steps", "2")
    assert "2 whole experts per rank" in first.stdout  # 4 experts over 2 expert-parallel ranks, not one process
    assert "saved a consolidated checkpoint" in first.stdout
    hf_moe.GPT2MoeForCausalLM.from_pretrained(tmp_path / "final")

    # the README's resume command: picks up checkpoint-2 and trains on to step 4
    run_example(launcher, "--output-dir", str(tmp_path), "--max-steps", "4", "--resume-from-checkpoint", "last")
    assert (tmp_path / "checkpoints" / "checkpoint-4" / "sharded_state").is_dir()
