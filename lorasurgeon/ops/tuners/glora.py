"""GLoRA: W' = W + W ⊙ A + B and b' = b + b ⊙ D + E + W0 @ C, each of A..E a low-rank product (``.Xd @ .Xu``),
a vector or a scalar (``.X``), or absent (zero), as config_A_B / config_C / config_D_E chose; C, D and E exist
only for layers with a bias. Unmerge: W0 = (W' - B) / (1 + A), b0 = (b' - E - W0 @ C) / (1 + D).

peft/tuners/glora/layer.py: the paths (:37 GloraLoraPath, :55 GloraVectorPath, :72 GloraScalarPath, :88
GloraEmptyPath), GloraLayer.merge (:180), unmerge (:241).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._base import ModuleConfig, Parts, Tuner, f32

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch


def path(parts: Parts, name: str) -> torch.Tensor | float:
    """A GloraPath's value: ``Xd @ Xu``, ``X`` (a vector, or the scalar X[0]), or 0.0 when absent."""
    if f"{name}.Xd" in parts:
        product: torch.Tensor = f32(parts[f"{name}.Xd"]) @ f32(parts[f"{name}.Xu"])
        return product
    if f"{name}.X" in parts:
        x = f32(parts[f"{name}.X"])
        return x[0] if x.shape == (1,) else x
    if f"{name}.zeros" in parts:
        return f32(parts[f"{name}.zeros"])
    return 0.0


@dataclass(frozen=True)
class GLoRA(Tuner):
    def merge(self, w0: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        w = f32(w0)
        return w + (w * path(parts, "glora_A") + path(parts, "glora_B"))

    def unmerge(self, w: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor | None:
        w32 = f32(w)
        zeros = torch.zeros_like(w32)
        return (w32 - (zeros + path(parts, "glora_B"))) / (1.0 + (zeros + path(parts, "glora_A")))

    def _w_at_c(self, w0: torch.Tensor | None, parts: Parts) -> torch.Tensor | float:
        c = path(parts, "glora_C")
        if w0 is None or isinstance(c, float):
            if not isinstance(c, float) and bool(c.any()):
                raise ValueError("glora: merging the bias of a module with a C path needs the weight W0")
            return 0.0
        return torch.matmul(f32(w0), c).squeeze(-1)

    def merge_bias(
        self, b0: torch.Tensor, parts: Parts, cfg: ModuleConfig, w0: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        b = f32(b0)
        return b + (b * path(parts, "glora_D") + path(parts, "glora_E") + self._w_at_c(w0, parts))

    def unmerge_bias(
        self, b: torch.Tensor, parts: Parts, cfg: ModuleConfig, w0: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        b32 = f32(b)
        zeros = torch.zeros_like(b32)
        numerator = b32 - (zeros + path(parts, "glora_E")) - (zeros + self._w_at_c(w0, parts))
        return numerator / (1.0 + (zeros + path(parts, "glora_D")))


_PATHS = ("Xd", "Xu", "X", "zeros")
GLORA = GLoRA(
    "glora",
    tuple(f"glora_{p}.{x}" for p in "ABCDE" for x in _PATHS),
    additive=False,
    bias=True,
)
