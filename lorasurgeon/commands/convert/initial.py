"""An adapter whose training started by changing the base (PiSSA, OLoRA, CorDA: ``init_lora_weights``), saved as it
was trained, made into the plain LoRA of the unchanged base -- the conversion PEFT does in
``save_pretrained(path_initial_model_for_weight_conversion=...)`` (peft/tuners/lora/model.py
``subtract_mutated_init``, peft_model.py ``save_pretrained``), exactly, from the initial adapter it saved:

    W = W_res + s·B₀·A₀ and W + ΔW = W_res + s·B·A, so ΔW = s·(B·A − B₀·A₀) = s·[B | −B₀]·[A; A₀]

The factors are concatenated (A above A₀, B beside −B₀: exact in any dtype), r and lora_alpha doubled (α·√2 with
rsLoRA: the same scale), as are rank_pattern and alpha_pattern, and init_lora_weights is True. Like PEFT's, the
result holds lora_A and lora_B only: an adapter holding anything else (DoRA, trained biases, modules_to_save,
embedding factors) is refused by name rather than written without it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...adapter.config import UNSUPPORTED_INITS
from ...adapter.formats.registry import adapter_writer
from ...adapter.names import ROLE_A, ROLE_B, Role, saved_key
from ...adapter.weights import LoraAdapter
from ...engine.execute import Outcome, run
from ...engine.plan import Ref
from ...errors import IncompatibleError, InvalidOptionError, UnsupportedError
from ...hub.cards import CARD_NAME, made_by, model_card
from ...io.dtypes import itemsize
from ...io.layout import TensorSpec
from ...words import plural
from .._inputs import Input, Output, adapters_of, open_inputs
from .._timing import rate, timed

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch

MUTATING_INITS = tuple(i for i in UNSUPPORTED_INITS if i != "loftq")  # loftq quantized the base: no way back
TRAINED, INITIAL = 0, 1  # the engine's inputs
FACTORS: tuple[tuple[Role, int], ...] = ((ROLE_A, 0), (ROLE_B, 1))  # each factor and the dim it doubles along


@dataclass(frozen=True)
class JoinOp:
    """One factor of the plain LoRA: the trained factor and the initial one side by side (``dim`` 0 for A,
    1 for B, whose initial half is negated)."""

    name: str
    trained: Ref
    initial: Ref
    dim: int
    spec: TensorSpec
    byte_copy: None = None

    def refs(self) -> list[Ref]:
        return [self.trained, self.initial]

    @property
    def nbytes(self) -> int:
        return math.prod(self.spec.shape) * itemsize(self.spec.dtype_name)


def join(op: JoinOp, tensors: Mapping[Ref, torch.Tensor], device: torch.device) -> Outcome[None]:
    initial = tensors[op.initial] if op.dim == 0 else -tensors[op.initial]
    return Outcome([(op.name, torch.cat([tensors[op.trained], initial], dim=op.dim))], None)


@dataclass(frozen=True)
class InitialReport:
    """What ``convert ADAPTER --initial INITIAL`` wrote (or, with dry_run, would write)."""

    output: str | None
    adapter: str
    initial: str
    init: str  # the adapter's init_lora_weights
    modules: int
    rank: int  # r of the result (twice the adapter's)
    bytes: int
    dry_run: bool
    wall: float = 0.0

    def summary(self) -> str:
        what = f"{plural(self.modules, 'module')} of the {self.init} adapter {self.adapter}"
        if self.dry_run:
            return f"Would write {what} as a plain LoRA of rank {self.rank} (the initial adapter: {self.initial})."
        speed = rate(self.bytes, self.wall)
        return (
            f"Wrote {self.output}: {what} as a plain LoRA of rank {self.rank} for the unchanged base "
            f"(ΔW = s·(B·A − B₀·A₀), exact), in {self.wall:.2f} s{f' ({speed})' if speed else ''}."
        )


@timed
def from_initial(
    adapter: str | os.PathLike[str], initial: str | os.PathLike[str], out: Output, *, device: str = "cpu"
) -> InitialReport:
    """The plain LoRA of ``adapter`` (trained from a PiSSA/OLoRA/CorDA init) given its ``initial`` adapter."""
    inputs = [Input(adapter, "ADAPTER", "adapter"), Input(initial, "INITIAL", "adapter")]
    with open_inputs(
        inputs, out.path, command="convert", overwrite=out.overwrite, device=device, in_place=out.in_place
    ) as opened:
        trained, start = adapters_of(opened)
    try:
        init = _check(trained, start)
        ops = _plan(trained, start)
        report = InitialReport(
            None, str(adapter), str(initial), init, len(trained.modules), 2 * trained.config.r, 0, True
        )
        if out.dry_run:
            return report
        where = out.where()
        writer = adapter_writer(where, overwrite=out.overwrite)
        try:
            stats = run(ops, [trained.checkpoint, start.checkpoint], writer, compute=join, progress=out.progress)
            writer.add_file(CARD_NAME, _card(trained, str(adapter), str(initial), Path(where).name))
            writer.finish(_config(trained.config.raw))
        except BaseException:
            writer.abort()
            raise
        return replace(report, output=str(where), bytes=stats.bytes_written, dry_run=False)
    finally:
        trained.close()
        start.close()


def _check(trained: LoraAdapter, start: LoraAdapter) -> str:
    """The adapter's init (one PEFT converts this way), and the two adapters of one shape; refusals by name."""
    init = str(trained.config.raw.get("init_lora_weights"))
    if not init.lower().startswith(MUTATING_INITS):
        raise InvalidOptionError(
            f"{trained.path}: init_lora_weights={init}: its base was not changed when training started, so it is "
            "a plain LoRA already: it needs no --initial"
        )
    raw = trained.config.raw
    if raw.get("use_rslora") and (raw.get("rank_pattern") or raw.get("alpha_pattern")):
        raise UnsupportedError(f"{trained.path}: rsLoRA with rank_pattern or alpha_pattern: PEFT does not convert it")
    extra = sorted(
        key
        for key in trained.checkpoint
        if not key.endswith((".lora_A.weight", ".lora_B.weight"))
        or key.rpartition(".lora_")[0].removeprefix("base_model.model.") not in trained.modules
    )
    if extra:
        raise UnsupportedError(
            f"{trained.path}: holds more than lora_A and lora_B ({', '.join(extra[:3])}): PEFT's conversion "
            "keeps only those, so this one is refused rather than written without them"
        )
    if set(start.modules) != set(trained.modules):
        differ = sorted(set(start.modules) ^ set(trained.modules))
        raise IncompatibleError(f"{start.path}: not the initial adapter of {trained.path}: modules {differ[:3]} differ")
    return init


def _plan(trained: LoraAdapter, start: LoraAdapter) -> list[JoinOp]:
    """A JoinOp per factor of each module: A (r, in) above A₀, B (out, r) beside −B₀."""
    ops = []
    for name, module in trained.modules.items():
        for role, dim in FACTORS:
            key, key0 = module.keys[role], start.modules[name].keys[role]
            info, info0 = trained.checkpoint.info(key), start.checkpoint.info(key0)
            if info.shape != info0.shape or info.dtype_name != info0.dtype_name:
                raise IncompatibleError(
                    f"{start.path}: {key0} is {info0.dtype_name} {list(info0.shape)}, but the adapter's {key} is "
                    f"{info.dtype_name} {list(info.shape)}: not the initial adapter it was trained from"
                )
            shape = list(info.shape)
            shape[dim] *= 2
            spec = TensorSpec(saved_key(name, role), info.dtype_name, tuple(shape))
            ops.append(JoinOp(spec.name, Ref(TRAINED, key), Ref(INITIAL, key0), dim, spec))
    return ops


def _config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """PEFT's config of the converted adapter: r and alpha doubled (α·√2 with rsLoRA), patterns doubled."""
    config = dict(raw)
    config["init_lora_weights"] = True
    config["r"] = 2 * raw["r"]
    config["lora_alpha"] = raw["lora_alpha"] * (2**0.5 if raw.get("use_rslora") else 2)
    for key in ("rank_pattern", "alpha_pattern"):
        if raw.get(key):
            config[key] = {k: 2 * v for k, v in raw[key].items()}
    return config


def _card(trained: LoraAdapter, adapter: str, initial: str, title: str) -> str:
    lines = [
        f"The plain LoRA of `{adapter}` (init_lora_weights={trained.config.raw.get('init_lora_weights')}) for the "
        f"unchanged base: ΔW = s·(B·A − B₀·A₀), with the initial adapter `{initial}`, as PEFT converts it."
    ]
    lines += made_by("lorasurgeon", "convert", adapter, "--initial", initial, "-o", title)
    return model_card(kind="adapter", base=trained.config.base_model, title=title, lines=lines)
