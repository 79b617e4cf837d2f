"""Planning an extraction: which fine-tune tensors become LoRA factors, which are stored in full.

Built from the two checkpoints' headers. Whether a tensor changed is only known once it is read,
so every candidate gets an op and the executor skips the unchanged ones.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ...engine.plan import Ref
from ...errors import IncompatibleError, InvalidOptionError
from ...io.checkpoint import Checkpoint, TensorInfo
from ...io.dtypes import is_floating, itemsize
from ...io.layout import TensorSpec
from ...names import ModelNames
from ...names.tables import INPUT_EMBEDDINGS
from ...ops.lora import LayerName
from .settings import ExtractSettings

if TYPE_CHECKING:
    from ...calibration import Moments

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
    experts: ExpertsOf | None = None  # kind "experts": which stacked parameter, and how it is stored
    moments: Moments | None = None  # --calibration: its statistics in the moments spool (extract.calibrated)

    def refs(self) -> list[Ref]:
        if self.experts is not None and self.experts.parts:
            return [r for pair in self.experts.parts for r in pair]
        moments = self.moments.refs() if self.moments is not None else []
        return [self.tuned] + ([self.base] if self.base is not None else []) + moments


@dataclass(frozen=True)
class ExpertsOf:
    """An extract op on stacked MoE experts: its change becomes a LoRA on the parameter (target_parameters).

    ``parts`` set: one expert (``expert``) held in per-expert files, its parts (tuned, base) concatenated
    on the rows (gate then up); unset: the op's tensors are the whole (E, d1, d2) stack."""

    parameter: str  # in-memory name: model.layers.0.mlp.experts.gate_up_proj
    experts: int
    transposed: bool  # stored (E, in, out) (GPT-OSS)
    expert: int | None = None
    parts: tuple[tuple[Ref, Ref], ...] = ()

    def rank(self, rank: int | None) -> int | None:
        """--rank (or --max-rank) for this parameter as PEFT counts it: per file matrix fused into it. PEFT gives
        a gate_up_proj fused from per-expert gate and up matrices r for each (``all-linear`` on Mixtral or Qwen-MoE:
        rank_pattern ``gate_up_proj`` 2r, alpha 2α), so each expert's change there has rank 2r."""
        return None if rank is None else rank * max(1, len(self.parts))


def _expert_ops(
    base: Checkpoint, tuned: Checkpoint, names: ModelNames, settings: ExtractSettings
) -> tuple[list[ExtractOp], set[str], int]:
    """One op per expert of each stacked parameter the files hold per expert, one per stack held whole;
    the file keys they stand for (compared by them, or left out by --include/--exclude on the stacked
    parameter's in-memory name), and how many were left out."""
    ops: list[ExtractOp] = []
    claimed: set[str] = set()
    excluded = 0
    for module, parameters in names.stacked.items():
        for parameter in parameters:
            fused = names.fused.get(parameter)
            whole = names.file_key(parameter)
            keys = [k for part in fused.parts for k in part] if fused is not None else [whole] if whole else []
            if not keys or not all(k in base and k in tuned for k in keys):
                continue  # the common names decide: the two do not share an architecture
            for key in keys:
                if base.info(key).shape != tuned.info(key).shape:
                    raise IncompatibleError(
                        f"tensor {key!r} is {list(base.info(key).shape)} in the base but "
                        f"{list(tuned.info(key).shape)} in the fine-tune: different architectures cannot be extracted"
                    )
            claimed.update(keys)
            if not settings.names(parameter):
                excluded += len(keys)
                continue
            transposed = parameter in names.transposed
            if fused is None:
                info = tuned.info(keys[0])
                if len(info.shape) != 3:
                    claimed.discard(keys[0])
                    continue
                of = ExpertsOf(parameter, info.shape[0], transposed)
                ref, base_ref = Ref(1, keys[0]), Ref(0, keys[0])
                ops.append(ExtractOp(parameter, module, "experts", ref, base_ref, info.shape, info.nbytes, experts=of))
                continue
            for e in range(fused.experts):
                infos = [tuned.info(part[e]) for part in fused.parts]
                shape = (sum(i.shape[0] for i in infos), *infos[0].shape[1:])
                parts = tuple((Ref(1, part[e]), Ref(0, part[e])) for part in fused.parts)
                of = ExpertsOf(parameter, fused.experts, transposed, e, parts)
                nbytes = sum(i.nbytes for i in infos)
                name = f"{parameter}[{e}]"
                ops.append(ExtractOp(name, module, "experts", parts[0][0], parts[0][1], shape, nbytes, experts=of))
    return ops, claimed, excluded


def views(ckpt: Checkpoint, names: ModelNames) -> dict[str, str]:
    """In-memory name -> file key: every tensor the files hold, and each tied one they omit (a view of its
    source: a tied head under whatever name the model gives it)."""
    views = {names.memory_name(key): key for key in ckpt}
    for target, source in names.tied_absent(set(ckpt)).items():
        key = names.file_key(source)
        assert key is not None  # tied_absent keeps only targets whose source the files hold
        views[target] = key
    return views


def _kind(
    name: str, ndim: int, names: ModelNames, kinds: ModelNames, settings: ExtractSettings, tied_head: bool
) -> ExtractKind:
    """What the change of one tensor becomes: a LoRA layer of the kind PEFT would wrap its module as, or the
    --embeddings / --extras choice. The layer kinds are ``kinds``' (``ModelNames.layer_of``)."""
    module, _, leaf = name.rpartition(".")
    layer = kinds.layer_of(module, ndim)
    is_head = name == names.head
    is_embedding = layer == "embedding" or (tied_head and is_head)
    if leaf != "weight" or layer is None:
        return settings.extras
    if ndim == 2 and is_embedding:
        if settings.embeddings != "lowrank":
            return settings.embeddings
        return "linear" if is_head else "embedding"  # PEFT's LoRA on a head is a Linear's
    if ndim == 2 and layer in ("linear", "conv1d"):
        return "linear" if is_head or layer == "linear" else "conv1d"
    if ndim == 4 and layer == "conv":
        return "conv"
    return settings.extras


def _resized(name: str, base: TensorInfo, tuned: TensorInfo, embeddings: tuple[str | None, ...]) -> str:
    """Why a tensor whose shapes differ is stored whole (a resized vocabulary), or a refusal by name."""
    resized = (
        name in embeddings
        or name in INPUT_EMBEDDINGS
        and len(tuned.shape) == 2
        and tuned.shape[1] == base.shape[1]
        and tuned.shape[0] > base.shape[0]
    )
    if not resized:
        raise IncompatibleError(
            f"tensor {name!r} is {list(base.shape)} in the base but {list(tuned.shape)} in the fine-tune: "
            "different architectures cannot be extracted"
        )
    return (
        f"vocabulary resized from {base.shape[0]} to {tuned.shape[0]} rows: new rows cannot be a "
        f"delta, stored in full; call resize_token_embeddings({tuned.shape[0]}) on the base before loading"
    )


def plan_extract(
    base: Checkpoint,
    tuned: Checkpoint,
    *,
    base_model: ModelNames,
    tuned_model: ModelNames,
    settings: ExtractSettings,
) -> tuple[list[ExtractOp], int]:
    """The ops, in the fine-tune's order, and how many tensors include/exclude left out. The layer kinds are the
    names' (the fine-tune's, or the base's where only its config names a model type).

    Raises:
        IncompatibleError: the two do not share an architecture, or a tensor's shape.
        InvalidOptionError: include/exclude leave no tensor to compare.
    """
    base_names = views(base, base_model)
    tuned_names = views(tuned, tuned_model)
    only_base = sorted(set(base_names) - set(tuned_names))
    only_tuned = sorted(set(tuned_names) - set(base_names))
    if only_base or only_tuned or not set(base_names) & set(tuned_names):
        sample = ", ".join((only_tuned or only_base)[:3])
        raise IncompatibleError(
            f"{tuned.root} and {base.root} do not share an architecture: {len(only_tuned)} tensors only in the "
            f"fine-tune, {len(only_base)} only in the base (e.g. {sample})"
        )
    head = tuned_model.head
    # the head is the embedding's tensor in either checkpoint: --embeddings decides for both
    tied_head = head is not None and (
        head in base_model.tied_absent(set(base)) or head in tuned_model.tied_absent(set(tuned))
    )
    # layer kinds: the fine-tune's names, the base's where only the base's config names a model type
    kinds = base_model if base_model.model_type and not tuned_model.model_type else tuned_model
    lora_modules = set()
    ops, stacked, excluded = _expert_ops(base, tuned, tuned_model, settings)  # their tensors are theirs alone
    for name, key in tuned_names.items():
        if key in stacked:
            continue
        if not settings.names(name):
            excluded += 1
            continue
        t_info, b_info = tuned.info(key), base.info(base_names[name])
        kind = _kind(name, len(t_info.shape), tuned_model, kinds, settings, tied_head)
        note = "" if t_info.shape == b_info.shape else _resized(name, b_info, t_info, (tuned_model.embedding, head))
        base_ref: Ref | None = Ref(0, base_names[name])
        if note:
            kind, base_ref = "full", None
        if not is_floating(t_info.dtype_name):
            kind = settings.extras
        if settings.fixed_rank(kind, t_info.shape) == 0:  # --conv-rank 0: k×k convolutions left out
            kind = "skip"
        module = name.rpartition(".")[0]
        if kind in FACTORED:
            lora_modules.add(module)
        shape = t_info.shape
        ops.append(
            ExtractOp(
                name, module, kind, Ref(1, key), base_ref, shape, math.prod(shape) * itemsize(t_info.dtype_name), note
            )
        )
    if not ops and settings.names.active:
        raise InvalidOptionError(
            f"{settings.names.describe()} leaves none of the {len(tuned_names)} tensors of the fine-tune to "
            f"compare (names look like {next(iter(tuned_names))!r})"
        )
    # The bias of a module that gets LoRA factors is stored as lora_B.bias (lora_bias), not in full.
    ops = [
        dataclasses.replace(o, kind="bias")
        if o.kind == "full" and o.name.endswith(".bias") and o.module in lora_modules and o.base
        else o
        for o in ops
    ]
    return ops, excluded
