"""What every quantized format has in common: a weight stored as parts, and re-quantizing it by blocks.

A format module finds its ``QuantTensor``s from a checkpoint's headers and config.json, and gives
its ``Codec``: ``dequantize`` (the parts -> float32 values, code x scale in float32 as the producer's
reference computes them) and ``requantize`` (float32 values -> the parts, with the producer's rule
applied only where the values changed). Everything here is pure: tensors in, tensors out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..io.checkpoint import TensorInfo


class Codec(Protocol):
    """One quantized format's arithmetic."""

    method: str  # the format in words: "block FP8", "compressed-tensors int4 (pack-quantized)", ...

    def dequantize(self, qt: QuantTensor, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The stored parts (by role) -> the weight's values in float32, shaped ``qt.shape``."""
        ...

    def requantize(
        self, qt: QuantTensor, parts: Mapping[str, torch.Tensor], w0: torch.Tensor, new: torch.Tensor, fresh: bool
    ) -> tuple[dict[str, torch.Tensor], Requantized]:
        """New parts for ``new`` (float32, ``qt.shape``), given the stored ``parts`` that decode to ``w0``.

        Blocks where ``new == w0`` keep their bytes; a changed block keeps its scale where its values
        still fit under it and that is at least as close as a new scale by the producer's rule
        (changed elements re-encoded); otherwise it takes the new scale. ``fresh``: ignore the stored
        parts, quantize every block by the producer's rule."""
        ...


@dataclass(frozen=True)
class QuantTensor:
    """One quantized weight: the plain tensor it stands for, and the stored tensors it is made of."""

    name: str  # the plain tensor's name: "model.layers.0.mlp.down_proj.weight", "...experts.gate_up_proj"
    shape: tuple[int, ...]  # its shape once dequantized
    dtype: torch.dtype  # the dtype the producer dequantizes it to (the model's dtype)
    parts: tuple[tuple[str, TensorInfo], ...]  # (role, stored tensor), in reading order
    codec: Codec = field(compare=False)
    params: Mapping[str, Any] = field(default_factory=dict, compare=False)  # block size, bits, ...

    def part(self, role: str) -> TensorInfo:
        return dict(self.parts)[role]

    @property
    def roles(self) -> tuple[str, ...]:
        return tuple(r for r, _ in self.parts)

    @property
    def stored_nbytes(self) -> int:
        return sum(i.nbytes for _, i in self.parts)


@dataclass(frozen=True)
class Requantized:
    """What re-quantizing one tensor did, block by block."""

    blocks: int  # scale blocks in the tensor
    touched: int  # blocks whose values changed (re-encoded)
    rescaled: int  # of those, blocks given a new scale (the old one no longer fit, or fitted worse)


Encode = Callable[[torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
Decode = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
Fresh = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def requantize_blocks(
    w0: torch.Tensor,
    new: torch.Tensor,
    codes: torch.Tensor,
    params: dict[str, torch.Tensor],
    *,
    encode: Encode,
    decode: Decode,
    fresh: Fresh,
    all_fresh: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], Requantized]:
    """The re-quantization rule shared by every format, on values grouped into scale blocks.

    Args:
        w0, new: (blocks, size) float32: the stored values decoded, and the values wanted.
        codes: (blocks, size) stored codes (any integer dtype; padding included).
        params: each block's stored parameters, (blocks,) each (scale, zero point, ...).
        encode: (values, params of those blocks) -> (codes, per block whether any value clipped).
        decode: (codes, params of those blocks) -> values, as the format decodes them.
        fresh: values (m, size) -> params (m,) by the producer's rule.
        all_fresh: re-quantize every block by the producer's rule (what quantizing anew would give).

    Returns:
        New codes and params (untouched blocks keep theirs, byte for byte) and what was done.
    """
    codes, params = codes.clone(), {k: v.clone() for k, v in params.items()}
    changed = (new != w0) | torch.isnan(new)  # NaN never equals itself, but say it plainly
    touched = torch.ones(len(new), dtype=torch.bool) if all_fresh else changed.any(dim=1)
    idx = touched.nonzero().squeeze(1)
    if not len(idx):
        return codes, params, Requantized(len(new), 0, 0)
    values = new[idx]
    made = fresh(values)
    made = {k: v.to(params[k].dtype) for k, v in made.items()}  # as it will be stored
    got, _ = encode(values, made)
    use_fresh = torch.ones(len(idx), dtype=torch.bool)
    if not all_fresh:
        old = {k: v[idx] for k, v in params.items()}
        kept, clipped = encode(values, old)
        kept = torch.where(changed[idx], kept, codes[idx])  # unchanged elements keep their codes
        err_kept = (decode(kept, old) - values).square().sum(dim=1)
        err_fresh = (decode(got, made) - values).square().sum(dim=1)
        use_fresh = clipped | (err_fresh < err_kept)
        codes[idx[~use_fresh]] = kept[~use_fresh]
    rescale = idx[use_fresh]
    codes[rescale] = got[use_fresh]
    for k, v in made.items():
        params[k][rescale] = v[use_fresh]
    return codes, params, Requantized(len(new), len(idx), len(rescale))


def round_up_in(dtype: torch.dtype, value: torch.Tensor) -> torch.Tensor:
    """``value`` (float32) stored in ``dtype``, rounded up where rounding would make it smaller: a scale
    stored in bf16/f16 must not shrink, or the block's largest value would no longer fit under it."""
    stored = value.to(dtype)
    low = stored.to(torch.float32) < value
    if low.any():
        stored[low] = torch.nextafter(stored[low], torch.tensor(float("inf"), dtype=dtype))
    return stored


def nearest_code(x: torch.Tensor, table: torch.Tensor, ties_to_even: bool = False) -> torch.Tensor:
    """The index into ``table`` (float32 code values, any order) of the value nearest each of ``x``.

    Ties go to the smaller value (bitsandbytes' bucketize on midpoints), or with ``ties_to_even``
    to the even index of the sorted table (round-to-nearest-even, as E2M1 casts do)."""
    order = torch.argsort(table)
    values = table[order]
    mids = (values[:-1] + values[1:]) / 2
    i = torch.bucketize(x, mids)  # x == a midpoint -> the lower side
    if ties_to_even:
        tie = (i < len(mids)) & (x == mids[i.clamp(max=len(mids) - 1)])
        i = torch.where(tie & (i % 2 == 1), i + 1, i)
    return order[i]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ (0 when both are zero)."""
    den = float(torch.linalg.vector_norm(want.to(torch.float32)))
    num = float(torch.linalg.vector_norm(got.to(torch.float32) - want.to(torch.float32)))
    return 0.0 if num == 0 else (num / den if den else float("inf"))
