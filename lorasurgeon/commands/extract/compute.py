"""One extract op computed: ΔW of one tensor -> LoRA factors, a lora_B.bias, the full tensor, or nothing."""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import torch

from ...adapter.names import SAVED_PREFIX, saved_key
from ...engine.execute import Outcome
from ...engine.plan import Ref
from ...ops.lora import CONV, LAYER_KINDS
from ...ops.lowrank import difference, factorize, relative_error, squared_norm
from .._results import check_finite
from .plan import ExtractOp
from .report import ModuleStats, OpInfo
from .settings import ExtractSettings


def compute_extract(
    op: ExtractOp, tensors: Mapping[Ref, torch.Tensor], device: torch.device, *, settings: ExtractSettings
) -> Outcome[OpInfo]:
    """ΔW of one tensor -> LoRA factors, a lora_B.bias, the full tensor, or nothing."""
    dtype = settings.factor_dtype
    tuned = tensors[op.tuned]
    base = tensors[op.base] if op.base is not None else None
    if base is not None and base.dtype == tuned.dtype and torch.equal(base, tuned):
        return Outcome([], OpInfo(op, "unchanged"))
    if op.kind == "full" or base is None or not tuned.is_floating_point():
        change = 0.0
        if base is not None and base.shape == tuned.shape and tuned.is_floating_point():
            # ‖base − tuned‖² = ‖ΔW‖²; tuned is what gets written, base is ours and not used again
            change = squared_norm(difference(base, tuned))
            if change == 0.0:  # the same values in another dtype: nothing to store
                return Outcome([], OpInfo(op, "unchanged"))
        return Outcome([(SAVED_PREFIX + op.name, tuned)], OpInfo(op, "full", change))
    delta = difference(tuned, base, device)  # tuned is ours (a fresh read) and not used again
    if not settings.allow_nonfinite:
        check_finite(op.name, delta)
    total = squared_norm(delta)
    if total == 0.0:  # same values in another dtype
        return Outcome([], OpInfo(op, "unchanged"))
    if op.kind == "skip":
        return Outcome([], OpInfo(op, "skipped", total))
    if op.kind == "bias":
        return Outcome([(saved_key(op.module, "B_bias"), delta.to(dtype).cpu())], OpInfo(op, "bias", total))
    # Orient ΔW as PEFT's B @ A: (out, in) for Linear; transposed for Conv1D and Embedding.
    layer = LAYER_KINDS[op.kind]
    m = delta.T if layer.transposed else delta.reshape(delta.shape[0], -1)
    lr = factorize(
        m,
        rank=settings.rank,
        energy=settings.energy,
        max_rank=settings.max_rank,
        solver=settings.solver,
        seed=settings.seed + zlib.crc32(op.name.encode()),
        total=total,
    )  # ‖m‖² = ‖ΔW‖²: same elements
    a, b = lr.a.to(dtype), lr.b.to(dtype)
    stats = ModuleStats(
        op.module, op.kind, list(op.shape), lr.rank, lr.kept, relative_error(m, a, b, total=total), lr.solver
    )
    if layer is CONV:
        a, b = a.reshape(lr.rank, *delta.shape[1:]), b[:, :, None, None]
    a_role, b_role = layer.lora_roles
    outputs = [(saved_key(op.module, a_role), a.cpu()), (saved_key(op.module, b_role), b.cpu())]
    return Outcome(outputs, OpInfo(op, "lowrank", total, stats))
