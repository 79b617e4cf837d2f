"""The adapter formats lorasurgeon reads: one ``AdapterFormat`` per module, in the order they are asked (the
first that claims an input reads it), each asked with a :class:`Probe` of the input. Adding a format is one
module exposing its ``FORMAT`` and one line here (CONTRIBUTING.md, "Adding an adapter format")."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import LorasurgeonError, UnsupportedError
from ...io.checkpoint import Checkpoint, open_checkpoint
from . import comfyui, diffusers, gguf, kohya, mlx, peft
from .base import AdapterFormat, AdapterWriter

if TYPE_CHECKING:
    from ..weights import LoraAdapter

# PEFT first: the common case asks one format; none of the others' files is claimed by PEFT's rule (no
# adapter_model file, no PEFT key: MLX's adapters.safetensors, a .gguf), so the order changes no answer
ADAPTER_FORMATS: tuple[AdapterFormat, ...] = (
    peft.FORMAT,
    mlx.FORMAT,
    gguf.FORMAT,
    kohya.FORMAT,
    diffusers.FORMAT,
    comfyui.FORMAT,
)


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


def read_opened(ckpt: Checkpoint) -> LoraAdapter:
    """The adapter whose checkpoint ``ckpt`` is, open, in its format: read from ``ckpt`` where the format can
    (its headers not read again; the adapter owns it), else from its path.

    Raises:
        UnsupportedError: no format claims it: every format lorasurgeon reads, by name.
    """
    found = opened_format(ckpt)
    if found.read_open is not None:
        return replace(found.read_open(ckpt), format=found.name)
    ckpt.close()
    return replace(found.read(ckpt.root), format=found.name)


def opened_format(ckpt: Checkpoint) -> AdapterFormat:
    """The format of the adapter whose checkpoint is open (:func:`adapter_format`, its headers not read again).

    Raises:
        UnsupportedError: no format claims it: every format lorasurgeon reads, by name.
    """
    found = claiming(Probe.of(ckpt))
    if found is None:
        raise UnsupportedError(f"{ckpt.root}: not an adapter lorasurgeon reads (it reads {known()})")
    return found


def adapter_writer(out: str | os.PathLike[str], *, overwrite: bool, name: str = "peft") -> AdapterWriter:
    """A writer of an adapter folder at ``out`` in the format called ``name`` (PEFT's by default): what extract,
    resize and combine write their adapters into, published whole by its ``finish``."""
    found = next((f for f in ADAPTER_FORMATS if f.name == name), None)
    if found is None or found.writer is None:
        writable = ", ".join(f.name for f in ADAPTER_FORMATS if f.writer is not None)
        raise UnsupportedError(f"lorasurgeon does not write {name!r} adapters (it writes {writable})")
    return found.writer(out, overwrite)


def writer_refusal(name: str, config: Mapping[str, Any]) -> str | None:
    """Why the writer of format ``name`` would refuse an adapter of this PEFT config, known from headers before
    anything is written (a writer's ``refusal``, where it has one), or None."""
    found = next((f for f in ADAPTER_FORMATS if f.name == name), None)
    check = getattr(found.writer, "refusal", None) if found is not None else None
    return check(config) if check is not None else None


def writable() -> list[str]:
    """The names of the formats lorasurgeon writes adapters in (``convert --to``)."""
    return [f.name for f in ADAPTER_FORMATS if f.writer is not None]


def known() -> str:
    """Every registered format in words, as a refusal lists them."""
    return ", ".join(f.holds for f in ADAPTER_FORMATS)


def read_against_base(name: str) -> bool:
    """Whether adapters of format ``name`` are read against their base model (their names are the base's)."""
    return any(f.name == name and f.read_with_base is not None for f in ADAPTER_FORMATS)


def result_format(names: Sequence[str]) -> str:
    """The format resize and combine write the result of adapters in these formats in: theirs where they share
    one whose writer holds any rank per module (``written_back``: a kohya file stays one), else PEFT's."""
    found = {f.name: f for f in ADAPTER_FORMATS}
    kinds = set(names)
    if len(kinds) == 1 and (only := found.get(next(iter(kinds)))) is not None and only.written_back:
        return only.name
    return "peft"
