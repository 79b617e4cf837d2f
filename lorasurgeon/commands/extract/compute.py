"""One extract op computed: ΔW of one tensor -> LoRA factors, a lora_B.bias, the full tensor, or nothing."""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ...adapter.names import ROLE_A, ROLE_B, ROLE_B_BIAS, Role, saved_key
from ...engine.execute import Outcome
from ...engine.plan import Ref
from ...ops.compare import rounding_units
from ...ops.lora import CONV, LAYER_KINDS
from ...ops.lowrank import difference, factorize, relative_error, squared_norm
from .._results import check_finite
from .calibrated import factor_calibrated
from .plan import ExpertsOf, ExtractOp
from .report import ModuleStats, OpInfo
from .settings import BUDGET_RANK, ExtractSettings

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch


def compute_extract(
    op: ExtractOp, tensors: Mapping[Ref, torch.Tensor], device: torch.device, *, settings: ExtractSettings
) -> Outcome[OpInfo]:
    """ΔW of one tensor -> LoRA factors, a lora_B.bias, the full tensor, or nothing."""
    dtype = settings.factor_dtype
    if op.experts is not None:
        return _experts(op, op.experts, tensors, device, settings)
    tuned = tensors[op.tuned]
    base = tensors[op.base] if op.base is not None else None
    if base is not None and base.dtype == tuned.dtype and torch.equal(base, tuned):
        return Outcome([], OpInfo(op, "unchanged"))
    if op.kind == "full" or base is None or not tuned.is_floating_point():
        change, rounding = 0.0, None
        if base is not None and base.shape == tuned.shape and tuned.is_floating_point():
            base_sq = squared_norm(base)
            # ‖base − tuned‖² = ‖ΔW‖²; tuned is what gets written, base is ours and not used again
            change = squared_norm(difference(base, tuned))
            if change == 0.0:  # the same values in another dtype: nothing to store
                return Outcome([], OpInfo(op, "unchanged"))
            rounding = rounding_units(change, base_sq, tuned.dtype)
        # stored whole: the finishing pass copies it from the fine-tune (extract.assemble), if it is kept
        return Outcome([], OpInfo(op, "full", change, rounding=rounding))
    tuned_dtype = tuned.dtype
    delta = difference(tuned, base, device)  # tuned is ours (a fresh read) and not used again
    if not settings.allow_nonfinite:
        check_finite(op.name, delta)
    total = squared_norm(delta)
    if total == 0.0:  # same values in another dtype
        return Outcome([], OpInfo(op, "unchanged"))
    rounding = rounding_units(total, squared_norm(base), tuned_dtype)
    if op.kind == "skip":
        return Outcome([], OpInfo(op, "skipped", total, rounding=rounding))
    if op.kind == "bias":
        bias = delta.to(dtype).cpu()
        return Outcome([(saved_key(op.module, ROLE_B_BIAS), bias)], OpInfo(op, "bias", total, rounding=rounding))
    # Orient ΔW as PEFT's B @ A: (out, in) for Linear; transposed for Conv1D and Embedding.
    layer = LAYER_KINDS[op.kind]
    m = delta.T if layer.transposed else delta.reshape(delta.shape[0], -1)
    if op.moments is not None:  # --calibration: best on the data (extract.calibrated)
        w = base.T if layer.transposed else base.reshape(base.shape[0], -1)  # the base weight, as m is oriented
        return _calibrated(op, m, w, tensors, settings, total, rounding)
    fixed = settings.fixed_rank(op.kind, op.shape)  # --conv-rank's, outside the sizing (and the budget)
    budget = settings.budget_params is not None and fixed is None  # factors up to a cap; finish truncates them
    lr = factorize(
        m,
        rank=fixed or (min(settings.max_rank or BUDGET_RANK, *m.shape) if budget else settings.rank),
        energy=None if budget or fixed else settings.energy,
        max_rank=None if budget or fixed else settings.max_rank,
        solver=settings.solver,
        seed=settings.seed + zlib.crc32(op.name.encode()),
        total=total,
    )  # ‖m‖² = ‖ΔW‖²: same elements
    a, b = lr.a.to(dtype), lr.b.to(dtype)
    error = relative_error(m, a, b, total=total)
    stats = ModuleStats(op.module, op.kind, list(op.shape), lr.rank, lr.kept, error, lr.solver, total, list(lr.sigma))
    if layer is CONV:
        a, b = a.reshape(lr.rank, *delta.shape[1:]), b[:, :, None, None]
    a, b = a.cpu(), b.cpu()
    a_role, b_role = layer.lora_roles
    outputs = [(saved_key(op.module, a_role), a), (saved_key(op.module, b_role), b)]
    spectrum = stored_spectrum(a, b) if budget else None
    return Outcome(outputs, OpInfo(op, "lowrank", total, stats, rounding, spectrum))


def _calibrated(
    op: ExtractOp,
    m: torch.Tensor,
    w: torch.Tensor,
    tensors: Mapping[Ref, torch.Tensor],
    settings: ExtractSettings,
    total: float,
    rounding: float | None,
) -> Outcome[OpInfo]:
    """A linear module or embedding factored by its output error on the calibration inputs; under --budget up to
    the cap, with the whitened spectrum and the per-rank curves the budget is spent by."""
    a64, b64, stats, curves = factor_calibrated(op, m, w, tensors, settings, total)
    a, b = a64.to(settings.factor_dtype), b64.to(settings.factor_dtype)
    if settings.budget_params is None:  # the rank is final: the relative error measured on the factors as stored
        error = relative_error(m, a, b, total=total)
        stats = dataclasses.replace(stats, rel_error=error, kept=max(0.0, 1.0 - error**2))
    outputs = [
        (saved_key(op.module, role), t.cpu()) for role, t in zip(LAYER_KINDS[op.kind].lora_roles, (a, b), strict=True)
    ]
    budget = settings.budget_params is not None
    spectrum = (curves.output[:-1] - curves.output[1:]).clamp_min(0.0).sqrt() if budget else None
    return Outcome(outputs, OpInfo(op, "lowrank", total, stats, rounding, spectrum, curves if budget else None))


def stored_spectrum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The singular values the factors hold as stored (in their dtype), float64: A = √S·Vᵀ and B = U·√S, so
    row j of A and column j of B hold σⱼ between them, σⱼ = ‖Aⱼ‖·‖Bⱼ‖ (a conv's B is (out, r, 1, 1))."""
    a64, b64 = a.double(), b.double()
    b64 = b64.reshape(b64.shape[0], -1)
    return (a64.reshape(a64.shape[0], -1).square().sum(1) * b64.square().sum(0)).sqrt()


def expert_piece(parameter: str, expert: int, role: Role) -> str:
    """A spooled name for one expert's factor, stacked into the parameter's lora_A / lora_B at the end."""
    return f"@experts/{parameter}/{expert}/{role}"


def _experts(
    op: ExtractOp, of: ExpertsOf, tensors: Mapping[Ref, torch.Tensor], device: torch.device, settings: ExtractSettings
) -> Outcome[OpInfo]:
    """Each expert's ΔW (as PEFT orients it: (out, in)) -> its factors, spooled one expert at a time."""
    if of.parts:  # one expert from per-expert files: its parts (gate rows, up rows) concatenated
        assert of.expert is not None
        changes = [(of.expert, torch.cat([difference(tensors[t], tensors[b], device) for t, b in of.parts]))]
    else:
        stack = difference(tensors[op.tuned], tensors[op.base], device) if op.base is not None else None
        assert stack is not None  # plan_extract gives a stack both checkpoints hold
        changes = list(enumerate(stack))
    outputs: list[tuple[str, torch.Tensor]] = []
    total = kept = error = 0.0
    rank, solver = 0, ""
    for e, delta in changes:
        m = delta.T if of.transposed else delta  # (E, in, out) stacks: ΔW[e]ᵀ is B·A
        energy = squared_norm(m)
        if energy == 0.0:
            continue
        if not settings.allow_nonfinite:
            check_finite(f"{of.parameter}[{e}]", m)
        lr = factorize(
            m,
            rank=of.rank(settings.rank),  # per file matrix fused into it, as PEFT counts it
            energy=settings.energy,
            max_rank=of.rank(settings.max_rank),
            solver=settings.solver,
            seed=settings.seed + zlib.crc32(f"{of.parameter}[{e}]".encode()),
            total=energy,
        )
        a, b = lr.a.to(settings.factor_dtype), lr.b.to(settings.factor_dtype)
        outputs += [(expert_piece(of.parameter, e, ROLE_A), a.cpu()), (expert_piece(of.parameter, e, ROLE_B), b.cpu())]
        total += energy
        kept += energy * lr.kept
        error += relative_error(m, a, b, total=energy) ** 2 * energy
        rank, solver = max(rank, lr.rank), lr.solver
    if total == 0.0:
        return Outcome([], OpInfo(op, "unchanged"))
    stats = ModuleStats(op.name, "experts", list(op.shape), rank, kept / total, (error / total) ** 0.5, solver, total)
    return Outcome(outputs, OpInfo(op, "lowrank", total, stats))
