"""A merge's plan: one TensorOp per output tensor, built from headers before any tensor is read.

A TensorOp says where its source tensor lives (``Ref``: input number + key), which LoRA terms
to apply to it, and the dtype and shape it is written with. The engine runs them with
``compute.compute_merge``; ``describe`` prints them for ``--dry-run``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...engine.plan import Ref
from ...io.dtypes import itemsize
from ...io.layout import TensorSpec


@dataclass(frozen=True)
class LoraTerm:
    """``± weight · scale · ΔW`` of one module of one adapter (DoRA when ``magnitude`` is set).

    ``kind`` "bias" adds ``scale · lora_B.bias`` to a bias (``lora_bias``); then ``a`` is None.
    """

    kind: str
    a: Ref | None
    b: Ref
    scale: float
    magnitude: Ref | None = None


@dataclass(frozen=True)
class RowPatch:
    """Trainable tokens: replace the rows ``indices`` of the weight with the tensor at ``values``."""

    indices: tuple[int, ...]
    values: Ref


@dataclass(frozen=True)
class TensorOp:
    """How one output tensor is made."""

    name: str
    src: Ref
    dtype: torch.dtype
    shape: tuple[int, ...]
    action: str  # copy | merge | unmerge | replace | restore (a saved W0 written back) | lora (adapter tensor)
    terms: tuple[LoraTerm, ...] = ()
    rows: tuple[RowPatch, ...] = ()
    # Round the source to this dtype before anything else: a W0 that PEFT saved (often in float32)
    # is held by the adapter model at the base's dtype, so it is taken at that dtype here too.
    src_dtype: torch.dtype | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.dtype, self.shape)

    def refs(self) -> list[Ref]:
        """Every input tensor this op reads."""
        refs = [self.src] + [r for t in self.terms for r in (t.a, t.b, t.magnitude) if r is not None]
        return refs + [p.values for p in self.rows]

    @property
    def is_plain_copy(self) -> bool:
        """The output is the source's values (perhaps in another dtype), rounded once."""
        return not self.terms and not self.rows and self.src_dtype is None


@dataclass(frozen=True)
class Plan:
    """Everything a run will do: the ops, the inputs' paths, and what else goes in the folder."""

    ops: tuple[TensorOp, ...]
    inputs: tuple[str, ...]
    notes: tuple[str, ...] = ()

    @property
    def nbytes(self) -> int:
        return sum(op.nbytes for op in self.ops)

    def count(self, action: str) -> int:
        return sum(op.action == action for op in self.ops)


def describe(plan: Plan) -> str:
    """A readable listing of the plan (``--dry-run``)."""
    lines = ["inputs:"] + [f"  [{i}] {p}" for i, p in enumerate(plan.inputs)]
    actions = sorted({op.action for op in plan.ops})
    lines.append(f"{len(plan.ops)} output tensors, {plan.nbytes / 2**20:.1f} MiB: "
                 + ", ".join(f"{plan.count(a)} {a}" for a in actions))
    for op in plan.ops:
        dtype = str(op.dtype).removeprefix("torch.")
        line = f"  {op.action:<8} {op.name}  {dtype}{list(op.shape)}"
        if op.src.key != op.name or op.src.source:
            line += f"  <- [{op.src.source}] {op.src.key}"
        for t in op.terms:
            what = "DoRA" if t.magnitude else ("lora_bias" if t.kind == "bias" else t.kind)
            line += f"  {'+' if t.scale >= 0 else '-'} {abs(t.scale):.6g}·[{t.b.source}] {what}"
        for r in op.rows:
            line += f"  rows {len(r.indices)} <- [{r.values.source}]"
        lines.append(line)
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
