"""OSF: the low singular part of W0 is retrained. W' = W0 + (U_low·S_low·V_low − U⁰·S⁰·V⁰), where U⁰, S⁰, V⁰ are
W0's own singular vectors and values past the ``effective_rank`` largest (torch.linalg.svd of W0 in float32,
as PEFT took them; the product is independent of SVD's sign choices). Depends on W0; PEFT has no unmerge
(it warns): ``unmerge`` is None.

peft/tuners/osf/layer.py: update_layer (:100: the SVD split), get_delta_weight (:218), merge (:240), unmerge
(:277); peft/tuners/osf/utils.py:41 decompose_weight_matrix. The split k = min(out, in) − len(S_low).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._base import ModuleConfig, Parts, Tuner, f32, need

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch


@dataclass(frozen=True)
class OSF(Tuner):
    def merge(self, w0: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        w = f32(w0)
        u_low, s_low, v_low = (need(parts, f"osf_svd_params.{k}", self.name) for k in ("U_low", "S_low", "V_low"))
        u, s, vt = torch.linalg.svd(w, full_matrices=False)
        k = s.shape[0] - s_low.shape[0]
        initial = torch.mm(u[:, k:].contiguous() * s[k:].unsqueeze(0), vt[k:, :].contiguous())
        current = torch.mm(u_low * s_low.unsqueeze(0), v_low)
        return w + (current - initial)

    def unmerge(self, w: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor | None:
        return None


OSF_TUNER = OSF(
    "osf", ("osf_svd_params.U_low", "osf_svd_params.S_low", "osf_svd_params.V_low"), additive=False, invertible=False
)
