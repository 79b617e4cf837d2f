"""Option checks shared by the commands: output placement, device, dtype, sizes."""

from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..errors import InvalidOptionError, UnsupportedError
from ..formats.detect import detect
from ..io.checkpoint import Checkpoint
from ..io.destination import check_destination
from ..io.dtypes import parse_dtype
from ..io.layout import parse_size


def check_output(out: str | os.PathLike[str], inputs: Sequence[Path], *, overwrite: bool) -> None:
    """Refuse, before any work, an output that overlaps an input, is a protected folder, or exists
    and is not ours to replace (see :mod:`lorasurgeon.io.destination`)."""
    check_destination(out, inputs, overwrite=overwrite)


def output_dtype(text: str | torch.dtype | None) -> torch.dtype | None:
    if text is None or text == "auto":
        return None
    try:
        dtype = text if isinstance(text, torch.dtype) else parse_dtype(text)
    except ValueError as exc:
        raise InvalidOptionError(str(exc)) from None
    if not dtype.is_floating_point:
        raise InvalidOptionError(f"--dtype must be a floating dtype, not {dtype}")
    return dtype


FLOAT32_MAX = torch.finfo(torch.float32).max


def check_weights(weights: Sequence[float]) -> None:
    """Adapter weights are finite numbers that float32 arithmetic can hold."""
    for w in weights:
        if not isinstance(w, numbers.Real) or isinstance(w, bool) or not math.isfinite(w) or abs(w) > FLOAT32_MAX:
            raise InvalidOptionError(
                f"--weight {w!r}: a weight must be a finite number within float32's range (|w| <= {FLOAT32_MAX:.3g})")


def parse_shard_size(text: str | int | None) -> int | None:
    try:
        return None if text is None else parse_size(text)
    except ValueError as exc:
        raise InvalidOptionError(str(exc)) from None


def check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InvalidOptionError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidOptionError(f"device {device!r} asked for, but torch sees no CUDA GPU")
    if dev.type not in ("cpu", "cuda"):
        raise InvalidOptionError(f"unsupported device {device!r}: use cpu, cuda or cuda:N")


def refuse_quantized(ckpt: Checkpoint, config: Mapping[str, Any], *, role: str, command: str) -> None:
    """Refuse, by name, a quantized checkpoint: its stored codes are not weights (formats.detect)."""
    found = detect(((i.name, i.dtype) for i in ckpt.infos()), config)
    if found is not None:
        raise UnsupportedError(
            f"{ckpt.root}: {role} is quantized: {found.describe()}; {command} would read its stored codes as "
            "weights, so it refuses quantized checkpoints for now: give the unquantized (bf16/fp16/fp32) checkpoint")
