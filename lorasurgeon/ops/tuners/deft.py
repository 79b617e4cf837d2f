"""DEFT (and PaRa with ``para``): remove a learned rank-r subspace of W0's outputs and inject a new one. The
adapted weight is (I − Q_P·rightᵀ)·W0 + Q_P·R·s, so ΔW = Q_P @ (R·s − rightᵀ @ W0) depends on W0 (PaRa:
−Q_P @ rightᵀ @ W0). ``decomposition_method``: "relu" (Q_P = P, right = relu(P)) or "qr" (Q_P = right = qr(P).Q).
s = alpha / r when alpha is set, else 1. PEFT's unmerge uses a factor it cached from W0: ``unmerge`` is None.

peft/tuners/deft/layer.py: update_layer (:80: r = min(r, out), scaling), _project (:194), _merge_factor
(:215), _delta_from_factor (:226), merge (:252).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import AdapterConfigError
from ._base import ModuleConfig, Parts, Shapes, Tuner, f32, need, transpose

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch


@dataclass(frozen=True)
class DEFT(Tuner):
    def _config(self, raw: Mapping[str, Any], module_name: str, parts_shapes: Shapes) -> dict[str, Any]:
        method = str(raw.get("decomposition_method", "relu"))
        if method not in ("relu", "qr"):
            raise AdapterConfigError(f"deft: unknown decomposition_method {method!r}")
        r = parts_shapes["deft_P"][1] if "deft_P" in parts_shapes else int(raw.get("r", 8))
        alpha = raw.get("alpha")
        return {"method": method, "para": bool(raw.get("para", False)), "scaling": (alpha / r) if alpha else 1.0}

    def merge(self, w0: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        w = f32(w0)
        p = need(parts, "deft_P", self.name)
        if cfg["method"] == "relu":
            q, right = p, torch.relu(p)
        else:
            q, _ = torch.linalg.qr(p)
            right = q
        factor = right.transpose(0, 1) @ transpose(w, cfg["fan_in_fan_out"])
        if cfg["para"]:
            delta = -(q @ factor)
        else:
            delta = q @ (need(parts, "deft_R", self.name) * cfg["scaling"] - factor)
        return w + transpose(delta, cfg["fan_in_fan_out"])

    def unmerge(self, w: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor | None:
        return None


DEFT_TUNER = DEFT("deft", ("deft_P", "deft_R"), layers=("linear", "conv1d"), additive=False, invertible=False)
