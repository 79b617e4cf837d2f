"""(IA)³: a learned vector scales the weight's rows (attention-like modules: output units, and the bias) or,
for ``feedforward_modules``, its columns (input units). Multiplicative.

peft/tuners/ia3/layer.py: Linear.merge (:96) ``W ⊙ transpose(l, fan_in_fan_out)``, bias ``b ⊙ l`` when not
feedforward (:142); unmerge (:149) divides by ``l + 1e-8`` (PEFT warns it can be inaccurate). Conv
(:233 ``_get_ia3_scaling_for_weight``): l (1, C, 1, 1), transposed to (C, 1, 1, 1) when not feedforward.
peft/tuners/ia3/model.py:184 feedforward: ``re.fullmatch`` for a string, ``key.endswith`` for a list.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import AdapterConfigError
from ._base import ModuleConfig, Parts, Shapes, Tuner, f32, need, transpose

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch

_EPS = 1e-8  # PEFT's "tolerance to avoid division by zero" in unmerge


def is_feedforward(raw: Mapping[str, Any], module_name: str) -> bool:
    """IA3Model._check_target_module_feedforward."""
    modules = raw.get("feedforward_modules")
    if modules is None:
        raise AdapterConfigError("an IA3 adapter_config.json without feedforward_modules")
    if isinstance(modules, str):
        return bool(re.fullmatch(modules, module_name))
    return any(module_name.endswith(key) for key in modules)


@dataclass(frozen=True)
class IA3(Tuner):
    def _config(self, raw: Mapping[str, Any], module_name: str, parts_shapes: Shapes) -> dict[str, Any]:
        return {"feedforward": is_feedforward(raw, module_name)}

    def _scaling(self, w: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        ia3_l = need(parts, "ia3_l", self.name)
        if w.dim() > 2:  # conv: (1, C, 1, 1)
            return ia3_l if cfg["feedforward"] else ia3_l.transpose(0, 1)
        return transpose(ia3_l, cfg["fan_in_fan_out"])

    def merge(self, w0: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        w = f32(w0)
        return torch.mul(w, self._scaling(w, parts, cfg))

    def unmerge(self, w: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor | None:
        w32 = f32(w)
        return torch.div(w32, self._scaling(w32, parts, cfg) + _EPS)

    def merge_bias(
        self, b0: torch.Tensor, parts: Parts, cfg: ModuleConfig, w0: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        if cfg["feedforward"]:
            return None
        return torch.mul(f32(b0), need(parts, "ia3_l", self.name).reshape(b0.shape))

    def unmerge_bias(
        self, b: torch.Tensor, parts: Parts, cfg: ModuleConfig, w0: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        if cfg["feedforward"]:
            return None
        return torch.div(f32(b), need(parts, "ia3_l", self.name).reshape(b.shape) + _EPS)


IA3_TUNER = IA3("ia3", ("ia3_l",), layers=("linear", "conv1d", "conv"), additive=False, bias=True)
