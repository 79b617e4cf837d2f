"""The augmented form: the base architecture with the LoRA layers inside.

Its keys are those of ``get_peft_model(model, config).base_model.model.state_dict()`` (adapter
name ``default``). ``augmented_ops`` writes one; ``split_augmented`` reads one back as a base
view plus an adapter view, so ``convert`` reuses the merge planner unchanged.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ...adapter.config import AdapterConfig
from ...adapter.names import (
    ADAPTER_NAME,
    AUGMENTED_SUFFIX,
    EMBEDDING_LAYER_NAMES,
    SAVED_PREFIX,
    TOKEN_ADAPTER,
    augmented_key,
    saved_key,
)
from ...adapter.weights import LoraAdapter, adapter_from
from ...engine.plan import Ref
from ...errors import CorruptCheckpointError, UnsupportedError
from ...io.checkpoint import Checkpoint
from ...io.dtypes import is_floating
from ...names import ModelNames, model_names, names_of_memory
from .experts import BASE_LAYER, stack_shape, unwrapped
from .ops import Action, TensorOp

if TYPE_CHECKING:
    pass
else:
    pass

ORIGINAL = "original_module"
SAVED_COPY = f"modules_to_save.{ADAPTER_NAME}"
TOKENS_DELTA = f"{TOKEN_ADAPTER}.trainable_tokens_delta.{ADAPTER_NAME}"


def _split(name: str) -> tuple[str, str]:
    module, _, leaf = name.rpartition(".")
    return module, leaf


def _saved_module(adapter: LoraAdapter, module: str) -> bool:
    """True when ``module`` is one of modules_to_save (PEFT's match: a whole name segment)."""
    return any(module == m or module.endswith("." + m) for m in adapter.config.modules_to_save)


def augmented_ops(base: Checkpoint, adapter: LoraAdapter, names: ModelNames, dtype: str | None) -> list[TensorOp]:
    """Ops writing base + adapter as one checkpoint with PEFT's in-memory key names (adapter = input 1).

    Its keys are the in-memory names (transformers 5 renames on load), every tied tensor included,
    as a PEFT model's state dict has them.
    """
    ops: list[TensorOp] = []
    # How many PEFT wrappers each module wears: one per LoRA layer, one per targeted parameter (nested).
    wrappers = Counter(unwrapped(m) for m in adapter.modules)
    tokens = set(adapter.token_deltas)
    views = names.tied_absent(set(base))
    parts = {key for fused in names.fused.values() for part in fused.parts for key in part}
    entries = [(names.memory_name(key), key) for key in base if key not in parts]
    for view, source in views.items():
        source_key = names.file_key(source)
        assert source_key is not None
        entries.append((view, source_key))
    owner = {module: module for module in tokens}  # module wearing trainable tokens -> the adapter's module
    for target, source in names.tied.items():  # PEFT mirrors the embedding's tokens on every tied module
        if _split(source)[0] in adapter.token_deltas:
            owner[_split(target)[0]] = _split(source)[0]
            tokens.add(_split(target)[0])

    def add(name: str, src: Ref, action: Action = "copy", like: str | None = None) -> None:
        """One output tensor; ``like``: the base dtype a saved W0 is taken at (as PEFT's model holds it)."""
        info = (base if src.source == 0 else adapter.checkpoint).info(src.key)
        held = like or info.dtype_name
        out = dtype if dtype is not None and is_floating(info.dtype_name) else held
        ops.append(
            TensorOp(name, src, out, info.shape, action, src_dtype_name=held if held != info.dtype_name else None)
        )

    for name, key in entries:
        module, leaf = _split(name)
        src = Ref(0, key)
        like: str | None = None
        if name in adapter.base_weights:
            like = base.info(src.key).dtype_name  # the base tensor's dtype, then the saved W0 as the source
            src = Ref(1, adapter.base_weights[name])
        if name in adapter.replacements and not _saved_module(adapter, module):
            src, like = Ref(1, adapter.replacements[name]), None  # bias="all"/"lora_only": loaded over the base
        if wrappers[module]:
            add(f"{module}{BASE_LAYER * wrappers[module]}.{leaf}", src, like=like)
        elif module in tokens:
            add(f"{module}.{TOKEN_ADAPTER}.base_layer.{leaf}", src, like=like)
        elif _saved_module(adapter, module):
            add(f"{module}.{ORIGINAL}.{leaf}", src, like=like)
            add(f"{module}.{SAVED_COPY}.{leaf}", Ref(1, adapter.replacements.get(name, name)), "replace")
        else:
            add(name, src, like=like)
    for name, fused in names.fused.items():  # experts as the model holds them: stacked from the files' parts
        module, leaf = _split(name)
        stack = tuple(tuple(Ref(0, key) for key in part) for part in fused.parts)
        first = base.info(fused.parts[0][0])
        shape = stack_shape(names, base, name)
        if shape is None:
            raise UnsupportedError(f"{base.root}: the per-expert parts of {name!r} are not matrices")
        out = dtype if dtype is not None and is_floating(first.dtype_name) else first.dtype_name
        ops.append(
            TensorOp(f"{module}{BASE_LAYER * wrappers[module]}.{leaf}", stack[0][0], out, shape, "copy", stack=stack)
        )
    for lora_module in adapter.modules.values():
        for role, key in lora_module.keys.items():
            if role in AUGMENTED_SUFFIX:
                add(augmented_key(lora_module.name, role), Ref(1, key), "lora")
    for token_module in sorted(tokens):  # a tied module wears the embedding's trainable tokens
        add(f"{token_module}.{TOKENS_DELTA}", Ref(1, adapter.token_deltas[owner[token_module]]), "lora")
    return ops


def _saves_embedding_layers(config: AdapterConfig) -> bool:
    """PEFT's save_embedding_layers="auto": an embedding layer name among the targets, no trainable tokens."""
    targets = config.target_modules or ()
    return any(name in targets for name in EMBEDDING_LAYER_NAMES) and not config.trainable_token_indices


def split_augmented(
    ckpt: Checkpoint, config: AdapterConfig, model_config: Mapping[str, Any]
) -> tuple[Checkpoint, LoraAdapter, ModelNames]:
    """Read an augmented checkpoint back as (base view, adapter view, the base's names), both views over
    the same file. The base view holds the tensors transformers would save for the model (its file
    names; stacked experts as per-expert slices), as a merge of the two would write them."""
    names = model_names(ckpt.names(), model_config)  # tied tensors, embedding and head: in-memory names
    base_names: dict[str, str] = {}
    saved_names: dict[str, str] = {}
    suffixes = {f".{suffix}": role for role, suffix in AUGMENTED_SUFFIX.items() if role != "tokens_delta"}
    for key in ckpt:
        role = next((r for s, r in suffixes.items() if key.endswith(s)), None)
        if role is not None:
            saved_names[saved_key(key[: -len(next(s for s, r in suffixes.items() if r == role))], role)] = key
        elif key.endswith("." + TOKENS_DELTA):
            module = key[: -len(TOKENS_DELTA) - 1]
            saved_names[saved_key(module, "tokens_delta")] = key
        elif f".{SAVED_COPY}." in key:
            module, leaf = key.split(f".{SAVED_COPY}.")
            saved_names[f"{SAVED_PREFIX}{module}.{leaf}"] = key
        elif f".{ORIGINAL}." in key:
            base_names[key.replace(f".{ORIGINAL}.", ".")] = key
        elif f".{TOKEN_ADAPTER}.base_layer." in key:
            base_names[key.replace(f".{TOKEN_ADAPTER}.base_layer.", ".")] = key
        elif ".base_layer." in key:  # under one wrapper per LoRA layer / targeted parameter
            base_names[re.sub(r"(\.base_layer)+\.", ".", key)] = key
        else:
            base_names[key] = key
    if not saved_names:
        raise CorruptCheckpointError(f"{ckpt.root}: no LoRA tensors (lora_A.default...): not an augmented checkpoint")
    # A tied tensor is in a PEFT model's state dict but not in a transformers checkpoint. transformers
    # ties a pair only when the files lack one or hold equal values (modeling_utils.tie_weights), so a
    # target that differs from its source (T5's lm_head under "tie_word_embeddings": false) stays.
    for target, source in names.tied.items():
        if target in base_names and source in base_names and ckpt.same_values(base_names[target], base_names[source]):
            del base_names[target]
        # trainable tokens mirrored onto a tied module are the embedding's: keep one copy.
        mirrored = saved_key(_split(target)[0], "tokens_delta")
        if mirrored in saved_names and saved_key(_split(source)[0], "tokens_delta") in saved_names:
            del saved_names[mirrored]
    # PEFT saves a wrapped embedding's W0 with the adapter when an embedding layer is targeted.
    if _saves_embedding_layers(config):
        for layer in [_split(n)[0] for n in (names.embedding, names.head) if n]:
            if f"{layer}.base_layer.weight" in ckpt:
                saved_names[saved_key(layer, "base_weight")] = f"{layer}.base_layer.weight"
    # bias="all" / "lora_only": PEFT saves those trained biases in full, under their wrapped names.
    if config.bias in ("all", "lora_only"):
        for key in ckpt:
            wrapped = key.endswith(".base_layer.bias") and not key.endswith(f".{TOKEN_ADAPTER}.base_layer.bias")
            if wrapped or (
                config.bias == "all"
                and key.endswith(".bias")
                and key in base_names.values()
                and f".{ORIGINAL}." not in key
            ):
                saved_names[SAVED_PREFIX + key] = key
    adapter = adapter_from(ckpt.folder, config, ckpt.renamed(saved_names))
    files = names_of_memory({name: ckpt.info(key).shape for name, key in base_names.items()}, model_config)
    stored = {
        name: name if name in files.fused else files.file_key(name) or files.file_name_for(name) for name in base_names
    }
    view = ckpt.renamed({stored[name]: key for name, key in base_names.items()})
    return view.carved(_expert_pieces(view, files)), adapter, files


def _expert_pieces(view: Checkpoint, names: ModelNames) -> dict[str, tuple[str, int, int, int]]:
    """Per-expert file tensors as slices of the stacked ones (transformers' reverse of its fusing:
    the parts are equal chunks of axis 1)."""
    pieces: dict[str, tuple[str, int, int, int]] = {}
    for name, fused in names.fused.items():
        if name not in view:
            continue
        shape = view.info(name).shape
        if len(shape) != 3 or shape[0] != fused.experts or shape[1] % len(fused.parts):
            raise CorruptCheckpointError(
                f"{view.root}: {name!r} {list(shape)} is not {fused.experts} experts of {len(fused.parts)} equal parts"
            )
        rows = shape[1]
        size = rows // len(fused.parts)
        for p, part in enumerate(fused.parts):
            pieces.update({key: (name, e, p * size, (p + 1) * size) for e, key in enumerate(part)})
    return pieces
