"""A merge's plan: one op per output tensor, built from headers before any tensor is read.

A TensorOp says where its source tensor lives (``Ref``: input number + key), which LoRA terms
to apply to it, and the dtype and shape it is written with; the engine runs it with
``compute.compute_merge``. A RequantOp (``--quantize keep``) is a quantized base's weight: its
TensorOp computed in float32, then re-quantized into the stored parts (``quantized.compute_requant``).
``describe`` prints them for ``--dry-run``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

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
    rows: tuple[int, int] | None = None  # the block of the weight's rows ΔW is (a module fused into it), else all


@dataclass(frozen=True)
class BiasTerm:
    """``± weight · scale · lora_B.bias`` added to a layer's bias (PEFT's ``lora_bias``)."""

    b: Ref
    scale: float


@dataclass(frozen=True)
class TunerTerm:
    """One module of a PEFT tuner other than LoRA (``ops.tuners``: LoHa, LoKr, IA³, OFT, VeRA, ...) applied to
    what the terms before it made of one weight -- or of its bias (``bias``: IA³ scales both). ``parts``: the
    tuner's tensors by its names; ``config``: the module's settings (``Tuner.module_config``); ``weight``: the
    merge weight an additive tuner's ΔW is scaled by; ``unmerge``: PEFT's inverse instead."""

    tuner: str
    parts: tuple[tuple[str, Ref], ...]
    config: Mapping[str, Any] = field(compare=False, hash=False)
    weight: float = 1.0
    unmerge: bool = False
    bias: bool = False
    w0: Ref | None = None  # a bias term's weight, as the input holds it (GLoRA's bias change depends on it)

    @property
    def refs(self) -> list[Ref]:
        return [ref for _, ref in self.parts] + ([self.w0] if self.w0 is not None else [])


Term = LoraTerm | BiasTerm | TunerTerm


@dataclass(frozen=True)
class RowPatch:
    """Trainable tokens: replace the rows ``indices`` of the weight with the tensor at ``values``."""

    indices: tuple[int, ...]
    values: Ref


@dataclass(frozen=True)
class TensorOp(DtypeByName):
    """How one output tensor is made: its source (W0), plus the terms, with rows patched, in ``dtype``."""

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

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.src_dtype_name is not None and not isinstance(self.src_dtype_name, str):
            object.__setattr__(self, "src_dtype_name", safetensors_name(self.src_dtype_name))

    @property
    def src_dtype(self) -> torch.dtype | None:
        return None if self.src_dtype_name is None else torch_dtype(self.src_dtype_name)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype_name)

    @property
    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.dtype_name, self.shape)

    @property
    def specs(self) -> list[TensorSpec]:
        """Every tensor it writes: itself."""
        return [self.spec]

    def source_refs(self) -> list[Ref]:
        """The tensors W0 is read from: the source, or every part of a stack, expert by expert, each
        expert's parts in order (the order of the stack's bytes)."""
        return [r for expert in zip(*self.stack, strict=True) for r in expert] if self.stack else [self.src]

    def change_refs(self) -> list[Ref]:
        """The tensors of its terms and row patches."""
        refs: list[Ref] = []
        for t in self.terms:
            if isinstance(t, TunerTerm):
                refs += t.refs
            elif isinstance(t, LoraTerm):
                refs += [t.a, t.b] + ([t.magnitude] if t.magnitude is not None else [])
            else:
                refs.append(t.b)
        return refs + [p.values for p in self.rows]

    def refs(self) -> list[Ref]:
        """Every input tensor this op reads."""
        return self.source_refs() + self.change_refs()

    @property
    def byte_copy(self) -> TensorSpec | None:
        """The output is the source's bytes when nothing changes them (see ``engine.plan.Op``)."""
        unchanged = not self.terms and not self.rows and self.src_dtype_name is None
        return self.spec if unchanged else None


@dataclass(frozen=True)
class RequantOp:
    """A quantized base's weight written in its format (merge --quantize keep): ``merge`` (a float32
    TensorOp, as planned on the dequantized view) computed, then re-quantized into the stored parts of
    ``tensor``, read from input ``source``; W0 is decoded from those parts, not read twice."""

    merge: TensorOp
    tensor: QuantTensor
    source: int  # the input holding the stored parts (the base checkpoint as it is on disk)

    @property
    def name(self) -> str:
        return self.merge.name

    @property
    def action(self) -> Action:
        return self.merge.action

    @property
    def parts(self) -> tuple[Ref, ...]:
        return tuple(Ref(self.source, i.name) for _, i in self.tensor.parts)

    @property
    def plain(self) -> Ref:
        """The plain (dequantized) weight's ref in the view the plan was made on."""
        return Ref(0, self.tensor.name)

    @property
    def nbytes(self) -> int:
        return self.tensor.stored_nbytes

    @property
    def specs(self) -> list[TensorSpec]:
        """Every tensor it writes: the stored parts of the re-quantized weight."""
        return [TensorSpec(i.name, i.dtype_name, i.shape) for _, i in self.tensor.parts]

    def refs(self) -> list[Ref]:
        """Every input tensor this op reads: the stored parts in place of the plain weight."""
        source = [r for r in self.merge.source_refs() if r != self.plain]
        return source + list(self.parts) + self.merge.change_refs()

    @property
    def byte_copy(self) -> TensorSpec | None:
        return None  # always computed: an unchanged weight is planned as copies of its parts


MergeOp = TensorOp | RequantOp  # one op of a merge's plan


def merge_of(op: MergeOp) -> TensorOp:
    """The plain merge an op computes: itself, or the float32 merge a RequantOp re-quantizes."""
    return op.merge if isinstance(op, RequantOp) else op


@dataclass(frozen=True)
class Plan:
    """Everything a run will do: the ops, the inputs' paths, and what else goes in the folder."""

    ops: tuple[MergeOp, ...]
    inputs: tuple[str, ...]
    names: str = ""  # where the model's names came from (ModelNames.source)

    def mapping(self) -> dict[str, list[str]]:
        """Adapter module -> the file tensors it changes, as planned (in-memory names to the files')."""
        found: dict[str, list[str]] = {}
        for op in self.ops:
            for term in merge_of(op).terms:
                if isinstance(term, TunerTerm):  # a tuner's part: base_model.model.<module>.<part>
                    module = split_saved_key(term.parts[0][1].key)[0].rpartition(".")[0]
                else:
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
    requant = sum(isinstance(op, RequantOp) for op in plan.ops)
    lines.append(
        f"{plural(len(plan.ops), 'output tensor')}, {plan.nbytes / 2**20:.1f} MiB: "
        + ", ".join(f"{plan.count(a)} {a}" for a in actions)
        + (f"; {plural(requant, 'weight')} re-quantized" if requant else "")
    )
    lines += [_describe_op(op) for op in plan.ops]
    return "\n".join(lines)


def _describe_op(op: MergeOp) -> str:
    """One op's line of ``describe``."""
    plain = merge_of(op)
    dtype = "float32→quantized" if isinstance(op, RequantOp) else torch_name(op.dtype_name).removeprefix("torch.")
    line = f"  {op.action:<8} {op.name}  {dtype}{list(plain.shape)}"
    if plain.stack:
        line += f"  <- [{plain.src.source}] {sum(len(p) for p in plain.stack)} tensors stacked: {plain.src.key}, ..."
    elif plain.src.key != op.name or plain.src.source:
        line += f"  <- [{plain.src.source}] {plain.src.key}"
    for t in plain.terms:
        if isinstance(t, TunerTerm):
            line += f"  {'unmerge' if t.unmerge else 'merge'} [{t.parts[0][1].source}] {t.tuner}"
            line += f" x {t.weight:g}" if t.weight != 1.0 else ""
            continue
        what = "lora_bias" if isinstance(t, BiasTerm) else ("DoRA" if t.magnitude else t.kind.name)
        line += f"  {'+' if t.scale >= 0 else '-'} {abs(t.scale):.6g}·[{t.b.source}] {what}"
    for r in plain.rows:
        line += f"  rows {len(r.indices)} <- [{r.values.source}]"
    if isinstance(op, RequantOp):
        line += f"  -> re-quantized ({op.tensor.codec.method}): " + ", ".join(s.name for s in op.specs)
    return line
