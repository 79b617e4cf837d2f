"""ExtractSettings: extract's options, validated once, carried to the plan, the compute, the report and the card."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

from ...errors import InvalidOptionError
from ...io.dtypes import is_floating, itemsize, parse_dtype_name, safetensors_name, torch_dtype, torch_name
from ...io.layout import parse_size
from ...ops.lowrank import Solver
from .._inputs import NameFilter, check_device

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch

BUDGET_RANK = 256  # with --budget, each module's factors are found up to this rank (or --max-rank)
Embeddings = Literal["lowrank", "full", "skip"]  # embedding changes (and a tied head's) as factors, whole, or left out
Extras = Literal["full", "skip"]  # changed norms, biases and other non-matrix tensors


def _choice(flag: str, value: object, kind: Any) -> None:
    choices = get_args(kind)
    if value not in choices:
        raise InvalidOptionError(f"{flag} {value!r}: choose {', '.join(choices)}")


@dataclass(frozen=True)
class ExtractSettings:
    """How to extract; every field is checked when the object is made (InvalidOptionError, by option name).

    Args:
        rank: a fixed rank for every module (capped by each matrix's own, and reported), or
        energy: per module, the smallest rank keeping this share of ‖ΔW‖² (capped by ``max_rank``); with
            ``budget``, a floor per module.
        budget: a size ("15MB", in ``dtype``) or a number of parameters (int) for the whole adapter, spent
            where it removes the most squared error (each module up to ``max_rank``, default BUDGET_RANK).
        include / exclude: regexes on tensor names (re.search) choosing what is compared.
        embeddings: embedding changes as LoRA factors ("lowrank"), stored whole ("full"), or left out.
        extras: changed norms, biases and other non-matrix tensors: stored whole, or left out.
        solver: "randomized" (block Krylov), "exact" (full SVD), or "auto" (exact where that is cheaper).
        seed: of the randomized solver (same seed, same adapter).
        dtype: of the LoRA factors (tensors stored whole keep the fine-tune's dtype).
        device: where the SVDs run ("cpu", "cuda", "cuda:N").
        allow_nonfinite: go on past NaN/Inf in a change instead of stopping.
    """

    rank: int | None = None
    energy: float | None = None
    max_rank: int | None = None
    budget: str | int | None = None  # a size in bytes ("15MB") or, as an int, a number of parameters
    for_: str | None = None  # vllm | llama.cpp: the adapter as that consumer computes it (extract.profile)
    include: str | None = None
    exclude: str | None = None
    embeddings: Embeddings = "lowrank"
    extras: Extras = "full"
    solver: Solver = "auto"
    seed: int = 0
    dtype: torch.dtype | str = "float32"  # kept as its safetensors name once checked (factor_dtype: torch's)
    device: str = "cpu"
    allow_nonfinite: bool = False
    names: NameFilter = field(init=False, repr=False, compare=False)
    budget_flag: str = field(init=False, repr=False, compare=False)  # the budget's option: a number is --budget-params

    def __post_init__(self) -> None:
        rank, energy, max_rank = self.rank, self.energy, self.max_rank
        flag = "--budget-params" if isinstance(self.budget, int) else "--budget"
        object.__setattr__(self, "budget_flag", flag)
        if rank is not None and (energy is not None or self.budget is not None):
            raise InvalidOptionError(f"--rank gives every module one rank: it goes with neither --energy nor {flag}")
        if rank is None and energy is None and self.budget is None:
            raise InvalidOptionError("give --rank N, --energy F or --budget SIZE")
        if rank is not None and (not isinstance(rank, int) or rank < 1):
            raise InvalidOptionError(f"--rank must be at least 1, got {rank}")
        if energy is not None and not 0.0 < energy <= 1.0:
            raise InvalidOptionError(f"--energy must be in (0, 1], got {energy}")
        if max_rank is not None and rank is not None:
            raise InvalidOptionError(
                f"--max-rank caps the ranks --energy chooses; with --rank {rank} every module gets rank "
                f"{rank} (or its matrix's own, if smaller): drop --max-rank, or use --energy"
            )
        if max_rank is not None and max_rank < 1:
            raise InvalidOptionError(f"--max-rank must be at least 1, got {max_rank}")
        _choice("--solver", self.solver, Solver)
        _choice("--embeddings", self.embeddings, Embeddings)
        _choice("--extras", self.extras, Extras)
        try:
            dtype = parse_dtype_name(self.dtype) if isinstance(self.dtype, str) else safetensors_name(self.dtype)
        except ValueError as exc:
            raise InvalidOptionError(f"--dtype: {exc}") from None
        if not is_floating(dtype):
            raise InvalidOptionError(f"--dtype must be a floating dtype, not {torch_name(dtype)}")
        check_device(self.device)
        if self.for_ not in (None, "vllm", "llama.cpp"):
            raise InvalidOptionError(f"unknown --for {self.for_!r}: choose vllm or llama.cpp")
        object.__setattr__(self, "dtype", dtype)
        if self.budget is not None:
            try:
                params = self.budget if isinstance(self.budget, int) else parse_size(self.budget) // itemsize(dtype)
            except ValueError as exc:
                raise InvalidOptionError(f"{flag} {self.budget!r}: {exc}") from None
            if params < 1:
                raise InvalidOptionError(f"{flag} must hold at least one parameter, got {self.budget!r}")
            object.__setattr__(self, "budget", params)
        object.__setattr__(self, "names", NameFilter.parse(self.include, self.exclude))

    @property
    def budget_params(self) -> int | None:
        assert self.budget is None or isinstance(self.budget, int)  # made a count in __post_init__
        return self.budget

    @property
    def factor_dtype(self) -> torch.dtype:
        assert isinstance(self.dtype, str)  # made a name in __post_init__
        return torch_dtype(self.dtype)

    def method(self) -> dict[str, Any]:
        """The ``method`` of extract_report.json and the model card."""
        return {
            "rank": self.rank,
            "energy": self.energy,
            "max_rank": self.max_rank,
            "budget_params": self.budget_params,
            "for": self.for_,
            "solver": self.solver,
            "seed": self.seed,
            "dtype": torch_name(self.dtype).removeprefix("torch."),
            "embeddings": self.embeddings,
            "extras": self.extras,
        }
