"""extract's finishing pass: the adapter's tensors, each made once, from what the first pass computed.

The first pass (``compute.compute_extract`` through the engine) leaves each changed matrix's factors (up to the
cap, under ``--budget``), each bias change and each expert's factors in a scratch spool that is never published.
Once every module's rank, scale and place is decided from those results (``budget``, ``profile``, ``finish``),
this pass runs as the engine's second plan over two inputs, the scratch spool (0) and the fine-tune (1), and
writes the adapter: factors copied as they are, or cut to their rank and their B scaled (CutOp); stacked experts'
factors gathered into PEFT's one lora_A / lora_B per parameter (StackOp); zero lora_B.bias (ZerosOp); and the
fine-tune's tensors stored whole (CopyOp: file to file).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

from ...adapter.names import ROLE_A, ROLE_B, Role
from ...engine.execute import Outcome
from ...engine.plan import Ref
from ...io.checkpoint import TensorInfo
from ...io.dtypes import itemsize
from ...io.layout import TensorSpec
from ...io.spool import SpoolWriter

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch

FACTORS, TUNED = 0, 1  # the finishing pass's inputs: the first pass's scratch spool, the fine-tune


class Factors:
    """The first pass's scratch spool as an input of the engine (its tensors' headers, and reading one)."""

    def __init__(self, spool: SpoolWriter):
        self.spool = spool

    def __contains__(self, name: object) -> bool:
        return name in self.spool

    def names(self) -> list[str]:
        return self.spool.names()

    def info(self, name: str) -> TensorInfo:
        return self.spool.info(name)

    def read(self, name: str, alloc: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
        return self.spool.read(name)


@dataclass(frozen=True)
class CopyOp:
    """A tensor stored as it is: a factor or lora_B.bias from the first pass, or a fine-tune tensor stored whole
    under PEFT's name for it (its bytes go file to file; computed only where they cannot: a legacy .bin input)."""

    name: str  # its key in the adapter
    src: Ref
    nbytes: int
    byte_copy: TensorSpec | None

    @classmethod
    def of(cls, key: str, src: Ref, info: TensorInfo) -> CopyOp:
        return cls(key, src, info.nbytes, TensorSpec.of(key, info.dtype, info.shape))

    def refs(self) -> list[Ref]:
        return [self.src]

    def outputs(self, tensors: Mapping[Ref, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        return [(self.name, tensors[self.src])]


@dataclass(frozen=True)
class CutOp:
    """A factor cut to its first ``rank`` components (rows of A, columns of B: the rank-k factors of the same
    SVD), a B scaled by ``scale`` (--for: k / r) in float32 and rounded once to its dtype."""

    name: str
    src: Ref
    nbytes: int
    rank: int
    role: Role  # ROLE_A | ROLE_B
    scale: float | None = None
    byte_copy: TensorSpec | None = None

    def refs(self) -> list[Ref]:
        return [self.src]

    def outputs(self, tensors: Mapping[Ref, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        t = tensors[self.src]
        cut = t[: self.rank] if self.role == ROLE_A else t[:, : self.rank]
        if self.scale is not None:
            cut = (cut.float() * self.scale).to(t.dtype)
        return [(self.name, cut.contiguous())]


@dataclass(frozen=True)
class ZerosOp:
    """A zero lora_B.bias: lora_bias puts one on every LoRA module, changed or not."""

    name: str
    features: int
    dtype: torch.dtype
    byte_copy: TensorSpec | None = None

    @property
    def nbytes(self) -> int:
        return self.features * itemsize(self.dtype)

    def refs(self) -> list[Ref]:
        return []

    def outputs(self, tensors: Mapping[Ref, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        return [(self.name, torch.zeros(self.features, dtype=self.dtype))]


@dataclass(frozen=True)
class StackOp:
    """A stacked parameter's per-expert factors as PEFT's one lora_A (E·r, in) and lora_B (out, E·r): expert e
    in rows e·r… of A and columns e, e+E, … of B, all at the largest rank ``rank`` (zeros where an expert
    needed fewer; an unchanged expert has no factors and is all zeros)."""

    name: str  # the stacked parameter
    keys: tuple[str, str]  # its lora_A, lora_B keys under the ParamWrapper's module
    pieces: tuple[tuple[int, Ref, Ref], ...]  # (expert, its A, its B)
    experts: int
    rank: int
    a_shape: tuple[int, int]  # an expert's A (r, in) and B (out, r): in and out
    b_shape: tuple[int, int]
    dtype: torch.dtype
    byte_copy: TensorSpec | None = None

    @property
    def nbytes(self) -> int:
        return self.experts * self.rank * (self.a_shape[1] + self.b_shape[0]) * itemsize(self.dtype)

    def refs(self) -> list[Ref]:
        return [r for _, a, b in self.pieces for r in (a, b)]

    def outputs(self, tensors: Mapping[Ref, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        count, rank = self.experts, self.rank
        stacked_a = torch.zeros(count * rank, self.a_shape[1], dtype=self.dtype)
        stacked_b = torch.zeros(self.b_shape[0], count * rank, dtype=self.dtype)
        for e, a_ref, b_ref in self.pieces:
            a, b = tensors[a_ref], tensors[b_ref]
            stacked_a[e * rank : e * rank + a.shape[0]] = a
            stacked_b[:, e + count * torch.arange(b.shape[1])] = b
        return [(self.keys[0], stacked_a), (self.keys[1], stacked_b)]


FinalOp: TypeAlias = CopyOp | CutOp | ZerosOp | StackOp


def factor_ops(factors: Factors, keys: tuple[str, str], rank: int, scale: float | None) -> list[CopyOp] | list[CutOp]:
    """A module's factors (lora_A, lora_B keys) at ``rank``, B scaled by ``scale``: copied where neither
    changes them."""
    a_key, b_key = keys
    a, b = factors.info(a_key), factors.info(b_key)
    if rank == a.shape[0] and scale is None:
        return [CopyOp.of(a_key, Ref(FACTORS, a_key), a), CopyOp.of(b_key, Ref(FACTORS, b_key), b)]
    share = rank / max(1, a.shape[0])
    return [
        CutOp(a_key, Ref(FACTORS, a_key), math.ceil(a.nbytes * share), rank, ROLE_A),
        CutOp(b_key, Ref(FACTORS, b_key), math.ceil(b.nbytes * share), rank, ROLE_B, scale),
    ]


def assemble(op: FinalOp, tensors: Mapping[Ref, torch.Tensor], device: torch.device) -> Outcome[None]:
    """One finishing op computed (on the CPU: nothing here is worth a device)."""
    return Outcome(op.outputs(tensors), None)
