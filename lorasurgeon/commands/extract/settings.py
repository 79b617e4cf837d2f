"""ExtractSettings: extract's options, validated once, carried to the plan, the compute, the report and the card."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

from ...calibration import Calibration, calibration_of
from ...consumers import consumer
from ...engine.devices import check_cluster
from ...errors import InvalidOptionError
from ...io.dtypes import is_floating, itemsize, parse_dtype_name, safetensors_name, torch_dtype, torch_name
from ...ops.lowrank import Solver
from .._inputs import NameFilter, check_device
from ..sizing import BUDGET_RANK as BUDGET_RANK  # with --budget, each module's factors are found up to this rank
from ..sizing import NOTHING_GIVEN, SizedBy, Sizing

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch

Embeddings = Literal["lowrank", "full", "skip"]  # embedding changes (and a tied head's) as factors, whole, or left out
Extras = Literal["full", "skip"]  # changed norms, biases and other non-matrix tensors


def _choice(flag: str, value: object, kind: Any) -> None:
    choices = get_args(kind)
    if value not in choices:
        raise InvalidOptionError(f"{flag} {value!r}: choose {', '.join(choices)}")


@dataclass(frozen=True)
class ExtractSettings(SizedBy):
    """How to extract. Make it with :meth:`parse` (the options as the CLI and :func:`extract` take them); every
    field is checked when the object is made (InvalidOptionError, by option name).

    Args:
        sizing: the ranks (``Sizing.parse``): a fixed rank for every module (capped by each matrix's own, and
            reported), or per module the smallest rank keeping a share of ‖ΔW‖² (capped by ``max_rank``), or a
            budget: a size ("15MB", in ``dtype``) or a number of parameters for the whole adapter, spent where it
            removes the most squared error (each module up to ``max_rank``, default BUDGET_RANK), with the
            energy, if given, as a floor per module.
        include / exclude: regexes on tensor names (re.search) choosing what is compared.
        embeddings: embedding changes as LoRA factors ("lowrank"), stored whole ("full"), or left out.
        extras: changed norms, biases and other non-matrix tensors: stored whole, or left out.
        solver: "randomized" (block Krylov), "exact" (full SVD), or "auto" (exact where that is cheaper).
        seed: of the randomized solver (same seed, same adapter).
        dtype: of the LoRA factors (tensors stored whole keep the fine-tune's dtype).
        device: where the SVDs run ("cpu", "cuda", "cuda:N").
        allow_nonfinite: go on past NaN/Inf in a change instead of stopping.
        plot: a picture of the result to write once the adapter is (.png, .pdf, .svg).
        to: the adapter format it is written in (peft, mlx, kohya, diffusers).
        conv_rank: a fixed rank for every k×k convolution (kernel above 1×1: a UNet's resnets, LoCon in kohya's
            files), whatever the sizing says for the rest; 0 leaves their changes out (reported as skipped);
            None: sized like every other module. kohya's extract_lora_from_models.py ``--conv_dim``.
        calibration: samples to run the model on (``calibration.Calibration``): each linear module and embedding
            factored, and a budget spent, by the output error on them instead of ‖ΔW‖.
        cluster: "ray": each layer's modules factored by a Ray task (engine.cluster), the rest in this process.
    """

    sizing: Sizing
    for_: str | None = None  # a consumer's name (consumers.CONSUMERS): the adapter as it computes it (extract.profile)
    include: str | None = None
    exclude: str | None = None
    embeddings: Embeddings = "lowrank"
    extras: Extras = "full"
    solver: Solver = "auto"
    seed: int = 0
    dtype: torch.dtype | str = "float32"  # kept as its safetensors name once checked (factor_dtype: torch's)
    device: str = "cpu"
    allow_nonfinite: bool = False
    plot: str | os.PathLike[str] | None = None
    to: str = "peft"  # the adapter format written (adapter.formats.registry.writable(): kohya's is one file)
    conv_rank: int | None = None
    calibration: Calibration | None = None  # --calibration: factors chosen by output error on data
    cluster: str | None = None  # "ray": the first pass's groups of modules (a layer each) as Ray tasks
    names: NameFilter = field(init=False, repr=False, compare=False)
    budget_params: int | None = field(init=False, repr=False, compare=False)  # the budget in parameters of dtype

    @classmethod
    def parse(
        cls,
        *,
        rank: int | None = None,
        energy: float | None = None,
        budget: str | int | None = None,
        budget_params: int | None = None,
        max_rank: int | None = None,
        calibration: str | os.PathLike[str] | Calibration | None = None,
        calibration_samples: int | None = None,
        max_length: int | None = None,
        calibration_split: str | None = None,
        calibration_column: str | None = None,
        calibration_model: str | None = None,
        **options: Any,
    ) -> ExtractSettings:
        """Validated settings: the sizing options by extract's rules (a budget's ranks capped at BUDGET_RANK
        unless ``max_rank``, an energy with a budget a floor per module), the calibration's options (each only
        with ``calibration``), ``options`` the other fields."""
        calibration = calibration_of(
            calibration, calibration_samples, max_length, calibration_split, calibration_column, calibration_model
        )
        sizing = Sizing.parse(
            rank=rank,
            energy=energy,
            budget=budget,
            budget_params=budget_params,
            max_rank=max_rank,
            default_max_rank=BUDGET_RANK,
            energy_floors=True,
        )
        return cls(sizing, calibration=calibration, **options)

    def __post_init__(self) -> None:
        if self.sizing.exact:  # Sizing.parse(required=True) says so first; a Sizing made by hand may not
            raise InvalidOptionError(NOTHING_GIVEN)
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
        check_cluster(self.cluster, self.device)
        if self.conv_rank is not None and (isinstance(self.conv_rank, bool) or not isinstance(self.conv_rank, int)):
            raise InvalidOptionError(f"--conv-rank must be a whole number, not {self.conv_rank!r}")
        if self.conv_rank is not None and self.conv_rank < 0:
            raise InvalidOptionError(f"--conv-rank must be 0 (k×k convolutions left out) or more: {self.conv_rank}")
        from ...adapter.formats.registry import writable  # the registry, only to check the name

        if self.to not in writable():
            raise InvalidOptionError(f"--to {self.to}: lorasurgeon writes adapters as {', '.join(writable())}")
        if self.for_ is not None:
            consumer(self.for_, "--for")  # an unknown name refused by name
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "budget_params", self.sizing.budget_params(itemsize(dtype)))
        object.__setattr__(self, "names", NameFilter.parse(self.include, self.exclude))

    @property
    def budget_flag(self) -> str:
        """The budget's option: --budget (a size) or --budget-params (a number)."""
        return self.sizing.flag

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
            "conv_rank": self.conv_rank,
        } | ({"calibration": self.calibration.method()} if self.calibration is not None else {})

    def fixed_rank(self, kind: str, shape: Sequence[int]) -> int | None:
        """The rank --conv-rank fixes for a module of this kind and weight shape (a k×k convolution's), or None:
        sized as the sizing says."""
        if self.conv_rank is None or not is_kxk_conv(kind, shape):
            return None
        return self.conv_rank


def is_kxk_conv(kind: str, shape: Sequence[int]) -> bool:
    """A convolution with a kernel above 1×1 (kohya's LoCon modules: a 1×1 one is a plain LoRA's)."""
    return kind == "conv" and len(shape) == 4 and shape[2] * shape[3] > 1
