"""resize and combine's target: how many singular components to keep, checked by option name."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import InvalidOptionError
from ...io.layout import parse_size


@dataclass(frozen=True)
class Target:
    """How many components to keep: one of rank, energy, budget (parameters); none keeps them all."""

    rank: int | None = None
    energy: float | None = None
    budget: int | None = None  # parameters
    max_rank: int | None = None

    @classmethod
    def parse(
        cls,
        *,
        rank: int | None,
        energy: float | None,
        budget: str | int | None,
        budget_params: int | None,
        max_rank: int | None,
        itemsize: int,
        required: bool,
    ) -> Target:
        """Checked by option name; a --budget in bytes becomes parameters of ``itemsize`` bytes."""
        given = [n for n, v in (("--rank", rank), ("--energy", energy), ("--budget", budget)) if v is not None]
        given += ["--budget-params"] if budget_params is not None else []
        if len(given) > 1:
            raise InvalidOptionError(f"{' and '.join(given)}: give one of them")
        if required and not given:
            raise InvalidOptionError("give --rank N, --energy F or --budget SIZE (e.g. 15MB)")
        if rank is not None and rank < 1:
            raise InvalidOptionError(f"--rank must be at least 1, got {rank}")
        if energy is not None and not 0 < energy <= 1:
            raise InvalidOptionError(f"--energy must be in (0, 1], got {energy}")
        if max_rank is not None and max_rank < 1:
            raise InvalidOptionError(f"--max-rank must be at least 1, got {max_rank}")
        params = budget_params
        if budget is not None:
            try:
                params = parse_size(budget) // itemsize
            except ValueError as exc:
                raise InvalidOptionError(f"--budget {budget!r}: {exc}") from None
        if params is not None and params < 1:
            raise InvalidOptionError(f"the budget must hold at least one parameter, got {params}")
        return cls(rank, energy, params, max_rank)

    @property
    def exact(self) -> bool:
        return self.rank is None and self.energy is None and self.budget is None
