"""AdaLoRA: an SVD-shaped LoRA, ΔW = transpose(B @ (A ⊙ E), fan_in_fan_out) · s / (ranknum + 1e-5). Additive.

peft/tuners/adalora/layer.py:168 get_delta_weight (Linear), :302 (Conv2d: reshaped to W); :85 s = lora_alpha
if lora_alpha > 0 else float(r); ranknum = float(r) at creation (:83) with r = init_r (adalora/model.py:128).
A saved rank_pattern (``<module>.lora_E`` -> a boolean mask over init_r) prunes the saved tensors
(model.py:289) and, on load, resizes the module to the mask's count but keeps ranknum = init_r
(model.py:259 ``resize_modules_by_rank_pattern``: ``ranknum.copy_``), and s uses the pruned r.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import AdapterConfigError
from ._base import ModuleConfig, Parts, Shapes, Tuner, need, transpose

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch


def _pruned_rank(raw: Mapping[str, Any], module_name: str, init_r: int) -> int:
    pattern = raw.get("rank_pattern") or {}
    for key in (f"{module_name}.lora_E", module_name):
        if key in pattern:
            mask = pattern[key]
            return int(sum(bool(m) for m in mask)) if isinstance(mask, list) else int(mask)
    return init_r


@dataclass(frozen=True)
class AdaLoRA(Tuner):
    def _config(self, raw: Mapping[str, Any], module_name: str, parts_shapes: Shapes) -> dict[str, Any]:
        if "init_r" not in raw:
            raise AdapterConfigError("an AdaLoRA adapter_config.json without init_r")
        init_r = int(raw["init_r"])
        r = _pruned_rank(raw, module_name, init_r)
        alpha = float(raw.get("lora_alpha", 8))
        return {"ranknum": float(init_r), "r": r, "scaling": alpha if alpha > 0 else float(r)}

    def delta_weight(self, shape: tuple[int, ...], parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        a, b, e = (need(parts, k, self.name) for k in ("lora_A", "lora_B", "lora_E"))
        ranknum = torch.tensor([cfg["ranknum"]], dtype=torch.float32) + 1e-5  # a float32 Parameter in PEFT
        if len(shape) > 2:
            delta: torch.Tensor = b @ (a * e) * cfg["scaling"] / ranknum
            return delta.reshape(shape)
        product = transpose(b @ (a * e), cfg["fan_in_fan_out"])
        result: torch.Tensor = product * cfg["scaling"] / ranknum
        return result


ADALORA = AdaLoRA("adalora", ("lora_A", "lora_B", "lora_E"), layers=("linear", "conv1d", "conv"))
