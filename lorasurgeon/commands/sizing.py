"""Sizing: how many singular components a low-rank result keeps (--rank, --energy, --budget or --budget-params,
--max-rank), one set of rules checked once, by option name, for extract, resize and combine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import InvalidOptionError
from ..io.layout import parse_size

BUDGET_RANK = 256  # extract --budget: each module's factors are found up to this rank (or --max-rank)
NOTHING_GIVEN = "give --rank N, --energy F or --budget SIZE (e.g. 15MB)"
BudgetFlag = Literal["--budget", "--budget-params"]


def _flag(budget: object) -> BudgetFlag:
    return "--budget-params" if isinstance(budget, int) else "--budget"


def one_budget(budget: str | int | None, budget_params: int | None) -> str | int | None:
    """The budget given, a size (``budget``) or a number of parameters (``budget_params``, or ``budget`` as an int)."""
    if budget is not None and budget_params is not None:
        raise InvalidOptionError("--budget and --budget-params: give one of them")
    return budget_params if budget_params is not None else budget


@dataclass(frozen=True)
class Sizing:
    """How many components to keep: a rank for every module, an energy share per module, or a budget for all of
    them; none of them (combine): every component. Made by :meth:`parse`, which checks every rule.

    Args:
        rank: the same rank for every module (capped by each matrix's own).
        energy: per module, the smallest rank keeping this share of ‖ΔW‖²; with ``budget`` (where the command
            takes it: extract), a floor per module.
        budget: a size as given ("15MB", in the result's dtype: :meth:`budget_params`), or, as an int, a number
            of parameters (--budget-params): all modules together, spent where it removes the most squared error.
        max_rank: a cap per module on the ranks ``energy`` or ``budget`` choose.
        default_max_rank: the cap of a budget's ranks when ``max_rank`` is not given (extract: BUDGET_RANK);
            None: each module's own rank.
    """

    rank: int | None = None
    energy: float | None = None
    budget: str | int | None = None
    max_rank: int | None = None
    default_max_rank: int | None = None

    @classmethod
    def parse(
        cls,
        *,
        rank: int | None = None,
        energy: float | None = None,
        budget: str | int | None = None,
        budget_params: int | None = None,
        max_rank: int | None = None,
        default_max_rank: int | None = None,
        required: bool = True,
        energy_floors: bool = False,
    ) -> Sizing:
        """The options checked by name (InvalidOptionError).

        ``required``: one of rank, energy and a budget must be given (extract, resize; combine without one is
        exact). ``energy_floors``: energy may go with a budget as a floor per module (extract); otherwise one of
        them."""
        budget = one_budget(budget, budget_params)
        sizing = cls(rank, energy, budget, max_rank, default_max_rank)
        sizing._check_choice(required=required, energy_floors=energy_floors)
        sizing._check_values()
        return sizing

    def _check_choice(self, *, required: bool, energy_floors: bool) -> None:
        """Which options go together."""
        given = [
            f for f, v in (("--rank", self.rank), ("--energy", self.energy), (self.flag, self.budget)) if v is not None
        ]
        if len(given) > 1 and (self.rank is not None or not energy_floors):
            reason = " (--rank gives every module one rank)" if self.rank is not None else ""
            raise InvalidOptionError(f"{' and '.join(given)}: give one of them{reason}")
        if required and not given:
            raise InvalidOptionError(NOTHING_GIVEN)

    def _check_values(self) -> None:
        """Each option's value, and --max-rank against the others."""
        rank, energy, max_rank = self.rank, self.energy, self.max_rank
        if rank is not None and (not isinstance(rank, int) or rank < 1):
            raise InvalidOptionError(f"--rank must be at least 1, got {rank}")
        if energy is not None and not 0.0 < energy <= 1.0:
            raise InvalidOptionError(f"--energy must be in (0, 1], got {energy}")
        if max_rank is not None and rank is not None:
            raise InvalidOptionError(
                f"--max-rank caps the ranks --energy chooses; with --rank {rank} every module gets rank "
                f"{rank} (or its matrix's own, if smaller): drop --max-rank, or use --energy"
            )
        if max_rank is not None and (not isinstance(max_rank, int) or max_rank < 1):
            raise InvalidOptionError(f"--max-rank must be at least 1, got {max_rank}")
        if max_rank is not None and self.exact:
            raise InvalidOptionError(
                "--max-rank caps the ranks --energy or --budget choose: without either, every component is kept; "
                "add one of them, or drop --max-rank"
            )
        if isinstance(self.budget, bool) or not isinstance(self.budget, (str, int, type(None))):
            raise InvalidOptionError(f"--budget {self.budget!r}: give a size (e.g. 15MB) or a number of parameters")
        if isinstance(self.budget, int) and self.budget < 1:
            raise InvalidOptionError(f"--budget-params must hold at least one parameter, got {self.budget!r}")
        if isinstance(self.budget, str):
            try:
                parse_size(self.budget)
            except ValueError as exc:
                raise InvalidOptionError(f"--budget {self.budget!r}: {exc}") from None

    @property
    def flag(self) -> BudgetFlag:
        """The option the budget came by: --budget (a size) or --budget-params (a number of parameters)."""
        return _flag(self.budget)

    @property
    def exact(self) -> bool:
        """No rank, energy or budget: every component kept."""
        return self.rank is None and self.energy is None and self.budget is None

    @property
    def budget_rank(self) -> int | None:
        """The largest rank a budget gives a module: max_rank, else default_max_rank (None: the module's own)."""
        return self.max_rank if self.max_rank is not None else self.default_max_rank

    def budget_params(self, itemsize: int) -> int | None:
        """The budget as a number of parameters, a size counted in parameters of ``itemsize`` bytes."""
        if self.budget is None or isinstance(self.budget, int):
            return self.budget
        params = parse_size(self.budget) // itemsize
        if params < 1:
            raise InvalidOptionError(f"--budget must hold at least one parameter, got {self.budget!r}")
        return params


class SizedBy:
    """For settings that hold a ``sizing`` (extract's, resize's): its rank, energy and max_rank read off it."""

    sizing: Sizing

    @property
    def rank(self) -> int | None:
        return self.sizing.rank

    @property
    def energy(self) -> float | None:
        return self.sizing.energy

    @property
    def max_rank(self) -> int | None:
        return self.sizing.max_rank
