"""Checkpoint files that are not on this disk: read in place, a byte range at a time, from where they lie.

A Hub input read in place (``hub.stream``) has its small files (config, index, tokenizer) in the local cache
and each weight file registered here under the path it would have there. Everything in ``io`` that opens a
checkpoint file asks this module first -- whether the file is there (:func:`is_file`), its size, its first
bytes for the header (:func:`open_binary`), a tensor's bytes (:func:`remote_of`, then ``read_into``) -- so a
checkpoint whose files are remote is opened and read like any other; only the byte-for-byte copy from file
to file is not offered for its tensors (``TensorInfo.file_slice``): they are read into memory and written.
A file that exists on disk is read from disk, registered or not.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import BinaryIO, Protocol


class RemoteFile(Protocol):
    """One file read by range: its size, where it is (for messages), and bytes at an offset."""

    @property
    def url(self) -> str: ...

    @property
    def size(self) -> int: ...

    def read_into(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` with the file's bytes from ``offset`` on (EOFError if the file ends first)."""
        ...


_REMOTE: dict[Path, RemoteFile] = {}
_HEADS: dict[Path, bytes] = {}  # each remote file's first bytes as read through open_binary (its header), kept
_LOCK = threading.Lock()


def register(path: Path, remote: RemoteFile) -> None:
    """Read ``path`` from ``remote`` whenever it is not on disk."""
    with _LOCK:
        known = _REMOTE.get(Path(path))
        if known is None or known.url != remote.url:  # the same url is the same bytes (a commit's file)
            _HEADS.pop(Path(path), None)
        _REMOTE[Path(path)] = remote


def registered() -> dict[Path, RemoteFile]:
    """Every registered file (what another process -- a Ray task -- registers again to read the same inputs)."""
    with _LOCK:
        return dict(_REMOTE)


def remote_of(path: Path) -> RemoteFile | None:
    """The remote file ``path`` is read from, or None when it is on disk (or was never registered)."""
    with _LOCK:
        found = _REMOTE.get(Path(path))
    return None if found is None or path.exists() else found


def is_file(path: Path) -> bool:
    """Whether ``path`` is a file on disk or one registered to be read in place."""
    return path.is_file() or remote_of(path) is not None


def file_size(path: Path) -> int:
    remote = remote_of(path)
    return path.stat().st_size if remote is None else remote.size


def open_binary(path: Path) -> BinaryIO | Sequential:
    """The file, open for sequential reading from its start (a remote one's header by range)."""
    remote = remote_of(path)
    return open(path, "rb") if remote is None else Sequential(path, remote)


class Sequential:
    """A remote file read front to back, each read() one range (what a safetensors header takes: 8 bytes, then
    the header's length). What was read is kept for the process: a header is fetched once, however many times
    the file is opened."""

    def __init__(self, path: Path, remote: RemoteFile):
        self.path, self.remote, self.pos = Path(path), remote, 0

    def read(self, n: int = -1) -> bytes:
        want = self.remote.size - self.pos if n < 0 else min(n, self.remote.size - self.pos)
        if want <= 0:
            return b""
        with _LOCK:
            head = _HEADS.get(self.path, b"")
        if self.pos + want > len(head):
            more = bytearray(self.pos + want - len(head))
            self.remote.read_into(memoryview(more), len(head))
            head += more
            with _LOCK:
                _HEADS[self.path] = head
        self.pos += want
        return head[self.pos - want : self.pos]

    def __enter__(self) -> Sequential:
        return self

    def __exit__(self, *exc: object) -> None:
        pass
