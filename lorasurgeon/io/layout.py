"""Where each output tensor goes: shard assignment, shard names and the byte order inside a file.

Pure functions of names, dtypes and shapes; the sharding algorithm itself takes "how big is
this" as a function, so it is tested with plain numbers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from .dtypes import DtypeByName, itemsize, layout_key, safetensors_name

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch

T = TypeVar("T")


@dataclass(frozen=True)
class TensorSpec(DtypeByName):
    """An output tensor before it exists: enough to write its header."""

    name: str
    dtype_name: str  # safetensors' name
    shape: tuple[int, ...]

    @staticmethod
    def of(name: str, dtype: torch.dtype | str, shape: tuple[int, ...]) -> TensorSpec:
        return TensorSpec(name, safetensors_name(dtype), shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype_name)


@dataclass(frozen=True)
class Shard:
    """One output file and its tensors, in the order their bytes are laid out."""

    filename: str  # relative to the result folder: "unet/diffusion_pytorch_model.safetensors" in a pipeline's
    tensors: tuple[TensorSpec, ...]
    strip: str = ""  # a prefix of every tensor's name not written in this file (a pipeline component's "unet.")

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def split_greedy(items: Sequence[T], size_of: Callable[[T], int], max_size: int) -> list[list[T]]:
    """Fill groups in order, starting a new one when the next item would pass ``max_size``.

    An item larger than ``max_size`` gets a group of its own (huggingface_hub's algorithm).
    """
    groups: list[list[T]] = []
    current: list[T] = []
    current_size = 0
    for item in items:
        size = size_of(item)
        if size > max_size:
            groups.append([item])
            continue
        if current and current_size + size > max_size:
            groups.append(current)
            current, current_size = [], 0
        current.append(item)
        current_size += size
    if current:
        groups.append(current)
    return groups


def in_file_order(specs: Sequence[TensorSpec]) -> tuple[TensorSpec, ...]:
    """The order ``safetensors.torch.save_file`` lays tensors out: by dtype, then by name."""
    return tuple(sorted(specs, key=lambda s: layout_key(s.name, s.dtype_name)))


def shard_filename(prefix: str, index: int, count: int) -> str:
    """``model.safetensors`` for one shard, else ``model-00001-of-00003.safetensors``."""
    if count == 1:
        return f"{prefix}.safetensors"
    return f"{prefix}-{index + 1:05d}-of-{count:05d}.safetensors"


def plan_shards(specs: Sequence[TensorSpec], *, max_shard_size: int | None, prefix: str = "model") -> list[Shard]:
    """Split tensors into Hugging Face-named shards of at most ``max_shard_size`` bytes (None: one file)."""
    groups = split_greedy(specs, lambda s: s.nbytes, max_shard_size) if max_shard_size is not None else [list(specs)]
    groups = groups or [[]]
    return [Shard(shard_filename(prefix, i, len(groups)), in_file_order(g)) for i, g in enumerate(groups)]


def shards_like(specs: Sequence[TensorSpec], weight_map: Mapping[str, str], fallback: str) -> list[Shard]:
    """Keep an existing layout: each tensor goes to the file ``weight_map`` names, new ones to ``fallback``."""
    files: dict[str, list[TensorSpec]] = {}
    for spec in specs:
        files.setdefault(weight_map.get(spec.name, fallback), []).append(spec)
    return [Shard(name, in_file_order(files[name])) for name in sorted(files)]


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int) -> int:
    """Bytes from ``"5GB"`` (10^9, as transformers reads it), ``"500MiB"`` (2^20) or a plain number."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    unit = (match.group(2) or "").upper() if match else None
    if unit is not None and unit and not unit.endswith("B"):
        unit += "B"
    if match is None or unit not in _UNITS:
        raise ValueError(f"invalid size {text!r}: use a number of bytes or e.g. 5GB, 500MB, 2GiB")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise ValueError(f"invalid size {text!r}: must be positive")
    return value


def human_bytes(n: int) -> str:
    """A size for people: ``812 B``, ``212 KiB``, ``3.41 GiB`` (three significant digits)."""
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            break
        value /= 1024
    if unit == "B":
        return f"{n} B"
    return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
