"""What every GGUF reader and writer here shares: the ``gguf`` package (an optional extra), its reader's fields and
tensor headers, and a .gguf result's place (one file, checked before any tensor is read, written beside it under
a hidden name, fsynced and renamed: it appears whole or not at all)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import (
    CorruptCheckpointError,
    InputNotFoundError,
    LorasurgeonError,
    OutputError,
    OutputExistsError,
    UnsupportedError,
)
from .publish import absolute, check_place, check_replaceable, earlier_file, publish
from .scratch import make_scratch, release

SUFFIX = ".gguf"
GGUF_FILE = earlier_file("GGUF", b"GGUF")  # what --overwrite may replace: an earlier .gguf


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of a .gguf, from its header."""

    name: str
    ggml: str  # the ggml type's name: F32, F16, BF16, Q8_0, Q4_K, ...
    shape: tuple[int, ...]  # numpy order (ggml's ne reversed): the contiguous dimension last
    offset: int  # absolute, in the file
    nbytes: int


def gguf_module(purpose: str) -> Any:
    """The ``gguf`` package, or UnsupportedError saying that ``purpose`` needs it and how to install it."""
    try:
        import gguf
    except ImportError:
        raise UnsupportedError(
            f"{purpose} needs the gguf package: pip install 'lorasurgeon[gguf]' (or pip install gguf)"
        ) from None
    return gguf


def open_reader(path: Path, purpose: str) -> Any:
    """gguf's reader of ``path`` (memory-mapped, headers parsed), or one line saying why not.

    Raises:
        InputNotFoundError: no such file. CorruptCheckpointError: one gguf cannot parse (damaged, truncated).
        UnsupportedError: no gguf package (naming ``purpose``).
    """
    gguf = gguf_module(purpose)
    if not path.is_file():
        raise InputNotFoundError(f"{path}: no such file")
    try:
        return gguf.GGUFReader(os.fspath(path), "r")
    except OSError as exc:
        raise corrupt_gguf(path, f"cannot be read ({exc.strerror or exc})") from None
    except (ValueError, IndexError, KeyError, OverflowError, TypeError) as exc:
        raise corrupt_gguf(path, _why(exc, path.stat().st_size)) from None


# what gguf's reader says of a file it understands but refuses (numpy's messages, from reading past the end of
# a short file, are said as what they mean)
_GGUF_MESSAGES = ("magic", "version", "alignment", "uplicate", "field type", "not a valid")


def _why(exc: Exception, size: int) -> str:
    if size == 0:
        return "an empty file"
    message = str(exc)
    if isinstance(exc, (ValueError, KeyError)) and any(m in message for m in _GGUF_MESSAGES):
        return message.strip("'\"")
    return f"its header or tensors run past the end of the file, {size:,} bytes"


def corrupt_gguf(path: Path, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path}: not a readable GGUF file ({what}); it is damaged or truncated (download or write it again)"
    )


def tensor_header(t: Any) -> GgufTensor:
    """A GGUFReader tensor's header."""
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    return GgufTensor(str(t.name), str(t.tensor_type.name), shape, int(t.data_offset), int(t.n_bytes))


def field_value(reader: Any, key: str) -> tuple[Any, Any] | None:
    """A field's first type and its first value's array (None when absent or empty)."""
    f = reader.fields.get(key)
    if f is None or not f.types or not f.data:
        return None
    return f.types[0], f.parts[f.data[0]]


def scalar(reader: Any, key: str) -> str | int | float | bool | None:
    """A string or number field's value; None for one that is absent, empty or an array."""
    found = field_value(reader, key)
    if found is None:
        return None
    kind, part = found
    if kind.name == "STRING":
        return bytes(part).decode("utf-8", errors="replace")
    if kind.name == "ARRAY":
        return None
    value = part[0].item()
    return value if isinstance(value, (int, float, bool)) else None


def text(reader: Any, key: str) -> str | None:
    value = scalar(reader, key)
    return value if isinstance(value, str) else None


def check_gguf_destination(
    out: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]], *, overwrite: bool
) -> Path:
    """Where a .gguf result may go, before any tensor is read: one file, by every result's rules
    (``io.publish.check_place``: never an input, inside one or a protected folder), replacing only
    an earlier .gguf (with ``overwrite``), in a folder that exists. Returns it, absolute."""
    path = absolute(out)
    if path.is_dir():
        raise OutputExistsError(f"{path}: a folder; a GGUF result is one file (e.g. -o result.gguf)")
    check_place(path, inputs)
    if os.path.lexists(path):
        if not overwrite:
            raise OutputExistsError(f"{path}: already exists (pass --overwrite to replace an earlier result)")
        check_replaceable(path, GGUF_FILE)
    if not path.parent.is_dir():
        raise OutputError(f"{path.parent}: no such folder")
    return path


@contextmanager
def staged_gguf(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """The path to write ``out``'s file at (hidden, beside it); when the block ends without an error it is
    fsynced and renamed to ``out`` (replacing only an earlier .gguf, with ``overwrite``); else it is removed."""
    scratch = make_scratch(out, "partial")
    partial = scratch / out.name
    try:
        yield partial
        with open(partial, "rb+") as fh:
            os.fsync(fh.fileno())
        publish(partial, out, overwrite=overwrite, not_replaceable=GGUF_FILE)
    except OSError as exc:
        if isinstance(exc, LorasurgeonError):
            raise
        raise OutputError(f"{out}: cannot write ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        release(scratch)
