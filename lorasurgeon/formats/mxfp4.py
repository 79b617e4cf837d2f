"""MXFP4 experts (gpt-oss): ``X_blocks`` U8 [E, R, G, 16] and ``X_scales`` U8 [E, R, G].

Each row of R holds G blocks of 32 E2M1 values, two per byte (element 2k in the low nibble), each
block with one E8M0 scale byte: ``v = LUT[nibble] · 2^(byte − 127)``. The plain tensor is
transformers' in-memory ``X`` [E, G·32, R] (the input axis first: GPT-OSS's experts are
``is_transposed``). Re-quantizing a block: keep its scale byte where that is at least as close,
otherwise triton_kernels' ROUND_UP rule ``2^ceil(log2(amax / 6))``; values rounded to nearest even.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .base import Format, Headers, QuantTensor, Requantized, nearest_code, requantize_blocks

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch

E2M1_VALUES = (0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6)


def _lut() -> torch.Tensor:
    return torch.tensor(E2M1_VALUES, dtype=torch.float32)


E2M1_MAX = 6.0


def _nibbles(blocks: torch.Tensor) -> torch.Tensor:
    """[..., G, 16] bytes -> [..., G, 32] codes, low nibble first."""
    return torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).reshape(*blocks.shape[:-1], 32)


def _encode(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    y = x / p["scale"][:, None]
    mag = nearest_code(y.abs().clamp(max=E2M1_MAX), _lut()[:8], ties_to_even=True)
    return (mag + 8 * torch.signbit(y).to(mag.dtype)).to(torch.uint8)


def _decode(codes: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    return _lut()[codes.long()] * p["scale"][:, None]


def _fresh(x: torch.Tensor, _: torch.Tensor) -> dict[str, torch.Tensor]:
    amax = x.abs().amax(dim=1)
    e = torch.where(amax > 0, torch.ceil(torch.log2(amax / E2M1_MAX)), torch.full_like(amax, -127.0))
    return {"scale": torch.exp2(e.clamp(-127, 127))}


class MXFP4:
    method = "MXFP4 (gpt-oss experts)"

    @staticmethod
    def _values(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """[E, R, G, 32] float32 values, as transformers' convert_moe_packed_tensors (ldexp) computes them."""
        return torch.ldexp(_lut()[_nibbles(blocks).long()], scales.to(torch.int32)[..., None] - 127)

    def dequantize(self, qt: QuantTensor, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        blocks, scales = parts["blocks"], parts["scales"]
        v = self._values(blocks, scales)
        return v.reshape(*blocks.shape[:-2], -1).transpose(-1, -2).contiguous()

    def requantize(
        self, qt: QuantTensor, parts: Mapping[str, torch.Tensor], w0: torch.Tensor, new: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], Requantized]:
        blocks, scales = parts["blocks"], parts["scales"]

        def rows(t: torch.Tensor) -> torch.Tensor:  # one expert's [in, out] -> one block of 32 per row
            return t.transpose(-1, -2).reshape(-1, 32)

        codes = _nibbles(blocks).reshape(blocks.shape[0], -1, 32)
        scale = torch.ldexp(torch.ones(scales.shape), scales.to(torch.int32) - 127).reshape(blocks.shape[0], -1)
        done = Requantized(0, 0, 0)
        for e in range(blocks.shape[0]):  # expert by expert: temporaries the size of one expert
            codes[e], got, part = requantize_blocks(
                rows(w0[e]),
                rows(new[e]),
                codes[e],
                {"scale": scale[e]},
                encode=_encode,
                decode=_decode,
                fresh=_fresh,
            )
            scale[e] = got["scale"]
            done = done + part
        params = {"scale": scale.reshape(-1)}
        pairs = codes.reshape(-1, 16, 2)
        new_blocks = (pairs[..., 0] | (pairs[..., 1] << 4)).reshape(blocks.shape)
        exps = torch.log2(params["scale"]).round() + 127
        return {"blocks": new_blocks, "scales": exps.to(torch.uint8).reshape(scales.shape)}, done


def find(headers: Headers, qconfig: Mapping[str, Any]) -> list[QuantTensor]:
    """gpt-oss's packed experts: ``X_blocks`` [E, R, G, 16] with ``X_scales`` [E, R, G], both uint8."""
    infos = headers.infos
    found = []
    for name, blocks in infos.items():
        if not name.endswith("_blocks") or blocks.dtype != torch.uint8 or len(blocks.shape) != 4:
            continue
        base = name.removesuffix("_blocks")
        scales = infos.get(f"{base}_scales")
        if scales is None or scales.dtype != torch.uint8 or tuple(scales.shape) != tuple(blocks.shape[:-1]):
            continue
        if blocks.shape[-1] != 16:
            continue
        e, r, g, _ = blocks.shape
        parts = (("blocks", blocks), ("scales", scales))
        found.append(QuantTensor(base, (e, g * 32, r), parts, MXFP4()))
    return found


FORMAT = Format(
    name="mxfp4",
    reads="MXFP4 experts",
    find=find,
    codecs=(MXFP4,),
    marks=lambda name: name.endswith("_blocks"),
)
