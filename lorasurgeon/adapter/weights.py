"""LoraAdapter: the common in-memory adapter (PEFT's layout: its saved key names) -- modules with their LoRA
tensors, from headers only -- which every adapter format (``adapter.formats``) reads into."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..errors import AdapterConfigError, IncompatibleError
from ..io.checkpoint import Checkpoint
from .config import AdapterConfig

if TYPE_CHECKING:
    from .tuned import TunedModule
from .names import (
    ROLE_A,
    ROLE_B,
    ROLE_BASE_WEIGHT,
    ROLE_EMB_A,
    ROLE_EMB_B,
    ROLE_TOKENS_DELTA,
    TOKEN_ADAPTER,
    Role,
    split_saved_key,
)

# What the adapter alone says a module is: "linear" stands for a Linear or GPT-2's Conv1D (the base
# weight's shape tells them apart, commands.merge.plan.module_kind), "embedding", "conv".
AdapterLayer = Literal["linear", "embedding", "conv"]


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: its name in the base model and the adapter keys of each role."""

    name: str
    kind: AdapterLayer
    keys: dict[Role, str]  # role -> key in the adapter file
    rank: int
    alpha: float
    scale: float

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"

    @property
    def bias_name(self) -> str:
        return f"{self.name}.bias"


@dataclass(frozen=True)
class LoraAdapter:
    """An adapter: its config, its checkpoint, its LoRA modules and its full-tensor replacements."""

    path: Path
    config: AdapterConfig
    checkpoint: Checkpoint
    modules: dict[str, LoraModule]
    replacements: dict[str, str]  # base tensor name -> adapter key (modules_to_save, bias)
    base_weights: dict[str, str]  # base weight name -> adapter key of a saved base_layer.weight (W0)
    token_deltas: dict[str, str]  # module -> key of its trainable_tokens_delta rows
    format: str = "peft"  # the adapter format it was read from (adapter.formats.registry sets it)
    tuned: dict[str, TunedModule] = field(default_factory=dict)  # modules of a tuner other than LoRA (ops.tuners)

    @property
    def tuner(self) -> str | None:
        """The PEFT tuner other than LoRA whose modules it holds (``ops.tuners``), None for LoRA."""
        return next(iter(self.tuned.values())).tuner if self.tuned else None

    def close(self) -> None:
        self.checkpoint.close()


def load_adapter(path: str | os.PathLike[str]) -> LoraAdapter:
    """Open an adapter: config + tensor headers, grouped by module, read by the first format of the registry
    (``adapter.formats.registry``) that claims it -- today PEFT's folder.

    Raises:
        AdapterConfigError: the config or tensors do not describe a valid LoRA adapter.
        UnsupportedError: no registered format claims it (the refusal lists them).
    """
    from .formats.registry import adapter_format  # the formats read adapters into this module's types

    found = adapter_format(path)
    return replace(found.read(Path(path)), format=found.name)


def adapter_of(ckpt: Checkpoint) -> LoraAdapter:
    """:func:`load_adapter` from the adapter's checkpoint, already open (its headers are not read again); the
    adapter owns it (``close()`` closes it).

    Raises:
        AdapterConfigError, UnsupportedError: as for :func:`load_adapter`.
    """
    from .formats.registry import read_opened

    return read_opened(ckpt)


def adapter_from(folder: Path, config: AdapterConfig, ckpt: Checkpoint) -> LoraAdapter:
    """Group the saved-format keys of ``ckpt`` into modules (also used for views of augmented files); those of a
    tuner other than LoRA by its parts (``adapter.tuned``)."""
    if config.tuner is not None:
        from .tuned import group_tuned  # only for another tuner's adapter

        tuned, whole = group_tuned(folder, config, ckpt, config.tuner)
        return LoraAdapter(folder, config, ckpt, {}, whole, {}, {}, tuned=tuned)
    groups: dict[str, dict[Role, str]] = {}
    replacements: dict[str, str] = {}
    for key in ckpt:
        module, role = split_saved_key(key)
        if role is None:  # a full tensor; a wrapped module's own bias is saved as base_layer.bias
            replacements[module.replace(".base_layer.", ".")] = key
        else:
            groups.setdefault(module, {})[role] = key
    modules, base_weights, token_deltas = {}, {}, {}
    for name, keys in groups.items():
        if ROLE_BASE_WEIGHT in keys:  # the W0 PEFT saved for an embedding / lm_head
            base_weights[f"{name.removesuffix('.' + TOKEN_ADAPTER)}.weight"] = keys[ROLE_BASE_WEIGHT]
        if ROLE_TOKENS_DELTA in keys:
            token_deltas[name] = keys[ROLE_TOKENS_DELTA]
            if config.token_indices(name) is None:
                raise AdapterConfigError(
                    f"{folder}: trainable tokens for {name!r} but trainable_token_indices does not name it"
                )
        if ROLE_A in keys or ROLE_EMB_A in keys:
            modules[name] = _module(folder, config, ckpt, name, keys)
        elif set(keys) - {ROLE_BASE_WEIGHT, ROLE_TOKENS_DELTA}:
            raise AdapterConfigError(f"{folder}: module {name!r} has {', '.join(sorted(keys))} but no lora_A")
    # PEFT saves a targeted embedding / head whole (save_embedding_layers): its frozen bias (Phi's and
    # GPT-J's lm_head) comes with its W0 -- the base's own bias, not a trained one, unless bias= trains it.
    if config.bias == "none":
        for name in [n for n in replacements if n.endswith(".bias") and f"{n[:-5]}.weight" in base_weights]:
            if replacements[name].endswith(".base_layer.bias"):
                base_weights[name] = replacements.pop(name)
    return LoraAdapter(folder, config, ckpt, modules, replacements, base_weights, token_deltas)


def _module(folder: Path, config: AdapterConfig, ckpt: Checkpoint, name: str, keys: dict[Role, str]) -> LoraModule:
    embedding = ROLE_EMB_A in keys
    a_key = keys[ROLE_EMB_A] if embedding else keys[ROLE_A]  # the caller grouped a module by its lora_A
    b_key = keys.get(ROLE_EMB_B) if embedding else keys.get(ROLE_B)
    if b_key is None:
        raise AdapterConfigError(f"{folder}: module {name!r} has lora_A but no lora_B")
    a, b = ckpt.info(a_key), ckpt.info(b_key)
    kind: AdapterLayer = "embedding" if embedding else ("conv" if len(a.shape) == 4 else "linear")
    # Embedding A is (r, num_embeddings); Linear A is (r, in); Conv A is (r, in, k, k).
    rank = a.shape[0]
    rank_b = b.shape[1] if len(b.shape) >= 2 else None
    if len(a.shape) not in (2, 4) or rank_b != rank:
        raise IncompatibleError(
            f"{folder}: module {name!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not share a rank"
        )
    return LoraModule(name, kind, dict(keys), rank, config.alpha_for(name), config.scale(name, rank))
