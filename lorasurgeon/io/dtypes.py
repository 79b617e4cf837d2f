"""The safetensors dtype table: names, torch dtypes, sizes and the order files are laid out in."""

from __future__ import annotations

import torch

# (safetensors name, torch attribute); attributes missing from an older torch are skipped.
_TABLE = (
    ("BOOL", "bool"),
    ("U8", "uint8"),
    ("I8", "int8"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E8M0", "float8_e8m0fnu"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("I16", "int16"),
    ("U16", "uint16"),
    ("F16", "float16"),
    ("BF16", "bfloat16"),
    ("I32", "int32"),
    ("U32", "uint32"),
    ("F32", "float32"),
    ("C64", "complex64"),
    ("F64", "float64"),
    ("I64", "int64"),
    ("U64", "uint64"),
)

TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, attr) for name, attr in _TABLE if hasattr(torch, attr)}
SAFETENSORS_NAMES: dict[torch.dtype, str] = {dt: name for name, dt in TORCH_DTYPES.items()}

# safetensors (Rust) lays tensors out by dtype, in the reverse of its enum order, then by name.
# _TABLE is in that enum order, so a dtype's rank is its position there.
_LAYOUT_RANK: dict[str, int] = {name: i for i, (name, _) in enumerate(_TABLE)}


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def safetensors_name(dtype: torch.dtype) -> str:
    """The safetensors spelling of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    try:
        return SAFETENSORS_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors") from None


def layout_key(name: str, dtype: torch.dtype) -> tuple[int, str]:
    """Sort key that reproduces the tensor order of ``safetensors.torch.save_file``."""
    return (-_LAYOUT_RANK[safetensors_name(dtype)], name)


def parse_dtype(text: str) -> torch.dtype:
    """A dtype from its common spellings: ``bfloat16``, ``bf16``, ``torch.bfloat16``, ``BF16``."""
    key = text.strip().removeprefix("torch.")
    if key in TORCH_DTYPES:
        return TORCH_DTYPES[key]
    aliases = {
        "bf16": "bfloat16",
        "fp16": "float16",
        "half": "float16",
        "fp32": "float32",
        "float": "float32",
        "fp64": "float64",
        "double": "float64",
    }
    key = aliases.get(key.lower(), key.lower())
    value = getattr(torch, key, None)
    if isinstance(value, torch.dtype):
        return value
    raise ValueError(f"unknown dtype {text!r}")
