"""The adapter formats lorasurgeon reads: one ``AdapterFormat`` per module, in the order they are asked (the
first that claims an input reads it). Adding a format is one module exposing its ``FORMAT`` and one line
here (CONTRIBUTING.md, "Adding an adapter format")."""

from __future__ import annotations

import os
from pathlib import Path

from ...errors import UnsupportedError
from ...io.checkpoint import Checkpoint
from . import peft
from .base import AdapterFormat, Probe

ADAPTER_FORMATS: tuple[AdapterFormat, ...] = (peft.FORMAT,)


def claiming(probe: Probe) -> AdapterFormat | None:
    """The first registered format that claims the input, or None if none does."""
    return next((f for f in ADAPTER_FORMATS if f.claims(probe)), None)


def is_adapter(ckpt: Checkpoint) -> bool:
    """Whether an open checkpoint is an adapter in a registered format (its headers are not read again)."""
    return claiming(Probe.of(ckpt)) is not None


def adapter_format(path: str | os.PathLike[str]) -> AdapterFormat:
    """The format of the adapter at ``path``.

    Raises:
        InputNotFoundError, CorruptCheckpointError: no format claims it, and its checkpoint cannot be read.
        UnsupportedError: no format claims it: every format lorasurgeon reads, by name.
    """
    probe = Probe(Path(path))
    found = claiming(probe)
    if found is not None:
        return found
    if probe.error is not None:
        raise probe.error
    raise UnsupportedError(f"{path}: not an adapter lorasurgeon reads (it reads {known()})")


def opened_format(ckpt: Checkpoint) -> AdapterFormat:
    """The format of the adapter whose checkpoint is open (:func:`adapter_format`, its headers not read again).

    Raises:
        UnsupportedError: no format claims it: every format lorasurgeon reads, by name.
    """
    found = claiming(Probe.of(ckpt))
    if found is None:
        raise UnsupportedError(f"{ckpt.root}: not an adapter lorasurgeon reads (it reads {known()})")
    return found


def known() -> str:
    """Every registered format in words, as a refusal lists them."""
    return ", ".join(f.holds for f in ADAPTER_FORMATS)
