"""RoAd: 2-D rotations (with scales) of pairs of output units, in groups; W' = R @ W and b' = R @ b. Multiplicative.

peft/tuners/road/layer.py: Linear.merge (:228: ``torch.matmul(road_R, W)``, and the bias), unmerge (:291:
``torch.linalg.inv(road_R)``), _get_delta_weight (:325), _prepare_cols (:345: variants road_1 / road_2 /
road_4). variant and group_size are adapter-wide (road/config.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import AdapterConfigError
from ._base import ModuleConfig, Parts, Shapes, Tuner, f32, need

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch


def _columns(variant: str, group: int, theta: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """_prepare_cols: the diagonal and the rotated-pair coefficients."""
    if variant == "road_1":
        theta = theta.reshape(-1, group // 2).repeat_interleave(2, dim=0).flatten()
        alpha = alpha.reshape(-1, group // 2).repeat_interleave(2, dim=0).flatten()
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_2":
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_4":
        theta, alpha = theta.reshape(-1, 2, group), alpha.reshape(-1, 2, group)
        return alpha[:, 0, :].flatten() * theta[:, 0, :].cos().flatten(), alpha[:, 1, :].flatten() * theta[
            :, 1, :
        ].sin().flatten()
    raise AdapterConfigError(f"road: unknown variant {variant!r}")


def road_matrix(variant: str, group: int, theta: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """_get_delta_weight: the (out, out) matrix R."""
    first, second = _columns(variant, group, theta, alpha)
    out = torch.diag(first)
    size = second.shape[0]
    swapped = second.reshape(-1, 2, group // 2)[:, [1, 0], :].flatten()
    rotated = torch.diag(swapped).reshape(-1, 2, group // 2, size)[:, [1, 0], :, :]
    rotated[:, 0, :, :] *= -1
    out += rotated.reshape(size, size)
    return out


@dataclass(frozen=True)
class RoAd(Tuner):
    def _config(self, raw: Mapping[str, Any], module_name: str, parts_shapes: Shapes) -> dict[str, Any]:
        return {"variant": str(raw.get("variant", "road_1")), "group_size": int(raw.get("group_size", 64))}

    def _matrix(self, parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        theta, alpha = need(parts, "road_theta", self.name), need(parts, "road_alpha", self.name)
        return road_matrix(cfg["variant"], cfg["group_size"], theta, alpha)

    def merge(self, w0: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        return torch.matmul(self._matrix(parts, cfg), f32(w0))

    def unmerge(self, w: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor | None:
        return torch.matmul(torch.linalg.inv(self._matrix(parts, cfg)), f32(w))

    def merge_bias(
        self, b0: torch.Tensor, parts: Parts, cfg: ModuleConfig, w0: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        return torch.matmul(self._matrix(parts, cfg), f32(b0))

    def unmerge_bias(
        self, b: torch.Tensor, parts: Parts, cfg: ModuleConfig, w0: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        return torch.matmul(torch.linalg.inv(self._matrix(parts, cfg)), f32(b))


ROAD = RoAd("road", ("road_theta", "road_alpha"), additive=False, bias=True)
