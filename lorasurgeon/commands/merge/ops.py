"""A merge's plan: one TensorOp per output tensor, built from headers before any tensor is read.

A TensorOp says where its source tensor lives (``Ref``: input number + key), which LoRA terms
to apply to it, and the dtype and shape it is written with. The engine runs them with
``compute.compute_merge``; ``describe`` prints them for ``--dry-run``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ...adapter.names import split_saved_key
from ...engine.plan import Ref
from ...formats.base import QuantTensor
from ...io.dtypes import DtypeByName, itemsize, safetensors_name, torch_dtype, torch_name
from ...io.layout import TensorSpec
from ...ops.lora import LayerKind
from ...words import plural

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch

# copy | merge | unmerge | replace (by a full tensor of the adapter) | restore (the adapter's saved W0,
# written back by unmerge) | lora (an adapter tensor carried into the augmented form)
Action = Literal["copy", "merge", "unmerge", "replace", "restore", "lora"]
ACTIONS: tuple[Action, ...] = ("merge", "unmerge", "restore", "replace", "copy", "lora")


@dataclass(frozen=True)
class LoraTerm:
    """``± weight · scale · ΔW`` of one module of one adapter (DoRA when ``magnitude`` is set)."""

    kind: LayerKind
    a: Ref
    b: Ref
    scale: float
    magnitude: Ref | None = None


@dataclass(frozen=True)
class BiasTerm:
    """``± weight · scale · lora_B.bias`` added to a layer's bias (PEFT's ``lora_bias``)."""

    b: Ref
    scale: float


Term = LoraTerm | BiasTerm


@dataclass(frozen=True)
class RowPatch:
    """Trainable tokens: replace the rows ``indices`` of the weight with the tensor at ``values``."""

    indices: tuple[int, ...]
    values: Ref


@dataclass(frozen=True)
class TensorOp(DtypeByName):
    """How one output tensor is made."""

    name: str
    src: Ref
    dtype_name: str  # safetensors' name of the dtype it is written in (``dtype``: the torch dtype)
    shape: tuple[int, ...]
    action: Action
    terms: tuple[Term, ...] = ()
    rows: tuple[RowPatch, ...] = ()
    # Round the source to this dtype before anything else: a W0 that PEFT saved (often in float32)
    # is held by the adapter model at the base's dtype, so it is taken at that dtype here too.
    src_dtype_name: str | None = None
    # The source is made of many tensors (the augmented form of experts transformers fuses on load):
    # stack[p][e] is part p of expert e; experts stacked on axis 0, the parts concatenated on axis 1.
    stack: tuple[tuple[Ref, ...], ...] = ()
    # Written quantized as the base stores it (merge --quantize keep): the result is computed in float32
    # as for any op, then re-quantized into these stored parts, read from input ``quant.source``.
    quant: Requant | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.src_dtype_name is not None and not isinstance(self.src_dtype_name, str):
            object.__setattr__(self, "src_dtype_name", safetensors_name(self.src_dtype_name))

    @property
    def src_dtype(self) -> torch.dtype | None:
        return None if self.src_dtype_name is None else torch_dtype(self.src_dtype_name)

    @property
    def nbytes(self) -> int:
        if self.quant is not None:
            return self.quant.tensor.stored_nbytes
        return math.prod(self.shape) * itemsize(self.dtype_name)

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.dtype_name, self.shape)

    @property
    def specs(self) -> list[TensorSpec]:
        """Every tensor it writes: itself, or the stored parts of a re-quantized weight."""
        if self.quant is None:
            return [self.spec]
        return [TensorSpec(i.name, i.dtype_name, i.shape) for _, i in self.quant.tensor.parts]

    def refs(self) -> list[Ref]:
        """Every input tensor this op reads."""
        # stacked: expert by expert, each expert's parts in order -- the order of the stack's bytes
        refs = [r for expert in zip(*self.stack, strict=True) for r in expert] if self.stack else [self.src]
        if self.quant is not None:  # its stored parts; W0 is decoded from them, not read twice
            refs = [r for r in refs if r != self.quant.plain] + list(self.quant.parts)
        for t in self.terms:
            refs += (
                [t.a, t.b] + ([t.magnitude] if t.magnitude is not None else []) if isinstance(t, LoraTerm) else [t.b]
            )
        return refs + [p.values for p in self.rows]

    @property
    def byte_copy(self) -> TensorSpec | None:
        """The output is the source's bytes when nothing changes them (see ``engine.plan.Op``)."""
        unchanged = not self.terms and not self.rows and self.src_dtype_name is None and self.quant is None
        return self.spec if unchanged else None


@dataclass(frozen=True)
class Requant:
    """Where a quantized weight's stored parts are read from, and its plain (dequantized) tensor's ref."""

    tensor: QuantTensor
    source: int  # the input holding the stored parts (the base checkpoint as it is on disk)

    @property
    def parts(self) -> tuple[Ref, ...]:
        return tuple(Ref(self.source, i.name) for _, i in self.tensor.parts)

    @property
    def plain(self) -> Ref:
        return Ref(0, self.tensor.name)


@dataclass(frozen=True)
class Plan:
    """Everything a run will do: the ops, the inputs' paths, and what else goes in the folder."""

    ops: tuple[TensorOp, ...]
    inputs: tuple[str, ...]
    names: str = ""  # where the model's names came from (ModelNames.source)

    def mapping(self) -> dict[str, list[str]]:
        """Adapter module -> the file tensors it changes, as planned (in-memory names to the files')."""
        found: dict[str, list[str]] = {}
        for op in self.ops:
            for term in op.terms:
                module = split_saved_key(term.b.key)[0]
                if op.name not in found.setdefault(module, []):
                    found[module].append(op.name)
        return found

    @property
    def nbytes(self) -> int:
        return sum(op.nbytes for op in self.ops)

    def count(self, action: str) -> int:
        return sum(op.action == action for op in self.ops)


def describe(plan: Plan) -> str:
    """A readable listing of the plan (``--dry-run``)."""
    lines = ["inputs:"] + [f"  [{i}] {p}" for i, p in enumerate(plan.inputs)]
    if plan.names:
        lines.append(f"names: {plan.names}")
    mapping = plan.mapping()
    renamed = {m: keys for m, keys in mapping.items() if keys not in ([f"{m}.weight"], [f"{m}.bias"])}
    if mapping:
        lines.append(
            f"adapter modules -> file tensors: {len(mapping) - len(renamed)} of {len(mapping)} by the same name"
            + (", the others:" if renamed else "")
        )
        for module, keys in renamed.items():
            shown = ", ".join(keys[:3]) + (f", ... ({len(keys)} tensors)" if len(keys) > 3 else "")
            lines.append(f"  {module} -> {shown}")
    actions = sorted({op.action for op in plan.ops})
    requant = sum(op.quant is not None for op in plan.ops)
    lines.append(
        f"{plural(len(plan.ops), 'output tensor')}, {plan.nbytes / 2**20:.1f} MiB: "
        + ", ".join(f"{plan.count(a)} {a}" for a in actions)
        + (f"; {plural(requant, 'weight')} re-quantized" if requant else "")
    )
    for op in plan.ops:
        dtype = torch_name(op.dtype_name).removeprefix("torch.") if op.quant is None else "float32→quantized"
        line = f"  {op.action:<8} {op.name}  {dtype}{list(op.shape)}"
        if op.stack:
            line += f"  <- [{op.src.source}] {sum(len(p) for p in op.stack)} tensors stacked: {op.src.key}, ..."
        elif op.src.key != op.name or op.src.source:
            line += f"  <- [{op.src.source}] {op.src.key}"
        for t in op.terms:
            what = "lora_bias" if isinstance(t, BiasTerm) else ("DoRA" if t.magnitude else t.kind.name)
            line += f"  {'+' if t.scale >= 0 else '-'} {abs(t.scale):.6g}·[{t.b.source}] {what}"
        for r in op.rows:
            line += f"  rows {len(r.indices)} <- [{r.values.source}]"
        if op.quant is not None:
            line += f"  -> re-quantized ({op.quant.tensor.codec.method}): " + ", ".join(s.name for s in op.specs)
        lines.append(line)
    return "\n".join(lines)
