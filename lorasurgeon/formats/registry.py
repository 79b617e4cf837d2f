"""The quantized formats lorasurgeon reads: one ``Format`` per module, in the order they are asked.

Where config.json names no quant_method, the first format a tensor name marks is the one; a format
that can be told only by its quant_method (compressed-tensors) may stand anywhere. Adding a format
is one module exposing its ``FORMAT`` and one line here (CONTRIBUTING.md, "Adding a quantized format").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from . import bnb, compressed, fp8, fp8_tensor, mlx, mxfp4
from .base import Format

FORMATS: tuple[Format, ...] = (
    fp8.FORMAT,
    compressed.FORMAT,
    mxfp4.FORMAT,
    bnb.FORMAT,
    mlx.FORMAT,
    fp8_tensor.FORMAT,  # last: claims by how tensors are stored, where no other format's names do
)


def claiming(
    qconfig: Mapping[str, Any], names: Sequence[str], stored: Mapping[str, str] | None = None
) -> Format | None:
    """The format a checkpoint with this quantization block (``{}`` if none) and these tensor names (``stored``:
    their dtypes) is in, or None if none of the registered formats claims it: a name or block first, in
    registry order, then how the tensors are stored."""
    by_name = next((f for f in FORMATS if f.claims(qconfig, names)), None)
    return by_name or next((f for f in FORMATS if f.claims(qconfig, names, stored)), None)


def reads() -> str:
    """Every registered format in words, as a refusal lists them."""
    return ", ".join(f.reads for f in FORMATS)
