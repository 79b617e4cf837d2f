"""A Hub dataset repo's data files for one split: listed, chosen as the ``datasets`` library's default patterns
choose them, and downloaded one at a time, when first read.

The split's files are what ``datasets.load_dataset(repo, split=...)`` reads without a loading script or a
``configs`` block: the sharded ``data/{split}-00000-of-00001.*`` files where the repo has them, else a folder,
then a file name, that holds one of the split's keywords (``train``, ``training``; ``validation``, ``valid``,
``dev``, ``val``; ``test``, ``testing``, ``eval``, ``evaluation``) between separators, else every data file as
``train``. Files of a folder on disk are chosen the same way. ``HF_TOKEN``, ``HF_ENDPOINT`` and
``HF_HUB_OFFLINE`` are honoured as for models (``hub.source``): offline, the split is read from the cache.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ..errors import InputNotFoundError
from .source import hub_errors, offline

SPLIT_KEYWORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "dev", "val"),
    "test": ("test", "testing", "eval", "evaluation"),
}
_SEP = "[-._ 0-9]"  # what may stand beside a split's keyword in a name (datasets' NON_WORDS_CHARS)
_SHARDED = re.compile(r"data/(?P<split>\w+(?:\.\w+)*)-\d{5}-of-\d{5}[^/]*\.[^/]+")
_IGNORED = frozenset(
    {"README.md", "config.json", "dataset_info.json", "dataset_infos.json", "dummy_data.zip", "dataset_dict.json"}
)
# The extensions datasets' packaged loaders read (the media folders' aside): a repo's data files.
DATA_EXTENSIONS = frozenset(
    {"jsonl", "json", "ndjson", "csv", "tsv", "txt", "parquet", "arrow", "xml", "tar", "h5", "hdf5", "lance", "eval"}
)
COMPRESSIONS = frozenset({"gz", "bz2", "xz", "zst", "zip", "lz4"})


def is_data_file(path: str) -> bool:
    """A file datasets would read as data: a data extension (before a compression's), not hidden, not a card."""
    parts = PurePosixPath(path).parts
    if any(p.startswith(".") or p.startswith("__") for p in parts) or parts[-1] in _IGNORED:
        return False
    suffixes = parts[-1].lower().split(".")[1:]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return bool(suffixes) and suffixes[-1] in DATA_EXTENSIONS


def _keyword_in(name: str, keyword: str, *, whole: bool) -> bool:
    """``keyword`` in a folder's (``whole``) or a file's name, between separators or at the name's start."""
    k = re.escape(keyword)
    forms = [rf"{k}{_SEP}.*", rf".*{_SEP}{k}{_SEP}.*"] + ([k, rf".*{_SEP}{k}"] if whole else [])
    return any(re.fullmatch(form, name) for form in forms)


def data_splits(files: Iterable[str]) -> dict[str, list[str]]:
    """Each split's data files among ``files`` (paths inside the repo, /-separated), sorted: by datasets'
    default patterns, the first of them that finds any file."""
    data = sorted(f for f in files if is_data_file(f))
    sharded: dict[str, list[str]] = {}
    for f in data:
        if match := _SHARDED.fullmatch(f):
            sharded.setdefault(match.group("split"), []).append(f)
    if sharded:
        return sharded
    for where in ("folder", "file"):
        found: dict[str, list[str]] = {}
        for split, keywords in SPLIT_KEYWORDS.items():
            for f in data:
                parts = PurePosixPath(f).parts
                names = parts[:-1] if where == "folder" else parts[-1:]
                if any(_keyword_in(n, k, whole=where == "folder") for n in names for k in keywords):
                    found.setdefault(split, []).append(f)
        if found:
            return found
    return {"train": data} if data else {}


def split_files(files: Iterable[str], split: str, name: str) -> list[str]:
    """The data files of ``split`` among ``files`` (see :func:`data_splits`).

    Raises:
        InputNotFoundError: ``name`` (the repo or folder, for the message) has no data file, or no such split.
    """
    splits = data_splits(files)
    if not splits:
        raise InputNotFoundError(
            f"--calibration {name}: no data file (looked for {', '.join(sorted(DATA_EXTENSIONS))} files)"
        )
    if split not in splits:
        found = ", ".join(f"{s} ({len(fs)} file{'s' * (len(fs) != 1)})" for s, fs in splits.items())
        raise InputNotFoundError(f"--calibration-split {split}: {name} has no such split (it has: {found})")
    return splits[split]


@dataclass(frozen=True)
class DatasetSplit:
    """One split of a Hub dataset repo: its data files (paths inside the repo, in order), fetched by
    :meth:`fetch` one at a time; offline, the cached snapshot's ``folder`` holds them."""

    repo_id: str
    revision: str | None
    split: str
    files: tuple[str, ...]
    folder: Path | None = None

    @property
    def name(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")

    def fetch(self, file: str) -> Path:
        """The local copy of ``file`` (one of :attr:`files`), downloaded into the cache if need be."""
        if self.folder is not None:
            return self.folder / file
        from huggingface_hub import hf_hub_download

        with _errors(self.repo_id, self.name), _quiet():
            endpoint, token = _endpoint_and_token()
            return Path(
                hf_hub_download(
                    self.repo_id, file, repo_type="dataset", revision=self.revision, endpoint=endpoint, token=token
                )
            )


def open_split(repo_id: str, revision: str | None, split: str) -> DatasetSplit:
    """The data files of ``split`` in the Hub dataset ``repo_id`` (at ``revision``); nothing downloaded yet
    (offline: the snapshot in the cache, its files as they are there).

    Raises:
        InputNotFoundError: no such dataset, revision or split (the splits it has named), or offline and not cached.
        LorasurgeonError: the Hub refused (a gated dataset, a server error) or could not be reached.
    """
    from huggingface_hub import HfApi, snapshot_download

    name = repo_id + (f"@{revision}" if revision else "")
    with _errors(repo_id, name), _quiet():
        if offline():
            folder = Path(snapshot_download(repo_id, repo_type="dataset", revision=revision, local_files_only=True))
            files = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
            chosen = split_files(files, split, f"{name} (offline: the files in the cache)")
            return DatasetSplit(repo_id, revision, split, tuple(chosen), folder)
        endpoint, token = _endpoint_and_token()
        info = HfApi(endpoint=endpoint, token=token).dataset_info(repo_id, revision=revision)
    files = [s.rfilename for s in info.siblings or []]
    return DatasetSplit(repo_id, revision, split, tuple(split_files(files, split, name)))


def _endpoint_and_token() -> tuple[str | None, str | None]:
    return os.environ.get("HF_ENDPOINT") or None, os.environ.get("HF_TOKEN") or None


@contextmanager
def _quiet() -> Iterator[None]:
    """huggingface_hub's progress bars only where someone watches (as ``hub.source.download``)."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    quiet = not sys.stderr.isatty() and not are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        yield
    finally:
        if quiet:
            enable_progress_bars()


def _errors(repo_id: str, name: str) -> AbstractContextManager[None]:
    """The Hub's and the network's errors as one-line LorasurgeonErrors, as ``hub.source`` maps a model repo's."""
    missing = f"{repo_id}: not a local file or folder, and no such dataset on the Hub"
    return hub_errors(name, missing, kind="dataset", label="--calibration ")
