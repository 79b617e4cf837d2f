"""extract --budget: each module's factors found up to a cap (the first pass), then the ranks that keep the most
of ‖ΔW‖² within the budget (ops.lowrank.allocate, resize's allocator too), the whole tensors stored charged first.

The factors are A = √S·Vᵀ and B = U·√S, so row j of A and column j of B hold σⱼ between them
(σⱼ² = ‖Aⱼ‖²·‖Bⱼ‖², ``compute.stored_spectrum``) and their first k rows/columns are the rank-k factors of the same
SVD: the finishing pass cuts them there (``assemble.CutOp``), with ‖ΔW − B_k A_k‖² = ‖ΔW‖² − Σ_{j<k} σⱼ². This
decides the ranks from the first pass's results and the headers; it reads no tensor.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ...adapter.names import saved_key
from ...errors import InvalidOptionError
from ...io.checkpoint import Checkpoint
from ...io.dtypes import itemsize
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
    if settings.calibration is not None and settings.budget_flag == "--budget":  # a size bounds the file
        fixed += header_params(infos, [k for pair in keys for k in pair], factors, settings)
    spectra, costs, floors = [], [], []
    for info, (a_key, b_key) in zip(lowrank, keys, strict=True):
        s = info.spectrum
        assert s is not None  # compute_extract gives it under --budget
        a_shape, b_shape = factors.info(a_key).shape, factors.info(b_key).shape
        spectra.append(s)
        costs.append(math.prod(a_shape[1:]) + b_shape[0])
        energy = float(info.curves.output[0]) if info.curves is not None else info.energy  # what s measures
        floor = 1 if settings.energy is None else rank_for_energy(s, energy, settings.energy)
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
        assert info.stats is not None
        if info.curves is not None:  # calibrated: its weight and output errors at k, measured in the first pass
            stats = info.curves.stats(info.stats, k, info.energy)
        else:
            kept = float(torch.sum(s[:k] ** 2)) / info.energy if info.energy else 1.0
            stats = dataclasses.replace(info.stats, rank=k, kept=kept, rel_error=math.sqrt(max(0.0, 1.0 - kept)))
        out[id(info)] = dataclasses.replace(info, stats=stats)
    spent = fixed + sum(k * c for k, c in zip(ranks, costs, strict=True))
    by = " by output error on the calibration samples" if settings.calibration is not None else ""
    note = (
        f"{settings.budget_flag} {budget:,} parameters{by}: {spent:,} used, {fixed:,} of them by whole tensors"
        f"{' and the header' if settings.calibration is not None and settings.budget_flag == '--budget' else ''}; "
        f"ranks {min(ranks, default=0)}..{max(ranks, default=0)} across {len(ranks)} modules"
    )
    return [out[id(i)] for i in infos], note


def header_params(
    infos: Sequence[OpInfo], factor_keys: Sequence[str], factors: Factors, settings: ExtractSettings
) -> int:
    """An upper bound of the adapter file's header (safetensors: 8 bytes of length, then a JSON entry per tensor --
    its name, dtype, shape and offsets), in parameters of the factors' dtype: what a size budget (--budget 15MB)
    must leave for it so that the *file* stays within the size. Every number written is bounded by the budget's
    bytes, every name by its key here and PEFT's prefixes."""
    assert settings.budget_params is not None
    digits = len(str(settings.budget_params * itemsize(str(settings.dtype))))
    names = [*factor_keys, *(n for n in factors.names() if n not in set(factor_keys))]
    names += [f"base_model.model.{i.op.name}.modules_to_save" for i in infos if i.status == "full"]
    entry = len('"":{"dtype":"","shape":[,,,],"data_offsets":[,]},') + 4 + 6 * digits + 24  # 4-D, PEFT's prefixes
    size = 8 + len('{"__metadata__":{"format":"pt"}}') + 7 + sum(len(json.dumps(n)) + entry for n in names)
    return -(-size // itemsize(str(settings.dtype)))
