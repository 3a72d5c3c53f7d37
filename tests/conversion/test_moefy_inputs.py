"""What moefy accepts: MoE config overrides of the target family only, and sources it finds fast (no minute of
retries against an unreachable Hub)."""

from __future__ import annotations

import json
import socket

import pytest
import transformers
from huggingface_hub import constants

from hf_moe.conversion import moefy

from .test_moefy import dense_gpt2
from .test_moefy_t5 import dense_t5


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test (a Hub lookup would otherwise hang or hit the network). Attempts are
    recorded and checked afterwards: huggingface_hub turns an exception raised inside a request into its own error."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts
    assert not attempts, f"moefy tried to reach the network: {attempts}"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty local Hub cache, read by huggingface_hub and transformers at call time."""
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_misspelt_override_is_rejected_with_a_hint():
    with pytest.raises(ValueError, match="'capacity_factr' \\(did you mean 'capacity_factor'\\?\\)") as error:
        moefy(dense_gpt2(), num_experts=2, top_k=1, capacity_factr=1.25)
    assert "expert_dropout" in str(error.value)  # the allowed names are listed


def test_unsupported_settings_are_rejected_not_stored():
    # settings of features hf_moe does not have (yet): refused, with a hint where a real field is close
    with pytest.raises(ValueError, match="'router_init_scale'.*'pyramid_layers'") as error:
        moefy(dense_t5(), num_experts=2, top_k=1, router_init_scale=2.0, pyramid_layers=True)
    assert "did you mean 'router_init_std'" in str(error.value)
    assert "not an MoE config field of t5 models" in str(error.value)


def test_dense_fields_are_not_overrides():
    with pytest.raises(ValueError, match="'n_embd'.*dense fields come from the source model"):
        moefy(dense_gpt2(), n_embd=64)


@pytest.mark.parametrize(
    ("override", "argument"), [("num_local_experts", "num_experts"), ("num_experts_per_tok", "top_k")]
)
def test_fields_that_moefy_sets_itself_point_to_its_argument(override, argument):
    with pytest.raises(ValueError, match=f"moefy sets {override} from its own {argument}= argument"):
        moefy(dense_gpt2(), **{override: 2})


def test_valid_overrides_reach_the_config():
    moe = moefy(dense_gpt2(), num_experts=2, top_k=1, capacity_factor=1.25, expert_dropout=0.1, router_init_std=0.05)
    assert (moe.config.capacity_factor, moe.config.expert_dropout, moe.config.router_init_std) == (1.25, 0.1, 0.05)


def test_layer_arguments_of_another_family_are_rejected():
    with pytest.raises(
        ValueError, match="encoder_moe_layers: not a layer choice of gpt2 models; they take moe_layers"
    ):
        moefy(dense_gpt2(), encoder_moe_layers="all")


def test_overrides_are_checked_before_the_weights_load(tmp_path, monkeypatch):
    dense_gpt2().save_pretrained(tmp_path)

    def not_now(*args, **kwargs):
        raise AssertionError("weights loaded before the arguments were checked")

    monkeypatch.setattr(transformers.GPT2LMHeadModel, "from_pretrained", not_now)
    with pytest.raises(ValueError, match="capacity_factr"):
        moefy(str(tmp_path), capacity_factr=1.25)


@pytest.mark.parametrize("as_path", [False, True])
def test_a_missing_folder_is_named_without_network(tmp_path, no_network, hub_cache, as_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(FileNotFoundError, match=f"{missing} not found: not a folder"):
        moefy(missing if as_path else str(missing))


def test_an_uncached_hub_id_without_a_reachable_hub_is_named_at_once(no_network, hub_cache, monkeypatch):
    import hf_moe.conversion.source

    # one probe, no retries: it fails at once here (no network); the message says where moefy looked
    monkeypatch.setattr(hf_moe.conversion.source, "_hub_has_model", lambda repo_id: (None, "ConnectError: offline"))
    with pytest.raises(
        FileNotFoundError, match="'someone/tiny-gpt2' is neither a local folder .* nor in the local Hub"
    ):
        moefy("someone/tiny-gpt2")


def test_an_uncached_hub_id_the_hub_has_is_downloaded(hub_cache, monkeypatch):
    import hf_moe.conversion.source

    dense = dense_gpt2()
    loads = []
    monkeypatch.setattr(hf_moe.conversion.source, "_hub_has_model", lambda repo_id: (True, ""))
    monkeypatch.setattr(
        transformers.AutoConfig, "from_pretrained", lambda location, **kw: loads.append((location, kw)) or dense.config
    )
    monkeypatch.setattr(
        transformers.GPT2LMHeadModel, "from_pretrained", lambda location, **kw: loads.append((location, kw)) or dense
    )
    moe = moefy("someone/tiny-gpt2", num_experts=2, top_k=1)
    assert loads == [("someone/tiny-gpt2", {"local_files_only": False})] * 2  # from the Hub, by id
    assert moe.moefy_report.source_model == "someone/tiny-gpt2"


def test_a_cached_hub_id_converts_offline(no_network, hub_cache):
    commit = "0" * 40
    repo = hub_cache / "models--someone--tiny-gpt2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    dense_gpt2().save_pretrained(repo / "snapshots" / commit)
    moe = moefy("someone/tiny-gpt2", num_experts=2, top_k=1)
    assert moe.moefy_report.source_model == "someone/tiny-gpt2"
    assert type(moe).__name__ == "GPT2MoeForCausalLM"


def test_a_file_is_not_a_model_folder(tmp_path, no_network):
    dense_gpt2().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        moefy(str(tmp_path / "config.json"))


def test_a_folder_without_config_names_the_supported_types(tmp_path, no_network):
    with pytest.raises(ValueError, match="has no config.json; moefy converts .* gpt2, t5, mt5"):
        moefy(str(tmp_path))


@pytest.mark.parametrize(
    ("model_type", "message"),
    [("bert", "supports model types gpt2, t5, mt5; got 'bert'"), ("gpt2_moe", "already an MoE model"), (None, "None")],
)
def test_a_folder_of_another_model_type_names_the_supported_types(tmp_path, no_network, model_type, message):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type} if model_type else {}))
    with pytest.raises(ValueError, match=message):
        moefy(str(tmp_path))


def test_a_folder_with_an_unconvertible_head_is_named(tmp_path):
    dense_gpt2(transformers.GPT2DoubleHeadsModel).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"GPT2LMHeadModel.*; {tmp_path} is a GPT2DoubleHeadsModel"):
        moefy(str(tmp_path))


def test_a_cached_hub_id_without_its_weights_says_so(no_network, hub_cache):
    commit = "1" * 40
    repo = hub_cache / "models--someone--config-only"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    dense_gpt2().config.save_pretrained(repo / "snapshots" / commit)
    with pytest.raises(FileNotFoundError, match="in the local Hub cache .* but not all of the weights"):
        moefy("someone/config-only")


def test_a_bad_config_value_is_reported_before_the_weights_load(tmp_path, monkeypatch):
    dense_gpt2().save_pretrained(tmp_path)

    def not_now(*args, **kwargs):
        raise AssertionError("weights loaded before the MoE config was validated")

    monkeypatch.setattr(transformers.GPT2LMHeadModel, "from_pretrained", not_now)
    with pytest.raises(Exception, match="expert_capacity"):
        moefy(str(tmp_path), num_experts=2, top_k=1, expert_capacity=3, capacity_factor=1.0)
