"""FRoD: W0 is re-expressed on a basis V shared by every module of the same role (``frod_V.<category>``), as
W0 = U·diag(λ)·Vᵀ with U, λ solved from W0 and V; training moves λ and a sparse matrix S at shared positions
(``frod_s_indices.<category>``, size ``frod_s_size.<category>``). W' = W0 + (U·(S + diag(λ_l))·Vᵀ − W0).
U is recomputed from W0 (it is not saved), in float64 as PEFT does. PEFT's unmerge restores a kept copy of
W0: ``unmerge`` is None.

peft/tuners/frod/layer.py: update_layer (:65), _calculate_frod_u_and_lambda (:135), get_delta_weight (:231),
_get_frod_tensors (:245), merge (:186); frod/model.py:34 _category_from_key (the shared tensors' names).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._base import ModuleConfig, Parts, Tuner, f32, need, transpose

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch


def category(module_name: str) -> str:
    """frod/model.py _category_from_key: the role shared across blocks (``self_attn_q_proj``)."""
    parts = module_name.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    name = f"{parts[-2]}_{parts[-1]}"
    if name == "output_dense" and len(parts) >= 3 and parts[-3] == "attention":
        return "attention_output"
    return name


def frod_u(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """U of _calculate_frod_u_and_lambda (float64 solve, columns normalized), in float32."""
    w64, v64 = w.detach().to(torch.float64), v.detach().to(torch.float64)
    try:
        bi = torch.linalg.solve(v64, w64.T).T
    except RuntimeError:
        bi = w64 @ torch.linalg.pinv(v64, rtol=1e-6).T
    lam = torch.linalg.norm(bi, dim=0)
    u = torch.zeros_like(bi)
    nonzero = lam > 1e-12
    u[:, nonzero] = bi[:, nonzero] / lam[nonzero]
    return u.float()


@dataclass(frozen=True)
class FRoD(Tuner):
    def shared_parts(self, module_name: str) -> dict[str, str]:
        cat = category(module_name)
        return {k: f"base_model.{k}.{cat}" for k in self.shared_keys}

    def merge(self, w0: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        w = f32(w0)
        base = transpose(w, cfg["fan_in_fan_out"])
        v = need(parts, "frod_V", self.name)
        u = frod_u(v, base)
        indices = parts["frod_s_indices"].to(torch.long)
        size = tuple(int(d) for d in parts["frod_s_size"].tolist())
        values = need(parts, "frod_lambda_s_values", self.name)
        s = torch.sparse_coo_tensor(indices, values, size).coalesce().to_dense()
        frod_weight = u @ (s + torch.diag_embed(need(parts, "frod_lambda_l", self.name))) @ v.T
        return w + transpose(frod_weight - base, cfg["fan_in_fan_out"])

    def unmerge(self, w: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor | None:
        return None


FROD = FRoD(
    "frod",
    ("frod_lambda_l", "frod_lambda_s_values"),
    shared_keys=("frod_V", "frod_s_indices", "frod_s_size"),
    layers=("linear", "conv1d"),
    additive=False,
    invertible=False,
)
