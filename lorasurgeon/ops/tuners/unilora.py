"""UniLoRA: every LoRA entry of every module is one shared vector θ_d, gathered at fixed indices and scaled by
1/√(uses): A = θ[idx_A]·scale_A, B = θ[idx_B]·scale_B, ΔW = transpose(B @ A, fan_in_fan_out). Additive.

peft/tuners/unilora/layer.py: _get_lora_matrices (:204), get_delta_weight (:221), merge (:170). θ_d is saved
once (``base_model.unilora_theta_d``). The indices and scales are in the file only with ``save_indices``;
otherwise they are drawn again over all the model's adapted modules in order (unilora/model.py:83), which
needs the whole model's layout: ``module_config`` refuses that case.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import UnsupportedError
from ._base import ModuleConfig, Parts, Shapes, Tuner, need, transpose

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch


@dataclass(frozen=True)
class UniLoRA(Tuner):
    def _config(self, raw: Mapping[str, Any], module_name: str, parts_shapes: Shapes) -> dict[str, Any]:
        if "unilora_indices_A" not in parts_shapes:
            raise UnsupportedError("unilora: an adapter saved without its indices (save_indices=False)")
        return {}

    def delta_weight(self, shape: tuple[int, ...], parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        theta = need(parts, "unilora_theta_d", self.name)
        a = theta[parts["unilora_indices_A"].to(torch.long)] * need(parts, "unilora_scales_A", self.name)
        b = theta[parts["unilora_indices_B"].to(torch.long)] * need(parts, "unilora_scales_B", self.name)
        return transpose(b @ a, cfg["fan_in_fan_out"])


UNILORA = UniLoRA(
    "unilora",
    ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B"),
    shared_keys=("unilora_theta_d",),
    layers=("linear", "conv1d"),
)
