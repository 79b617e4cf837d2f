"""SHiRA: a sparse ΔW, the saved values at the saved (row, column) indices, times scaling (1.0 unless changed
at inference with set_scale, which is not saved). Additive.

peft/tuners/shira/layer.py: update_layer (scaling = 1.0), get_delta_weight (:210: a sparse COO tensor
(out, in) of ``shira_weight · scaling`` at ``shira_indices``), merge (:158: ``W += ΔW``), unmerge (:198);
shira/model.py:160 saves shira_indices (as float32 on Windows; integers otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._base import ModuleConfig, Parts, Tuner, need

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch


@dataclass(frozen=True)
class SHiRA(Tuner):
    def delta_weight(self, shape: tuple[int, ...], parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        values = need(parts, "shira_weight", self.name) * float(cfg.get("scaling", 1.0))
        indices = parts["shira_indices"].to(torch.long)
        dense = torch.zeros(shape, dtype=torch.float32)
        return dense.index_put_((indices[0], indices[1]), values, accumulate=True)


SHIRA = SHiRA("shira", ("shira_weight", "shira_indices"))
