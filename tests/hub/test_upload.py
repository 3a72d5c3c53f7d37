"""push_folder_to_hub against a mocked HfApi: the right calls, the folder uploaded as it is, errors before any call."""

from __future__ import annotations

from unittest.mock import create_autospec

import pytest
from huggingface_hub import HfApi

from hf_moe.hub import push_folder_to_hub, render_model_card, save_model_card
from tests.conftest import tiny_gpt2_moe_config

COMMIT_URL = "https://huggingface.co/me/tiny-moe/commit/0123abc"


@pytest.fixture
def api(monkeypatch):
    """An HfApi stand-in that records calls; the real Hub is never reached."""
    mock = create_autospec(HfApi, instance=True)
    mock.upload_folder.return_value.commit_url = COMMIT_URL
    constructed = []

    def make_api(*args, **kwargs):
        constructed.append(kwargs)
        return mock

    monkeypatch.setattr("hf_moe.hub.upload.HfApi", make_api)
    mock.constructed = constructed
    return mock


@pytest.fixture
def folder(tmp_path):
    config = tiny_gpt2_moe_config()
    config.save_pretrained(tmp_path)
    save_model_card(tmp_path, render_model_card(config, repo_id="me/tiny-moe"))
    return tmp_path


def test_creates_the_repo_and_uploads_the_folder(api, folder):
    url = push_folder_to_hub(folder, "me/tiny-moe", token="hf_test", private=True, commit_message="first")
    assert url == COMMIT_URL
    assert api.constructed == [{"token": "hf_test"}]
    api.create_repo.assert_called_once_with("me/tiny-moe", private=True, exist_ok=True)
    api.upload_folder.assert_called_once_with(
        repo_id="me/tiny-moe", folder_path=folder, revision=None, commit_message="first"
    )
    api.create_branch.assert_not_called()


def test_revision_is_created_as_a_branch_before_the_upload(api, folder):
    push_folder_to_hub(folder, "me/tiny-moe", revision="experiments")
    api.create_branch.assert_called_once_with("me/tiny-moe", branch="experiments", exist_ok=True)
    assert api.upload_folder.call_args.kwargs["revision"] == "experiments"
    assert api.upload_folder.call_args.kwargs["commit_message"] == "Upload MoE model made with hf_moe"


def test_the_model_card_is_uploaded_as_written(api, folder):
    before = {path.name: path.read_bytes() for path in folder.iterdir()}
    push_folder_to_hub(folder, "me/tiny-moe")
    assert {path.name: path.read_bytes() for path in folder.iterdir()} == before  # README.md not regenerated
    assert api.upload_folder.call_args.kwargs["folder_path"] == folder


def test_missing_folder(api, tmp_path):
    with pytest.raises(FileNotFoundError, match="not an existing folder"):
        push_folder_to_hub(tmp_path / "nowhere", "me/tiny-moe")
    assert api.constructed == []


@pytest.mark.parametrize("missing", ["config.json", "README.md"])
def test_missing_config_or_card(api, folder, missing):
    (folder / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        push_folder_to_hub(folder, "me/tiny-moe")
    assert api.constructed == []


def test_bad_repo_id_fails_before_any_call(api, folder):
    with pytest.raises(ValueError, match="Repo id"):
        push_folder_to_hub(folder, "me/tiny moe")
    assert api.constructed == []
