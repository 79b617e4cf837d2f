"""What the engine knows of a plan: where an op's input tensors live.

Each command defines its own op type (merge's TensorOp, extract's ExtractOp, diff's DiffOp);
the engine needs from an op only ``name``, ``nbytes`` and ``refs()`` (see ``execute.run``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Ref:
    """A tensor in one of the plan's inputs (0 = the model, 1.. = adapters in command-line order)."""

    source: int
    key: str
