"""One extract op computed: ΔW of one tensor -> LoRA factors, a lora_B.bias, the full tensor, or nothing."""

from __future__ import annotations

import zlib

import torch

from ...adapter.names import SAVED_PREFIX, saved_key
from ...engine.execute import Outcome
from ...engine.plan import Ref
from ...ops.lowrank import difference, factorize, relative_error, squared_norm
from .._results import check_finite
from .finish import ModuleStats, OpInfo
from .plan import ExtractOp


def compute_extract(op: ExtractOp, tensors: dict[Ref, torch.Tensor], device: torch.device, *,
                    rank: int | None, energy: float | None, max_rank: int | None, solver: str,
                    seed: int, dtype: torch.dtype, allow_nonfinite: bool) -> Outcome:
    """ΔW of one tensor -> LoRA factors, a lora_B.bias, the full tensor, or nothing."""
    tuned = tensors[op.tuned]
    base = tensors[op.base] if op.base is not None else None
    if base is not None and base.dtype == tuned.dtype and torch.equal(base, tuned):
        return Outcome([], OpInfo(op, "unchanged"))
    if op.kind == "full" or base is None or not tuned.is_floating_point():
        same_shape = base is not None and base.shape == tuned.shape and tuned.is_floating_point()
        # ‖base − tuned‖² = ‖ΔW‖²; tuned is what gets written, base is ours and not used again
        change = squared_norm(difference(base, tuned)) if same_shape else 0.0
        if same_shape and change == 0.0:  # the same values in another dtype: nothing to store
            return Outcome([], OpInfo(op, "unchanged"))
        return Outcome([(SAVED_PREFIX + op.name, tuned)], OpInfo(op, "full", change))
    delta = difference(tuned, base, device)  # tuned is ours (a fresh read) and not used again
    if not allow_nonfinite:
        check_finite(op.name, delta)
    total = squared_norm(delta)
    if total == 0.0:  # same values in another dtype
        return Outcome([], OpInfo(op, "unchanged"))
    if op.kind == "skip":
        return Outcome([], OpInfo(op, "skipped", total))
    if op.kind == "bias":
        return Outcome([(saved_key(op.module, "B_bias"), delta.to(dtype).cpu())], OpInfo(op, "bias", total))
    # Orient ΔW as PEFT's B @ A: (out, in) for Linear; transposed for Conv1D and Embedding.
    m = delta.T if op.kind in ("conv1d", "embedding") else delta.reshape(delta.shape[0], -1)
    lr = factorize(m, rank=rank, energy=energy, max_rank=max_rank, solver=solver,
                   seed=seed + zlib.crc32(op.name.encode()), total=total)  # ‖m‖² = ‖ΔW‖²: same elements
    a, b = lr.a.to(dtype), lr.b.to(dtype)
    stats = ModuleStats(op.module, op.kind, list(op.shape), lr.rank, lr.kept,
                        relative_error(m, a, b, total=total), lr.solver)
    if op.kind == "conv":
        a, b = a.reshape(lr.rank, *delta.shape[1:]), b[:, :, None, None]
    roles = ("emb_A", "emb_B") if op.kind == "embedding" else ("A", "B")
    outputs = [(saved_key(op.module, roles[0]), a.cpu()), (saved_key(op.module, roles[1]), b.cpu())]
    return Outcome(outputs, OpInfo(op, "lowrank", total, stats))
