"""lorasurgeon: LoRA checkpoint surgery, streamed tensor by tensor.

Library entry points mirror the CLI commands; each returns a frozen report dataclass and raises
a :class:`LorasurgeonError` subclass on bad input. Names are imported on first use, so that
``lorasurgeon --version`` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "inspect": "describe", "CheckpointReport": "describe",
    "merge": "merge", "unmerge": "merge", "convert": "merge", "MergeReport": "merge",
    "extract": "extract", "ExtractReport": "extractresult",
    "diff": "diff", "DiffReport": "diff",
    "push": "hub", "verify": "verify",
    "open_checkpoint": "io", "Checkpoint": "io", "CheckpointWriter": "io",
    "LorasurgeonError": "errors", "AdapterConfigError": "errors", "CorruptCheckpointError": "errors",
    "IncompatibleError": "errors", "InputNotFoundError": "errors", "InvalidOptionError": "errors",
    "OutputError": "errors", "OutputExistsError": "errors", "UnsafeCheckpointError": "errors",
    "UnsupportedError": "errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'lorasurgeon' has no attribute {name!r}")
