"""ResizeSettings: resize and combine's options, validated once; Target: the Sizing asked for, its budget counted
in parameters of the adapter's dtype."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...calibration import Calibration, calibration_of
from ...consumers import Consumer, consumer
from ...engine.devices import check_cluster
from ...errors import InvalidOptionError
from .._inputs import adapter_weights
from ..sizing import SizedBy, Sizing


@dataclass(frozen=True)
class ResizeSettings(SizedBy):
    """How to resize one adapter or combine several. Make it with :meth:`parse`, which checks every option by name.

    Args:
        sizing: how many components each module keeps (none given, with combine: every one, exactly).
        weights: one per adapter.
        combining: combine (several adapters, a weighted sum) rather than resize (one).
        for_: a consumer's name: what it needs made, or refused by name.
        allow_different_bases: combine adapters whose configs name different base models.
        device: where the QR and SVDs run.
        base: the base model a llama.cpp .gguf adapter among the inputs is read against (--base; None: none).
        cluster: "ray": the modules' new factors computed by Ray tasks, a layer's modules each (engine.cluster).
    """

    sizing: Sizing
    weights: tuple[float, ...]
    combining: bool = False
    for_: str | None = None
    allow_different_bases: bool = False
    device: str = "cpu"
    base: str | os.PathLike[str] | None = None
    calibration: Calibration | None = None  # --calibration (with --base): factors best on the samples
    cluster: str | None = None  # "ray": the second pass's groups of modules (a layer each) as Ray tasks

    @classmethod
    def parse(
        cls,
        *,
        adapters: int,
        combining: bool = False,
        weights: Sequence[float] | None = None,
        rank: int | None = None,
        energy: float | None = None,
        budget: str | int | None = None,
        budget_params: int | None = None,
        max_rank: int | None = None,
        for_: str | None = None,
        allow_different_bases: bool = False,
        device: str = "cpu",
        base: str | os.PathLike[str] | None = None,
        calibration: str | os.PathLike[str] | Calibration | None = None,
        calibration_samples: int | None = None,
        max_length: int | None = None,
        calibration_split: str | None = None,
        calibration_column: str | None = None,
        calibration_model: str | None = None,
        cluster: str | None = None,
    ) -> ResizeSettings:
        """Validated settings for ``adapters`` adapters (InvalidOptionError naming the option otherwise); the
        calibration's options only with ``calibration``, which needs ``base`` (the model run on the samples) and a
        target (without one, combine's stacked factors are exact: there is nothing to choose)."""
        sizing = Sizing.parse(
            rank=rank,
            energy=energy,
            budget=budget,
            budget_params=budget_params,
            max_rank=max_rank,
            required=not combining,
        )
        if for_ is not None:
            consumer(for_, "--for")
        if combining and adapters < 2:
            raise InvalidOptionError("combine takes two adapters or more (resize takes one)")
        chosen = adapter_weights(weights, adapters)
        cal = calibration_of(
            calibration, calibration_samples, max_length, calibration_split, calibration_column, calibration_model
        )
        command = "combine" if combining else "resize"
        if cal is not None and base is None:
            raise InvalidOptionError(f"{command} --calibration needs --base BASE: the model run on the samples")
        if cal is not None and sizing.exact:
            raise InvalidOptionError(
                "combine --calibration needs a target (--rank, --energy or --budget): the stacked factors are exact"
            )
        check_cluster(cluster, device)
        return cls(sizing, chosen, combining, for_, allow_different_bases, device, base, cal, cluster)

    @property
    def command(self) -> str:
        return "combine" if self.combining else "resize"

    @property
    def consumer(self) -> Consumer | None:
        """The consumer --for names (None: PEFT's own rules)."""
        return None if self.for_ is None else consumer(self.for_, "--for")


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
