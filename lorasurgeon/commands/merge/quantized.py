"""Merging into a quantized base and keeping its format (``--quantize keep``).

The plan is made on the dequantized view of the base (``formats.layout.dequantized``), as for any
model. ``keep_ops`` then turns it back into the base's format: a quantized weight nothing changes
is its stored parts copied byte for byte; a changed one becomes a RequantOp, which ``compute_requant``
computes in float32 (W0 decoded from its parts, + ΔW, exactly as an unquantized merge) and re-quantizes
into the same parts, block by block (``Codec.requantize``: untouched blocks keep their bytes). It also
measures what that cost: the stored result against the exact float32 values, next to what quantizing those values
afresh with the producer's rule would cost (the format's own error on this tensor).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ...engine.execute import Outcome
from ...engine.plan import Ref
from ...errors import UnsupportedError
from ...formats.base import CHUNK
from ...formats.layout import QuantLayout
from .compute import compute_merge
from .ops import MergeOp, RequantOp, TensorOp

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch


@dataclass(frozen=True)
class RequantReport:
    """What re-quantizing one weight cost. Errors are relative: ‖x − exact‖ / ‖exact‖, exact = W0 + ΔW in float32."""

    name: str
    method: str  # the format
    blocks: int  # scale blocks in the tensor
    blocks_changed: int  # blocks whose values changed, re-encoded
    blocks_rescaled: int  # of those, blocks given a new scale (closer than keeping theirs)
    change: float  # ‖ΔW‖ / ‖W0‖: the size of the change that had to be stored
    error: float  # of the stored result
    format_error: float  # of the changed blocks quantized afresh by the producer's rule: what the format costs anyway
    change_kept: float  # ⟨stored − W0, ΔW⟩ / ‖ΔW‖²: the share of the change that made it into the stored weight

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def change_measures(w0: torch.Tensor, exact: torch.Tensor, stored: torch.Tensor) -> tuple[tuple[float, float], float]:
    """(‖ΔW‖, ‖stored − exact‖) and the share of ΔW the stored weight kept, ⟨stored − W0, ΔW⟩ / ‖ΔW‖²,
    computed a slice of rows at a time (temporaries of about CHUNK values, whatever the weight's size)."""
    rows = max(1, CHUNK // max(1, w0.shape[-1]))
    delta_sq = error_sq = dot = 0.0
    pieces = (t.flatten(0, -2).split(rows) for t in (w0, exact, stored))
    for a, b, c in zip(*pieces, strict=True):
        d = b - a
        delta_sq += float(d.square().sum())
        error_sq += float((c - b).square().sum())
        dot += float(((c - a) * d).sum())
    return (math.sqrt(delta_sq), math.sqrt(error_sq)), (dot / delta_sq if delta_sq else 1.0)


def keep_ops(ops: Sequence[TensorOp], layout: QuantLayout, stored: int) -> list[MergeOp]:
    """The plan's ops, made on the dequantized view, written in the base's quantized format.

    ``stored``: the input number of the base as it is on disk (its stored parts).

    Raises:
        UnsupportedError: a quantized weight that would be written under another name (a tied head).
    """
    out: list[MergeOp] = []
    for op in ops:
        qt = layout.tensors.get(op.name)
        from_quantized = op.src.source == 0 and op.src.key in layout.tensors
        if qt is None:
            if from_quantized:
                raise UnsupportedError(
                    f"{op.name} would be written from the quantized {op.src.key} under another name (a tied head "
                    "the adapter changes apart from its embedding): give --dtype for a plain result"
                )
            out.append(op)
            continue
        if op.src == Ref(0, qt.name) and not op.terms and not op.rows:
            # unchanged: each stored part copied byte for byte
            out += [TensorOp(i.name, Ref(stored, i.name), i.dtype_name, i.shape, "copy") for _, i in qt.parts]
            continue
        out.append(RequantOp(dataclasses.replace(op, dtype_name="F32"), qt, stored))
    return out


def compute_requant(
    op: RequantOp, tensors: Mapping[Ref, torch.Tensor], device: torch.device, *, allow_nonfinite: bool = False
) -> Outcome[RequantReport]:
    """One re-quantized op: W0 decoded from the stored parts, the merge computed in float32 as for any op,
    re-quantized (blocks that did not change keep their bytes), and the cost measured."""
    qt, codec = op.tensor, op.tensor.codec
    parts = {role: tensors[ref] for role, ref in zip(qt.roles, op.parts, strict=True)}
    w0 = codec.dequantize(qt, parts)
    given = {**tensors, op.plain: w0.clone()} if op.merge.src == op.plain else tensors
    exact = compute_merge(op.merge, given, device, allow_nonfinite=allow_nonfinite).outputs[0][1]
    if exact.shape != w0.shape:
        raise UnsupportedError(f"{op.name}: the merged tensor {list(exact.shape)} is not the stored {list(qt.shape)}")
    new_parts, done = codec.requantize(qt, parts, w0, exact)
    norm = float(torch.linalg.vector_norm(exact))
    change, kept = change_measures(w0, exact, codec.dequantize(qt, {**parts, **new_parts}))
    report = RequantReport(
        op.name,
        codec.method,
        done.blocks,
        done.touched,
        done.rescaled,
        change[0] / float(torch.linalg.vector_norm(w0)) if float(w0.abs().max()) else float("inf"),
        change[1] / norm if norm else 0.0,
        math.sqrt(done.fresh_sq_error) / norm if norm else 0.0,
        kept,
    )
    outputs = [(info.name, new_parts.get(role, parts[role])) for role, info in qt.parts]
    return Outcome(outputs, report)
