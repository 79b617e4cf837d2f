"""resize and combine's plan: one op per module (its terms from every adapter that has it), one per whole
tensor carried over; and what cannot be treated as low-rank factors, refused by name."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from ...adapter.names import ROLE_B_BIAS, ROLE_MAGNITUDE
from ...adapter.weights import LoraAdapter, LoraModule
from ...calibration import Moments
from ...engine.plan import Ref
from ...errors import IncompatibleError, UnsupportedError
from ...io.dtypes import itemsize
from ...io.layout import TensorSpec
from ...ops.lora import EMBEDDING, LINEAR


@dataclass(frozen=True)
class ModuleOp:
    """One module: its terms (A ref, B ref, factor) from every adapter that has it, and its output keys."""

    name: str
    kind: str  # linear | embedding | conv
    terms: tuple[tuple[Ref, Ref, float], ...]
    a_key: str
    b_key: str
    a_shape: tuple[int, ...]  # of the first adapter's A: (r, in) or (r, in, kh, kw)
    b_shape: tuple[int, ...]
    ranks: tuple[int, ...]  # of each term
    nbytes: int
    byte_copy: TensorSpec | None = None
    moments: Moments | None = None  # --calibration: its statistics (resize.calibrated)
    weight: Ref | None = None  # --calibration: the base's weight, what its output error is relative to

    def refs(self) -> list[Ref]:
        extra = [*self.moments.refs(), self.weight] if self.moments is not None and self.weight is not None else []
        return [r for a, b, _ in self.terms for r in (a, b)] + extra

    @property
    def cost(self) -> int:
        """Parameters per rank component: in + out."""
        return math.prod(self.a_shape[1:]) + self.b_shape[0]

    @property
    def rank(self) -> int:
        return sum(self.ranks)


@dataclass(frozen=True)
class CopyOp:
    """A tensor carried over as it is (modules_to_save, a saved W0)."""

    name: str
    src: Ref
    spec: TensorSpec

    def refs(self) -> list[Ref]:
        return [self.src]

    @property
    def nbytes(self) -> int:
        return math.prod(self.spec.shape) * itemsize(self.spec.dtype)

    @property
    def byte_copy(self) -> TensorSpec:
        return self.spec


def check_adapter(adapter: LoraAdapter, *, combining: bool) -> None:
    cfg = adapter.config
    found = cfg.unsupported()
    if adapter.tuned:
        found.append(
            f"peft_type {cfg.peft_type} (not LoRA factors: "
            "`lorasurgeon convert ADAPTER --to lora --base BASE --rank N` first)"
        )
    if any(ROLE_MAGNITUDE in m.keys for m in adapter.modules.values()):
        found.append("DoRA (its magnitude depends on the base weights, not on the factors)")
    if any(ROLE_B_BIAS in m.keys for m in adapter.modules.values()):
        found.append("lora_bias (a trained bias is not low-rank)")
    if cfg.target_parameters:
        found.append("target_parameters (stacked MoE experts: E·r rows per module)")
    if adapter.token_deltas:
        found.append("trainable tokens")
    if combining and adapter.replacements:
        found.append(f"modules_to_save / trained biases ({', '.join(sorted(adapter.replacements)[:3])}): whole tensors")
    if found:
        verb = "combined" if combining else "resized"
        raise UnsupportedError(f"{adapter.path}: cannot be {verb} as low-rank factors: {'; '.join(found)}")


def same_base(a: str, b: str) -> bool:
    """Whether two base_model_name_or_path name one model: equal, or one a path ending in the other (a folder
    named relatively and absolutely, a Hub id and a local copy in a folder of its name)."""
    parts_a, parts_b = PurePosixPath(a).parts, PurePosixPath(b).parts
    common = min(len(parts_a), len(parts_b))
    return parts_a[-common:] == parts_b[-common:]


def check_same_base(adapters: Sequence[LoraAdapter]) -> None:
    """Adapters combined must be of one base model: those whose configs name different ones are refused by
    name (an adapter that names none is taken at its word: its shapes are still checked, module by module)."""
    first = adapters[0]
    for other in adapters[1:]:
        ours, theirs = first.config.base_model, other.config.base_model
        if ours and theirs and not same_base(ours, theirs):
            raise IncompatibleError(
                f"{other.path}: base_model_name_or_path {theirs!r}, but {first.path} has {ours!r}: adapters "
                "of different base models (if both are of one model under two names, pass --allow-different-bases)"
            )


def plan_modules(adapters: Sequence[LoraAdapter], weights: Sequence[float]) -> tuple[list[ModuleOp], list[CopyOp]]:
    names: dict[str, list[tuple[int, LoraModule]]] = {}
    for i, adapter in enumerate(adapters):
        for name, module in adapter.modules.items():
            names.setdefault(name, []).append((i, module))
    ops: list[ModuleOp] = []
    for name, found in names.items():
        first_i, first = found[0]
        info_of = adapters[first_i].checkpoint.info
        a_role, b_role = (EMBEDDING if first.kind == "embedding" else LINEAR).lora_roles
        a_shape, b_shape = info_of(first.keys[a_role]).shape, info_of(first.keys[b_role]).shape
        terms, ranks, nbytes = [], [], 0
        for i, m in found:
            ia, ib = adapters[i].checkpoint.info(m.keys[a_role]), adapters[i].checkpoint.info(m.keys[b_role])
            if m.kind != first.kind or ia.shape[1:] != a_shape[1:] or ib.shape[0] != b_shape[0]:
                raise IncompatibleError(
                    f"{adapters[i].path}: module {name!r} is {m.kind} {list(ib.shape)} x {list(ia.shape)}, but "
                    f"{adapters[first_i].path} has it {first.kind} {list(b_shape)} x {list(a_shape)}: "
                    "not the same base model"
                )
            terms.append((Ref(i, m.keys[a_role]), Ref(i, m.keys[b_role]), weights[i] * m.scale))
            ranks.append(ia.shape[0])
            nbytes += ia.nbytes + ib.nbytes
        keys = first.keys[a_role], first.keys[b_role]
        ops.append(ModuleOp(name, first.kind, tuple(terms), *keys, a_shape, b_shape, tuple(ranks), nbytes))
    copies: list[CopyOp] = []
    for i, adapter in enumerate(adapters):
        for key in [*adapter.replacements.values(), *adapter.base_weights.values()]:
            info = adapter.checkpoint.info(key)
            if key not in {c.name for c in copies}:
                copies.append(CopyOp(key, Ref(i, key), TensorSpec.of(key, info.dtype, info.shape)))
    return ops, copies
