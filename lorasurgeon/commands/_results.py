"""Checks on computed results, shared by the commands."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import NonFiniteError
from ..ops.lora import all_finite

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if not all_finite(tensor):
        raise NonFiniteError(
            f"tensor {name!r}: the result holds NaN or Inf; nothing was written "
            "(check the inputs, or pass --allow-nonfinite)"
        )
