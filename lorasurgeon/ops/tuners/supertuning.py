"""Super-Tuning: sparse updates at fixed flat positions of W, plus (Supra, when ``r`` is set) a LoRA at α/r.
Additive: W' = W.flatten().scatter_add(indices, values) + (α/r)·(B @ A); unmerge subtracts both.

peft/tuners/supertuning/layer.py: update_layer (:107; :141 Supra's r and lora_alpha), _lora_delta (:187), merge
(:212), unmerge (:241). The positions are in the file (``supertuning_indices``) when
``save_precomputed_indices`` (the default); without them they would be chosen again from the base weight,
which this does not reproduce (``module_config`` refuses).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import UnsupportedError
from ._base import ModuleConfig, Parts, Shapes, Tuner, need

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch


@dataclass(frozen=True)
class SuperTuning(Tuner):
    def _config(self, raw: Mapping[str, Any], module_name: str, parts_shapes: Shapes) -> dict[str, Any]:
        if "supertuning_indices" not in parts_shapes:
            raise UnsupportedError("supertuning: an adapter saved without its indices (save_precomputed_indices)")
        r = raw.get("r")
        return {"r": int(r or 0), "lora_alpha": float(raw.get("lora_alpha") or 0.0) if r else 0.0}

    def _sparse(self, w: torch.Tensor, parts: Parts, sign: float) -> torch.Tensor:
        indices = parts["supertuning_indices"].to(torch.int64).reshape(-1)
        values = need(parts, "supertuning_values", self.name)
        return w.reshape(-1).scatter_add(0, indices, sign * values).reshape_as(w)

    def _lora(self, parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        a = need(parts, "supertuning_lora_A.weight", self.name)
        b = need(parts, "supertuning_lora_B.weight", self.name)
        lora: torch.Tensor = (cfg["lora_alpha"] / cfg["r"]) * (b @ a)
        return lora

    def delta_weight(self, shape: tuple[int, ...], parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        delta = self._sparse(torch.zeros(shape, dtype=torch.float32), parts, 1.0)
        return delta + self._lora(parts, cfg) if cfg["r"] > 0 else delta

    def merge(self, w0: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        merged = self._sparse(w0.to(torch.float32), parts, 1.0)
        return merged + self._lora(parts, cfg) if cfg["r"] > 0 else merged

    def unmerge(self, w: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor | None:
        w32 = w.to(torch.float32)
        if cfg["r"] > 0:
            w32 = w32 - self._lora(parts, cfg)
        return self._sparse(w32, parts, -1.0)


SUPERTUNING = SuperTuning(
    "supertuning",
    ("supertuning_values", "supertuning_indices", "supertuning_lora_A.weight", "supertuning_lora_B.weight"),
)
