"""MiSS (formerly Bone): a block shared across the weight's column blocks. ``init_weights`` picks the form:

  MiSS (True / False / "mini")  W'[o, k·r + j] = W[o, k·r + j] + B[j, o] (a trailing partial block takes B's
        first columns); "mini" stores B (r, mini_r), tiled along out. Unmerge subtracts.
  Bat ("bat")  per r×r block of W: W' = W + (W_blk @ B_blk + B_blk), B (out/r, r, r); unmerge
        (W' - B) @ (I + B)⁻¹.

peft/tuners/miss/layer.py: MissLinear.merge (:165), unmerge (:211), get_delta_weight (:233: Bat),
get_delta_weight_miss (:274).
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


def _bat(w: torch.Tensor, block: torch.Tensor, reverse: bool) -> torch.Tensor:
    r = block.size(-1)
    blocks = w.reshape(w.size(0) // r, r, w.size(1) // r, r).permute(2, 0, 1, 3)
    if reverse:
        inv = torch.inverse(torch.eye(r, dtype=torch.float32) + block)
        result = (blocks - block) @ inv
    else:
        result = blocks @ block + block
    return result.permute(1, 2, 0, 3).reshape(*w.shape)


def _miss(w: torch.Tensor, block: torch.Tensor, sign: int) -> torch.Tensor:
    out = w.clone()
    in_features, r = w.size(-1), block.size(0)
    aligned = in_features // r * r
    if aligned != in_features:
        w_aligned = out[:, :aligned].reshape(-1, in_features // r, r).permute(1, 2, 0)
        out[:, :aligned] = (w_aligned + sign * block).permute(2, 0, 1).reshape(*out[:, :aligned].shape)
        out[:, aligned:] = out[:, aligned:] + sign * block.transpose(0, 1)[:, : in_features - aligned]
        return out
    w_blocks = w.reshape(-1, in_features // r, r).permute(1, 2, 0)
    return (w_blocks + sign * block).permute(2, 0, 1).reshape(*w.shape)


@dataclass(frozen=True)
class MiSS(Tuner):
    def _config(self, raw: Mapping[str, Any], module_name: str, parts_shapes: Shapes) -> dict[str, Any]:
        init = raw.get("init_weights", True)
        form = init if init in ("bat", "mini") else "miss"
        return {"form": form, "mini_r": int(raw.get("mini_r", 1))}

    def _block(self, w: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        block = need(parts, "miss_block", self.name)
        if cfg["form"] == "mini":
            block = block.repeat(1, w.size(0) // cfg["mini_r"])
        return block

    def merge(self, w0: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        w = f32(w0)
        if cfg["form"] == "bat":
            return w + _bat(w, need(parts, "miss_block", self.name), reverse=False)
        return _miss(w, self._block(w, parts, cfg), 1)

    def unmerge(self, w: torch.Tensor, parts: Parts, cfg: ModuleConfig) -> torch.Tensor | None:
        w32 = f32(w)
        if cfg["form"] == "bat":
            return _bat(w32, need(parts, "miss_block", self.name), reverse=True)
        return _miss(w32, self._block(w32, parts, cfg), -1)


MISS = MiSS("miss", ("miss_block",), additive=False)
