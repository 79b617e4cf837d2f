"""resize and combine's target: the Sizing asked for, its budget counted in parameters of the adapter's dtype."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..sizing import SizedBy, Sizing


@dataclass(frozen=True)
class Target(SizedBy):
    """How many components to keep (``sizing``: one of rank, energy, budget; none keeps them all), with the
    budget in parameters once the adapter's dtype is known."""

    sizing: Sizing
    budget: int | None = None  # parameters

    @classmethod
    def of(cls, sizing: Sizing, itemsize: int) -> Target:
        """``sizing`` with a --budget in bytes counted in parameters of ``itemsize`` bytes."""
        return cls(sizing, sizing.budget_params(itemsize))

    @property
    def exact(self) -> bool:
        return self.sizing.exact

    def method(self) -> dict[str, Any]:
        """The ``method`` of resize_report.json and the card: the options given (the budget in parameters),
        or ``{"exact": True}``."""
        found = {"rank": self.rank, "energy": self.energy, "budget": self.budget, "max_rank": self.max_rank}
        return {k: v for k, v in found.items() if v is not None} or {"exact": True}
