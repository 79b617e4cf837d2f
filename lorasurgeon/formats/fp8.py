"""Block-scaled FP8 (DeepSeek-V3/R1, Qwen3-*-FP8): ``X.weight`` float8_e4m3 + ``X.weight_scale_inv``.

``W[i, j] = float(q[i, j]) · S[i // bm, j // bn]`` in float32 (``S`` is a multiplier despite its
name), with partial tiles at the edges; the scale is stored as F32, BF16, F16, or power-of-two
UE8M0 (``float8_e8m0fnu`` values or U8 biased-exponent bytes). Re-quantizing a tile: keep its
scale where that is at least as close (``formats.base.requantize_blocks``), otherwise
``S = amax / 448`` (``2^ceil(log2)`` for UE8M0), stored rounded up so the tile fits;
``q = e4m3(clamp(W / S, ±448))``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import UnsupportedError
from .base import Format, Headers, QuantTensor, Requantized, requantize_blocks, round_up_in, slabs

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch

FP8_MAX = 448.0


# --- tiles: (..., R, C) <-> (tiles, bm·bn), zero-padded at the edges ---------------------------------
def to_tiles(t: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Split the last two axes into whole tiles (zero-padded), one tile per row of the result."""
    bm, bn = block
    *lead, rows, cols = t.shape
    rt, ct = -(-rows // bm), -(-cols // bn)
    padded = torch.nn.functional.pad(t, (0, ct * bn - cols, 0, rt * bm - rows))
    tiles = padded.reshape(*lead, rt, bm, ct, bn).transpose(-3, -2)
    return tiles.reshape(-1, bm * bn)


def from_tiles(tiles: torch.Tensor, shape: Sequence[int], block: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`to_tiles` (padding cropped)."""
    bm, bn = block
    *lead, rows, cols = shape
    rt, ct = -(-rows // bm), -(-cols // bn)
    t = tiles.reshape(*lead, rt, ct, bm, bn).transpose(-3, -2).reshape(*lead, rt * bm, ct * bn)
    return t[..., :rows, :cols].contiguous()


def expand_tiles(scale: torch.Tensor, shape: Sequence[int], block: tuple[int, int]) -> torch.Tensor:
    """A per-tile scale grid (..., ceil(R/bm), ceil(C/bn)) stretched over the (..., R, C) elements."""
    rows, cols = shape[-2:]
    return scale.repeat_interleave(block[0], dim=-2)[..., :rows, :].repeat_interleave(block[1], dim=-1)[..., :cols]


def scale_tiles_(values: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``values`` (..., R, C) multiplied in place by its tiles' scales (..., ceil(R/bm), ceil(C/bn)), one row
    of tiles at a time (no element-sized scale map)."""
    rows, cols = values.shape[-2:]
    flat, grid = values.reshape(-1, rows, cols), scale.reshape(-1, *scale.shape[-2:]).to(torch.float32)
    for i, r0 in enumerate(range(0, rows, block[0])):
        flat[:, r0 : r0 + block[0]].mul_(grid[:, i].repeat_interleave(block[1], dim=-1)[:, None, :cols])
    return values


def encode_e4m3(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Values (m, n) over their blocks' scales (m,) cast to e4m3 bytes, saturating at ±448."""
    y = x / params["scale"].to(torch.float32)[:, None]
    return y.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)


def decode_e4m3(codes: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """e4m3 bytes (m, n) times their blocks' scales (m,), in float32."""
    return codes.contiguous().view(torch.float8_e4m3fn).to(torch.float32) * params["scale"].to(torch.float32)[:, None]


def fresh_fp8_scale(amax: torch.Tensor, power_of_two: bool = False) -> torch.Tensor:
    """The producer's scale for blocks with these largest magnitudes: amax / 448 (1 for an all-zero block)."""
    s = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    if power_of_two:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    return s


# --- the format ---------------------------------------------------------------------------------------
class BlockFP8:
    method = "block FP8"

    def __init__(self, block: tuple[int, int], scale_fmt: str):
        self.block = block
        self.scale_fmt = scale_fmt

    # scales as stored <-> float32 values
    @staticmethod
    def scale_values(stored: torch.Tensor) -> torch.Tensor:
        if stored.dtype == torch.uint8:  # UE8M0 biased exponent bytes
            return (stored.to(torch.float32) - 127.0).exp2()
        return stored.to(torch.float32)

    def store_scales(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if like.dtype == torch.uint8:
            return (torch.log2(values).round() + 127).to(torch.uint8)
        if like.dtype == getattr(torch, "float8_e8m0fnu", None):
            return values.to(torch.float8_e8m0fnu)  # powers of two: exact
        return round_up_in(like.dtype, values)

    @property
    def power_of_two(self) -> bool:
        return self.scale_fmt == "ue8m0"

    def dequantize(self, qt: QuantTensor, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return scale_tiles_(parts["weight"].to(torch.float32), self.scale_values(parts["scale"]), self.block)

    def requantize(
        self, qt: QuantTensor, parts: Mapping[str, torch.Tensor], w0: torch.Tensor, new: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], Requantized]:
        stored = parts["scale"]
        power = (
            self.power_of_two or stored.dtype == torch.uint8 or stored.dtype == getattr(torch, "float8_e8m0fnu", None)
        )

        def fresh_scales(values: torch.Tensor, _: torch.Tensor) -> dict[str, torch.Tensor]:
            s = fresh_fp8_scale(values.abs().amax(dim=1), power)
            return {"scale": self.scale_values(self.store_scales(s, stored))}

        rows, cols = qt.shape[-2:]
        bm = self.block[0]
        codes = parts["weight"].view(torch.uint8).reshape(-1, rows, cols).clone()
        scales = self.scale_values(stored).reshape(-1, *stored.shape[-2:]).clone()
        w0s, news = w0.reshape(-1, rows, cols), new.reshape(-1, rows, cols)
        done = Requantized(0, 0, 0)
        for e in range(codes.shape[0]):
            for rs in slabs(rows, cols, bm):
                ts = slice(rs.start // bm, -(-rs.stop // bm))
                got, params, part = requantize_blocks(
                    to_tiles(w0s[e, rs], self.block),
                    to_tiles(news[e, rs], self.block),
                    to_tiles(codes[e, rs], self.block),
                    {"scale": scales[e, ts].reshape(-1)},
                    encode=encode_e4m3,
                    decode=decode_e4m3,
                    fresh=fresh_scales,
                )
                codes[e, rs] = from_tiles(got, (rs.stop - rs.start, cols), self.block)
                scales[e, ts] = params["scale"].reshape(-1, scales.shape[-1])
                done = done + part
        weight = codes.reshape(qt.shape).view(torch.float8_e4m3fn)
        return {"weight": weight, "scale": self.store_scales(scales, stored).reshape(stored.shape)}, done


def find(headers: Headers, qconfig: Mapping[str, Any]) -> list[QuantTensor]:
    """The block-FP8 weights: a 1-byte ``X.weight`` with a sibling ``X.weight_scale_inv`` (as DeepSeek's own
    fp8_cast_bf16 tells them), tiles of ``weight_block_size``.

    Raises:
        UnsupportedError: a scale grid that does not fit the weight and the block size.
    """
    block = tuple(qconfig.get("weight_block_size") or (128, 128))
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise UnsupportedError(f"config.json quantization_config.weight_block_size {list(block)} is not [rows, cols]")
    fmt = str(qconfig.get("scale_fmt") or "float")
    infos = headers.infos
    found = []
    for name, info in infos.items():
        if not name.endswith(".weight_scale_inv"):
            continue
        weight = infos.get(name.removesuffix("_scale_inv"))
        if weight is None or weight.dtype != torch.float8_e4m3fn:
            continue
        grid = (*weight.shape[:-2], *(math.ceil(d / b) for d, b in zip(weight.shape[-2:], block, strict=True)))
        if len(weight.shape) < 2 or tuple(info.shape) != grid:
            raise UnsupportedError(
                f"{info.file}: {name} is {list(info.shape)}, but {weight.name} {list(weight.shape)} in blocks of "
                f"{list(block)} (weight_block_size) needs a {list(grid)} scale grid"
            )
        codec = BlockFP8((block[0], block[1]), fmt)
        found.append(QuantTensor(weight.name, weight.shape, (("weight", weight), ("scale", info)), codec))
    return found


FORMAT = Format(
    name="fp8",
    reads="block FP8",
    find=find,
    codecs=(BlockFP8,),
    marks=lambda name: name.endswith(".weight_scale_inv"),
)
