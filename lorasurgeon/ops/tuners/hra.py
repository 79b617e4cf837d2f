"""HRA: a chain of r Householder reflections of the input space, W' = W @ H. Multiplicative.

peft/tuners/hra/layer.py: HRALinear.merge (:156, ``torch.mm(W, H)``), unmerge (:197: the reflections in
reverse order), get_delta_weight (:215): without apply_GS H = Π (I - 2 uᵢuᵢᵀ) over the columns of ``hra_u``
normalized; with apply_GS, H = I - 2 U Uᵀ for U the Gram-Schmidt orthonormalized columns (its own inverse).
HRAConv2d (:282) does the same on W flattened to (out, in·k·k).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._base import ModuleConfig, Parts, Shapes, Tuner, f32, need

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch


def householder(opt_u: torch.Tensor, apply_gs: bool, reverse: bool = False) -> torch.Tensor:
    """HRALinear.get_delta_weight: the (in, in) product of reflections."""
    size, rank = opt_u.shape
    if apply_gs:
        basis = [(opt_u[:, 0] / opt_u[:, 0].norm()).view(-1, 1)]
        for i in range(1, rank):
            ui = opt_u[:, i].view(-1, 1)
            for j in range(i):
                ui = ui - (basis[j].t() @ ui) * basis[j]
            basis.append((ui / ui.norm()).view(-1, 1))
        u = torch.cat(basis, dim=1)
        return torch.eye(size, dtype=opt_u.dtype) - 2 * u @ u.t()
    unit = opt_u / opt_u.norm(dim=0)
    weight = torch.eye(size, dtype=opt_u.dtype)
    for i in range(rank - 1, -1, -1) if reverse else range(rank):
        ui = unit[:, i].view(-1, 1)
        weight = weight - 2 * weight @ ui @ ui.t()
    return weight


@dataclass(frozen=True)
class HRA(Tuner):
    def _config(self, raw: Mapping[str, Any], module_name: str, parts_shapes: Shapes) -> dict[str, Any]:
        return {"apply_GS": bool(raw.get("apply_GS", False))}

    def merge(self, w0: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        w = f32(w0)
        flat = w.reshape(w.shape[0], -1)  # HRAConv2d.merge (:298): (out, in·k·k)
        return torch.mm(flat, householder(need(parts, "hra_u", self.name), cfg["apply_GS"])).reshape(w.shape)

    def unmerge(self, w: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor | None:
        w32 = f32(w)
        flat = w32.reshape(w32.shape[0], -1)
        reflections = householder(need(parts, "hra_u", self.name), cfg["apply_GS"], reverse=True)
        return torch.mm(flat, reflections).reshape(w32.shape)


HRA_TUNER = HRA("hra", ("hra_u",), layers=("linear", "conv"), additive=False)
