"""The lorasurgeon exception family.

Every error a user can cause (a missing path, a broken file, an adapter for another model)
is a :class:`LorasurgeonError`. Its message names the file or tensor, says what was expected
and, where there is one, what to do. The CLI prints it on one line and exits with status 2;
the library never prints or exits. Each class also inherits from the built-in exception it
resembles, so ``except FileNotFoundError`` keeps working for library users.
"""

from __future__ import annotations

import re

# Messages name options as the command line spells them (--overwrite, --rank 4); called from Python they
# read as the functions' keywords (overwrite=True, rank=4). The CLI says which while it runs a command.
_CLI: list[bool] = [False]
_SWITCHES = {"overwrite", "dry-run", "allow-nonfinite", "allow-different-bases", "quiet", "private", "create-pr"}
_COMMAND = re.compile(r"`[^`]*`|lorasurgeon \w[^;)]*")  # a suggested command line stays one
_FLAG = re.compile(r"--([a-z][a-z0-9-]*)(?: (\d[\w.]*|[A-Z]+)\b)?")
_RESERVED = {"for": "for_"}  # a flag whose keyword is a Python word gets PEP 8's trailing underscore


def speak_cli(on: bool) -> None:
    """Name options as flags (the CLI, while a command runs) or as keywords (the library, the default)."""
    _CLI[0] = on


def as_keywords(text: str) -> str:
    """``text`` with each ``--flag [VALUE]`` outside a suggested command as the keyword it is in Python."""

    def keyword(match: re.Match[str]) -> str:
        flag, value = match.group(1), match.group(2)
        name = _RESERVED.get(flag, flag.replace("-", "_"))
        if flag in _SWITCHES:
            return f"{name}=True"
        return f"{name}={value}" if value else name

    parts, at = [], 0
    for command in _COMMAND.finditer(text):
        parts += [_FLAG.sub(keyword, text[at : command.start()]), command.group(0)]
        at = command.end()
    return "".join([*parts, _FLAG.sub(keyword, text[at:])])


class LorasurgeonError(Exception):
    """Base class of every error lorasurgeon raises on purpose."""

    def __str__(self) -> str:
        text = super().__str__()
        return text if _CLI[0] else as_keywords(text)


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


class LorasurgeonWarning(UserWarning):
    """Something the user should know that does not stop the run (the CLI prints it as one ``warning:`` line)."""
