"""Key names of LoRA tensors: in PEFT's saved adapter files and in the augmented (in-memory) form.

Every naming fact about the PEFT format lives in these tables; facts about the model's own names (its
embeddings, head, Conv1D model types) are ``names.tables``.
"""

from __future__ import annotations

from typing import Final, Literal

SAVED_PREFIX = "base_model.model."
ADAPTER_NAME = "default"

# A LoRA tensor's role in its module: the key tables below are by role, and so are LoraModule.keys.
Role = Literal["A", "B", "B_bias", "emb_A", "emb_B", "magnitude", "tokens_delta", "base_weight"]
ROLE_A: Final = "A"  # lora_A
ROLE_B: Final = "B"  # lora_B
ROLE_B_BIAS: Final = "B_bias"  # lora_B.bias (lora_bias=True)
ROLE_EMB_A: Final = "emb_A"  # lora_embedding_A
ROLE_EMB_B: Final = "emb_B"  # lora_embedding_B
ROLE_MAGNITUDE: Final = "magnitude"  # DoRA's magnitude vector
ROLE_TOKENS_DELTA: Final = "tokens_delta"  # trainable tokens' rows
ROLE_BASE_WEIGHT: Final = "base_weight"  # the W0 PEFT saves for an embedding / lm_head

# role -> suffix after "<module>." in a saved adapter file (no adapter name inside).
SAVED_SUFFIX: dict[Role, str] = {
    "A": "lora_A.weight",
    "B": "lora_B.weight",
    "B_bias": "lora_B.bias",
    "emb_A": "lora_embedding_A",
    "emb_B": "lora_embedding_B",
    "magnitude": "lora_magnitude_vector",
    "tokens_delta": "token_adapter.trainable_tokens_delta",
    "base_weight": "base_layer.weight",
}

# role -> suffix after "<module>." in a PEFT-wrapped model's state dict (adapter name inside).
AUGMENTED_SUFFIX: dict[Role, str] = {
    "A": f"lora_A.{ADAPTER_NAME}.weight",
    "B": f"lora_B.{ADAPTER_NAME}.weight",
    "B_bias": f"lora_B.{ADAPTER_NAME}.bias",
    "emb_A": f"lora_embedding_A.{ADAPTER_NAME}",
    "emb_B": f"lora_embedding_B.{ADAPTER_NAME}",
    "magnitude": f"lora_magnitude_vector.{ADAPTER_NAME}.weight",
    "tokens_delta": f"token_adapter.trainable_tokens_delta.{ADAPTER_NAME}",
}


def strip_prefix(key: str) -> str:
    """``base_model.model.x.y`` -> ``x.y`` (keys without the prefix are returned unchanged)."""
    return key[len(SAVED_PREFIX) :] if key.startswith(SAVED_PREFIX) else key


def split_saved_key(key: str) -> tuple[str, Role | None]:
    """(module, role) for a LoRA tensor key; (base tensor name, None) for a plain tensor.

    ``base_model.model.layers.0.q_proj.lora_A.weight`` -> ``("layers.0.q_proj", "A")``;
    ``base_model.model.lm_head.weight`` -> ``("lm_head.weight", None)``.
    """
    name = strip_prefix(key)
    for role, suffix in SAVED_SUFFIX.items():
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1], role
    return name, None


def saved_key(module: str, role: Role) -> str:
    """The key of a LoRA tensor in a saved adapter file."""
    return f"{SAVED_PREFIX}{module}.{SAVED_SUFFIX[role]}"


def augmented_key(module: str, role: Role) -> str:
    """The key of a LoRA tensor in the augmented form (a PEFT-wrapped model's state dict)."""
    return f"{module}.{AUGMENTED_SUFFIX[role]}"


# Target names for which PEFT saves the embedding layers' W0 with the adapter (EMBEDDING_LAYER_NAMES).
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")

TOKEN_ADAPTER = "token_adapter"
