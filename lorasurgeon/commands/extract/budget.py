"""extract --budget: each module's factors found up to a cap (the first pass), then the ranks that keep the most
of ‖ΔW‖² within the budget (ops.lowrank.allocate, resize's allocator too), the whole tensors stored charged first.

The factors are A = √S·Vᵀ and B = U·√S, so row j of A and column j of B hold σⱼ between them
(σⱼ² = ‖Aⱼ‖²·‖Bⱼ‖², ``compute.stored_spectrum``) and their first k rows/columns are the rank-k factors of the same
SVD: the finishing pass cuts them there (``assemble.CutOp``), with ‖ΔW − B_k A_k‖² = ‖ΔW‖² − Σ_{j<k} σⱼ². This
decides the ranks from the first pass's results and the headers; it reads no tensor.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ...adapter.names import saved_key
from ...errors import InvalidOptionError
from ...io.checkpoint import Checkpoint
from ...ops.lora import LAYER_KINDS
from ...ops.lowrank import OverBudget, allocate, rank_for_energy
from .assemble import Factors
from .report import OpInfo
from .settings import ExtractSettings

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch


def spend(
    infos: Sequence[OpInfo], factors: Factors, tuned: Checkpoint, settings: ExtractSettings
) -> tuple[list[OpInfo], str]:
    """The infos with each low-rank module's rank its share of ``settings.budget`` (what the finishing pass cuts
    its factors to); and a note saying how the budget was spent.

    Raises:
        InvalidOptionError: the budget does not hold the whole tensors and rank 1 (or the --energy floors).
    """
    budget = settings.budget_params
    assert budget is not None
    lowrank = [
        i
        for i in infos
        if i.status == "lowrank" and i.stats is not None and i.op.experts is None
        and settings.fixed_rank(i.op.kind, i.op.shape) is None  # --conv-rank's: charged whole, as stored
    ]  # fmt: skip
    keys = [tuple(saved_key(i.op.module, role) for role in LAYER_KINDS[i.op.kind].lora_roles) for i in lowrank]
    factored = {k for pair in keys for k in pair}
    fixed = sum(math.prod(factors.info(n).shape) for n in factors.names() if n not in factored)  # lora_B.bias
    fixed += sum(tuned.info(i.op.tuned.key).numel for i in infos if i.status == "full")  # stored whole
    spectra, costs, floors = [], [], []
    for info, (a_key, b_key) in zip(lowrank, keys, strict=True):
        s = info.spectrum
        assert s is not None  # compute_extract gives it under --budget
        a_shape, b_shape = factors.info(a_key).shape, factors.info(b_key).shape
        spectra.append(s)
        costs.append(math.prod(a_shape[1:]) + b_shape[0])
        floor = 1 if settings.energy is None else rank_for_energy(s, info.energy, settings.energy)
        floors.append(min(floor, len(s)))
    try:
        ranks = allocate(spectra, costs, budget - fixed, floors, [len(s) for s in spectra])
    except OverBudget as short:
        raise InvalidOptionError(
            f"{settings.budget_flag} of {budget:,} parameters is less than the {fixed + short.need:,} that the whole "
            f"tensors and {'the --energy floors' if settings.energy is not None else 'rank 1 for every module'} need"
        ) from None
    out = {id(i): i for i in infos}
    for info, s, k in zip(lowrank, spectra, ranks, strict=True):
        kept = float(torch.sum(s[:k] ** 2)) / info.energy if info.energy else 1.0
        assert info.stats is not None
        stats = dataclasses.replace(info.stats, rank=k, kept=kept, rel_error=math.sqrt(max(0.0, 1.0 - kept)))
        out[id(info)] = dataclasses.replace(info, stats=stats)
    spent = fixed + sum(k * c for k, c in zip(ranks, costs, strict=True))
    note = (
        f"{settings.budget_flag} {budget:,} parameters: {spent:,} used, {fixed:,} of them by whole tensors; ranks "
        f"{min(ranks, default=0)}..{max(ranks, default=0)} across {len(ranks)} modules"
    )
    return [out[id(i)] for i in infos], note
