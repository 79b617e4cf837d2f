"""The lorasurgeon exception family.

Every error a user can cause (a missing path, a broken file, an adapter for another model)
is a :class:`LorasurgeonError`. Its message names the file or tensor, says what was expected
and, where there is one, what to do. The CLI prints it on one line and exits with status 2;
the library never prints or exits. Each class also inherits from the built-in exception it
resembles, so ``except FileNotFoundError`` keeps working for library users.
"""

from __future__ import annotations


class LorasurgeonError(Exception):
    """Base class of every error lorasurgeon raises on purpose."""


class InvalidOptionError(LorasurgeonError, ValueError):
    """An option value that cannot be used (a size, a dtype, a device, a weight count)."""


class InputNotFoundError(LorasurgeonError, FileNotFoundError):
    """A path (or the file a folder should contain) does not exist."""


class CorruptCheckpointError(LorasurgeonError, ValueError):
    """A checkpoint file is truncated or its header, index or contents are inconsistent."""


class UnsafeCheckpointError(LorasurgeonError, ValueError):
    """A pickle asks for more than plain tensors (it could run code): refused."""


class AdapterConfigError(LorasurgeonError, ValueError):
    """adapter_config.json is missing, unreadable or describes something invalid."""


class UnsupportedError(LorasurgeonError, NotImplementedError):
    """A format or PEFT variant lorasurgeon deliberately does not handle."""


class IncompatibleError(LorasurgeonError, ValueError):
    """Inputs that do not belong together (an adapter for another model, shapes that differ)."""


class OutputExistsError(LorasurgeonError, FileExistsError):
    """The output path exists and ``overwrite`` was not asked for."""


class OutputError(LorasurgeonError, OSError):
    """The output could not be written (no space, an output inside an input, ...)."""


class NonFiniteError(LorasurgeonError, ValueError):
    """A result holds NaN or Inf (pass ``allow_nonfinite`` to write it anyway)."""
