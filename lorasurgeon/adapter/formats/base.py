"""AdapterFormat (what every adapter format is to the registry) and AdapterWriter (what its writer is)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ...io.checkpoint import Checkpoint

if TYPE_CHECKING:
    import torch

    from ...io.checkpoint import FileSlice, TensorInfo
    from ..weights import LoraAdapter
    from .registry import Probe


class AdapterWriter(Protocol):
    """What a command writes an adapter into (an engine ``Sink``): tensors under PEFT's saved names (the
    common form's), each turned into the format's own; extra files; then ``finish`` with the PEFT config,
    which writes the format's config and publishes the folder whole. ``abort`` removes what was written.
    ``names`` and ``info`` tell what was written so far (a report counts it)."""

    def write(self, name: str, tensor: torch.Tensor | FileSlice) -> None: ...

    def names(self) -> list[str]: ...

    def info(self, name: str) -> TensorInfo: ...

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
    # a format whose names and layout are the base model's (llama.cpp's GGUF LoRA): its files read against the base,
    # open; None: ``read`` needs nothing else
    read_with_base: Callable[[Path, Checkpoint], LoraAdapter] | None = None
    # the same, its modules under the file's own names, no base needed: what inspect shows of such a format
    read_as_named: Callable[[Path], LoraAdapter] | None = None
    # those names are whole without the base (a diffusers LoRA's: the pipeline's own): read so where a command
    # is given no base, instead of refused
    base_optional: bool = False
    # resize and combine write their result in this format too (its writer holds a rank per module), not PEFT's
    written_back: bool = False
    # an output folder to write an adapter into, in this format (None: lorasurgeon does not write it)
    writer: Callable[[str | os.PathLike[str], bool], AdapterWriter] | None = None
