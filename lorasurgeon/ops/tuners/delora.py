"""DeLoRA: a LoRA whose rank-one terms are normalized and bounded, scaled by the base's column norms. Additive:

    ΔW = (B @ diag(λ / r / (‖Aᵢ‖·‖Bⁱ‖)) @ A) ⊙ w_norm[None, :]    (norms clamped at 1e-4)

``delora_w_norm`` (‖W0‖ per input column, taken when the adapter was made) is saved with the adapter and used
as saved. peft/tuners/delora/layer.py: _compute_delta (:64), merge (:173: ``W += ΔW``), unmerge (:214);
r by rank_pattern (delora/model.py:75).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._base import ModuleConfig, Parts, Shapes, Tuner, need, pattern_value

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch


@dataclass(frozen=True)
class DeLoRA(Tuner):
    def _config(self, raw: Mapping[str, Any], module_name: str, parts_shapes: Shapes) -> dict[str, Any]:
        return {"r": int(pattern_value(raw, "rank_pattern", module_name, "r"))}

    def delta_weight(self, shape: tuple[int, ...], parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        a, b = need(parts, "delora_A", self.name), need(parts, "delora_B", self.name)
        lam, w_norm = need(parts, "delora_lambda", self.name), need(parts, "delora_w_norm", self.name)
        a_norm = torch.clamp(a.norm(dim=1), min=1e-4)
        b_norm = torch.clamp(b.norm(dim=0), min=1e-4)
        diag = torch.diag_embed(lam / cfg["r"] / (a_norm * b_norm))
        delta: torch.Tensor = b @ diag @ a
        return delta * w_norm.unsqueeze(0)


DELORA = DeLoRA("delora", ("delora_A", "delora_B", "delora_lambda", "delora_w_norm"))
