"""Turn what the user typed into local files: a path, or a Hub repo id (``org/name[@revision]``).

This is the single place that resolves an input string, so every command takes Hub ids. From
the Hub only what a command needs is downloaded: the weights in one format (safetensors
preferred, never both), the index and its shards, config, tokenizer and generation files,
into huggingface_hub's cache (``HF_HOME``). ``HF_TOKEN``, ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE``
are honoured, read when the call is made.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputNotFoundError, LorasurgeonError
from ..io.checkpoint import FOLDER_LAYOUTS
from ..io.sidecar import is_sidecar

REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")


@dataclass(frozen=True)
class Source:
    """An input: where its files are, and the Hub repo (and revision) they came from, if any."""

    path: Path
    repo_id: str | None = None
    revision: str | None = None

    @property
    def label(self) -> str:
        """The repo id (with @revision) for Hub inputs, the path otherwise: what model cards cite."""
        if self.repo_id is None:
            return str(self.path)
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def resolve_source(spec: str | os.PathLike[str], *, in_place: bool = False) -> Source:
    """A local path if one exists, else a Hub repo id downloaded into the cache -- or, ``in_place``, only its
    small files downloaded and its safetensors weights read by range when read (hub.stream); also in place,
    with a warning, when the weights do not fit in the free space of the cache's disk.

    Raises:
        InputNotFoundError: neither a local path nor a Hub repo (or revision) that can be had.
        LorasurgeonError: the Hub refused (gated repo, server error) or could not be reached.
    """
    path = Path(spec).expanduser()
    if path.exists():
        return Source(path)
    match = REPO_ID.match(str(spec))
    if not match or Path(str(spec).split("/", 1)[0]).exists():
        # Not a repo id, or its first part is a local folder: a path with a typo, not a Hub repo.
        raise InputNotFoundError(f"{spec}: no such file or folder{did_you_mean(path)}")
    repo_id, revision = match.group("repo"), match.group("rev")
    return Source(download(repo_id, revision, in_place=in_place), repo_id, revision)


def did_you_mean(path: Path) -> str:
    """A near miss among the names beside the deepest part of ``path`` that exists."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        path, parent = parent, parent.parent
    try:
        names = [p.name for p in parent.iterdir()]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    return f" (did you mean {parent / close[0] if str(parent) != '.' else close[0]}?)" if close else ""


def resolve(spec: str | os.PathLike[str], *, in_place: bool = False) -> Path:
    """The local path for an input (see :func:`resolve_source`)."""
    return resolve_source(spec, in_place=in_place).path


def needed_files(files: list[str]) -> list[str]:
    """From a repo's file list, the weights of one format (the first layout found) and the sidecar files."""
    top = [f for f in files if "/" not in f]
    for filename, _ in FOLDER_LAYOUTS:
        if filename in top:
            if filename.endswith(".index.json"):
                prefix, ext = filename.split(".")[0], filename.split(".")[1]
                weights = [filename] + [f for f in top if fnmatch.fnmatch(f, f"{prefix}-*-of-*.{ext}")]
            else:
                weights = [filename]
            break
    else:
        raise InputNotFoundError(
            f"no weights lorasurgeon can read (looked for {', '.join(f for f, _ in FOLDER_LAYOUTS)})"
        )
    sidecars = [f for f in top if is_sidecar(f) and f not in weights]
    return weights + sidecars


def is_transport_error(exc: BaseException) -> bool:
    """httpx's connection and timeout errors, which are not OSErrors (huggingface_hub uses httpx)."""
    return "Connect" in type(exc).__name__ or "Timeout" in type(exc).__name__


def offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def download(repo_id: str, revision: str | None, *, in_place: bool = False) -> Path:
    """Fetch what a command needs from a Hub repo (or find it in the cache when offline); ``in_place``: its
    weights are read by range instead (see :func:`resolve_source`)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    quiet = not sys.stderr.isatty() and not are_progress_bars_disabled()
    if quiet:  # huggingface_hub's bars only where someone watches
        disable_progress_bars()
    try:
        return _download(repo_id, revision, in_place)
    finally:
        if quiet:
            enable_progress_bars()


@contextmanager
def hub_errors(name: str, missing: str, *, kind: str = "repo", label: str = "") -> Iterator[None]:
    """huggingface_hub's and the network's errors as one-line LorasurgeonErrors: ``name`` is what the user gave
    (repo[@revision]), ``missing`` what a repo the Hub does not have is (its line, before the HF_TOKEN hint),
    ``kind`` repo or dataset, ``label`` the option it was given to ("--calibration ")."""
    from huggingface_hub import errors as hf

    what = f"{label}{name}"
    try:
        yield
    except LorasurgeonError:
        raise
    except hf.GatedRepoError:
        raise LorasurgeonError(
            f"{what}: this {kind} is gated: accept its terms on the Hub, then set HF_TOKEN"
        ) from None
    except hf.RevisionNotFoundError:
        of = "" if kind == "repo" else f" of the {kind}"
        raise InputNotFoundError(f"{what}: no such revision{of} on the Hub") from None
    except hf.RepositoryNotFoundError:
        raise InputNotFoundError(f"{label}{missing} (private? set HF_TOKEN)") from None
    except (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled):
        raise InputNotFoundError(
            f"{what}: offline (HF_HUB_OFFLINE) and not in the local cache; download it once online"
        ) from None
    except hf.HfHubHTTPError as exc:
        raise LorasurgeonError(f"{what}: the Hub answered {str(exc).splitlines()[0]}") from None
    except OSError as exc:  # connection refused, DNS, disk
        raise LorasurgeonError(f"{what}: cannot download from the Hub ({exc.__class__.__name__}: {exc})") from None
    except Exception as exc:  # httpx transport errors are not OSErrors
        if is_transport_error(exc):
            endpoint = os.environ.get("HF_ENDPOINT") or "huggingface.co"
            raise LorasurgeonError(
                f"{what}: no such local file or folder, and the Hub at {endpoint}, where it would be a {kind} id, "
                f"cannot be reached ({exc})"
            ) from None
        raise


def _download(repo_id: str, revision: str | None, in_place: bool) -> Path:
    from huggingface_hub import HfApi, snapshot_download

    from .stream import in_place as read_in_place

    endpoint = os.environ.get("HF_ENDPOINT") or None
    token = os.environ.get("HF_TOKEN") or None
    name = repo_id + (f"@{revision}" if revision else "")
    with hub_errors(name, f"{repo_id}: not a local path, and not found on the Hub"):
        if offline():
            return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
        info = HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision, files_metadata=True)
        sizes = {s.rfilename: s.size for s in info.siblings or []}
        try:
            patterns = needed_files(list(sizes))
        except InputNotFoundError as exc:
            raise InputNotFoundError(f"{name}: {exc}") from None
        if in_place or _too_big(name, {f: sizes[f] for f in patterns}):
            assert info.sha is not None
            return read_in_place(repo_id, {f: sizes[f] for f in patterns}, info.sha)
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=patterns, endpoint=endpoint, token=token)
        )


def _too_big(name: str, sizes: dict[str, int | None]) -> bool:
    """Whether the weights' download would not fit in the free space of the cache's disk (then they are read in
    place, and a warning says so)."""
    import shutil
    import warnings

    from huggingface_hub import constants

    from ..errors import LorasurgeonWarning

    need = sum(s or 0 for f, s in sizes.items() if f.endswith(".safetensors"))
    cache = Path(constants.HF_HUB_CACHE)
    while not cache.exists() and cache != cache.parent:
        cache = cache.parent
    free = shutil.disk_usage(cache).free
    if need <= free:
        return False
    warnings.warn(
        f"{name}: its weights ({need / 1e9:.1f} GB) do not fit in the {free / 1e9:.1f} GB free at {cache}; "
        "they are read in place from the Hub, by range, as --stream reads them",
        LorasurgeonWarning,
        stacklevel=2,
    )
    return True
