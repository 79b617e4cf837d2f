"""ModelNames without transformers: the files' names are the in-memory names, the head is ``lm_head``
and ties to the first input embedding found, and each module's layer kind is told by its name (an
embedding's leaf name, GPT-2's Conv1D by model type, a Linear otherwise). A fallback, used only where
transformers is not installed or cannot build the model; the facts it is made of are ``tables``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .model import ModelNames
from .tables import (
    BUILTIN_TASK_TYPE,
    CONV1D_MODEL_TYPES,
    EMBEDDING_LEAVES,
    OUTPUT_EMBEDDING,
    TIED_BY_DEFAULT,
    input_embedding,
)

if TYPE_CHECKING:
    from ..ops.lora import LayerName

__all__ = ["TIED_BY_DEFAULT", "builtin", "is_tied", "layers"]


def is_tied(config: Mapping[str, Any]) -> bool:
    """tie_word_embeddings as config.json says (top level or text_config), else the class's default."""
    for doc in (config.get("text_config"), config):
        if isinstance(doc, Mapping) and "tie_word_embeddings" in doc:
            return bool(doc["tie_word_embeddings"])
    return config.get("model_type") in TIED_BY_DEFAULT


def layers(names: Iterable[str], model_type: str | None) -> dict[str, LayerName]:
    """The layer kind of each module holding one of these ``weight`` tensors, by its name: an embedding
    (EMBEDDING_LEAVES), the head (a Linear), GPT-2's Conv1D for its model types, else a Linear. A 4-D
    weight makes it a Conv2d (``ModelNames.layer_of``: names carry no shapes)."""
    head = OUTPUT_EMBEDDING.rpartition(".")[0]
    other: LayerName = "conv1d" if model_type in CONV1D_MODEL_TYPES else "linear"
    found: dict[str, LayerName] = {}
    for name in names:
        module, _, leaf = name.rpartition(".")
        if leaf != "weight" or not module:
            continue
        if module.rpartition(".")[2] in EMBEDDING_LEAVES:
            found[module] = "embedding"
        else:
            found[module] = "linear" if module == head else other
    return found


def builtin(file_keys: Sequence[str], config: Mapping[str, Any], why: str) -> ModelNames:
    """The names the built-in table gives. Its task type is PEFT's CAUSAL_LM whatever the class: the one
    extract has always written for a model transformers does not describe."""
    keys = set(file_keys)
    embedding = input_embedding(keys)
    tied = {OUTPUT_EMBEDDING: embedding} if is_tied(config) and embedding and OUTPUT_EMBEDDING not in keys else {}
    classes = config.get("architectures") or [None]
    return ModelNames(
        {k: k for k in file_keys},
        tied,
        OUTPUT_EMBEDDING,
        embedding,
        {},
        classes[0],
        BUILTIN_TASK_TYPE,
        f"built-in table ({why})",
        layers=layers([*file_keys, *tied], config.get("model_type")),
        model_type=config.get("model_type"),
    )
