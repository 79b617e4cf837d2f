"""GraLoRA: k×k blocks of W each get their own rank-(r/k) LoRA (mixing the sub-ranks across blocks), plus an
optional plain LoRA of rank hybrid_r; scaled by α / (r + hybrid_r). Additive.

peft/tuners/gralora/layer.py: update_layer (:66: gralora_A (k, in/k, r), gralora_B (k, r, out/k), scaling),
get_delta_weight (:235), merge (:179: ``W += ΔW``), unmerge (:221).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._base import ModuleConfig, Parts, Shapes, Tuner, need, transpose

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch


@dataclass(frozen=True)
class GraLoRA(Tuner):
    def _config(self, raw: Mapping[str, Any], module_name: str, parts_shapes: Shapes) -> dict[str, Any]:
        r, hybrid = int(raw.get("r", 32)), int(raw.get("hybrid_r", 0))
        k = int(raw.get("gralora_k", 2))
        return {"r": r, "hybrid_r": hybrid, "k": k, "scaling": float(raw.get("alpha", 64)) / (r + hybrid)}

    def delta_weight(self, shape: tuple[int, ...], parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        a, b = need(parts, "gralora_A", self.name), need(parts, "gralora_B", self.name)
        k, r = cfg["k"], cfg["r"]
        out_f, in_f = shape[::-1] if cfg["fan_in_fan_out"] else shape
        positions = torch.arange(in_f)
        blocks, offsets = positions // (in_f // k), positions % (in_f // k)
        scattered = torch.zeros(in_f, k, r)
        scattered.scatter_(1, blocks.unsqueeze(1).unsqueeze(2).expand(-1, 1, r), a[blocks, offsets, :].unsqueeze(1))
        mixed = scattered.view(in_f, k, k, r // k).permute(0, 2, 1, 3).reshape(in_f, k, r)
        delta = torch.einsum("ikr, kro -> iko", mixed, b).reshape(in_f, out_f).T
        if cfg["hybrid_r"] > 0:
            a_general = need(parts, "gralora_A_general.weight", self.name)
            delta += need(parts, "gralora_B_general.weight", self.name) @ a_general
        result: torch.Tensor = transpose(delta, cfg["fan_in_fan_out"]) * cfg["scaling"]
        return result


GRALORA = GraLoRA("gralora", ("gralora_A", "gralora_B", "gralora_A_general.weight", "gralora_B_general.weight"))
