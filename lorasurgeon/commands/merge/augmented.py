"""The augmented form: the base architecture with the LoRA layers inside.

Its keys are those of ``get_peft_model(model, config).base_model.model.state_dict()`` (adapter
name ``default``). ``augmented_ops`` writes one; ``split_augmented`` reads one back as a base
view plus an adapter view, so ``convert`` reuses the merge planner unchanged.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Mapping
from typing import Any

from ...adapter.config import AdapterConfig
from ...adapter.names import (
    ADAPTER_NAME,
    AUGMENTED_SUFFIX,
    EMBEDDING_LAYER_NAMES,
    ROLE_BASE_WEIGHT,
    ROLE_TOKENS_DELTA,
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

ORIGINAL = "original_module"
SAVED_COPY = f"modules_to_save.{ADAPTER_NAME}"
TOKENS_DELTA = AUGMENTED_SUFFIX[ROLE_TOKENS_DELTA]
# The adapter's tensors in the augmented form: ".lora_A.default.weight" -> "A", ... (tokens apart).
_LORA_SUFFIXES = {f".{suffix}": role for role, suffix in AUGMENTED_SUFFIX.items() if role != ROLE_TOKENS_DELTA}


def _split(name: str) -> tuple[str, str]:
    module, _, leaf = name.rpartition(".")
    return module, leaf


def _saved_module(adapter: LoraAdapter, module: str) -> bool:
    """True when ``module`` is one of modules_to_save (PEFT's match: a whole name segment)."""
    return any(module == m or module.endswith("." + m) for m in adapter.config.modules_to_save)


@dataclasses.dataclass
class _AugmentedPlan:
    """The ops of an augmented checkpoint, added one output tensor at a time (base = input 0, adapter = input 1)."""

    base: Checkpoint
    adapter: LoraAdapter
    dtype: str | None
    ops: list[TensorOp] = dataclasses.field(default_factory=list)

    def add(self, name: str, src: Ref, action: Action = "copy", like: str | None = None) -> None:
        """One output tensor; ``like``: the base dtype a saved W0 is taken at (as PEFT's model holds it)."""
        info = (self.base if src.source == 0 else self.adapter.checkpoint).info(src.key)
        held = like or info.dtype_name
        out = self.dtype if self.dtype is not None and is_floating(info.dtype_name) else held
        self.ops.append(
            TensorOp(name, src, out, info.shape, action, src_dtype_name=held if held != info.dtype_name else None)
        )


def _base_entries(base: Checkpoint, names: ModelNames) -> list[tuple[str, str]]:
    """(in-memory name, file key) of every base tensor the model holds unfused, tied views included."""
    parts = {key for fused in names.fused.values() for part in fused.parts for key in part}
    entries = [(names.memory_name(key), key) for key in base if key not in parts]
    for view, source in names.tied_absent(set(base)).items():
        source_key = names.file_key(source)
        assert source_key is not None
        entries.append((view, source_key))
    return entries


def _token_owners(adapter: LoraAdapter, names: ModelNames) -> dict[str, str]:
    """Module wearing trainable tokens -> the adapter's module whose tokens it wears (PEFT mirrors the
    embedding's tokens on every tied module)."""
    owner = {module: module for module in adapter.token_deltas}
    for target, source in names.tied.items():
        if _split(source)[0] in adapter.token_deltas:
            owner[_split(target)[0]] = _split(source)[0]
    return owner


def _add_base_tensor(
    out: _AugmentedPlan, name: str, key: str, wrappers: Counter[str], token_owners: dict[str, str]
) -> None:
    """A base tensor under the name PEFT's model holds it by (inside its wrappers), from the base or the adapter."""
    adapter = out.adapter
    module, leaf = _split(name)
    src = Ref(0, key)
    like: str | None = None
    if name in adapter.base_weights:
        like = out.base.info(src.key).dtype_name  # the base tensor's dtype, then the saved W0 as the source
        src = Ref(1, adapter.base_weights[name])
    if name in adapter.replacements and not _saved_module(adapter, module):
        src, like = Ref(1, adapter.replacements[name]), None  # bias="all"/"lora_only": loaded over the base
    if wrappers[module]:
        out.add(f"{module}{BASE_LAYER * wrappers[module]}.{leaf}", src, like=like)
    elif module in token_owners:
        out.add(f"{module}.{TOKEN_ADAPTER}.base_layer.{leaf}", src, like=like)
    elif _saved_module(adapter, module):
        out.add(f"{module}.{ORIGINAL}.{leaf}", src, like=like)
        out.add(f"{module}.{SAVED_COPY}.{leaf}", Ref(1, adapter.replacements.get(name, name)), "replace")
    else:
        out.add(name, src, like=like)


def _add_stacked_experts(out: _AugmentedPlan, names: ModelNames, wrappers: Counter[str]) -> None:
    """Experts as the model holds them: stacked from the files' parts."""
    for name, fused in names.fused.items():
        module, leaf = _split(name)
        stack = tuple(tuple(Ref(0, key) for key in part) for part in fused.parts)
        first = out.base.info(fused.parts[0][0])
        shape = stack_shape(names, out.base, name)
        if shape is None:
            raise UnsupportedError(f"{out.base.root}: the per-expert parts of {name!r} are not matrices")
        dtype = out.dtype if out.dtype is not None and is_floating(first.dtype_name) else first.dtype_name
        out.ops.append(
            TensorOp(f"{module}{BASE_LAYER * wrappers[module]}.{leaf}", stack[0][0], dtype, shape, "copy", stack=stack)
        )


def augmented_ops(base: Checkpoint, adapter: LoraAdapter, names: ModelNames, dtype: str | None) -> list[TensorOp]:
    """Ops writing base + adapter as one checkpoint with PEFT's in-memory key names (adapter = input 1).

    Its keys are the in-memory names (transformers 5 renames on load), every tied tensor included,
    as a PEFT model's state dict has them.
    """
    out = _AugmentedPlan(base, adapter, dtype)
    # How many PEFT wrappers each module wears: one per LoRA layer, one per targeted parameter (nested).
    wrappers = Counter(unwrapped(m) for m in adapter.modules)
    token_owners = _token_owners(adapter, names)
    for name, key in _base_entries(base, names):
        _add_base_tensor(out, name, key, wrappers, token_owners)
    _add_stacked_experts(out, names, wrappers)
    for lora_module in adapter.modules.values():
        for role, key in lora_module.keys.items():
            if role in AUGMENTED_SUFFIX:
                out.add(augmented_key(lora_module.name, role), Ref(1, key), "lora")
    for token_module in sorted(token_owners):  # a tied module wears the embedding's trainable tokens
        out.add(f"{token_module}.{TOKENS_DELTA}", Ref(1, adapter.token_deltas[token_owners[token_module]]), "lora")
    return out.ops


def _saves_embedding_layers(config: AdapterConfig) -> bool:
    """PEFT's save_embedding_layers="auto": an embedding layer name among the targets, no trainable tokens."""
    targets = config.target_modules or ()
    return any(name in targets for name in EMBEDDING_LAYER_NAMES) and not config.trainable_token_indices


def _saved_name(key: str) -> str | None:
    """The saved adapter file's key for augmented key ``key`` when it is an adapter tensor, else None."""
    lora = next(((suffix, role) for suffix, role in _LORA_SUFFIXES.items() if key.endswith(suffix)), None)
    if lora is not None:
        suffix, role = lora
        return saved_key(key[: -len(suffix)], role)
    if key.endswith("." + TOKENS_DELTA):
        return saved_key(key[: -len(TOKENS_DELTA) - 1], ROLE_TOKENS_DELTA)
    if f".{SAVED_COPY}." in key:
        module, leaf = key.split(f".{SAVED_COPY}.")
        return f"{SAVED_PREFIX}{module}.{leaf}"
    return None


def _unwrapped_name(key: str) -> str:
    """A base tensor's augmented key without PEFT's wrappers: the name the model holds it by."""
    if f".{ORIGINAL}." in key:
        return key.replace(f".{ORIGINAL}.", ".")
    if f".{TOKEN_ADAPTER}.base_layer." in key:
        return key.replace(f".{TOKEN_ADAPTER}.base_layer.", ".")
    if ".base_layer." in key:  # under one wrapper per LoRA layer / targeted parameter
        return re.sub(r"(\.base_layer)+\.", ".", key)
    return key


def _drop_tied_copies(
    ckpt: Checkpoint, names: ModelNames, base_names: dict[str, str], saved_names: dict[str, str]
) -> None:
    """A tied tensor is in a PEFT model's state dict but not in a transformers checkpoint. transformers
    ties a pair only when the files lack one or hold equal values (modeling_utils.tie_weights), so a
    target that differs from its source (T5's lm_head under "tie_word_embeddings": false) stays."""
    for target, source in names.tied.items():
        if target in base_names and source in base_names and ckpt.same_values(base_names[target], base_names[source]):
            del base_names[target]
        # trainable tokens mirrored onto a tied module are the embedding's: keep one copy.
        mirrored = saved_key(_split(target)[0], ROLE_TOKENS_DELTA)
        if mirrored in saved_names and saved_key(_split(source)[0], ROLE_TOKENS_DELTA) in saved_names:
            del saved_names[mirrored]


def _trained_biases(ckpt: Checkpoint, config: AdapterConfig, base_names: dict[str, str]) -> list[str]:
    """bias="all" / "lora_only": the trained biases PEFT saves in full, under their wrapped names."""
    if config.bias not in ("all", "lora_only"):
        return []
    held = set(base_names.values())
    trained = []
    for key in ckpt:
        wrapped = key.endswith(".base_layer.bias") and not key.endswith(f".{TOKEN_ADAPTER}.base_layer.bias")
        plain = config.bias == "all" and key.endswith(".bias") and key in held and f".{ORIGINAL}." not in key
        if wrapped or plain:
            trained.append(key)
    return trained


def split_augmented(
    ckpt: Checkpoint, config: AdapterConfig, model_config: Mapping[str, Any]
) -> tuple[Checkpoint, LoraAdapter, ModelNames]:
    """Read an augmented checkpoint back as (base view, adapter view, the base's names), both views over
    the same file. The base view holds the tensors transformers would save for the model (its file
    names; stacked experts as per-expert slices), as a merge of the two would write them."""
    names = model_names(ckpt.names(), model_config)  # tied tensors, embedding and head: in-memory names
    base_names: dict[str, str] = {}
    saved_names: dict[str, str] = {}
    for key in ckpt:
        saved = _saved_name(key)
        if saved is not None:
            saved_names[saved] = key
        else:
            base_names[_unwrapped_name(key)] = key
    if not saved_names:
        raise CorruptCheckpointError(f"{ckpt.root}: no LoRA tensors (lora_A.default...): not an augmented checkpoint")
    _drop_tied_copies(ckpt, names, base_names, saved_names)
    # PEFT saves a wrapped embedding's W0 with the adapter when an embedding layer is targeted.
    if _saves_embedding_layers(config):
        for layer in [_split(n)[0] for n in (names.embedding, names.head) if n]:
            if f"{layer}.base_layer.weight" in ckpt:
                saved_names[saved_key(layer, ROLE_BASE_WEIGHT)] = f"{layer}.base_layer.weight"
    saved_names.update({SAVED_PREFIX + key: key for key in _trained_biases(ckpt, config, base_names)})
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
