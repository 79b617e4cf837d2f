"""What the engine knows of a plan: where an op's inputs live, and what it asks of an op.

Each command defines its own op type (merge's TensorOp, extract's ExtractOp, diff's DiffOp, ...);
the engine imports none of them and asks only for what ``Op`` declares.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..io.layout import TensorSpec


@dataclass(frozen=True)
class Ref:
    """A tensor in one of the plan's inputs (0 = the model, 1.. = adapters in command-line order)."""

    source: int
    key: str


class Op(Protocol):
    """One step of a plan, as the engine sees it."""

    @property
    def name(self) -> str: ...

    @property
    def nbytes(self) -> int:
        """Its share of the progress bar (the bytes it writes, or reads when it writes nothing)."""
        ...

    @property
    def byte_copy(self) -> TensorSpec | None:
        """When set, the output is the bytes of ``refs()`` one after another, unchanged (most often one
        input), stored as this spec: if the inputs already have that dtype and size, their bytes go
        file to file and the op is never computed."""
        ...

    def refs(self) -> Sequence[Ref]:
        """The input tensors it reads."""
        ...
