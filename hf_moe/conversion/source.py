"""Where a model comes from: a local folder, or a Hub repo id (from the local Hub cache, else the Hub), decided fast.

moefy and the CLI ask here before anything slow runs. A missing folder or an unknown id must be named in a blink: a
plain `from_pretrained` of an id against an unreachable Hub retries for about a minute before an error that never
says "not found".
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["HUB_PROBE_TIMEOUT_S", "looks_like_repo_id", "resolve_source"]

# one look-up on the Hub, no retries: an unreachable Hub answers in well under a second (DNS failure) or runs into this
HUB_PROBE_TIMEOUT_S = 5.0


def looks_like_repo_id(source: str) -> bool:
    """Spelled like a Hub repo id (`name` or `org/name`), and not like a path (`./x`, `~/x`, `/x`)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        return False
    return not source.startswith(("~", "/", "."))


def resolve_source(source: str, option: str = "SRC") -> str:
    """Where to load a model from: a local model folder, or a Hub repo id in the local Hub cache or on the Hub.

    Decides in at most one network request. A local folder must hold a config.json. A name that is no local path is a
    Hub repo id only if it is spelled like one. A model in the local Hub cache is used from its cache folder, so that
    loading it never touches the network (the cached revision is what a download would give, unless the Hub moved on).
    Otherwise the Hub is asked once, with a short timeout and no retries (`HUB_PROBE_TIMEOUT_S`), whether the model
    exists: asking once is the only way to tell "no such model" from "no network", and it costs a fraction of a
    second, where a download attempt against an unreachable Hub retries for about a minute. HF_HUB_OFFLINE skips it.

    Returns the folder to load (the argument itself, or a cache snapshot folder) or the repo id of a model the Hub has
    (`from_pretrained` then downloads it). Raises FileNotFoundError naming `option`, the source and
    what would have been accepted.
    """
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise FileNotFoundError(f"{option} {source} is a file; {option} must be a model folder or a Hub repo id")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{option} {source} has no config.json; {option} must be a folder written by save_pretrained"
            )
        return str(path)

    from huggingface_hub import constants

    if not looks_like_repo_id(source):
        raise FileNotFoundError(f"{option} folder {source} not found (and it is not a Hub repo id like 'org/name')")

    cached = _cached_snapshot(source)
    if cached is not None:
        return cached
    if constants.HF_HUB_OFFLINE:
        exists, reason = None, "HF_HUB_OFFLINE is set"
    else:
        exists, reason = _hub_has_model(source)
    if exists:
        return source
    if exists is False:
        raise FileNotFoundError(
            f"{option} {source!r} is neither a local folder (not found) nor a model on the Hub ({reason})"
        )
    raise FileNotFoundError(
        f"{option} {source!r} is neither a local folder (not found) nor in the local Hub cache "
        f"({constants.HF_HUB_CACHE}) nor reachable on the Hub ({reason})"
    )


def _hub_has_model(repo_id: str) -> tuple[bool | None, str]:
    """(True, "") if the Hub has the model, (False, why) if it says it has not, (None, why) if it cannot be asked."""
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        model_info(repo_id, timeout=HUB_PROBE_TIMEOUT_S)
    except GatedRepoError:
        return True, ""  # it exists; whether this user may download it is the download's business
    except RepositoryNotFoundError:
        return False, "no such model, or a private one: log in with `hf auth login`"
    except Exception as error:  # DNS, connection, timeout, proxy, TLS, HTTP 5xx: all mean "cannot ask"
        return None, f"{type(error).__name__}: {_first_line(error)}"
    return True, ""


def _cached_snapshot(repo_id: str) -> str | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, local_files_only=True)
    except LocalEntryNotFoundError:
        return None
    return folder if os.path.isfile(os.path.join(folder, "config.json")) else None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
