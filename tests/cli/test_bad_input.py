"""Every bad input to `hf-moe` gets one line on stderr naming the input and what is allowed, exit code 2, and leaves
nothing on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

import hf_moe.conversion.source
from hf_moe.cli.main import main
from hf_moe.conversion import REPORT_FILENAME
from tests.cli.conftest import error_lines, snapshot

REAL_HUB_PROBE = hf_moe.conversion.source._hub_has_model
REAL_CACHE_LOOK_UP = hf_moe.conversion.source._cached_snapshot


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    # the one Hub request resolve_source makes; tests never reach the network, whatever the machine allows
    monkeypatch.setattr(
        hf_moe.conversion.source, "_hub_has_model", lambda repo_id: (None, "ConnectError: no network in tests")
    )
    monkeypatch.setattr(hf_moe.conversion.source, "_cached_snapshot", lambda repo_id: None)


def truncate(path: Path, keep: float | int) -> None:
    """Keep a fraction (float) or a number of bytes (int) of the file."""
    data = path.read_bytes()
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])


def rewrite_tensors(folder: Path, change) -> None:
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def drop_a_tensor(tensors: dict) -> None:
    del tensors[next(name for name in tensors if name.endswith("experts.down_proj"))]


def reshape_a_tensor(tensors: dict) -> None:
    name = next(name for name in tensors if name.endswith("experts.down_proj"))
    tensors[name] = tensors[name][:2].copy()  # 2 experts where the config says 4


def shard_index_naming_a_missing_file(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


PREPARE = {
    "truncated dense": lambda ws: truncate(ws / "dense" / "model.safetensors", keep=0.5),
    "garbage dense": lambda ws: (ws / "dense" / "model.safetensors").write_bytes(b"\xff" * 64),
    "truncated moe": lambda ws: truncate(ws / "moe" / "model.safetensors", keep=0.6),
    # 4 of the 8 bytes that give the header's length
    "moe cut inside its header length": lambda ws: truncate(ws / "moe" / "model.safetensors", keep=4),
    "moe lacking a tensor": lambda ws: rewrite_tensors(ws / "moe", drop_a_tensor),
    "moe with a wrong shape": lambda ws: rewrite_tensors(ws / "moe", reshape_a_tensor),
    "moe without weights": lambda ws: (ws / "moe" / "model.safetensors").unlink(),
    "moe with a broken index": lambda ws: shard_index_naming_a_missing_file(ws / "moe"),
    "no config": lambda ws: (ws / "dense" / "config.json").unlink(),
}

MOEFY = ["moefy", "{ws}/dense", "{ws}/out"]

# (case, argv, fragments the one error line must contain, what to break first)
CASES = [
    ("missing source folder", ["moefy", "{ws}/no/such/dir", "{ws}/out"], ["{ws}/no/such/dir", "not found"], None),
    ("bare name, no Hub", ["moefy", "nope", "{ws}/out"], ["'nope'", "not found", "nor in the local Hub cache", "nor reachable on the Hub"], None),
    ("source is a file", ["moefy", "{ws}/a_file", "{ws}/out"], ["{ws}/a_file", "is a file", "Hub repo id"], None),
    ("source without config", MOEFY, ["{ws}/dense", "config.json"], "no config"),
    ("zero experts", [*MOEFY, "--num-experts", "0"], ["--num-experts", "integer >= 1", "got 0"], None),
    ("not a number", [*MOEFY, "--num-experts", "many"], ["--num-experts", "'many'"], None),
    ("top-k above experts", [*MOEFY, "--num-experts", "4", "--top-k", "5"], ["--top-k 5", "choose 1..4"], None),
    ("negative capacity", [*MOEFY, "--capacity-factor", "-1.5"], ["--capacity-factor", "> 0", "-1.5"], None),
    ("nan capacity", [*MOEFY, "--eval-capacity-factor", "nan"], ["--eval-capacity-factor", "finite"], None),
    ("drop ratio above 1", [*MOEFY, "--init", "drop_upcycle", "--drop-ratio", "2"], ["--drop-ratio", "[0, 1]"], None),
    ("out is a file", ["moefy", "{ws}/dense", "{ws}/a_file"], ["OUT {ws}/a_file", "is a file"], None),
    ("out under a file", ["moefy", "{ws}/dense", "{ws}/a_file/out"], ["{ws}/a_file", "is a file"], None),
    ("out not empty", ["moefy", "{ws}/dense", "{ws}/moe"], ["OUT {ws}/moe", "--overwrite"], None),
    ("truncated source", MOEFY, ["{ws}/dense/model.safetensors", "not a readable safetensors"], "truncated dense"),
    ("garbage source", MOEFY, ["{ws}/dense/model.safetensors", "not a readable safetensors"], "garbage dense"),
    ("unknown router", [*MOEFY, "--router-type", "psychic"], ["--router-type 'psychic'", "topk", "noisy_topk"], None),
    ("unknown init", [*MOEFY, "--init", "magic"], ["--init 'magic'", "copy", "drop_upcycle"], None),
    ("unknown balance loss", [*MOEFY, "--aux-loss-type", "fair"], ["--aux-loss-type 'fair'", "switch"], None),
    ("unknown drop policy", [*MOEFY, "--drop-policy", "random"], ["--drop-policy 'random'", "position"], None),
    ("unknown capacity scope", [*MOEFY, "--capacity-scope", "epoch"], ["--capacity-scope 'epoch'", "sequence"], None),
    ("unknown aux loss scope", [*MOEFY, "--aux-loss-scope", "epoch"], ["--aux-loss-scope", "invalid choice: 'epoch'", "micro_batch", "global_batch", "sequence"], None),
    ("negative bias rate", [*MOEFY, "--router-bias-update-rate", "-0.1"], ["--router-bias-update-rate", ">= 0", "-0.1"], None),
    ("unknown split partition", [*MOEFY, "--init", "split", "--split-partition", "x"], ["--split-partition"], None),
    ("init option without its init", [*MOEFY, "--noise-scale", "0.1"], ["--noise-scale", "--init noise"], None),
    ("private without upload", [*MOEFY, "--private"], ["--private", "--push-to-hub"], None),
    ("bad upload repo id", [*MOEFY, "--push-to-hub", "a/b/c"], ["--push-to-hub 'a/b/c'", "namespace/name"], None),
    # rejected by the config's validators (wrapped by huggingface_hub's strict dataclasses): still one line
    ("config: capacity twice", [*MOEFY, "--expert-capacity", "3", "--capacity-factor", "1"], ["expert_capacity=3"], None),
    ("config: global batch of a loss without f_e", [*MOEFY, "--aux-loss-type", "cv_squared", "--aux-loss-scope", "global_batch"], ["aux_loss_type='cv_squared'", "aux_loss_scope in ('micro_batch', 'sequence')", "got 'global_batch'"], None),
    ("config: bias on a router without scores", [*MOEFY, "--router-type", "hash", "--router-bias-update-rate", "0.01"], ["router_bias_update_rate=0.01", "router_type='hash'", "'topk', 'noisy_topk'"], None),
    ("config: expert dropout", [*MOEFY, "--expert-dropout", "1"], ["expert_dropout", "[0, 1)", "got 1"], None),
    ("unknown command", ["upcycle"], ["'upcycle'", "moefy", "inspect"], None),
    ("unknown option", [*MOEFY, "--experts", "4"], ["--experts"], None),
    ("inspect missing folder", ["inspect", "{ws}/gone"], ["{ws}/gone", "not found"], None),
    ("inspect a dense model", ["inspect", "{ws}/dense"], ["{ws}/dense", "'gpt2'", "not an hf_moe MoE model"], None),
    ("inspect truncated", ["inspect", "{ws}/moe"], ["{ws}/moe/model.safetensors", "not a readable"], "truncated moe"),
    ("inspect cut in its header", ["inspect", "{ws}/moe"], ["{ws}/moe/model.safetensors", "header too small"], "moe cut inside its header length"),
    ("inspect missing tensor", ["inspect", "{ws}/moe"], ["lacks 1 tensor that", "experts.down_proj"], "moe lacking a tensor"),
    ("inspect wrong shape", ["inspect", "{ws}/moe"], ["experts.down_proj is [2,", "implies [4,"], "moe with a wrong shape"),
    ("inspect no weights", ["inspect", "{ws}/moe"], ["{ws}/moe", "no weights", "model.safetensors"], "moe without weights"),
    ("inspect missing shard", ["inspect", "--json", "{ws}/moe"], ["model-00002-of-00002", "missing"], "moe with a broken index"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "fragments", "prepare"), [case[1:] for case in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(workspace, capsys, argv, fragments, prepare):
    if prepare is not None:
        PREPARE[prepare](workspace)
    before = snapshot(workspace)
    capsys.readouterr()

    code = main([arg.format(ws=workspace) for arg in argv])

    captured = capsys.readouterr()
    lines = error_lines(captured.err)
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    command = argv[0] if argv[0] in ("moefy", "inspect") else ""
    assert lines[0].startswith(f"hf-moe {command}".strip() + ": error: ")
    for fragment in fragments:
        assert fragment.format(ws=workspace) in lines[0]
    assert captured.out == ""
    assert snapshot(workspace) == before  # nothing written, nothing left behind


def test_a_hub_id_the_hub_does_not_have(workspace, capsys, monkeypatch):
    monkeypatch.setattr(hf_moe.conversion.source, "_hub_has_model", lambda repo_id: (False, "no such model"))
    assert main(["moefy", "someone/nothing-here", str(workspace / "out")]) == 2
    line = capsys.readouterr().err.strip()
    assert "'someone/nothing-here'" in line and "not found" in line and "nor a model on the Hub" in line
    assert not (workspace / "out").exists()


def test_offline_mode_asks_no_one(workspace, capsys, monkeypatch):
    from huggingface_hub import constants

    def never(repo_id):
        raise AssertionError("HF_HUB_OFFLINE is set: no request may be made")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_moe.conversion.source, "_hub_has_model", never)
    assert main(["moefy", "gpt2", str(workspace / "out")]) == 2
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err


def test_a_cached_hub_model_is_used_without_asking_the_hub(workspace, capsys, monkeypatch):
    def never(repo_id):
        raise AssertionError("a cached model needs no request")

    # resolve_source hands moefy the cached snapshot folder, so that loading never touches the network
    monkeypatch.setattr(hf_moe.conversion.source, "_hub_has_model", never)
    monkeypatch.setattr(hf_moe.conversion.source, "_cached_snapshot", lambda repo_id: str(workspace / "dense"))
    assert main(["moefy", "openai-community/gpt2", str(workspace / "out"), "--num-experts", "2", "--top-k", "1"]) == 0
    report = json.loads((workspace / "out" / REPORT_FILENAME).read_text())
    assert report["source_model"] == "openai-community/gpt2"  # the id, not the cache folder
    capsys.readouterr()
    monkeypatch.setattr(hf_moe.conversion.source, "_cached_snapshot", lambda repo_id: str(workspace / "moe"))
    assert main(["inspect", "me/tiny-moe"]) == 0
    assert "headers OK" in capsys.readouterr().out


def test_the_hub_probe_is_one_short_request(monkeypatch):
    calls = []

    def model_info(repo_id, timeout):
        calls.append((repo_id, timeout))
        raise ConnectionError("network unreachable")

    monkeypatch.setattr("huggingface_hub.model_info", model_info)
    assert REAL_HUB_PROBE("gpt2") == (None, "ConnectionError: network unreachable")
    assert calls == [("gpt2", hf_moe.conversion.source.HUB_PROBE_TIMEOUT_S)]


def test_the_cache_look_up_reads_the_hub_cache_layout(workspace, monkeypatch):
    from huggingface_hub import constants

    # the layout huggingface_hub writes: models--{org}--{name}/refs/main -> snapshots/{commit}/
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = workspace / "hub" / "models--me--tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots").mkdir()
    (workspace / "dense").rename(repo / "snapshots" / commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(workspace / "hub"))
    monkeypatch.setattr(hf_moe.conversion.source, "_cached_snapshot", REAL_CACHE_LOOK_UP)
    assert hf_moe.conversion.source.resolve_source("me/tiny") == str(repo / "snapshots" / commit)
    with pytest.raises(FileNotFoundError, match="nor in the local Hub cache"):
        hf_moe.conversion.source.resolve_source("me/other")
