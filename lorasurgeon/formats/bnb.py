"""bitsandbytes: 4-bit nf4/fp4 (with or without double quantization) and LLM.int8 weights.

4-bit: the weight flattened row-major, blocks of ``blocksize`` (64) values, two codes per byte
(element 2k in the HIGH nibble), ``W[i] = quant_map[code_i] · absmax[i // blocksize]`` in float32.
Double quantization stores absmax itself as uint8 codes: ``absmax = nested_quant_map[c] ·
nested_absmax[b // 256] + offset``. The layout is in ``X.weight.quant_state.bitsandbytes__<type>``,
a JSON object stored as bytes. Re-quantizing a block (bitsandbytes' quantize_4bit): keep its
absmax where that is at least as close, otherwise the block's max|x| (with double quantization: the
nearest code within its group's nested scale, which never changes); codes nearest to x / absmax,
ties to the lower code.

LLM.int8: ``X.weight`` int8 + ``X.SCB`` (row absmax): ``W = q · SCB / 127`` computed as
bitsandbytes does (``q · SCB · 7.874015718698502e-3`` in float32); re-quantized per row.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import CorruptCheckpointError, UnsupportedError
from ..io.checkpoint import TensorInfo
from .base import Format, Headers, QuantTensor, Requantized, nearest_code, requantize_blocks, slabs

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch

INV_127 = 7.874015718698502e-3  # bitsandbytes' int8_vectorwise_dequant multiplies by this
STATE = ".weight.quant_state.bitsandbytes__"


class Bnb4bit:
    def __init__(self, state: Mapping[str, Any]):
        self.state = state
        self.blocksize = int(state["blocksize"])
        self.nested = "nested_blocksize" in state
        self.nested_blocksize = int(state.get("nested_blocksize", 256))
        self.offset = float(state.get("nested_offset", 0.0))
        self.method = f"bitsandbytes {state['quant_type']}" + (" (double quantized)" if self.nested else "")

    def absmax(self, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        a = parts["absmax"]
        if not self.nested:
            return a.to(torch.float32)
        code = parts["nested_quant_map"].to(torch.float32)
        n = a.numel()
        scale = parts["nested_absmax"].to(torch.float32).repeat_interleave(self.nested_blocksize)[:n]
        return code[a.long()] * scale + self.offset

    @staticmethod
    def _codes(packed: torch.Tensor) -> torch.Tensor:
        b = packed.contiguous().view(torch.uint8).reshape(-1)
        return torch.stack((b >> 4, b & 0x0F), dim=-1).reshape(-1)

    def dequantize(self, qt: QuantTensor, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        n = math.prod(qt.shape)
        codes = self._codes(parts["weight"])[:n]
        absmax = self.absmax(parts).repeat_interleave(self.blocksize)[:n]
        return (parts["quant_map"].to(torch.float32)[codes.long()] * absmax).reshape(qt.shape)

    def _flat_blocks(self, t: torch.Tensor) -> torch.Tensor:
        flat = t.reshape(-1)
        pad = -len(flat) % self.blocksize
        return torch.nn.functional.pad(flat, (0, pad)).reshape(-1, self.blocksize)

    def requantize(
        self, qt: QuantTensor, parts: Mapping[str, torch.Tensor], w0: torch.Tensor, new: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], Requantized]:
        n = math.prod(qt.shape)
        table = parts["quant_map"].to(torch.float32)

        def encode(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
            a = p["absmax"][:, None]
            y = torch.where(a > 0, x / a, torch.zeros_like(x))
            return nearest_code(y.clamp(-1, 1), table).to(torch.uint8)

        absmax = self.absmax(parts)
        state: dict[str, torch.Tensor] = {"absmax": absmax}
        codes_in = self._flat_blocks(self._codes(parts["weight"])[:n])  # the last block zero-padded
        w0b, newb = self._flat_blocks(w0), self._flat_blocks(new)
        codes, params, done = requantize_blocks(
            w0b,
            newb,
            codes_in,
            state,
            encode=encode,
            decode=lambda c, p: table[c.long()] * p["absmax"][:, None],
            fresh=lambda x, at: {"absmax": self._as_stored(parts, x.abs().amax(dim=1), at)},
        )
        out: dict[str, torch.Tensor] = {}
        if self.nested:  # the new absmax values are representable: store their codes
            a_codes = parts["absmax"].clone()
            moved = (params["absmax"] != absmax).nonzero().squeeze(1)
            a_codes[moved] = self._nested_codes(parts, params["absmax"][moved], moved).to(a_codes.dtype)
            out["absmax"] = a_codes
        else:
            out["absmax"] = params["absmax"].to(parts["absmax"].dtype)
        flat = codes.reshape(-1)[:n]
        flat = torch.nn.functional.pad(flat, (0, len(flat) % 2))
        packed = ((flat[0::2] << 4) | flat[1::2]).to(torch.uint8)
        weight = parts["weight"]
        out["weight"] = packed.view(weight.dtype).reshape(weight.shape)  # quant_storage: the same bytes
        return out, done

    def _nested_codes(
        self, parts: Mapping[str, torch.Tensor], amax: torch.Tensor, blocks: torch.Tensor
    ) -> torch.Tensor:
        """Double quantization's codes for these blocks' absmax: the nearest value under the group's
        nested scale, kept within the scale's range (the nested scales never change, so neither
        does any block the adapter left alone)."""
        table = parts["nested_quant_map"].to(torch.float32)
        nested = parts["nested_absmax"].to(torch.float32)[blocks // self.nested_blocksize]
        need = ((amax - self.offset) / nested).clamp(float(table.min()), float(table.max()))
        return nearest_code(need, table)

    def _as_stored(self, parts: Mapping[str, torch.Tensor], amax: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """A new absmax as the checkpoint will store it (double quantization: rounded to its code's value;
        a block whose values then overshoot it saturates, and is kept only where that is still closer)."""
        if not self.nested:
            return amax
        table = parts["nested_quant_map"].to(torch.float32)
        nested = parts["nested_absmax"].to(torch.float32)[blocks // self.nested_blocksize]
        return table[self._nested_codes(parts, amax, blocks)] * nested + self.offset


class Int8:
    method = "bitsandbytes LLM.int8"

    def dequantize(self, qt: QuantTensor, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return parts["weight"].to(torch.float32) * parts["SCB"].to(torch.float32).view(-1, 1) * INV_127

    def requantize(
        self, qt: QuantTensor, parts: Mapping[str, torch.Tensor], w0: torch.Tensor, new: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], Requantized]:
        def encode(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
            s = p["SCB"][:, None]
            y = torch.round(torch.where(s > 0, x * (127.0 / s), torch.zeros_like(x)))
            return y.clamp(-127, 127).to(torch.int8)

        rows = qt.shape[0]
        codes, scb = parts["weight"].reshape(rows, -1).clone(), parts["SCB"].to(torch.float32).clone()
        done = Requantized(0, 0, 0)
        for rs in slabs(rows, codes.shape[1], 1):
            codes[rs], params, part = requantize_blocks(
                w0.reshape(rows, -1)[rs],
                new.reshape(rows, -1)[rs],
                codes[rs],
                {"SCB": scb[rs]},
                encode=encode,
                decode=lambda c, p: c.to(torch.float32) * p["SCB"][:, None] * INV_127,
                fresh=lambda x, _: {"SCB": x.abs().amax(dim=1)},
            )
            scb[rs] = params["SCB"]
            done = done + part
        return {"weight": codes.reshape(qt.shape), "SCB": scb.to(parts["SCB"].dtype)}, done


def _state(info: TensorInfo, read: Callable[[TensorInfo], torch.Tensor]) -> dict[str, Any]:
    try:
        state = json.loads(bytes(read(info).view(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"{info.file}: {info.name} is not a bitsandbytes quant state ({exc})") from None
    if not isinstance(state, dict) or not {"quant_type", "blocksize", "shape", "dtype"} <= set(state):
        raise CorruptCheckpointError(f"{info.file}: {info.name} lacks quant_type/blocksize/shape/dtype")
    return state


def find(headers: Headers, qconfig: Mapping[str, Any]) -> list[QuantTensor]:
    """bitsandbytes' 4-bit weights (by their quant_state tensor) and LLM.int8 weights (by ``SCB``).

    Raises:
        UnsupportedError: an int8 weight_format other than row-major (0).
        CorruptCheckpointError: a quant state that is not bitsandbytes' JSON, or a part missing.
    """
    infos, read = headers.infos, headers.read
    found = []
    for name, info in infos.items():
        if STATE in name:
            module = name.split(STATE)[0]
            state = _state(info, read)
            roles = [("weight", f"{module}.weight"), ("absmax", f"{module}.weight.absmax")]
            roles += [("quant_map", f"{module}.weight.quant_map"), ("state", name)]
            if "nested_blocksize" in state:
                roles += [
                    ("nested_absmax", f"{module}.weight.nested_absmax"),
                    ("nested_quant_map", f"{module}.weight.nested_quant_map"),
                ]
            missing = [key for _, key in roles if key not in infos]
            if missing:
                raise CorruptCheckpointError(f"{info.file}: bitsandbytes 4-bit {module} lacks {', '.join(missing)}")
            parts = tuple((role, infos[key]) for role, key in roles)
            found.append(QuantTensor(f"{module}.weight", tuple(state["shape"]), parts, Bnb4bit(state)))
        elif name.endswith(".SCB"):
            module = name.removesuffix(".SCB")
            weight = infos.get(f"{module}.weight")
            if weight is None or weight.dtype != torch.int8:
                continue
            parts_i8: list[tuple[str, TensorInfo]] = [("weight", weight), ("SCB", info)]
            fmt = infos.get(f"{module}.weight_format")
            if fmt is not None:
                if int(read(fmt).reshape(-1)[0]) != 0:
                    raise UnsupportedError(f"{module}: LLM.int8 weight_format other than row-major (0)")
                parts_i8.append(("weight_format", fmt))
            found.append(QuantTensor(f"{module}.weight", tuple(weight.shape), tuple(parts_i8), Int8()))
    return found


FORMAT = Format(
    name="bitsandbytes",
    reads="bitsandbytes 4-bit and LLM.int8",
    find=find,
    codecs=(Bnb4bit, Int8),
    marks=lambda name: STATE in name or name.endswith(".SCB"),
)
