"""AdapterFormat (what every adapter format is to the registry) and Probe (what its ``claims`` sees)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ...errors import LorasurgeonError
from ...io.checkpoint import Checkpoint, open_checkpoint

if TYPE_CHECKING:
    import torch

    from ...io.checkpoint import FileSlice
    from ..weights import LoraAdapter


@dataclass
class Probe:
    """An input as a format's ``claims`` sees it, without torch: its path and folder, and the files and tensor
    names of the checkpoint there (headers only, read once, when first asked).

    A path that is no checkpoint lorasurgeon opens (a .gguf, a folder of other files) has no files and no
    names: its ``error`` says why, and the registry raises it when no format claims the input.
    """

    path: Path
    _files: list[Path] | None = field(default=None, repr=False)
    _names: list[str] | None = field(default=None, repr=False)
    error: LorasurgeonError | None = None

    @classmethod
    def of(cls, ckpt: Checkpoint) -> Probe:
        """The probe of a checkpoint already open (its headers are not read again)."""
        return cls(ckpt.root, list(ckpt.files), ckpt.names())

    @property
    def folder(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    def has(self, filename: str) -> bool:
        """Whether the input's folder holds a file of this name."""
        return (self.folder / filename).is_file()

    def files(self) -> list[Path]:
        """The checkpoint files open_checkpoint reads for this path (empty when it reads none)."""
        self._open()
        assert self._files is not None
        return self._files

    def names(self) -> list[str]:
        """The tensor names in those files' headers (empty when there are none to read)."""
        self._open()
        assert self._names is not None
        return self._names

    def _open(self) -> None:
        if self._names is not None:
            return
        try:
            with open_checkpoint(self.path) as ckpt:
                self._files, self._names = list(ckpt.files), ckpt.names()
        except LorasurgeonError as exc:
            self._files, self._names, self.error = [], [], exc


class AdapterWriter(Protocol):
    """What a command writes an adapter into (an engine ``Sink``): tensors under PEFT's saved names (the
    common form's), each turned into the format's own; extra files; then ``finish`` with the PEFT config,
    which writes the format's config and publishes the folder whole. ``abort`` removes what was written."""

    def write(self, name: str, tensor: torch.Tensor | FileSlice) -> None: ...

    def add_file(self, relname: str, data: bytes | str) -> None: ...

    def finish(self, config: Mapping[str, Any]) -> Path: ...

    def abort(self) -> None: ...


@dataclass(frozen=True)
class AdapterFormat:
    """One adapter format, as the registry (``adapter.formats.registry.ADAPTER_FORMATS``) holds it: every
    format has this one shape, so ``load_adapter`` and the commands ask them all the same way."""

    name: str  # what options and reports call it: "peft"
    holds: str  # what a folder of it holds, in words: a refusal lists every format's
    claims: Callable[[Probe], bool]  # whether an input is in this format: file names and headers only, no torch
    read: Callable[[Path], LoraAdapter]  # its files as the common adapter (headers only; tensors read later)
    # the same from the input's checkpoint, already open (its headers not read again; the adapter owns it);
    # None: ``read`` opens the files itself
    read_open: Callable[[Checkpoint], LoraAdapter] | None = None
    # an output folder to write an adapter into, in this format (None: lorasurgeon does not write it)
    writer: Callable[[str | os.PathLike[str], bool], AdapterWriter] | None = None

    def read_opened(self, ckpt: Checkpoint) -> LoraAdapter:
        """The adapter whose checkpoint ``ckpt`` is, open: read from it where the format can, else from its path."""
        if self.read_open is not None:
            return self.read_open(ckpt)
        ckpt.close()
        return self.read(ckpt.root)
