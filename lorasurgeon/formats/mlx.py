"""MLX affine quantization: what mlx-lm's ``convert -q`` (``mlx_lm.utils.quantize_model``) writes.

A quantized ``Linear`` or ``Embedding`` ``X`` (``QuantizedSwitchLinear``'s expert stacks too) is three
tensors: ``X.weight`` uint32 ``[..., out, in·bits/32]``, ``X.scales`` and ``X.biases`` ``[..., out,
in/group_size]`` in the model's dtype. Each row's codes are one little-endian bit stream: code ``j`` at
bit ``j·bits`` (LSB first; 3-, 5- and 6-bit codes run across word boundaries). ``mx.dequantize``
computes ``w = scale · q + bias`` in the scales' dtype, rounding after the product and after the sum.
config.json: ``quantization`` (and its copy ``quantization_config``) = ``{group_size, bits, mode}``,
with per-module overrides under the module's path (a dict, or ``True`` for the defaults). Re-quantizing
a group keeps its scale and bias where that is at least as close; otherwise ``mx.quantize``'s own rule
on the values in the model's dtype (the range's larger end exact, the scale ``±(max − min)/(2^bits − 1)``
made to land a code on it; 1-bit: scale ``max − min``, bias ``min``), codes ``rint((w − bias)/scale)``
from the unrounded scale, stored scales rounded to the model's dtype. The other MLX modes (mxfp4, mxfp8,
nvfp4: float codes, uint8 scales, no biases) are refused by name. docs/formats.md ("MLX affine") cites
the sources.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

from ..errors import CorruptCheckpointError, UnsupportedError
from ..io.checkpoint import TensorInfo
from .base import Format, Headers, QuantTensor, Requantized, requantize_blocks, slabs

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch

BITS = (1, 2, 3, 4, 5, 6, 8)  # mx.quantize's affine bits (mlx 0.32.4)
MODE_DEFAULTS = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}  # nn.quantize's
EPS = 1e-7  # mlx's floor on a group's scale


# --- packing: codes <-> uint32 words, one little-endian bit stream per row ---------------------------------
def unpack(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """uint32 words ``[rows, n·bits/32]`` -> int32 codes ``[rows, n]`` (code j at bit j·bits of the row)."""
    rows = words.shape[0]
    by = words.contiguous().view(torch.uint8).reshape(rows, -1).to(torch.int32)
    by = torch.nn.functional.pad(by, (0, 1))  # a code's two bytes never run past the row's last + 1
    start = torch.arange(n) * bits
    lo = start // 8
    pair = by[:, lo] | (by[:, lo + 1] << 8)
    return (pair >> (start % 8)) & ((1 << bits) - 1)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int codes ``[rows, n]`` (n a multiple of 8) -> uint32 words ``[rows, n·bits/32]``: the inverse of
    :func:`unpack`. Eight codes fill ``bits`` bytes exactly."""
    rows = codes.shape[0]
    eight = codes.to(torch.int64).reshape(rows, -1, 8)
    chunk = (eight << (torch.arange(8) * bits)).sum(dim=-1)  # ≤ 64 bits; int64 wraps, bits stay disjoint
    by = (chunk[..., None] >> (torch.arange(bits) * 8)) & 0xFF
    return by.to(torch.uint8).reshape(rows, -1).view(torch.uint32)


def _rounded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 ``x`` rounded to ``dtype`` (nearest even) and back: what mlx computing in ``dtype`` keeps."""
    return x if dtype == torch.float32 else x.to(dtype).to(torch.float32)


def decode(codes: torch.Tensor, p: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Groups of codes ``[m, g]`` -> values, as mx.dequantize computes them in the scales' ``dtype``:
    ``scale · q`` rounded, ``+ bias`` rounded (mlx/ops.cpp affine_dequantize)."""
    v = _rounded(codes.to(torch.float32) * p["scale"][:, None], dtype)
    return _rounded(v + p["bias"][:, None], dtype)


class MLXAffine:
    def __init__(self, bits: int, group_size: int):
        self.bits, self.group_size = bits, group_size
        self.method = f"MLX affine {bits}-bit (group {group_size})"

    def _codes(self, qt: QuantTensor, words: torch.Tensor) -> torch.Tensor:
        return unpack(words.reshape(-1, words.shape[-1]), self.bits, qt.shape[-1])

    def dequantize(self, qt: QuantTensor, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        scales = parts["scales"]
        p = {"scale": scales.reshape(-1).to(torch.float32), "bias": parts["biases"].reshape(-1).to(torch.float32)}
        codes = self._codes(qt, parts["weight"]).reshape(-1, self.group_size)
        return decode(codes, p, scales.dtype).reshape(qt.shape)

    # --- re-quantizing, group by group ----------------------------------------------------------------
    def _encode(self, x: torch.Tensor, p: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Codes of ``x`` (rounded to the model's dtype first, as the weight mx.quantize is given) for the
        groups' encoding scale and bias: ``rint((w − bias) / scale)`` clipped to [0, 2^bits − 1]."""
        y = (_rounded(x, dtype) - p["qbias"][:, None]) / p["qscale"][:, None]
        return torch.nan_to_num(torch.round(y), nan=0.0).clamp(0, (1 << self.bits) - 1).to(torch.int32)

    def fresh(self, x: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """mx.quantize's parameters for groups ``x`` ``[m, g]`` (mlx/backend/cpu/quantized.cpp quantize):
        the values in the model's dtype, the arithmetic in float32. ``qscale``/``qbias`` are what the codes
        are computed with; ``scale``/``bias`` what is stored (rounded to ``dtype``)."""
        w = _rounded(x, dtype)
        lo, hi = w.amin(dim=1), w.amax(dim=1)
        scale = torch.maximum((hi - lo) / float((1 << self.bits) - 1), torch.tensor(EPS, dtype=torch.float32))
        if self.bits == 1:  # (mlx 0.32.4, measured: tests/test_quantized_mlx.py) the range, from the minimum
            return {"scale": _rounded(scale, dtype), "bias": lo, "qscale": scale, "qbias": lo}
        mask = lo.abs() > hi.abs()
        scale = torch.where(mask, scale, -scale)
        edge = torch.where(mask, lo, hi)
        q0 = torch.round(edge / scale)
        scale = torch.where(q0 != 0, edge / q0, scale)
        bias = torch.where(q0 != 0, edge, torch.zeros_like(edge))
        return {"scale": _rounded(scale, dtype), "bias": _rounded(bias, dtype), "qscale": scale, "qbias": bias}

    def requantize(
        self, qt: QuantTensor, parts: Mapping[str, torch.Tensor], w0: torch.Tensor, new: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], Requantized]:
        words, scales, biases = parts["weight"], parts["scales"], parts["biases"]
        dtype, g, n = scales.dtype, self.group_size, qt.shape[-1]
        rows, per_row = math.prod(qt.shape[:-1]), n // g
        codes = self._codes(qt, words)
        # copies, written group by group (a float32 part's .to(float32) would be the stored tensor itself)
        scale, bias = (t.reshape(-1).to(torch.float32, copy=True) for t in (scales, biases))
        w0_rows, new_rows = w0.reshape(rows, n), new.reshape(rows, n)
        done = Requantized(0, 0, 0)
        for rs in slabs(rows, n, 1):
            bs = slice(rs.start * per_row, rs.stop * per_row)
            got, params, part = requantize_blocks(
                w0_rows[rs].reshape(-1, g),
                new_rows[rs].reshape(-1, g),
                codes[rs].reshape(-1, g),
                {"scale": scale[bs], "bias": bias[bs], "qscale": scale[bs], "qbias": bias[bs]},
                encode=partial(self._encode, dtype=dtype),
                decode=partial(decode, dtype=dtype),
                fresh=lambda x, _: self.fresh(x, dtype),
            )
            codes[rs] = got.reshape(-1, n)
            scale[bs], bias[bs] = params["scale"], params["bias"]
            done = done + part
        out = {
            "weight": pack(codes, self.bits).reshape(words.shape),
            "scales": scale.to(dtype).reshape(scales.shape),
            "biases": bias.to(dtype).reshape(biases.shape),
        }
        return out, done


# --- finding the quantized weights from the headers -------------------------------------------------------
def _params(qconfig: Mapping[str, Any], module: str) -> tuple[str, int, int]:
    """(mode, bits, group_size) a module was quantized with: its own entry in the quantization block (a
    dict, its missing keys nn.quantize's defaults for its mode), else the block's top-level values."""
    own = qconfig.get(module)
    if own is False:
        raise CorruptCheckpointError(f"{module}: stored quantized, but config.json's quantization says it is not")
    try:
        return _entry(qconfig, own, module)
    except (TypeError, ValueError):  # bits or group_size that int() does not take
        raise CorruptCheckpointError(
            f"{module}: config.json's quantization entry for it is not {{group_size, bits, mode}} numbers"
        ) from None


def _entry(qconfig: Mapping[str, Any], own: Any, module: str) -> tuple[str, int, int]:
    """(mode, bits, group_size) from a module's own entry ``own`` (a dict, or True/None for the top level)."""
    if isinstance(own, Mapping):
        mode = str(own.get("mode") or "affine")
        group, bits = MODE_DEFAULTS.get(mode, (0, 0))
        return mode, int(own.get("bits") or bits), int(own.get("group_size") or group)
    if qconfig.get("bits") is None or qconfig.get("group_size") is None:
        raise UnsupportedError(
            f"{module}: MLX quantized weights, but config.json's quantization block has no {{bits, group_size}} "
            "for it (mlx-lm writes them in quantization and quantization_config)"
        )
    return str(qconfig.get("mode") or "affine"), int(qconfig["bits"]), int(qconfig["group_size"])


def _check(module: str, weight: TensorInfo, scales: TensorInfo, biases: TensorInfo | None, bits: int, g: int) -> int:
    """The plain tensor's last dimension, once the three parts are seen to fit together.

    Raises:
        CorruptCheckpointError: parts whose dtypes or shapes do not fit, named with what was expected.
    """
    if biases is None:
        raise CorruptCheckpointError(f"{module}: MLX affine weight and scales without biases")
    if scales.dtype_name not in ("F32", "F16", "BF16") or biases.dtype_name != scales.dtype_name:
        raise CorruptCheckpointError(
            f"{module}: MLX affine scales {scales.dtype_name} and biases {biases.dtype_name} (both F32, F16 or BF16)"
        )
    packed = weight.shape[-1] if weight.shape else 0
    n = packed * 32 // bits
    want = [*weight.shape[:-1], n // g] if n % g == 0 and packed * 32 % bits == 0 else None
    if len(weight.shape) < 2 or n == 0 or want != list(scales.shape) or list(biases.shape) != list(scales.shape):
        raise CorruptCheckpointError(
            f"{module}: MLX affine parts do not fit together with bits={bits}, group_size={g}: weight "
            f"{list(weight.shape)} U32, scales {list(scales.shape)}, biases {list(biases.shape)} "
            f"(expected scales {want if want is not None else '[..., in / group_size]'})"
        )
    return n


def _tensor(module: str, infos: Mapping[str, TensorInfo], qconfig: Mapping[str, Any]) -> QuantTensor:
    weight, scales = infos[f"{module}.weight"], infos[f"{module}.scales"]
    biases = infos.get(f"{module}.biases")
    mode, bits, g = _params(qconfig, module)
    if mode != "affine":
        raise UnsupportedError(
            f"{module}: MLX {mode} quantization (float codes, uint8 scales, no biases) is not read; "
            "lorasurgeon reads MLX affine (weight, scales, biases)"
        )
    if bits not in BITS or g <= 0 or g % 8:
        raise UnsupportedError(
            f"{module}: MLX affine with bits={bits}, group_size={g} is not read "
            f"(bits {', '.join(map(str, BITS))}; group sizes multiples of 8)"
        )
    n = _check(module, weight, scales, biases, bits, g)
    assert biases is not None  # _check refused a module without them
    parts = (("weight", weight), ("scales", scales), ("biases", biases))
    return QuantTensor(f"{module}.weight", (*weight.shape[:-1], n), parts, MLXAffine(bits, g), {"bits": bits})


def find(headers: Headers, qconfig: Mapping[str, Any]) -> list[QuantTensor]:
    """The quantized weights of an MLX checkpoint: each module with a uint32 ``weight`` and ``scales``.

    Raises:
        UnsupportedError: a mode (mxfp4, mxfp8, nvfp4), bits or group size it does not read, by name.
        CorruptCheckpointError: parts that do not fit together.
    """
    infos = headers.infos
    found = []
    for name in infos:
        module = name.removesuffix(".scales")
        weight = infos.get(f"{module}.weight")
        if module != name and weight is not None and weight.dtype_name == "U32":
            found.append(_tensor(module, infos, qconfig))
    return found


FORMAT = Format(
    name="mlx",
    reads="MLX affine (mlx-lm)",
    find=find,
    codecs=(MLXAffine,),
    marks=lambda name: name.endswith(".biases"),  # config.json names no quant_method; only MLX writes .biases
)
