"""compressed-tensors (llm-compressor's output): float-, int-, naive- and pack-quantized weights.

``W = (q − zero_point) · scale``, the scale per tensor ``[1]``, channel ``[out, 1]``, group
``[out, in/g]`` (column j in group ``g_idx[j]`` when activation order stored one) or block
``[ceil(out/bh), ceil(in/bw)]``. pack-quantized keeps int4/int8 codes ``q + 2^(bits−1)`` packed
into int32 words along the columns, LSB first (zero points along the rows). Re-quantizing a
block keeps its scale and zero point where that is at least as close; otherwise compressed-tensors'
``calculate_qparams`` rule: the range widened to include 0, ``max|x| / ((qmax − qmin)/2)``
symmetric, ``(max − min)/(qmax − qmin)`` with ``zp = round(qmin − min/scale)`` asymmetric.
Rotations (``transform_config``) and sparsity change what the stored tensors mean: refused by name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import UnsupportedError
from ..io.checkpoint import TensorInfo
from .base import Format, Headers, QuantTensor, Requantized, requantize_blocks, round_up_in, slabs
from .fp8 import FP8_MAX, decode_e4m3, expand_tiles, from_tiles, scale_tiles_, to_tiles

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch

SUPPORTED = ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized")


# --- packing: int codes <-> int32 words, ``bits`` per code, LSB first ---------------------------------
def unpack(words: torch.Tensor, bits: int, n: int, dim: int = 1) -> torch.Tensor:
    """int32 words packed along ``dim`` -> int8 codes, ``n`` of them along that axis."""
    w = words if dim == 1 else words.t()
    per_byte = 8 // bits
    by = w.contiguous().view(torch.uint8)  # little-endian: a word's low byte first
    fields = torch.stack([(by >> (bits * k)) & ((1 << bits) - 1) for k in range(per_byte)], dim=-1)
    codes = (fields.reshape(w.shape[0], -1)[:, :n].to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
    return codes if dim == 1 else codes.t().contiguous()


def pack(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """int8 codes -> int32 words along ``dim`` (the inverse of :func:`unpack`, zero-padded)."""
    c = codes if dim == 1 else codes.t()
    per_word = 32 // bits
    rows, n = c.shape
    words = -(-n // per_word)
    u = torch.nn.functional.pad(c.to(torch.int64) + (1 << (bits - 1)), (0, words * per_word - n))
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    packed = (u.reshape(rows, words, per_word) << shifts).sum(dim=-1)
    out = (packed - ((packed >= 2**31).to(torch.int64) << 32)).to(torch.int32)
    return out if dim == 1 else out.t().contiguous()


class Compressed:
    def __init__(self, fmt: str, args: Mapping[str, Any]):
        self.fmt = fmt
        self.bits = int(args.get("num_bits", 8))
        self.float = args.get("type", "int") == "float"
        self.symmetric = bool(args.get("symmetric", True))
        self.strategy = str(args.get("strategy", "tensor"))
        self.group = int(args.get("group_size") or 0)
        self.block = tuple(args.get("block_structure") or (128, 128))
        if self.float and self.bits != 8:
            raise UnsupportedError(f"compressed-tensors float{self.bits} weights are not supported (FP8 is)")
        if self.fmt == "pack-quantized" and self.bits not in (2, 4, 8):
            raise UnsupportedError(f"compressed-tensors pack-quantized int{self.bits} is not supported (int2/4/8 are)")
        if self.strategy not in ("tensor", "channel", "group", "block"):
            raise UnsupportedError(f"compressed-tensors weight strategy {self.strategy!r} is not supported")
        self.method = f"compressed-tensors {'fp8' if self.float else f'int{self.bits}'} {self.strategy} ({fmt})"

    @property
    def qrange(self) -> tuple[float, float]:
        if self.float:
            return -FP8_MAX, FP8_MAX
        return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1

    # stored codes as an int8/fp8 matrix, and back
    def codes(self, qt: QuantTensor, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if "packed" in parts:
            return unpack(parts["packed"], self.bits, qt.shape[1])
        return parts["weight"]

    def zero_point(self, qt: QuantTensor, parts: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        zp = parts.get("zero_point")
        if zp is None:
            return None
        if self.fmt == "pack-quantized" and zp.dtype == torch.int32:
            return unpack(zp, self.bits, qt.shape[0], dim=0)
        return zp

    def _expand(self, qt: QuantTensor, t: torch.Tensor, g_idx: torch.Tensor | None) -> torch.Tensor:
        """A per-tensor/channel/group/block parameter stretched over the weight's elements."""
        rows, cols = qt.shape
        if self.strategy == "tensor":
            return t.reshape(1, 1).expand(rows, cols)
        if self.strategy == "channel":
            return t.reshape(rows, 1).expand(rows, cols)
        if self.strategy == "block":
            return expand_tiles(t, qt.shape, self.block)
        groups = g_idx.long() if g_idx is not None else torch.arange(cols) // self.group
        return t[:, groups]

    def dequantize(self, qt: QuantTensor, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        g_idx = parts.get("g_idx")
        q = self.codes(qt, parts).to(torch.float32)
        zp = self.zero_point(qt, parts)
        if zp is not None:
            q.sub_(self._expand(qt, zp, g_idx).to(torch.float32))
        if self.strategy == "block" and zp is None:
            return scale_tiles_(q, parts["scale"], self.block)
        return q.mul_(self._expand(qt, parts["scale"], g_idx).to(torch.float32))

    # --- re-quantizing, block by block ---------------------------------------------------------------
    def _blocks(self, t: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
        rows, cols = t.shape
        if self.strategy == "tensor":
            return t.reshape(1, -1)
        if self.strategy == "channel":
            return t.reshape(rows, cols)
        if self.strategy == "block":
            return to_tiles(t, self.block)
        if perm is not None:
            t = t[:, perm]
        return t.reshape(rows * (cols // self.group), self.group)

    def _unblocks(self, t: torch.Tensor, shape: tuple[int, int], perm: torch.Tensor | None) -> torch.Tensor:
        rows, cols = shape
        if self.strategy == "block":
            return from_tiles(t, shape, self.block)
        t = t.reshape(rows, cols)
        if self.strategy == "group" and perm is not None:
            t = t[:, torch.argsort(perm)]
        return t

    def _encode(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        lo, hi = self.qrange
        y = x / p["scale"].to(torch.float32)[:, None]
        if self.float:
            return y.clamp(lo, hi).to(torch.float8_e4m3fn).view(torch.uint8)
        if "zero_point" in p:
            y = y + p["zero_point"].to(torch.float32)[:, None]
        r = torch.round(y)  # half to even, as torch.round
        return r.clamp(lo, hi).to(torch.int8)

    def _decode(self, codes: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.float:
            return decode_e4m3(codes, p)
        q = codes.to(torch.float32)
        if "zero_point" in p:
            q = q - p["zero_point"].to(torch.float32)[:, None]
        return q * p["scale"].to(torch.float32)[:, None]

    def _fresh(self, x: torch.Tensor, scale_dtype: torch.dtype, zp: bool) -> dict[str, torch.Tensor]:
        lo, hi = self.qrange
        mn = torch.clamp(x.amin(dim=1), max=0)
        mx = torch.clamp(x.amax(dim=1), min=0)
        eps = torch.finfo(scale_dtype).eps
        if self.symmetric or not zp:
            s = torch.maximum(mn.abs(), mx) / ((hi - lo) / 2)
            s = round_up_in(scale_dtype, torch.where(s == 0, torch.full_like(s, eps), s)).to(torch.float32)
            return {"scale": s} | ({"zero_point": torch.zeros_like(s)} if zp else {})
        s = (mx - mn) / (hi - lo)
        s = round_up_in(scale_dtype, torch.where(s == 0, torch.full_like(s, eps), s)).to(torch.float32)
        z = torch.round(lo - mn / s).clamp(lo, hi)
        return {"scale": s, "zero_point": z}

    def requantize(
        self, qt: QuantTensor, parts: Mapping[str, torch.Tensor], w0: torch.Tensor, new: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], Requantized]:
        g_idx = parts.get("g_idx")
        perm = None
        if self.strategy == "group":
            if g_idx is not None:
                perm = torch.argsort(g_idx.long(), stable=True)
                sizes = torch.bincount(g_idx.long())
                if not bool((sizes == self.group).all()):
                    raise UnsupportedError(f"{qt.name}: g_idx groups of unequal sizes cannot be re-quantized")
            elif qt.shape[1] % self.group:
                raise UnsupportedError(f"{qt.name}: {qt.shape[1]} columns are not whole groups of {self.group}")
        scale = parts["scale"]
        zp = self.zero_point(qt, parts)
        # each parameter with one row per row of blocks, so that a slab of weight rows has its own
        grid = {
            "scale": scale.to(torch.float32).reshape(-1, 1) if self.strategy == "tensor" else scale.to(torch.float32)
        }
        if zp is not None:
            grid["zero_point"] = zp.to(torch.float32).reshape(grid["scale"].shape)
        stored = self.codes(qt, parts)
        codes = (stored.view(torch.uint8) if self.float else stored).clone()
        rows, cols = qt.shape
        unit = self.block[0] if self.strategy == "block" else 1
        done = Requantized(0, 0, 0)
        for rs in [slice(0, rows)] if self.strategy == "tensor" else slabs(rows, cols, unit):
            ps = slice(rs.start // unit, -(-rs.stop // unit)) if self.strategy != "tensor" else slice(0, 1)
            got, params, part = requantize_blocks(
                self._blocks(w0[rs], perm),
                self._blocks(new[rs], perm),
                self._blocks(codes[rs], perm),
                {k: v[ps].reshape(-1) for k, v in grid.items()},
                encode=self._encode,
                decode=self._decode,
                fresh=lambda x, _: self._fresh(x, scale.dtype, zp is not None),
            )
            codes[rs] = self._unblocks(got, (rs.stop - rs.start, cols), perm)
            for k, v in params.items():
                grid[k][ps] = v.reshape(grid[k][ps].shape)
            done = done + part
        q = codes
        params = {k: v.reshape(-1) for k, v in grid.items()}
        out: dict[str, torch.Tensor] = {"scale": params["scale"].to(scale.dtype).reshape(scale.shape)}
        if self.float:
            out["weight"] = q.view(torch.float8_e4m3fn)
        elif "packed" in parts:
            out["packed"] = pack(q, self.bits)
        else:
            out["weight"] = q
        if zp is not None:
            z = params["zero_point"].round().to(torch.int8).reshape(zp.shape)
            stored_zp = parts["zero_point"]
            out["zero_point"] = pack(z, self.bits, dim=0) if stored_zp.dtype == torch.int32 else z.to(stored_zp.dtype)
        return out, done


def _matches(target: str, module: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == module or module.endswith("." + target)


def _scheme(qconfig: Mapping[str, Any], module: str) -> tuple[str, Mapping[str, Any]]:
    """(format, weight args) of the config group a module belongs to (a name or regex target before a
    class-name target such as "Linear", which headers cannot check and every quantized module has)."""
    groups = qconfig.get("config_groups") or {}
    by_name, by_class = [], []
    for group in groups.values():
        if not isinstance(group, Mapping) or not group.get("weights"):
            continue
        for target in group.get("targets") or ():
            if target.startswith("re:") or "." in target:
                if _matches(target, module):
                    by_name.append(group)
            else:
                by_class.append(group)
    chosen = (by_name or by_class)[0] if by_name or by_class else None
    if chosen is None:
        raise UnsupportedError(f"config.json quantization_config: no config_groups entry covers {module!r}")
    return str(chosen.get("format") or qconfig.get("format") or ""), chosen["weights"]


def find(headers: Headers, qconfig: Mapping[str, Any]) -> list[QuantTensor]:
    """The quantized weights of a compressed-tensors checkpoint: each module with a ``weight_scale``.

    Raises:
        UnsupportedError: a rotation, sparsity, or a format or scheme it does not handle, by name.
    """
    if qconfig.get("transform_config"):
        raise UnsupportedError(
            "compressed-tensors transform_config (Hadamard rotations): the stored weights live in a rotated "
            "basis, so a LoRA change would have to be rotated too; not supported"
        )
    sparsity = qconfig.get("sparsity_config")
    if isinstance(sparsity, Mapping) and sparsity.get("format") not in (None, "dense"):
        raise UnsupportedError(f"compressed-tensors sparsity_config format {sparsity.get('format')!r}: not supported")
    infos, read = headers.infos, headers.read
    found = []
    for name, scale in infos.items():
        if not name.endswith(".weight_scale"):
            continue
        module = name.removesuffix(".weight_scale")
        fmt, args = _scheme(qconfig, module)
        if fmt not in SUPPORTED:
            raise UnsupportedError(
                f"{module}: compressed-tensors format {fmt!r} is not supported (these are: {', '.join(SUPPORTED)})"
            )
        codec = Compressed(fmt, args)
        packed = infos.get(f"{module}.weight_packed")
        weight = infos.get(f"{module}.weight")
        if packed is not None:
            shape_info = infos.get(f"{module}.weight_shape")
            if shape_info is None:
                raise UnsupportedError(f"{module}: weight_packed without weight_shape")
            parts: list[tuple[str, TensorInfo]] = [("packed", packed), ("shape", shape_info)]
            shape: tuple[int, ...] = tuple(int(d) for d in read(shape_info).tolist())
            if len(shape) != 2 or shape[0] != packed.shape[0] or -(-shape[1] * codec.bits // 32) != packed.shape[1]:
                raise UnsupportedError(
                    f"{module}: weight_shape {list(shape)} does not fit weight_packed {list(packed.shape)}"
                )
        elif weight is not None and (not weight.dtype.is_floating_point or weight.dtype == torch.float8_e4m3fn):
            parts, shape = [("weight", weight)], tuple(weight.shape)
        else:
            continue
        parts.append(("scale", scale))
        for role, suffix in (("zero_point", "weight_zero_point"), ("g_idx", "weight_g_idx")):
            if f"{module}.{suffix}" in infos:
                parts.append((role, infos[f"{module}.{suffix}"]))
        if codec.strategy == "group" and not codec.group:
            raise UnsupportedError(f"{module}: group strategy without group_size")
        found.append(QuantTensor(f"{module}.weight", shape, tuple(parts), codec))
    return found


FORMAT = Format(
    name="compressed-tensors",
    reads="compressed-tensors (float/int/naive/pack-quantized)",
    find=find,
    codecs=(Compressed,),
)
