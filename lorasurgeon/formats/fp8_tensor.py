"""FP8 weights with one scale per tensor, or none: the diffusion checkpoints ComfyUI and Forge load as
``fp8_e4m3fn`` (``flux1-dev-fp8.safetensors``: each weight cast to float8, no scale) and ComfyUI's
``scaled_fp8`` ones (a ``scaled_fp8`` marker tensor, each weight ``X.weight`` float8 with a float32
``X.scale_weight``: ``W = float(q) · scale``, as ComfyUI's ``comfy/ops.py`` dequantizes it; ``X.scale_input``
is an activation scale, copied where the format is kept, dropped where it is not).

Re-quantizing keeps each tensor's scale (it is the tensor's only one) and re-encodes only the changed values,
``q = fp8(clamp(W / scale, ±max))`` (``formats.base.requantize_blocks``, one block per row, whose fresh
scale is the stored one); unchanged values keep their bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .base import Format, Headers, QuantTensor, Requantized, requantize_blocks

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch

MAX = {"F8_E4M3": 448.0, "F8_E5M2": 57344.0}  # the largest finite value of each float8
MARKER = "scaled_fp8"  # ComfyUI's marker tensor of a scaled-fp8 checkpoint
SCALE = ".scale_weight"


class TensorFP8:
    """One float8 weight, with its tensor scale (``scale`` part) or none."""

    def __init__(self, stored: str, scaled: bool):
        self.stored = stored  # safetensors' dtype name: F8_E4M3 or F8_E5M2
        self.scaled = scaled
        self.method = f"scaled {stored} (one scale per tensor)" if scaled else f"{stored} (no scale)"

    def _fp8(self) -> torch.dtype:
        return torch.float8_e4m3fn if self.stored == "F8_E4M3" else torch.float8_e5m2

    def _scale(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return parts["scale"].to(torch.float32).reshape(()) if self.scaled else torch.ones(())

    def dequantize(self, qt: QuantTensor, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return parts["weight"].to(torch.float32) * self._scale(parts)

    def requantize(
        self, qt: QuantTensor, parts: Mapping[str, torch.Tensor], w0: torch.Tensor, new: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], Requantized]:
        weight = parts["weight"]
        rows = weight.shape[0] if weight.dim() else 1
        scale = self._scale(parts)
        fp8, top = self._fp8(), MAX[self.stored]

        def encode(values: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
            return (values / params["scale"][:, None]).clamp(-top, top).to(fp8).view(torch.uint8)

        def decode(codes: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
            return codes.contiguous().view(fp8).to(torch.float32) * params["scale"][:, None]

        def fresh(values: torch.Tensor, at: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"scale": scale.expand(len(at)).clone()}  # the tensor's one scale: nothing fresher to give

        codes = weight.contiguous().view(torch.uint8).reshape(rows, -1)
        params = {"scale": scale.expand(rows).clone()}
        codes, _, done = requantize_blocks(
            w0.reshape(rows, -1), new.reshape(rows, -1), codes, params, encode=encode, decode=decode, fresh=fresh
        )
        out = {"weight": codes.view(fp8).reshape(weight.shape)}
        if self.scaled:
            out["scale"] = parts["scale"]
        return out, done


def find(headers: Headers, qconfig: Mapping[str, Any]) -> list[QuantTensor]:
    """Every float8 ``X.weight``, with its ``X.scale_weight`` where the file has one."""
    infos = headers.infos
    found = []
    for name, info in infos.items():
        if info.dtype_name not in MAX or not name.endswith(".weight"):
            continue
        scale = infos.get(name.removesuffix(".weight") + SCALE)
        parts = (("weight", info), ("scale", scale)) if scale is not None else (("weight", info),)
        found.append(QuantTensor(name, info.shape, parts, TensorFP8(info.dtype_name, scale is not None)))
    return found


FORMAT = Format(
    name="fp8-tensor",
    reads="FP8 weights with one scale per tensor or none (ComfyUI's fp8 and scaled_fp8 checkpoints)",
    find=find,
    codecs=(TensorFP8,),
    marks=lambda name: name.endswith((MARKER, SCALE)),
    stores=lambda name, dtype: dtype in MAX and name.endswith(".weight"),
)
