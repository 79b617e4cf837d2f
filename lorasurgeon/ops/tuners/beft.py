"""BEFT: a trained bias offset; the weight is untouched. b' = b + beft_bias (1, out) squeezed; unmerge subtracts.
PEFT refuses to merge into a layer without a bias (there is nothing to add it to): so does ``merge_bias``'s
caller, which sees ``bias=True`` and a layer with none.

peft/tuners/beft/layer.py: Linear.merge (:80: ``bias.add_(beft_bias.squeeze())``), unmerge (:122).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._base import ModuleConfig, Parts, Tuner, f32, need

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch


@dataclass(frozen=True)
class BEFT(Tuner):
    def delta_weight(self, shape: tuple[int, ...], parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float32)

    def merge(self, w0: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        return f32(w0).clone()

    def unmerge(self, w: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor | None:
        return f32(w).clone()

    def merge_bias(
        self, b0: torch.Tensor, parts: Parts, cfg: ModuleConfig, w0: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        return f32(b0) + need(parts, "beft_bias", self.name).squeeze()

    def unmerge_bias(
        self, b: torch.Tensor, parts: Parts, cfg: ModuleConfig, w0: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        return f32(b) - need(parts, "beft_bias", self.name).squeeze()


BEFT_TUNER = BEFT("beft", ("beft_bias",), bias=True)
