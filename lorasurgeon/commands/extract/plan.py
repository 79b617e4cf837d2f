"""Planning an extraction: which fine-tune tensors become LoRA factors, which are stored in full.

Built from the two checkpoints' headers. Whether a tensor changed is only known once it is read,
so every candidate gets an op and the executor skips the unchanged ones.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from ...adapter.names import CONV1D_MODEL_TYPES, EMBEDDING_LEAVES, INPUT_EMBEDDINGS, OUTPUT_EMBEDDING, input_embedding
from ...engine.plan import Ref
from ...errors import IncompatibleError
from ...io.checkpoint import Checkpoint
from ...io.dtypes import itemsize
from ...io.layout import TensorSpec
from ...ops.lora import LayerName
from .settings import ExtractSettings

# A layer's kind (its change becomes LoRA factors), "bias" (a lora_B.bias), "full" (stored whole), "skip"
ExtractKind = LayerName | Literal["bias", "full", "skip"]
FACTORED: tuple[ExtractKind, ...] = ("linear", "conv1d", "embedding", "conv")


@dataclass(frozen=True)
class ExtractOp:
    """One fine-tune tensor: compare with its base tensor, and factorize / store / skip the change."""

    name: str
    module: str
    kind: ExtractKind
    tuned: Ref
    base: Ref | None  # None when the base has no counterpart (a resized vocabulary)
    shape: tuple[int, ...]
    nbytes: int
    note: str = ""
    byte_copy: TensorSpec | None = None  # every op is computed: whether it changed is known only then

    def refs(self) -> list[Ref]:
        return [self.tuned] + ([self.base] if self.base is not None else [])


def _tied_views(ckpt: Checkpoint, tied: bool) -> dict[str, str]:
    """name -> key in ckpt, with lm_head standing for the input embedding when tied and absent."""
    names = {n: n for n in ckpt}
    embedding = input_embedding(ckpt)
    if tied and OUTPUT_EMBEDDING not in ckpt and embedding is not None:
        names[OUTPUT_EMBEDDING] = embedding
    return names


def _kind(name: str, ndim: int, model_type: str | None, settings: ExtractSettings, tied_head: bool) -> ExtractKind:
    module, _, leaf = name.rpartition(".")
    # A tied head is the embedding's tensor: --embeddings decides for both (full means full for both).
    is_embedding = module.rpartition(".")[2] in EMBEDDING_LEAVES or (tied_head and name == OUTPUT_EMBEDDING)
    if leaf == "weight" and ndim == 2 and is_embedding:
        if settings.embeddings != "lowrank":
            return settings.embeddings
        return "linear" if name == OUTPUT_EMBEDDING else "embedding"  # PEFT's LoRA on a head is a Linear's
    if leaf == "weight" and ndim == 2:
        return "conv1d" if model_type in CONV1D_MODEL_TYPES and name != OUTPUT_EMBEDDING else "linear"
    if leaf == "weight" and ndim == 4:
        return "conv"
    return settings.extras


def plan_extract(
    base: Checkpoint,
    tuned: Checkpoint,
    *,
    base_tied: bool,
    tuned_tied: bool,
    model_type: str | None,
    settings: ExtractSettings,
) -> tuple[list[ExtractOp], int]:
    """The ops, in the fine-tune's order, and how many tensors include/exclude left out."""
    base_names = _tied_views(base, base_tied)
    tuned_names = _tied_views(tuned, tuned_tied)
    only_base = sorted(set(base_names) - set(tuned_names))
    only_tuned = sorted(set(tuned_names) - set(base_names))
    if only_base or only_tuned or not set(base_names) & set(tuned_names):
        sample = ", ".join((only_tuned or only_base)[:3])
        raise IncompatibleError(
            f"{tuned.root} and {base.root} do not share an architecture: {len(only_tuned)} tensors only in the "
            f"fine-tune, {len(only_base)} only in the base (e.g. {sample})"
        )
    tied_head = OUTPUT_EMBEDDING in tuned_names and OUTPUT_EMBEDDING not in (set(base) & set(tuned))
    lora_modules = set()
    ops: list[ExtractOp] = []
    excluded = 0
    for name, key in tuned_names.items():
        if not settings.names(name):
            excluded += 1
            continue
        t_info, b_info = tuned.info(key), base.info(base_names[name])
        kind = _kind(name, len(t_info.shape), model_type, settings, tied_head)
        note = ""
        base_ref: Ref | None = Ref(0, base_names[name])
        if t_info.shape != b_info.shape:
            resized = (
                (name in INPUT_EMBEDDINGS or name == OUTPUT_EMBEDDING)
                and len(t_info.shape) == 2
                and t_info.shape[1] == b_info.shape[1]
                and t_info.shape[0] > b_info.shape[0]
            )
            if not resized:
                raise IncompatibleError(
                    f"tensor {name!r} is {list(b_info.shape)} in the base but {list(t_info.shape)} in the fine-tune: "
                    "different architectures cannot be extracted"
                )
            kind, base_ref = "full", None
            note = (
                f"vocabulary resized from {b_info.shape[0]} to {t_info.shape[0]} rows: new rows cannot be a "
                f"delta, stored in full; call resize_token_embeddings({t_info.shape[0]}) on the base before loading"
            )
        if not t_info.dtype.is_floating_point:
            kind = settings.extras
        module = name.rpartition(".")[0]
        if kind in FACTORED:
            lora_modules.add(module)
        shape = t_info.shape
        ops.append(
            ExtractOp(name, module, kind, Ref(1, key), base_ref, shape, math.prod(shape) * itemsize(t_info.dtype), note)
        )
    # The bias of a module that gets LoRA factors is stored as lora_B.bias (lora_bias), not in full.
    ops = [
        dataclasses.replace(o, kind="bias")
        if o.kind == "full" and o.name.endswith(".bias") and o.module in lora_modules and o.base
        else o
        for o in ops
    ]
    return ops, excluded
