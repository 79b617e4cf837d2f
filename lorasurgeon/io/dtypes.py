"""The safetensors dtype table: names, torch dtypes, sizes and the order files are laid out in.

Known by name without torch: headers are read, sized and laid out from names alone; a torch dtype is made
(and torch imported) only when a tensor is.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch

# (safetensors name, torch attribute, bytes per element), in safetensors' enum order.
_TABLE = (
    ("BOOL", "bool", 1),
    ("U8", "uint8", 1),
    ("I8", "int8", 1),
    ("F8_E5M2", "float8_e5m2", 1),
    ("F8_E4M3", "float8_e4m3fn", 1),
    ("F8_E8M0", "float8_e8m0fnu", 1),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz", 1),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz", 1),
    ("I16", "int16", 2),
    ("U16", "uint16", 2),
    ("F16", "float16", 2),
    ("BF16", "bfloat16", 2),
    ("I32", "int32", 4),
    ("U32", "uint32", 4),
    ("F32", "float32", 4),
    ("C64", "complex64", 8),
    ("F64", "float64", 8),
    ("I64", "int64", 8),
    ("U64", "uint64", 8),
)
ITEMSIZE: dict[str, int] = {name: size for name, _, size in _TABLE}
FLOATING = frozenset({"F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F16", "BF16", "F32", "F64"})
_NAME_OF_ATTR: dict[str, str] = {attr: name for name, attr, _ in _TABLE}
_ATTR_OF_NAME: dict[str, str] = {name: attr for name, attr, _ in _TABLE}

# safetensors (Rust) lays tensors out by dtype, in the reverse of its enum order, then by name.
# _TABLE is in that enum order, so a dtype's rank is its position there.
_LAYOUT_RANK: dict[str, int] = {name: i for i, (name, _, _) in enumerate(_TABLE)}

_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
    "fp32": "float32",
    "float": "float32",
    "fp64": "float64",
    "double": "float64",
}


@functools.cache
def torch_dtypes() -> dict[str, torch.dtype]:
    """safetensors name -> torch dtype, for the dtypes this torch has (imports torch)."""
    return {name: getattr(torch, attr) for name, attr, _ in _TABLE if hasattr(torch, attr)}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (imports torch)."""
    try:
        return torch_dtypes()[name]
    except KeyError:
        raise ValueError(f"dtype {name} cannot be held by this torch") from None


def itemsize(dtype: torch.dtype | str) -> int:
    """Bytes per element of ``dtype`` (a torch dtype or a safetensors name)."""
    return ITEMSIZE[safetensors_name(dtype)]


def safetensors_name(dtype: torch.dtype | str) -> str:
    """The safetensors spelling of a dtype (``torch.bfloat16`` -> ``"BF16"``); a name is returned as is."""
    if isinstance(dtype, str):
        if dtype not in ITEMSIZE:
            raise ValueError(f"unknown safetensors dtype {dtype!r}")
        return dtype
    try:
        return _NAME_OF_ATTR[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors") from None


def torch_name(dtype: torch.dtype | str) -> str:
    """``torch.bfloat16``'s spelling of a dtype given either way, as reports print it."""
    return "torch." + _ATTR_OF_NAME[safetensors_name(dtype)]


def is_floating(dtype: torch.dtype | str) -> bool:
    return safetensors_name(dtype) in FLOATING


def layout_key(name: str, dtype: torch.dtype | str) -> tuple[int, str]:
    """Sort key that reproduces the tensor order of ``safetensors.torch.save_file``."""
    return (-_LAYOUT_RANK[safetensors_name(dtype)], name)


def parse_dtype_name(text: str) -> str:
    """A dtype's safetensors name from its common spellings: ``bfloat16``, ``bf16``, ``torch.bfloat16``,
    ``BF16`` (no torch needed)."""
    key = text.strip().removeprefix("torch.")
    if key in ITEMSIZE:
        return key
    key = _ALIASES.get(key.lower(), key.lower())
    if key in _NAME_OF_ATTR:
        return _NAME_OF_ATTR[key]
    raise ValueError(f"unknown dtype {text!r}")


def parse_dtype(text: str) -> torch.dtype:
    """A torch dtype from its common spellings (see parse_dtype_name)."""
    return torch_dtype(parse_dtype_name(text))


class DtypeByName:
    """For frozen dataclasses that keep a dtype by its safetensors name in a ``dtype_name`` field (known
    without torch): a torch dtype given there is kept as its name, and ``dtype`` is the torch dtype
    (made, and torch imported, when asked for)."""

    dtype_name: str

    def __post_init__(self) -> None:
        if not isinstance(self.dtype_name, str):
            object.__setattr__(self, "dtype_name", safetensors_name(self.dtype_name))

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype_name)
