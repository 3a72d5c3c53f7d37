"""Every example answers `--help` (argparse) with its usage and exits 0; the examples' short log lines."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("run_clm_moe", "accelerate launch --multi_gpu --num_processes 2"),
        ("run_seq2seq_moe", "--pairs-file"),
        ("peft_lora_moe", "target_parameters"),
    ],
)
def test_help(example, capsys, name, expected):
    with pytest.raises(SystemExit) as exit_info:
        example(name).main(["--help"])
    assert exit_info.value.code == 0
    assert expected in capsys.readouterr().out


def test_short_log_line_keeps_the_trainer_numbers_and_the_model_wide_moe_summaries(example):
    short_log_line = example("moe_example_utils").short_log_line
    logs = {"loss": 4.62137, "learning_rate": 0.001, "epoch": 0.5, "total_flos": 1e12}
    logs.update({f"moe/layer_{i:02d}/token_fraction_expert_{e:02d}": 0.125 for i in range(12) for e in range(64)})
    logs.update({"moe/load_imbalance": 1.234567, "moe/cv": 0.2, "moe/dead_experts": 0})
    line = short_log_line(logs, step=25)
    assert line == "step 25: loss 4.621, learning_rate 0.001, epoch 0.5 | moe: imbalance 1.235, cv 0.2, dead 0"
    evaluation = short_log_line({"eval_loss": 4.0, "eval_moe/layer_00/cv": 0.1, "eval_moe/cv": 0.3}, step=25)
    assert evaluation == "step 25: eval_loss 4 | eval_moe: cv 0.3"
