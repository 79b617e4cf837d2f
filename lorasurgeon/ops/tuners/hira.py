"""HiRA: a Hadamard (element-wise) low-rank update, W' = W + W ⊙ transpose(B @ A, fan_in_fan_out). Neither
additive (ΔW depends on W0) nor inverted by PEFT: its unmerge restores a copy of W0 it kept, so ``unmerge``
returns None (W'/(1 + BA) is undefined where BA = -1).

peft/tuners/hira/layer.py: _merge (:85: ``W + W0 ⊙ Σ ΔH``), _unmerge (:106), Linear.get_delta_weight (:213).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._base import ModuleConfig, Parts, Tuner, f32, need, transpose

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch


@dataclass(frozen=True)
class HiRA(Tuner):
    def merge(self, w0: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        w = f32(w0)
        product = transpose(need(parts, "hira_B", self.name) @ need(parts, "hira_A", self.name), cfg["fan_in_fan_out"])
        hadamard = torch.zeros_like(w) + product
        return w + w * hadamard

    def unmerge(self, w: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor | None:
        return None


HIRA = HiRA("hira", ("hira_A", "hira_B"), layers=("linear", "conv1d"), additive=False, invertible=False)
