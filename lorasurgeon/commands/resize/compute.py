"""One module's new factors: the SVD of its stacked factors' product (never the dense ΔW), the ranks kept,
and the factors shaped and scaled as the adapter stores them."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ...adapter.names import ROLE_A, ROLE_B, Role
from ...engine.execute import Outcome
from ...engine.plan import Ref
from ...errors import InvalidOptionError, UnsupportedError
from ...ops.lowrank import OverBudget, allocate, product_svd, rank_for_energy, split
from ...ops.whitened import errors_by_rank
from ..extract.report import OutputError
from .calibrated import whitened_svd
from .plan import CopyOp, ModuleOp
from .report import ModuleResult
from .settings import Target

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch


def matrix(t: torch.Tensor, kind: str, role: Role) -> torch.Tensor:
    if kind == "conv":
        if role == ROLE_B and t.shape[2:] != (1, 1):
            raise UnsupportedError(f"a conv lora_B with a {list(t.shape[2:])} kernel is not a matrix product")
        return t.reshape(t.shape[0], -1)
    return t


def stacked(op: ModuleOp, tensors: Mapping[Ref, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of Σ factor·B A: B's columns and A's rows stacked, in float32."""
    b = torch.cat([matrix(tensors[rb], op.kind, ROLE_B).to(torch.float32) * f for _, rb, f in op.terms], dim=1)
    a = torch.cat([matrix(tensors[ra], op.kind, ROLE_A).to(torch.float32) for ra, _, _ in op.terms], dim=0)
    return b, a


def spectrum(op: ModuleOp | CopyOp, tensors: Mapping[Ref, torch.Tensor], device: torch.device) -> Outcome[Any]:
    if isinstance(op, CopyOp):
        return Outcome([], None)
    b, a = stacked(op, tensors)
    if op.moments is not None:  # calibrated: the whitened spectrum, relative to the module's output
        w = whitened_svd(op, b.to(device), a.to(device), tensors)
        return Outcome([], (w.s / w.signal**0.5).cpu())
    return Outcome([], product_svd(b.to(device), a.to(device))[1].cpu())


def factors(
    op: ModuleOp | CopyOp,
    tensors: Mapping[Ref, torch.Tensor],
    device: torch.device,
    *,
    exact: bool,
    ranks: Mapping[str, int],
    top: int,
    dtype: torch.dtype,
) -> Outcome[Any]:
    """A module's new factors at its chosen rank k, B scaled by k / top: with lora_alpha = top every consumer
    that scales by alpha / rank (PEFT with rank_pattern, llama.cpp, vLLM) gets exactly the change kept."""
    if isinstance(op, CopyOp):
        return Outcome([(op.name, tensors[op.src])], None)
    b, a = stacked(op, tensors)
    k = ranks[op.name]
    if op.moments is not None and not exact:  # calibrated: the best rank-k factors on the samples
        w = whitened_svd(op, b.to(device), a.to(device), tensors)
        nb64, na64 = w.factors(k)
        left = errors_by_rank((b.to(device), a.to(device)), nb64, na64)  # ‖ΔW − B_j A_j‖², j = 0..k, ΔW never formed
        energy = float(left[0])
        kept = 1.0 - float(left[-1]) / energy if energy else 1.0
        result = ModuleResult(op.name, op.rank, k, kept, energy, OutputError(*w.errors(k)))
        nb, na = nb64.to(torch.float32).cpu(), na64.to(torch.float32).cpu()
        return Outcome(shaped(op, nb * (k / top), na, dtype), result)
    u, s, vh = product_svd(b.to(device), a.to(device))
    energy = float(torch.sum(s**2))
    if exact:  # the stacked factors themselves: the weighted sum, exactly
        return Outcome(shaped(op, b * (k / top), a, dtype), ModuleResult(op.name, op.rank, k, 1.0, energy))
    nb, na = split(u.cpu(), s.cpu(), vh.cpu(), k)
    kept = float(torch.sum(s[:k] ** 2)) / energy if energy else 1.0
    return Outcome(shaped(op, nb * (k / top), na, dtype), ModuleResult(op.name, op.rank, k, kept, energy))


def choose_ranks(
    ops: Sequence[ModuleOp], spectra: Sequence[torch.Tensor] | None, target: Target, fixed: int
) -> list[int]:
    """Each module's rank: all of it (exact), --rank, --energy per module, or --budget across modules; capped
    by --max-rank and by the matrix's own rank (the nonzero singular values)."""
    if target.exact:  # the stacked factors, all of them
        return [op.rank for op in ops]
    if spectra is None:
        caps = [min(op.rank, op.b_shape[0], math.prod(op.a_shape[1:])) for op in ops]
        return caps if target.rank is None else [max(1, min(target.rank, c)) for c in caps]
    caps = [max(1, min(int((s > s[0] * 1e-12).sum()) if len(s) else 1, target.max_rank or len(s))) for s in spectra]
    if target.energy is not None:
        return [
            max(1, min(rank_for_energy(s, float(torch.sum(s.double() ** 2)), target.energy), cap))
            for s, cap in zip(spectra, caps, strict=True)
        ]
    assert target.budget is not None
    try:
        return allocate(list(spectra), [op.cost for op in ops], target.budget - fixed, [1] * len(ops), caps)
    except OverBudget:
        raise InvalidOptionError(
            f"{target.sizing.flag} of {target.budget:,} parameters is less than rank 1 everywhere needs "
            f"({sum(op.cost for op in ops) + fixed:,})"
        ) from None


def shaped(op: ModuleOp, b: torch.Tensor, a: torch.Tensor, dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    k = a.shape[0]
    a_out = a.reshape(k, *op.a_shape[1:])
    b_out = b.reshape(op.b_shape[0], k, *op.b_shape[2:])
    return [(op.a_key, a_out.to(dtype).contiguous()), (op.b_key, b_out.to(dtype).contiguous())]
