"""extract --calibration: each module's factors chosen by what its error costs on the calibration samples, not by
‖ΔW‖.

A module's error E = ΔW − BA costs, to second order and with K-FAC's independence (``calibration.backward``),
‖Lrᵀ·E·Lc‖² with Lc Lcᵀ = Gc + λI (Gc = E[x xᵀ] of its inputs, ``calibration.layerwise``) and Lr Lrᵀ = Gr + λI
(Gr = E[g gᵀ] of the loss gradient at its output): the truncated SVD of Lrᵀ·ΔW·Lc mapped back is its optimum
(``ops.whitened``), and its σⱼ² are each component's gain -- the units ``--budget`` compares modules in. Input
whitening alone (Gr = I, ``Calibration(fisher=False)``) lowered each module's output error and still lost end to end
on a SmolLM2-shaped fine-tune (docs/benchmarks.md): the output side is what tells which directions the layers after
a module respond to. An embedding's inputs are one-hot: Gc is the diagonal of its tokens' frequencies, Gr the
gradients' at its output. A tied embedding and head share one change, stored once (PEFT's ensure_weight_tying):
its rows weighted by the head's input moment H, each vocabulary row by F(v) + α·p(v) -- the head's Fisher diagonal,
and how often the embedding reads it, its gradients' moment taken as H scaled to its trace (α) so that the two
costs make one Kronecker product (without the backward: 1 + V·p(v)).

For the report, the plain SVD's output error at every rank is measured too (``Whitening.plain_errors``), and the
factors' ‖ΔW − B_k A_k‖² at every rank (``errors_by_rank``), so that ``--budget`` can say both once it has chosen.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...calibration import embedding_moments, linear_moments, whitening_of
from ...calibration.layerwise import Gathered
from ...engine.plan import Ref
from ...ops.lowrank import rank_for_energy, top_singular
from ...ops.whitened import errors_by_rank
from .plan import ExtractOp
from .report import ModuleStats, OutputError
from .settings import BUDGET_RANK, ExtractSettings

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch

TIED_NOTE = (
    "the head is tied to the embedding: their one change is stored once, as the embedding's factors, "
    "and the config asks PEFT to tie them (ensure_weight_tying)"
)


@dataclass(frozen=True)
class Curves:
    """What --budget needs of a calibrated module, per rank k = 0..cap (float64): the output error the whitened
    factors leave (``output``), the plain SVD's (``plain``), and ‖ΔW − B_k A_k‖² of the whitened factors."""

    output: torch.Tensor
    plain: torch.Tensor
    weight: torch.Tensor

    def stats(self, base: ModuleStats, k: int, energy: float) -> ModuleStats:
        """``base`` at rank k: its share of ‖ΔW‖², relative error and output errors there."""
        left = float(self.weight[k])
        kept = 1.0 - left / energy if energy else 1.0
        output = OutputError(float(self.output[0]), float(self.output[k]), float(self.plain[k]))
        return dataclasses.replace(
            base, rank=k, kept=max(0.0, kept), rel_error=(left / energy) ** 0.5 if energy else 0.0, output=output
        )


def factor_calibrated(
    op: ExtractOp,
    m: torch.Tensor,
    w: torch.Tensor,
    tensors: Mapping[Ref, torch.Tensor],
    settings: ExtractSettings,
    energy: float,
) -> tuple[torch.Tensor, torch.Tensor, ModuleStats, Curves]:
    """ΔW as PEFT orients it (``m``) -> the factors best on the calibration inputs (float64), its stats at the rank
    chosen (--rank, --energy of the output error, or the cap under --budget), and the per-rank curves."""
    assert op.moments is not None
    whitening = whitening_of(op.moments, tensors, m.device)
    mw = whitening.whiten(m)
    total = float(mw.square().sum())
    signal = float(whitening.whiten(w.to(m.device)).square().sum()) or 1.0  # E‖W·x‖²: errors are relative to it
    budget = settings.budget_params is not None
    cap = min(settings.max_rank or BUDGET_RANK, *m.shape) if budget else None
    seed = settings.seed + zlib.crc32(op.name.encode())
    u, s, vh, _, kind = top_singular(
        mw,
        rank=cap if budget else settings.rank,
        energy=None if budget else settings.energy,
        max_rank=None if budget else settings.max_rank,
        solver=settings.solver,
        seed=seed,
        total=total,
    )
    full = min(m.shape)
    if budget:
        r = min(len(s), full)
    elif settings.rank is not None:
        r = min(settings.rank, full, len(s))
    else:
        assert settings.energy is not None
        r = min(rank_for_energy(s, total, settings.energy), settings.max_rank or full, len(s))
    s64 = s[:r].to(torch.float64)
    root = s64.sqrt()
    a, b = whitening.factors(root[:, None] * vh[:r].to(torch.float64), u[:, :r].to(torch.float64) * root)
    pu, ps, pvh, _, _ = top_singular(m, rank=max(r, 1), solver=settings.solver, seed=seed)
    zero = torch.zeros(1, dtype=torch.float64, device=s64.device)
    output = (total - torch.cat([zero, (s64**2).cumsum(0)])).clamp_min(0.0) / signal
    plain = whitening.plain_errors(mw, pu[:, :r], ps[:r], pvh[:r])[: r + 1] / signal
    curves = Curves(output, plain, errors_by_rank(m, b, a))
    base = ModuleStats(op.module, op.kind, list(op.shape), r, 0.0, 0.0, kind, energy, [float(x) for x in s64[:16]])
    return a, b, curves.stats(base, r, energy), curves


def calibrate_ops(
    ops: list[ExtractOp], gathered: Gathered, head: str | None, tie: bool
) -> tuple[list[ExtractOp], list[str], bool]:
    """The ops given where their statistics are (the moments spool is the engine's input 2): each linear module
    the model ran, each embedding (its token counts); with ``tie`` (a head tied to the embedding in both
    checkpoints, written for PEFT) the head's op left out and its input moment weighing the embedding's rows.
    Returns the ops, notes, and whether the tied pair is stored once."""
    moments = gathered.moments
    embedding = next((o for o in ops if o.kind == "embedding" and o.shape[0] == gathered.vocab), None)
    head_op = next((o for o in ops if o.name == head and o.kind == "linear"), None)
    once = tie and embedding is not None and head_op is not None and head_op.module in moments
    out, plain = [], []
    for op in ops:
        if once and op is head_op:
            continue
        found = linear_moments(gathered, op.module, 2) if op.kind in ("linear", "conv1d") else None
        if found is not None:
            op = dataclasses.replace(op, moments=found)
        elif op is embedding:
            tied = head_op.module if once and head_op is not None else None
            op = dataclasses.replace(op, moments=embedding_moments(gathered, 2, tied))
        elif op.kind in ("linear", "conv1d", "embedding", "conv", "experts"):
            plain.append(op.name)
        out.append(op)
    notes = [TIED_NOTE] if once else []
    if plain:
        notes.append(
            f"{len(plain)} matrices the calibration run does not reach (e.g. {plain[0]}): factored by ‖ΔW‖ where "
            "they changed"
        )
    return out, notes, once
