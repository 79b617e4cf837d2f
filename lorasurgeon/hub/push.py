"""Pushing a result folder to a Hub repo (inputs from the Hub are resolved in io/source.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import InputNotFoundError, InvalidOptionError, LorasurgeonError
from ..words import plural
from .source import is_transport_error, offline


@dataclass(frozen=True)
class PushReport:
    repo_id: str
    url: str  # the commit, or the pull request with create_pr
    files: int
    held: int = 0  # of them, files the Hub already held there, byte for byte: not uploaded again

    def summary(self) -> str:
        if not self.held:
            return f"Pushed {plural(self.files, 'file')} to {self.repo_id}: {self.url}"
        sent = self.files - self.held
        return (
            f"Pushed {plural(self.files, 'file')} to {self.repo_id} ({sent} uploaded, {self.held} the Hub already "
            f"held): {self.url}"
        )


def check_push_target(repo_id: str) -> None:
    """Everything a push needs that can be known before any work: a valid repo id, the Hub online,
    a token, and a Hub that accepts the token (``whoami``).

    Raises:
        InvalidOptionError: ``repo_id`` cannot be a repo id, or the Hub is switched off (HF_HUB_OFFLINE).
        LorasurgeonError: no token, a token the Hub refuses, or a Hub that cannot be reached.
    """
    from huggingface_hub import HfApi, get_token
    from huggingface_hub import errors as hf
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise InvalidOptionError(f"{repo_id!r}: not a Hub repo id ({str(exc).split('. ')[0]}); use org/name") from None
    if offline():
        raise InvalidOptionError(f"{repo_id}: pushing needs the Hub, and HF_HUB_OFFLINE is set")
    token = get_token()
    if not token:
        raise LorasurgeonError(f"{repo_id}: no Hub token to push with: set HF_TOKEN, or run `hf auth login`")
    endpoint = os.environ.get("HF_ENDPOINT") or None
    try:
        HfApi(endpoint=endpoint, token=token).whoami()
    except hf.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 401:
            raise LorasurgeonError(
                f"{repo_id}: the Hub refuses this token (HTTP 401): set a valid HF_TOKEN, or run `hf auth login`"
            ) from None
        raise LorasurgeonError(f"{repo_id}: the Hub answered {str(exc).splitlines()[0]}") from None
    except OSError as exc:
        raise LorasurgeonError(f"{repo_id}: cannot reach the Hub at {endpoint or 'huggingface.co'} ({exc})") from None
    except Exception as exc:  # httpx transport errors
        if is_transport_error(exc):
            raise LorasurgeonError(
                f"{repo_id}: cannot reach the Hub at {endpoint or 'huggingface.co'} ({exc})"
            ) from None
        raise


def push(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    message: str | None = None,
) -> PushReport:
    """Upload a result folder to a Hub repo (created if missing). Honours HF_TOKEN and HF_ENDPOINT.

    Args:
        folder: the result folder (with its model card).
        repo_id: ``org/name``.
        private: create the repo private if it does not exist.
        revision: a branch to push to (created if missing).
        create_pr: open a pull request instead of committing to the branch.
        message: the commit message.

    Returns:
        A PushReport: the repo, the commit (or pull request) URL, the number of files.

    Raises:
        InputNotFoundError: ``folder`` is not a folder.
        LorasurgeonError: the Hub refused the push, or cannot be reached.
    """
    from huggingface_hub import HfApi
    from huggingface_hub import errors as hf

    path = Path(folder)
    if not path.is_dir():
        raise InputNotFoundError(f"{folder}: no such folder to push")
    files = [p for p in path.rglob("*") if p.is_file()]
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=os.environ.get("HF_TOKEN") or None)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        held = _held(api, repo_id, revision, path, files)
        info = api.upload_folder(
            folder_path=path,
            repo_id=repo_id,
            revision=revision,
            create_pr=create_pr,
            commit_message=message or f"Upload {path.name} with lorasurgeon {__version__}",
        )
    except hf.HfHubHTTPError as exc:
        raise LorasurgeonError(f"{repo_id}: the Hub refused the push: {str(exc).splitlines()[0]}") from None
    except (ValueError, OSError) as exc:
        raise LorasurgeonError(f"{repo_id}: cannot push ({exc.__class__.__name__}: {exc})") from None
    except Exception as exc:  # httpx transport errors
        if is_transport_error(exc):
            raise LorasurgeonError(f"{repo_id}: cannot reach the Hub ({exc})") from None
        raise
    return PushReport(repo_id, info.pr_url or info.commit_url, len(files), held)


def _held(api: Any, repo_id: str, revision: str | None, folder: Path, files: list[Path]) -> int:
    """How many of ``files`` the repo's revision already holds, byte for byte (huggingface_hub leaves those out of
    the commit: it asks the Hub for each file's oid first). Compared by size, then by the Hub's own hash: the
    sha256 of an LFS file, git's blob id of a regular one."""
    import hashlib

    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils.sha import git_hash

    tree = {
        f.path: f for f in api.list_repo_tree(repo_id, revision=revision, recursive=True) if isinstance(f, RepoFile)
    }
    held = 0
    for file in files:
        remote = tree.get(file.relative_to(folder).as_posix())
        if remote is None or remote.size != file.stat().st_size:
            continue
        if remote.lfs is not None:
            digest = hashlib.sha256()
            with open(file, "rb") as fh:
                while chunk := fh.read(16 << 20):
                    digest.update(chunk)
            held += digest.hexdigest() == remote.lfs.sha256
        else:
            held += git_hash(file.read_bytes()) == remote.blob_id
    return held
