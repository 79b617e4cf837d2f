"""What resize and combine report: per module the ranks in and out and the share of ‖ΔW‖² kept
(``ResizeReport.to_dict()`` is resize_report.json)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...words import plural
from ..extract.report import OutputError


@dataclass(frozen=True)
class ModuleResult:
    name: str
    rank_in: int  # Σ of the input adapters' ranks
    rank: int  # kept
    kept: float  # share of ‖ΔW‖² kept
    energy: float  # ‖ΔW‖²
    output: OutputError | None = None  # --calibration only: output errors on the samples, as extract reports them


@dataclass(frozen=True)
class ResizeReport:
    """What resize / combine did; ``to_dict()`` is resize_report.json."""

    output: str | None
    inputs: list[str]
    weights: list[float]
    method: dict[str, Any]
    modules: list[ModuleResult]
    parameters_in: int
    parameters: int
    kept: float  # Σ kept σ² / Σ ‖ΔW‖² over all modules
    dry_run: bool = False
    copied: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # --calibration: what was measured, and how

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        out = asdict(self)
        for module in out["modules"]:
            if module["output"] is None:  # without --calibration, resize_report.json is as it was
                del module["output"]
        if not out["notes"]:
            del out["notes"]
        return out

    def summary(self) -> str:
        head = f"{'Would write' if self.dry_run else 'Wrote'} {self.output}: {plural(len(self.modules), 'module')}"
        if self.dry_run:
            return head + f", {self.parameters_in:,} LoRA parameters in ({', '.join(self.inputs)})"
        lines = [
            f"{head}, {self.parameters:,} LoRA parameters (from {self.parameters_in:,}), "
            f"{100 * self.kept:.2f}% of ‖ΔW‖² kept"
            + (f"; {plural(len(self.copied), 'tensor')} copied" if self.copied else "")
        ]
        ranks = sorted({(m.rank_in, m.rank) for m in self.modules})
        lines.append("  ranks (in -> out): " + ", ".join(f"{a}->{b}" for a, b in ranks[:12]))
        outputs = [m.output for m in self.modules if m.output is not None]
        if outputs:
            ours, plain = sum(o.after for o in outputs), sum(o.plain_svd for o in outputs)
            lines.append(
                f"  output error on the samples (Σ over modules, relative to E‖W·x‖², both weighed by the calibration "
                f"weight): {ours:.4g} calibrated, {plain:.4g} by the plain SVD at the same ranks"
            )
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)
