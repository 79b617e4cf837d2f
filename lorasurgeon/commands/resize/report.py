"""What resize and combine report: per module the ranks in and out and the share of ‖ΔW‖² kept
(``ResizeReport.to_dict()`` is resize_report.json)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...words import plural


@dataclass(frozen=True)
class ModuleResult:
    name: str
    rank_in: int  # Σ of the input adapters' ranks
    rank: int  # kept
    kept: float  # share of ‖ΔW‖² kept
    energy: float  # ‖ΔW‖²


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

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

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
        return "\n".join(lines)
