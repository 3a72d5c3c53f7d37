"""Every example answers `--help` (argparse) with its usage and exits 0."""

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
