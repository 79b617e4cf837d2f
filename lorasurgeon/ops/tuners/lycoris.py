"""LoHa and LoKr (PEFT's LyCORIS tuners): additive ΔW, scale α/r, unmerge subtracts it.

peft/tuners/lycoris_utils.py:114 merge (``weight += get_delta_weight``), :168 unmerge (``-=``);
peft/tuners/loha/model.py:106 and lokr/model.py:106: r and α by rank_pattern / alpha_pattern.

  LoHa  ΔW = ((w1a@w1b) ⊙ (w2a@w2b))·α/r, reshaped to W (loha/layer.py:183, :434)
        conv with use_effective_conv2d: einsum("ijkl,jr,ip->prkl", t, wb, wa) for each factor (:438)
  LoKr  ΔW = kron(w1, w2)·α/r, reshaped to W (lokr/layer.py:256, :497); w1 = lokr_w1 or w1_a@w1_b,
        w2 = lokr_w2, or w2_a@w2_b, or einsum("ijkl,ip,jr->prkl", t2, w2_a, w2_b) (conv, :492)
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


def _lycoris_config(raw: Mapping[str, Any], module_name: str) -> dict[str, Any]:
    r = int(pattern_value(raw, "rank_pattern", module_name, "r"))
    alpha = float(pattern_value(raw, "alpha_pattern", module_name, "alpha"))
    return {"r": r, "alpha": alpha, "scale": alpha / r}


@dataclass(frozen=True)
class LoHa(Tuner):
    def _config(self, raw: Mapping[str, Any], module_name: str, parts_shapes: Shapes) -> dict[str, Any]:
        return _lycoris_config(raw, module_name)

    def delta_weight(self, shape: tuple[int, ...], parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        w1a, w1b = need(parts, "hada_w1_a", self.name), need(parts, "hada_w1_b", self.name)
        w2a, w2b = need(parts, "hada_w2_a", self.name), need(parts, "hada_w2_b", self.name)
        scale = torch.tensor(cfg["scale"])  # PEFT passes a 0-d float32 tensor
        if "hada_t1" in parts:
            t1, t2 = need(parts, "hada_t1", self.name), need(parts, "hada_t2", self.name)
            rebuild1 = torch.einsum("i j k l, j r, i p -> p r k l", t1, w1b, w1a)
            rebuild2 = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a)
            weight = rebuild1 * rebuild2 * scale
        else:
            weight = ((w1a @ w1b) * (w2a @ w2b)) * scale
        return weight.reshape(shape)


@dataclass(frozen=True)
class LoKr(Tuner):
    def _config(self, raw: Mapping[str, Any], module_name: str, parts_shapes: Shapes) -> dict[str, Any]:
        return _lycoris_config(raw, module_name)

    def delta_weight(self, shape: tuple[int, ...], parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        if "lokr_w1" in parts:
            w1 = need(parts, "lokr_w1", self.name)
        else:
            w1 = need(parts, "lokr_w1_a", self.name) @ need(parts, "lokr_w1_b", self.name)
        if "lokr_w2" in parts:
            w2 = need(parts, "lokr_w2", self.name)
        elif "lokr_t2" in parts:
            t2, wa, wb = (need(parts, k, self.name) for k in ("lokr_t2", "lokr_w2_a", "lokr_w2_b"))
            w2 = torch.einsum("i j k l, i p, j r -> p r k l", t2, wa, wb)
        else:
            w2 = need(parts, "lokr_w2_a", self.name) @ need(parts, "lokr_w2_b", self.name)
        if w2.dim() == 4:
            w1 = w1.unsqueeze(2).unsqueeze(2)
        weight: torch.Tensor = torch.kron(w1, w2.contiguous()) * cfg["scale"]
        return weight.reshape(shape)


LOHA = LoHa(
    "loha",
    ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    layers=("linear", "conv"),
)
LOKR = LoKr(
    "lokr",
    ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    layers=("linear", "conv"),
)
