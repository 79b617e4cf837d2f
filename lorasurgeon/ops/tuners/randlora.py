"""RandLoRA: full-rank ΔW from shared random bases (``randlora_A`` (r, 1, min_dim), ``randlora_B`` (max_dim,
n_bases, r)), scaled per module by ``randlora_lambda`` (r, n_bases) and ``randlora_gamma`` (n_bases, min_dim),
times randlora_alpha / r. Additive.

peft/tuners/randlora/layer.py: update_layer (:94: n_bases = ⌈min(in, out) / r⌉, scaling), UniqueBaseGrad
(:30: λ[:, :, None] · A · γ[None]), get_scaled_bases (:262), get_delta_weight (:310); the bases are saved
as ``base_model.randlora_A`` / ``base_model.randlora_B`` when save_projection (randlora/model.py:178),
and under each module too (each layer holds a persistent reference to the same BufferDict).
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
class RandLoRA(Tuner):
    def _config(self, raw: Mapping[str, Any], module_name: str, parts_shapes: Shapes) -> dict[str, Any]:
        r = int(raw.get("r", 32))
        return {"r": r, "scaling": float(raw.get("randlora_alpha", 640)) / r}

    def delta_weight(self, shape: tuple[int, ...], parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        out_f, in_f = shape[::-1] if cfg["fan_in_fan_out"] else shape
        lam, gamma = need(parts, "randlora_lambda", self.name), need(parts, "randlora_gamma", self.name)
        n_bases = lam.shape[1]
        min_dim, max_dim = min(out_f, in_f), max(out_f, in_f)
        sliced_a = need(parts, "randlora_A", self.name)[:, :n_bases, :min_dim]
        sliced_b = need(parts, "randlora_B", self.name)[:max_dim, :n_bases, :]
        scaled_b = sliced_b.flatten(start_dim=1)
        scaled_a = (lam[:, :, None] * sliced_a * gamma[None,]).flatten(end_dim=1)
        if min_dim == in_f:
            first, second = scaled_a, scaled_b
        else:
            first, second = scaled_b.T, scaled_a.T
        update = (first.T @ second.T).T
        result: torch.Tensor = transpose(update, cfg["fan_in_fan_out"]) * cfg["scaling"]
        return result


# save_pretrained writes the shared bases once (base_model.randlora_A) and again under every module.
RANDLORA = RandLoRA(
    "randlora",
    ("randlora_lambda", "randlora_gamma", "randlora_A", "randlora_B"),
    shared_keys=("randlora_A", "randlora_B"),
)
