"""LN-Tuning: the adapter holds a trained copy of each targeted layer (norms, by default); merging swaps it in.
Not a function of W0: merge returns the saved weight (and bias); unmerge cannot be done from the merged
weight alone (PEFT swaps the kept original back: ln_tuning/layer.py:71 merge, :94 unmerge).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._base import ModuleConfig, Parts, Tuner, f32, need

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LNTuning(Tuner):
    def merge(self, w0: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        return need(parts, "ln_tuning_layers.weight", self.name).reshape(w0.shape)

    def unmerge(self, w: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor | None:
        return None

    def merge_bias(
        self, b0: torch.Tensor, parts: Parts, cfg: ModuleConfig, w0: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        bias = parts.get("ln_tuning_layers.bias")
        return None if bias is None else f32(bias).reshape(b0.shape)


LN_TUNING = LNTuning(
    "ln_tuning",
    ("ln_tuning_layers.weight", "ln_tuning_layers.bias"),
    layers=("norm", "linear", "conv1d", "embedding", "conv"),
    additive=False,
    invertible=False,
    bias=True,
)
