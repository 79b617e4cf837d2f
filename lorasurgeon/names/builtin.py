"""ModelNames without transformers: the files' names are the in-memory names, the head is ``lm_head``
and ties to the first input embedding found. A fallback, used only where transformers is not
installed or cannot build the model; ``tests/test_names.py`` keeps its tie defaults in step with
the installed transformers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..adapter.names import OUTPUT_EMBEDDING, input_embedding
from .from_transformers import task_type
from .model import ModelNames

# Model types whose config class ties the embeddings when config.json does not say (transformers 5.x).
TIED_BY_DEFAULT = frozenset(
    {
        "bert",
        "bloom",
        "falcon",
        "gemma",
        "gemma2",
        "gemma3_text",
        "gpt2",
        "opt",
        "starcoder2",
        "t5",
        "whisper",
    }
)


def is_tied(config: Mapping[str, Any]) -> bool:
    """tie_word_embeddings as config.json says (top level or text_config), else the class's default."""
    for doc in (config.get("text_config"), config):
        if isinstance(doc, Mapping) and "tie_word_embeddings" in doc:
            return bool(doc["tie_word_embeddings"])
    return config.get("model_type") in TIED_BY_DEFAULT


def builtin(file_keys: Sequence[str], config: Mapping[str, Any], why: str) -> ModelNames:
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
        task_type(classes[0]),
        f"built-in table ({why})",
    )
