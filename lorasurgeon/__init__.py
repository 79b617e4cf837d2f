"""lorasurgeon: LoRA checkpoint surgery, streamed tensor by tensor.

Library entry points mirror the CLI commands; each returns a frozen report dataclass and raises
a :class:`LorasurgeonError` subclass on bad input.
"""

__version__ = "0.1.0"

from .describe import CheckpointReport, inspect
from .errors import (
    AdapterConfigError,
    CorruptCheckpointError,
    IncompatibleError,
    InputNotFoundError,
    LorasurgeonError,
    OutputError,
    OutputExistsError,
    UnsafeCheckpointError,
    UnsupportedError,
)
from .io import Checkpoint, CheckpointWriter, open_checkpoint

__all__ = [
    "__version__", "inspect", "CheckpointReport", "open_checkpoint", "Checkpoint",
    "CheckpointWriter", "LorasurgeonError", "AdapterConfigError", "CorruptCheckpointError",
    "IncompatibleError", "InputNotFoundError", "OutputError", "OutputExistsError",
    "UnsafeCheckpointError", "UnsupportedError",
]
