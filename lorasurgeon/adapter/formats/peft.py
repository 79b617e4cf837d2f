"""PEFT's adapter format: adapter_config.json beside adapter_model.safetensors (or .bin), keys under
``base_model.model.`` -- the common form itself (``adapter.weights``), so reading it is grouping its keys."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...io.checkpoint import Checkpoint, open_checkpoint
from ...io.sidecar import config_bytes
from ...io.spool import SpoolWriter, folder_only
from ..config import CONFIG_NAME, AdapterConfig
from ..names import AUGMENTED_SUFFIX, ROLE_A, ROLE_EMB_A, ROLE_TOKENS_DELTA, SAVED_PREFIX, SAVED_SUFFIX
from ..weights import LoraAdapter, adapter_from
from .base import AdapterFormat

if TYPE_CHECKING:
    from .registry import Probe

PREFIX = "adapter_model"  # adapter_model.safetensors, as PEFT's save_pretrained names it

_SAVED = tuple(f".{SAVED_SUFFIX[r]}" for r in (ROLE_A, ROLE_EMB_A, ROLE_TOKENS_DELTA))
_AUGMENTED = tuple(f".{s}" for s in AUGMENTED_SUFFIX.values())


def claims(probe: Probe) -> bool:
    """A PEFT adapter: LoRA keys as PEFT saves them, or an adapter_model file beside adapter_config.json (an
    adapter of full tensors only: modules_to_save). A model with PEFT's LoRA layers inside (the augmented
    form, which ``input_kind`` tells apart first) is read as its adapter too."""
    if any((k.startswith(SAVED_PREFIX) and k.endswith(_SAVED)) or k.endswith(_AUGMENTED) for k in probe.names()):
        return True
    files = probe.files()
    return bool(files) and files[0].name.startswith(PREFIX) and probe.has(CONFIG_NAME)


def read(path: Path) -> LoraAdapter:
    """adapter_config.json and the tensors' headers, grouped by module."""
    return adapter_from(path, AdapterConfig.load(path), open_checkpoint(path))


def read_open(ckpt: Checkpoint) -> LoraAdapter:
    """:func:`read`, from the adapter's checkpoint already open."""
    return adapter_from(ckpt.root, AdapterConfig.load(ckpt.root), ckpt)


class PeftWriter(SpoolWriter):
    """An adapter folder as PEFT writes it: the tensors under their saved names in one
    adapter_model.safetensors, the config as adapter_config.json."""

    def __init__(self, out: str | os.PathLike[str], overwrite: bool = False):
        folder_only(out, "a PEFT adapter")
        super().__init__(out, prefix=PREFIX, overwrite=overwrite)

    def finish(self, config: Mapping[str, Any]) -> Path:
        self.add_file(CONFIG_NAME, config_bytes(dict(config)))
        return self.commit()


FORMAT = AdapterFormat(
    name="peft",
    holds=f"PEFT ({CONFIG_NAME} + {PREFIX}.safetensors)",
    claims=claims,
    read=read,
    read_open=read_open,
    writer=PeftWriter,
)
