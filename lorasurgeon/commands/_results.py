"""Checks on computed results, shared by the commands."""

from __future__ import annotations

import torch

from ..errors import NonFiniteError
from ..ops.lora import all_finite


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if not all_finite(tensor):
        raise NonFiniteError(
            f"tensor {name!r}: the result holds NaN or Inf; nothing was written "
            "(check the inputs, or pass --allow-nonfinite)"
        )
