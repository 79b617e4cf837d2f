"""VB-LoRA: LoRA factors assembled from a shared vector bank, each sub-vector a softmax-weighted mix of its
top-k bank vectors. Additive: ΔW = transpose(B @ A, fan_in_fan_out).

peft/tuners/vblora/layer.py: _get_low_rank_matrix (:182: top-k logits, softmax, Σ w·bank[idx]),
_get_lora_matrices (:187: A (r, in), B (out, r)), get_delta_weight (:217), merge (:137: ``W += ΔW``),
unmerge (:172). The bank is saved once, as ``base_model.vblora_vector_bank`` (vblora/model.py:225).
With ``save_only_topk_weights`` the file holds ``<logits>_topk_indices`` and ``<logits>_topk_weights`` (the
first k-1 softmax weights; model.py:216); PEFT's load (model.py:244) rebuilds logits log(w) with the last
weight 1 - Σ, which this reproduces.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._base import ModuleConfig, Parts, Shapes, Tuner, f32, need, transpose

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch


def _mix(parts: Parts, name: str, bank: torch.Tensor, topk: int) -> torch.Tensor:
    """_get_low_rank_matrix for the logits ``name`` (saved whole, or as top-k indices and weights)."""
    if name in parts:
        logits, indices = f32(parts[name]).topk(topk, dim=-1)
    else:
        indices = parts[f"{name}_topk_indices"].to(torch.long)
        weights = f32(parts[f"{name}_topk_weights"])
        logits = torch.log(torch.cat([weights, 1 - weights.sum(-1, keepdim=True)], dim=-1))
    mixed: torch.Tensor = (torch.softmax(logits, dim=-1).unsqueeze(-1) * bank[indices]).sum(-2)
    return mixed


@dataclass(frozen=True)
class VBLoRA(Tuner):
    def _config(self, raw: Mapping[str, Any], module_name: str, parts_shapes: Shapes) -> dict[str, Any]:
        return {"topk": int(raw.get("topk", 2))}

    def delta_weight(self, shape: tuple[int, ...], parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        bank, topk = need(parts, "vblora_vector_bank", self.name), cfg["topk"]
        a_mix = _mix(parts, "vblora_logits_A", bank, topk)  # (r, in / L, L)
        b_mix = _mix(parts, "vblora_logits_B", bank, topk)  # (out / L, r, L)
        a = a_mix.reshape(a_mix.shape[0], -1)
        b = b_mix.transpose(1, 2).reshape(-1, b_mix.shape[1])
        return transpose(b @ a, cfg["fan_in_fan_out"])


VBLORA = VBLoRA(
    "vblora",
    (
        "vblora_logits_A",
        "vblora_logits_B",
        "vblora_logits_A_topk_indices",
        "vblora_logits_A_topk_weights",
        "vblora_logits_B_topk_indices",
        "vblora_logits_B_topk_weights",
    ),
    shared_keys=("vblora_vector_bank",),
    layers=("linear", "conv1d"),
)
