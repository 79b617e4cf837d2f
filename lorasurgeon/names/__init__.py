"""Which tensor is which: in-memory names (what PEFT adapters use) against file keys, tied tensors,
the output head, fused MoE experts, the PEFT task type. See ``model.ModelNames``."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from .builtin import builtin, is_tied
from .cache import remembered, remembered_keys
from .flux import flux_names
from .from_transformers import from_transformers, saved_keys
from .model import FusedExperts, ModelNames
from .single_file import single_file_names

# the diffusion families whose single files name their tensors otherwise than diffusers does: each one module's
# function of the file keys (None: not its file), asked in this order
SINGLE_FILES = (single_file_names, flux_names)

__all__ = ["FusedExperts", "ModelNames", "is_tied", "model_names", "names_of_memory"]


def model_names(file_keys: Sequence[str], config: Mapping[str, Any]) -> ModelNames:
    """The names of a checkpoint: from transformers where it is installed and knows the model, else the
    built-in table (``ModelNames.source`` says which, and why)."""
    return _cached(tuple(file_keys), json.dumps(config, sort_keys=True, default=str))


@functools.lru_cache(maxsize=8)
def _cached(file_keys: tuple[str, ...], config_json: str) -> ModelNames:
    """One meta model per checkpoint and config in a process (a program or a test suite merges the same
    model again and again); ModelNames is never changed once made."""
    config = json.loads(config_json)

    def compute() -> ModelNames:
        if not config.get("model_type"):  # a single-file diffusion checkpoint: diffusers' names in memory
            single = next((n for family in SINGLE_FILES if (n := family(file_keys)) is not None), None)
            if single is not None:
                return single
        found = from_transformers(file_keys, config)
        return found if isinstance(found, ModelNames) else builtin(file_keys, config, found)

    return remembered(file_keys, config_json, compute)


def names_of_memory(shapes: Mapping[str, tuple[int, ...]], config: Mapping[str, Any]) -> ModelNames:
    """The names of the checkpoint transformers would save for a model holding tensors of these in-memory
    names and shapes (an augmented checkpoint's base): its ``file_of`` and ``fused`` say where each goes."""
    config_json = json.dumps(config, sort_keys=True, default=str)
    keys = remembered_keys(shapes, config_json, lambda: saved_keys(shapes, config))
    return model_names(keys if keys is not None else list(shapes), config)
