"""The model-naming facts written down (rather than read off transformers): which tensor is the head and
which the input embedding, which modules are embeddings, which model types hold GPT-2's Conv1D, which
tie their embeddings by default, and PEFT's task type for a class. The built-in fallback (``builtin``) is
made of them; ``tests/test_names.py`` keeps them in step with the installed transformers.

The PEFT adapter format's own key grammar (lora_A/lora_B, the ``base_model.model.`` prefix) is not a fact
about the model: it stays in ``adapter.names``.
"""

from __future__ import annotations

from collections.abc import Container

# Tied embeddings: the output embedding transformers omits from the files when tied, and the
# input embeddings it then shares its weight with (first present wins).
OUTPUT_EMBEDDING = "lm_head.weight"
INPUT_EMBEDDINGS = (
    "model.embed_tokens.weight",
    "transformer.wte.weight",
    "model.decoder.embed_tokens.weight",
    "model.language_model.embed_tokens.weight",
    "language_model.model.embed_tokens.weight",
    "gpt_neox.embed_in.weight",
    "embed_tokens.weight",
)


def input_embedding(names: Container[str]) -> str | None:
    """The input embedding among a checkpoint's tensor names (the first of INPUT_EMBEDDINGS present)."""
    return next((n for n in INPUT_EMBEDDINGS if n in names), None)


# Leaf names of nn.Embedding modules in transformers models (LoRA uses lora_embedding_A/B there).
EMBEDDING_LEAVES = frozenset(
    {
        "embed_tokens",
        "wte",
        "wpe",
        "embed_positions",
        "word_embeddings",
        "position_embeddings",
        "token_type_embeddings",
        "embed_in",
        "shared",
    }
)

# Model types whose linear layers are transformers' Conv1D (weight stored (in, out)); their head is a Linear.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})

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

# PEFT's task type for a transformers class, by the end of its name (None: PEFT's plain PeftModel).
_TASKS = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("Model", "FEATURE_EXTRACTION"),
)
# The task type the built-in table gives, whatever the class: the one extract has always written for a model
# transformers does not describe.
BUILTIN_TASK_TYPE = "CAUSAL_LM"
# transformers classes whose forward is not PEFT's seq2seq signature, or have no task PEFT names.
_NO_TASK = ("WhisperForConditionalGeneration", "CLIPTextModel", "CLIPVisionModel")


def task_type(class_name: str | None) -> str | None:
    if class_name is None or class_name in _NO_TASK:
        return None
    return next((task for end, task in _TASKS if class_name.endswith(end)), None)
