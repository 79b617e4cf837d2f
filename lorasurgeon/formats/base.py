"""What every quantized format has in common: a weight stored as parts, and re-quantizing it by blocks.

A format module exposes one ``Format`` (``formats.registry.FORMATS`` lists them): whether a checkpoint
is in it (``claims``, from config.json's quantization block and the tensor names), its ``QuantTensor``s
found from the headers (``find``), each with its ``Codec``: ``dequantize`` (the parts -> float32
values, code x scale in float32 as the producer's reference computes them) and ``requantize``
(float32 values -> the parts, with the producer's rule applied only where the values changed).
Everything here is pure: tensors in, tensors out.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

from ..io.checkpoint import TensorInfo
from .detect import quant_method

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch


class Codec(Protocol):
    """One quantized format's arithmetic."""

    method: str  # the format in words: "block FP8", "compressed-tensors int4 (pack-quantized)", ...

    def dequantize(self, qt: QuantTensor, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The stored parts (by role) -> the weight's values in float32, shaped ``qt.shape``."""
        ...

    def requantize(
        self, qt: QuantTensor, parts: Mapping[str, torch.Tensor], w0: torch.Tensor, new: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], Requantized]:
        """New parts for ``new`` (float32, ``qt.shape``), given the stored ``parts`` that decode to ``w0``.

        Blocks where ``new == w0`` keep their bytes; a changed block keeps its scale (changed elements
        re-encoded) where that is at least as close as a new scale by the producer's rule, and takes
        the new scale otherwise (``requantize_blocks``)."""
        ...


@dataclass(frozen=True)
class QuantTensor:
    """One quantized weight: the plain tensor it stands for, and the stored tensors it is made of."""

    name: str  # the plain tensor's name: "model.layers.0.mlp.down_proj.weight", "...experts.gate_up_proj"
    shape: tuple[int, ...]  # its shape once dequantized
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
    rescaled: int  # of those, blocks given a new scale (closer to the wanted values than the stored one)
    # Σ squared error of the changed blocks quantized afresh by the producer's rule (what the format
    # costs anyway; the blocks left alone are exact either way)
    fresh_sq_error: float = 0.0

    def __add__(self, other: Requantized) -> Requantized:
        return Requantized(
            self.blocks + other.blocks,
            self.touched + other.touched,
            self.rescaled + other.rescaled,
            self.fresh_sq_error + other.fresh_sq_error,
        )


@dataclass(frozen=True)
class Headers:
    """A checkpoint as a format's ``find`` sees it: its stored tensors by name, and a way to read the
    few small ones a layout keeps its facts in (a packed weight's shape, a quant state)."""

    infos: Mapping[str, TensorInfo]
    read: Callable[[TensorInfo], torch.Tensor]


@dataclass(frozen=True)
class Format:
    """One quantized format, as the registry (``formats.registry.FORMATS``) holds it: every format has
    this one shape, so ``formats.layout`` asks them all the same way."""

    name: str  # config.json's quantization_config.quant_method for it: "fp8", "compressed-tensors", ...
    reads: str  # what lorasurgeon reads of it, in words (a refusal lists every format's)
    find: Callable[[Headers, Mapping[str, Any]], list[QuantTensor]]  # (headers, quantization block) -> weights
    codecs: tuple[type[Codec], ...]  # the Codec classes its weights carry
    # without a quant_method in config.json: a tensor name that shows the format (None: only by quant_method)
    marks: Callable[[str], bool] | None = None
    # ... or a tensor's name and stored dtype (a float8 weight with nothing beside it: fp8_tensor's)
    stores: Callable[[str, str], bool] | None = None

    def claims(self, qconfig: Mapping[str, Any], names: Sequence[str], stored: Mapping[str, str] | None = None) -> bool:
        """Whether a checkpoint with this quantization block (``{}`` if none) and these tensor names (``stored``:
        their dtypes) is in this format: named by its quant_method, or, where none is named, shown by a
        tensor's name or by how it is stored."""
        method = quant_method(qconfig)
        if method:
            return method == self.name
        if self.marks is not None and any(self.marks(n) for n in names):
            return True
        return self.stores is not None and stored is not None and any(self.stores(n, d) for n, d in stored.items())


# (strings: torch is imported when first used, not when this module is)
Encode: TypeAlias = "Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]"
Decode: TypeAlias = "Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]"
Fresh: TypeAlias = "Callable[[torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]"


CHUNK = 1 << 20  # values re-encoded at a time: bounds the temporaries whatever the tensor's size


def slabs(rows: int, cols: int, unit: int) -> list[slice]:
    """Row ranges of about CHUNK values each, whole multiples of ``unit`` rows (a block's height): a big
    weight is re-quantized slab by slab, its temporaries the size of a slab, not of the weight."""
    step = max(unit, CHUNK // max(1, cols) // unit * unit)
    return [slice(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def requantize_blocks(
    w0: torch.Tensor,
    new: torch.Tensor,
    codes: torch.Tensor,
    params: dict[str, torch.Tensor],
    *,
    encode: Encode,
    decode: Decode,
    fresh: Fresh,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], Requantized]:
    """The re-quantization rule shared by every format, on values grouped into scale blocks.

    A block whose values did not change keeps its codes and parameters. A changed block gets two
    candidates: its stored parameters, with only the changed elements re-encoded (a value beyond
    their range saturates: it loses its overshoot, at most its change), and new parameters by the
    producer's rule (every element re-encoded: the format's own noise); the one closer to the wanted
    values wins, ties to the stored parameters. So a change smaller than the format's steps leaves
    the block's bytes as they were rather than adding fresh noise bigger than the change.

    Args:
        w0, new: (blocks, size) float32: the stored values decoded, and the values wanted.
        codes: (blocks, size) stored codes (any integer dtype; padding included).
        params: each block's stored parameters, (blocks,) each (scale, zero point, ...).
        encode: (values, params of those blocks) -> codes, nearest, saturating at the format's range.
        decode: (codes, params of those blocks) -> values, as the format decodes them.
        fresh: (values (m, size), their block numbers (m,)) -> params (m,) by the producer's rule, as stored.

    Returns:
        New codes and params (untouched blocks keep theirs, byte for byte) and what was done.
    """
    codes, params = codes.clone(), {k: v.clone() for k, v in params.items()}
    touched = ((new != w0) | torch.isnan(new)).any(dim=1)  # NaN never equals itself, but say it plainly
    idx = touched.nonzero().squeeze(1)
    rescaled, fresh_error = 0, 0.0
    step = max(1, CHUNK // max(1, new.shape[1]))
    for start in range(0, len(idx), step):
        at = idx[start : start + step]
        values = new[at]
        changed = values != w0[at]
        old = {k: v[at] for k, v in params.items()}
        made = {k: v.to(params[k].dtype) for k, v in fresh(values, at).items()}  # as they will be stored
        got = encode(values, made)
        kept = encode(values, old)
        kept = torch.where(changed, kept, codes[at])  # unchanged elements keep their codes
        err_fresh = (decode(got, made) - values).square().sum(dim=1)
        err_kept = (decode(kept, old) - values).square().sum(dim=1)
        use_fresh = err_fresh < err_kept
        codes[at] = torch.where(use_fresh[:, None], got, kept)
        for k, v in made.items():
            params[k][at[use_fresh]] = v[use_fresh]
        rescaled += int(use_fresh.sum())
        fresh_error += float(err_fresh.sum())
    return codes, params, Requantized(len(new), len(idx), rescaled, fresh_error)


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
