"""What an extraction reports: per module, per op, and in total. ``ExtractReport.to_dict()`` is
extract_report.json (its keys are a contract)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ...io.layout import human_bytes
from ...words import plural
from .plan import ExtractOp

if TYPE_CHECKING:
    import torch

    from .calibrated import Curves

# unchanged (equal values) | lowrank (LoRA factors) | bias (a lora_B.bias) | full (stored whole) | skipped
Status = Literal["unchanged", "lowrank", "bias", "full", "skipped"]


@dataclass(frozen=True)
class OutputError:
    """A calibrated module's output error on the calibration inputs, E‖·x‖² relative to its output E‖W·x‖² (W the
    base's; the ridge λ included): of the whole change (``before``), left by the factors stored (``after``), and
    left by the plain SVD's of the same rank (``plain_svd``)."""

    before: float
    after: float
    plain_svd: float


@dataclass(frozen=True)
class ModuleStats:
    name: str
    kind: str  # linear | conv1d | embedding | conv
    shape: list[int]
    rank: int
    kept: float  # fraction of ‖ΔW‖² the factors keep
    rel_error: float  # ‖ΔW − BA‖ / ‖ΔW‖, measured on the factors as stored
    solver: str
    energy: float = 0.0  # ‖ΔW‖²
    sigma: list[float] = field(default_factory=list)  # ΔW's leading singular values, as many as the solver found
    # (--calibration: ΔW·L's, whose squares are output errors)
    output: OutputError | None = None  # --calibration only


@dataclass(frozen=True)
class FullTensor:
    name: str
    reason: str
    parameters: int


@dataclass(frozen=True)
class OpInfo:
    """What computing one extract op found (the engine hands these back)."""

    op: ExtractOp
    status: Status
    energy: float = 0.0  # ‖ΔW‖²
    stats: ModuleStats | None = None
    rounding: float | None = None  # ‖ΔW‖ / (eps · ‖W‖) in the fine-tune's dtype (ops.compare.rounding_units)
    # --budget: the factors' singular values as stored (σⱼ = ‖Aⱼ‖·‖Bⱼ‖, float64), what the budget is spent by
    spectrum: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # --calibration with --budget: the errors at every rank (extract.calibrated.Curves)
    curves: Curves | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class Skipped:
    unchanged: int  # tensors whose values did not change
    excluded: int  # left out by --include / --exclude
    not_stored: list[str]  # changed, but --embeddings skip / --extras skip left them out


@dataclass(frozen=True)
class Totals:
    parameters: int  # in the adapter file
    bytes: int
    kept: float  # share of the fine-tune's Σ‖ΔW‖² the adapter keeps
    change_energy: float  # Σ‖ΔW‖²
    seconds: float
    lorasurgeon: str
    modules_to_save: list[str]


@dataclass(frozen=True)
class ExtractReport:
    """What extract did (or, with dry_run, would compare); ``to_dict()`` is extract_report.json."""

    output: str | None
    base: str
    finetuned: str
    method: dict[str, Any]  # ExtractSettings.method(): rank, energy, max_rank, solver, seed, dtype, ...
    modules: list[ModuleStats]
    full: list[FullTensor]
    skipped: Skipped
    totals: Totals
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the adapter may not be what was meant (rounding noise)
    dry_run: bool = False
    wall: float = 0.0  # the whole call (totals.seconds: the streaming part)
    plot: str | None = None  # the picture drawn, once it is written

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k not in ("dry_run", "wall", "plot")}
        for module in out["modules"]:
            if module["output"] is None:  # calibrated modules only: without --calibration the report is as it was
                del module["output"]
        return out

    def summary(self) -> str:
        if self.dry_run:
            return "\n".join([f"would extract from {self.finetuned} (base {self.base}):"] + self.notes)
        lines = []
        if self.modules:
            width = max(len(m.name) for m in self.modules)
            calibrated = any(m.output is not None for m in self.modules)
            extra = f" {'out.err':>9} {'plain':>9}" if calibrated else ""  # relative to E‖W·x‖², and plain SVD's
            lines.append(f"{'module'.ljust(width)}  {'kind':<9} {'rank':>5} {'kept':>8} {'rel.err':>8}{extra}")
            lines += [
                f"{m.name.ljust(width)}  {m.kind:<9} {m.rank:>5} {m.kept:>8.2%} {m.rel_error:>8.4f}{_output(m)}"
                for m in self.modules
            ]
        lines += [f"stored in full: {f.name} ({f.reason})" for f in self.full]
        outputs = [m.output for m in self.modules if m.output is not None]
        if outputs:
            lines.append(
                f"output error on the calibration samples (out.err: relative to E‖W·x‖², both weighed by the method's "
                f"calibration weight; Σ over modules): "
                f"{sum(o.after for o in outputs):.4g}, against {sum(o.plain_svd for o in outputs):.4g} for the plain "
                "SVD at the same ranks"
            )
        t = self.totals
        lines.append(
            f"Wrote {self.output}: {plural(len(self.modules), 'low-rank module')}, "
            f"{plural(len(self.full), 'full tensor')}, "
            f"{t.parameters:,} parameters ({human_bytes(t.bytes)}); kept {t.kept:.2%} of the "
            f"fine-tune's change; {plural(self.skipped.unchanged, 'tensor')} unchanged; {self.wall or t.seconds:.1f} s."
        )
        if self.skipped.not_stored:
            lines.append(
                f"not stored: {plural(len(self.skipped.not_stored), 'changed tensor')} (the options left them out)"
            )
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"Wrote {self.plot}"] if self.plot else []
        return "\n".join(lines)


def _output(m: ModuleStats) -> str:
    """A calibrated module's output error left, and the plain SVD's at its rank (relative to E‖W·x‖²)."""
    if m.output is None:
        return ""
    return f" {m.output.after:>9.3g} {m.output.plain_svd:>9.3g}"
