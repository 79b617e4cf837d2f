"""lorasurgeon: LoRA checkpoint surgery, streamed tensor by tensor.

Library entry points mirror the CLI commands; each returns a frozen report dataclass and raises
a :class:`LorasurgeonError` subclass on bad input. Each is a keyword builder of an :class:`Output` and its
command's settings (``MergeSettings``, ``ExtractSettings``, ...), which ``lorasurgeon.commands.<command>.run``
takes directly. Names are imported on first use, so that
``lorasurgeon --version`` does not pay for importing torch. No submodule of this package is
named like a public function (the commands live in ``lorasurgeon.commands``), so
``lorasurgeon.merge`` is the function however often it is called and whatever was imported before.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "inspect": "commands.inspect",
    "CheckpointReport": "commands.inspect",
    "verify": "commands.verify",
    "VerifyReport": "commands.verify",
    "merge": "commands.merge",
    "unmerge": "commands.merge",
    "convert": "commands.convert",
    "iter_merged": "commands.merge",
    "MergeReport": "commands.merge",
    "MergeSettings": "commands.merge",
    "extract": "commands.extract",
    "ExtractReport": "commands.extract",
    "ExtractSettings": "commands.extract",
    "Output": "commands._inputs",
    "resize": "commands.resize",
    "combine": "commands.resize",
    "ResizeReport": "commands.resize",
    "ResizeSettings": "commands.resize",
    "to_gguf": "commands.convert",
    "ConvertSettings": "commands.convert",
    "check": "commands.check",
    "CheckReport": "commands.check",
    "diff": "commands.diff",
    "DiffReport": "commands.diff",
    "DiffSettings": "commands.diff",
    "push": "hub.push",
    "PushReport": "hub.push",
    "open_checkpoint": "io",
    "Checkpoint": "io",
    "CheckpointWriter": "io",
    "LorasurgeonError": "errors",
    "AdapterConfigError": "errors",
    "CorruptCheckpointError": "errors",
    "IncompatibleError": "errors",
    "InputNotFoundError": "errors",
    "InvalidOptionError": "errors",
    "NonFiniteError": "errors",
    "OutputError": "errors",
    "OutputExistsError": "errors",
    "UnsafeCheckpointError": "errors",
    "UnsupportedError": "errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # resolved once; later lookups do not come here
        return value
    raise AttributeError(f"module 'lorasurgeon' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
