"""Ctrl-C during `hf-moe moefy` leaves nothing on disk and says so in one line; written folders get the permissions
`save_pretrained` gives (0o777 minus the umask)."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path
from unittest import mock

import pytest
from transformers import PreTrainedModel

import hf_moe.conversion.save
from hf_moe.cli.main import EXIT_INTERRUPTED, main
from tests.cli.conftest import error_lines, snapshot

SMALL = ["--num-experts", "2", "--top-k", "1"]


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _half_written_then_interrupted(self, save_directory, *args, **kwargs):
    (Path(save_directory) / "model.safetensors").write_bytes(b"half a model")
    raise KeyboardInterrupt


# where Ctrl-C lands: (attribute to patch, replacement)
INTERRUPTION_POINTS = {
    "while converting": ("hf_moe.conversion.moefy", _interrupt),
    "while saving the weights": (PreTrainedModel, _half_written_then_interrupted),
    "while copying the tokenizer": ("hf_moe.conversion.save.shutil.copy2", _interrupt),
    "while writing the report": ("hf_moe.conversion.report.ConversionReport.save", _interrupt),
    "while rendering the card": ("hf_moe.hub.render_model_card", _interrupt),
    # a real SIGINT, as the terminal sends it, outside the moments save.py holds it
    "on a real SIGINT": (
        "hf_moe.conversion.report.ConversionReport.save",
        lambda *a: os.kill(os.getpid(), signal.SIGINT),
    ),
}


@pytest.mark.parametrize("point", INTERRUPTION_POINTS)
@pytest.mark.parametrize("out_name", ["out", "new/nested/out"])
def test_ctrl_c_leaves_nothing_on_disk(workspace, capsys, monkeypatch, point, out_name):
    (workspace / "dense" / "tokenizer.json").write_text("{}")  # so that the tokenizer copy runs
    target, replacement = INTERRUPTION_POINTS[point]
    if target is PreTrainedModel:
        monkeypatch.setattr(PreTrainedModel, "save_pretrained", replacement)
    else:
        monkeypatch.setattr(target, replacement)
    before = snapshot(workspace)

    code = main(["moefy", str(workspace / "dense"), str(workspace / out_name), *SMALL])

    assert code == EXIT_INTERRUPTED == 130
    assert error_lines(capsys.readouterr().err) == ["hf-moe moefy: interrupted, nothing written"]
    assert snapshot(workspace) == before  # no OUT, no staging folder, no parent folder made for OUT


def test_ctrl_c_during_overwrite_keeps_the_old_folder(workspace, capsys, monkeypatch):
    before = snapshot(workspace)
    monkeypatch.setattr("hf_moe.conversion.report.ConversionReport.save", _interrupt)
    assert main(["moefy", str(workspace / "dense"), str(workspace / "moe"), *SMALL, "--overwrite"]) == 130
    assert snapshot(workspace) == before
    assert "nothing written" in capsys.readouterr().err


def test_ctrl_c_during_the_final_rename_is_held_until_out_is_complete(workspace, capsys, monkeypatch):
    # a real SIGINT, as the terminal sends it: the handler save.py installs holds it until the renames are done
    real_replace = hf_moe.conversion.save._replace

    def replace_with_a_signal(staging, out):
        os.kill(os.getpid(), signal.SIGINT)
        real_replace(staging, out)

    monkeypatch.setattr(hf_moe.conversion.save, "_replace", replace_with_a_signal)
    out = workspace / "moe"
    assert main(["moefy", str(workspace / "dense"), str(out), *SMALL, "--overwrite"]) == 130
    assert error_lines(capsys.readouterr().err) == [f"hf-moe moefy: interrupted, {out} was written"]
    assert (out / "config.json").is_file() and '"num_local_experts": 2' in (out / "config.json").read_text()
    assert not [path.name for path in workspace.iterdir() if path.name.startswith(".")]  # no staging, no old copy
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_during_the_upload_says_the_folder_is_complete(workspace, capsys, monkeypatch):
    monkeypatch.setattr("hf_moe.hub.push_folder_to_hub", mock.Mock(side_effect=KeyboardInterrupt))
    out = workspace / "up"
    assert main(["moefy", str(workspace / "dense"), str(out), *SMALL, "--push-to-hub", "me/tiny"]) == 130
    assert error_lines(capsys.readouterr().err) == [
        f"hf-moe moefy: interrupted, {out} is complete but the upload to me/tiny did not finish"
    ]
    assert (out / "model.safetensors").is_file()


@pytest.fixture
def umask():
    """Set the process umask for one test (it is process-wide: always restored)."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


@pytest.mark.parametrize(("mask", "folder_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_the_written_folder_has_the_permissions_save_pretrained_gives(workspace, umask, mask, folder_mode, file_mode):
    from transformers import AutoModelForCausalLM

    umask(mask)
    out = workspace / "moe_perm"
    assert main(["moefy", str(workspace / "dense"), str(out), *SMALL]) == 0
    # the folder as save_pretrained makes it (not tempfile.mkdtemp's 0o700)
    reference = workspace / "reference"
    AutoModelForCausalLM.from_pretrained(out).save_pretrained(reference)
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode) == folder_mode
    # every file as `open` makes it, the weights too (transformers itself writes those 0o600)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in out.iterdir()}
    assert {"model.safetensors", "config.json", "README.md"} <= set(modes)
    assert set(modes.values()) == {file_mode}, modes


def test_a_full_disk_is_one_line_exit_1_and_leaves_nothing(workspace, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("hf_moe.conversion.report.ConversionReport.save", full)
    before = snapshot(workspace)
    assert main(["moefy", str(workspace / "dense"), str(workspace / "new" / "out"), *SMALL]) == 1
    assert error_lines(capsys.readouterr().err) == ["hf-moe moefy: error: [Errno 28] No space left on device"]
    assert snapshot(workspace) == before
