"""Statistics of the difference of two tensors. Pure functions of tensors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .lowrank import rank_for_energy, squared_norm, top_singular

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch

PROFILE = (0.5, 0.9, 0.99)


@dataclass(frozen=True)
class Change:
    rel_change: float  # ‖B − A‖ / ‖A‖ (inf when A is zero and B is not)
    max_abs_diff: float
    cosine: float  # of A and B flattened (1.0 when both are zero)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so NaNs with equal payloads count as equal, -0.0 ≠ 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


_SAME_SIZE_INT = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}  # torch attributes


def identical_fraction(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 20) -> float:
    """The share of elements that are the same: bit for bit when the dtypes match (as ``same_bits``),
    equal in value when they differ (compared in float64). Counted a block at a time."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    if fa.numel() != fb.numel():
        raise ValueError("identical_fraction needs tensors of the same size")
    if not fa.numel():
        return 1.0
    if a.dtype == b.dtype and a.element_size() in _SAME_SIZE_INT and a.dtype != torch.bool:
        as_int = getattr(torch, _SAME_SIZE_INT[a.element_size()])
        fa, fb = fa.contiguous().view(as_int), fb.contiguous().view(as_int)
        same = sum(int((fa[i : i + chunk] == fb[i : i + chunk]).sum()) for i in range(0, fa.numel(), chunk))
    else:
        same = sum(
            int((fa[i : i + chunk].double() == fb[i : i + chunk].double()).sum()) for i in range(0, fa.numel(), chunk)
        )
    return same / fa.numel()


def change(a: torch.Tensor, b: torch.Tensor) -> Change:
    """How far B is from A, computed in float32 (float64 accumulation for the norms)."""
    a32, b32 = a.to(torch.float32), b.to(torch.float32)
    diff = b32 - a32
    na, nb, nd = squared_norm(a32) ** 0.5, squared_norm(b32) ** 0.5, squared_norm(diff) ** 0.5
    rel = nd / na if na else (0.0 if nd == 0 else float("inf"))
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    if na == 0 or nb == 0:
        cosine = 1.0 if na == nb else 0.0
    else:
        cosine = _clamped(_dot64(a32, b32) / (na * nb))
    return Change(rel, max_abs, cosine)


def _clamped(cosine: float) -> float:
    """Into [-1, 1] (rounding can step past it); NaN stays NaN (min/max would make it -1.0)."""
    return cosine if math.isnan(cosine) else min(1.0, max(-1.0, cosine))


def non_finite(t: torch.Tensor, chunk: int = 1 << 20) -> tuple[int, int]:
    """How many elements are NaN and how many ±Inf (0, 0 for integer dtypes). Counted a block at a time."""
    if not t.dtype.is_floating_point:
        return 0, 0
    flat = t.reshape(-1)
    blocks = [flat[i : i + chunk] for i in range(0, flat.numel(), chunk)]
    return sum(int(torch.isnan(b).sum()) for b in blocks), sum(int(torch.isinf(b).sum()) for b in blocks)


def _dot64(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 20) -> float:
    fa, fb = a.reshape(-1), b.reshape(-1)
    return float(
        sum(torch.dot(fa[i : i + chunk].double(), fb[i : i + chunk].double()) for i in range(0, fa.numel(), chunk))
    )


def rank_profile(diff: torch.Tensor, *, seed: int = 0, fractions: Sequence[float] = PROFILE) -> list[int]:
    """For each fraction, the smallest rank keeping it of ‖diff‖² (randomized solver, widening as needed)."""
    m = diff.to(torch.float32).reshape(diff.shape[0], -1)
    if not m.any():
        return [0 for _ in fractions]
    _, s, _, total, _ = top_singular(m, energy=max(fractions), seed=seed)
    return [rank_for_energy(s, total, f) for f in fractions]


# A change of less than this many units of the dtype's eps (relative to the tensor) is rounding noise:
# one rounding into a dtype moves each element by at most half an ulp, ≤ eps/2 of its value.
ROUNDING_NOISE = 1.0


def rounding_units(change_sq: float, base_sq: float, dtype: torch.dtype) -> float:
    """‖ΔW‖ / (eps · ‖W‖), from ‖ΔW‖² and ‖W‖²: a tensor's change in units of ``dtype``'s rounding
    (``torch.finfo(dtype).eps``, the gap between 1.0 and the next value). One rounding to ``dtype`` (a cast
    to it, or a round trip through another dtype that holds its values but for subnormals) moves each element
    by at most eps/2 of its value, so it stays under 1/2 (under ROUNDING_NOISE): a change that small is what
    rounding alone does, not training. 0.0 for no change, inf for a change of a zero tensor."""
    if change_sq == 0.0:
        return 0.0
    if base_sq == 0.0:
        return float("inf")
    return math.sqrt(change_sq / base_sq) / torch.finfo(dtype).eps
