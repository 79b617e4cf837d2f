"""The safetensors header: parse it defensively, and build it byte for byte as safetensors does.

Layout of a file: 8 bytes little-endian header length N, N bytes of JSON (padded with spaces to a
multiple of 8), then the data section. Each JSON entry gives a tensor's dtype, shape and
``data_offsets`` relative to the data section.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..errors import CorruptCheckpointError, UnsupportedError
from .dtypes import ITEMSIZE, DtypeByName, itemsize, safetensors_name

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch

MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class TensorEntry(DtypeByName):
    """One tensor of a safetensors file, as its header describes it."""

    name: str
    dtype_name: str  # safetensors' name ("BF16")
    shape: tuple[int, ...]
    begin: int  # absolute offset of the first byte in the file
    nbytes: int


@dataclass(frozen=True)
class Header:
    """A parsed header: tensors in file order and the string metadata."""

    entries: tuple[TensorEntry, ...]
    metadata: dict[str, str]
    data_start: int


def _fail(path: Path, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{path}: {what}; the file is damaged or not safetensors (download or save it again)")


class Reads(Protocol):
    """What a header is read from: an open file, or a remote one (io.remote.Sequential)."""

    def read(self, n: int = -1, /) -> bytes: ...


def read_header(path: Path, file_size: int, fh: Reads) -> Header:
    """Parse and validate the header of an open safetensors file.

    Everything is checked against the file's real size before any tensor is read: header
    length, JSON shape, dtypes, shapes, offsets in range and not overlapping.
    """
    if file_size < 8:
        raise _fail(path, f"file is {file_size} bytes, too short for a safetensors header")
    (length,) = struct.unpack("<Q", fh.read(8))
    if length > MAX_HEADER_BYTES:
        raise _fail(path, f"header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + length > file_size:
        raise _fail(path, f"header length {length} runs past the end of the {file_size}-byte file")
    raw = fh.read(length)
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"header is not valid JSON ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(doc, dict):
        raise _fail(path, "header is not a JSON object")
    metadata = doc.pop(METADATA_KEY, None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _fail(path, "__metadata__ must map strings to strings")
    data_start = 8 + length
    data_size = file_size - data_start
    entries = [_parse_entry(path, name, spec, data_start) for name, spec in doc.items()]
    entries.sort(key=lambda e: e.begin)
    end = data_start
    for e in entries:
        if e.begin < end and e.nbytes:
            raise _fail(path, f"tensor {e.name!r} overlaps the tensor before it")
        end = max(end, e.begin + e.nbytes)
    if end - data_start > data_size:
        raise _fail(
            path,
            f"truncated: tensors need {end - data_start} data bytes, the file has {data_size}",
        )
    return Header(tuple(entries), dict(metadata), data_start)


def _parse_entry(path: Path, name: str, spec: object, data_start: int) -> TensorEntry:
    if not isinstance(spec, dict):
        raise _fail(path, f"entry {name!r} is not an object")
    dtype_name = spec.get("dtype")
    shape = spec.get("shape")
    offsets = spec.get("data_offsets")
    if not isinstance(dtype_name, str):
        raise _fail(path, f"tensor {name!r} has no dtype")
    if dtype_name not in ITEMSIZE:
        if dtype_name.startswith(("F4", "F6", "F8")):
            raise UnsupportedError(
                f"{path}: tensor {name!r} has dtype {dtype_name}, a quantized format "
                "lorasurgeon cannot read yet: give the unquantized checkpoint"
            )
        raise UnsupportedError(f"{path}: tensor {name!r} has dtype {dtype_name}, which lorasurgeon does not know")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _fail(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _fail(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    expected = math.prod(shape) * itemsize(dtype_name)
    if offsets[1] - offsets[0] != expected:
        raise _fail(
            path,
            f"tensor {name!r} ({dtype_name}{shape}) needs {expected} bytes "
            f"but its data_offsets span {offsets[1] - offsets[0]}",
        )
    return TensorEntry(name, dtype_name, tuple(shape), data_start + offsets[0], expected)


def build_header(
    tensors: list[tuple[str, torch.dtype | str, tuple[int, ...]]], metadata: dict[str, str] | None
) -> tuple[bytes, list[int]]:
    """Serialize a header exactly as safetensors does, for tensors given in file order.

    Returns the bytes to write before the data (length prefix included) and the offset of each
    tensor relative to the data section.
    """
    doc: dict[str, object] = {}
    if metadata:
        doc[METADATA_KEY] = dict(sorted(metadata.items()))
    offsets = []
    pos = 0
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * itemsize(dtype)
        doc[name] = {"dtype": safetensors_name(dtype), "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets.append(pos)
        pos += nbytes
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets
