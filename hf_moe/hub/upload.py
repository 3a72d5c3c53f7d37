"""Upload a saved hf_moe model folder to the Hub as it is, model card included.

Why not `model.push_to_hub`: transformers saves the model again into a temporary folder and writes a README.md there
(the repo's current card, or a generic auto-generated one for a new repo), so our card would never reach the Hub. We
upload the folder that `save_pretrained` + `save_model_card` already wrote, byte for byte.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi
from huggingface_hub.utils import validate_repo_id

__all__ = ["push_folder_to_hub"]

REQUIRED_FILES = ("config.json", "README.md")


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload MoE model made with hf_moe",
) -> str:
    """Create `repo_id` if needed and upload every file of `folder` to it in one commit; returns the commit URL.

    Args:
        folder: a saved model folder holding at least config.json and README.md (the card).
        repo_id: "user/name" or "org/name".
        token: Hub token; None: the logged-in user's.
        private: visibility of a newly created repo; None: the Hub's default. An existing repo keeps its visibility.
        revision: branch to commit to, created from the default branch if absent; None: the default branch.
        commit_message: the commit's title.
    """
    # checked before any network call: a failed check leaves the Hub untouched
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"push_folder_to_hub: {folder} is not an existing folder")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"push_folder_to_hub: {folder} has no {' or '.join(missing)}; save the model (save_pretrained) and its "
            "card (save_model_card) there first"
        )
    validate_repo_id(repo_id)

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    commit = api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, commit_message=commit_message)
    return commit.commit_url
