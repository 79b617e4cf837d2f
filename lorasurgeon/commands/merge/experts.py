"""LoRA on stacked MoE experts (PEFT's ``target_parameters``): which parameter a wrapper adapts, which
way round, and the file tensors its change lands in.

PEFT wraps a module's parameter in a ``ParamWrapper`` (two targeted parameters of one module nest two
wrappers: ``experts.lora_A`` and ``experts.base_layer.lora_A``); the parameter's name is not in the
keys, so the shapes say which it is. A stacked parameter is (E, d1, d2): (E, out, in) as transformers
5 holds Mixtral's or Qwen's experts, (E, in, out) where the module says ``is_transposed`` (GPT-OSS).
PEFT >= 0.19.1 stores A (E·r, in), B (out, E·r); earlier versions took (E, out, in) for (E, in, out)
(``ΔW[e]`` transposed), so where d1 == d2 only the version tells them apart, and an older adapter
is refused. On disk the stack is whole (fused files) or one tensor per expert and part (the files
transformers fuses on load: ``experts.N.w1`` + ``experts.N.w3`` -> ``gate_up_proj``).

Which of B's E·r columns belong to expert e is PEFT's rank-major packing, or Unsloth's grouped-by-expert
one where adapter_config.json declares it (``adapter.expert_layouts``): the shapes are the same, so an
adapter Unsloth trained that does not declare it is refused. Other trainers' MoE LoRAs are not stacked:
ms-swift/Megatron (mcore-bridge) and vLLM's 2-D format name each expert's gate_proj/up_proj/down_proj, and
merge as Linear modules on the per-expert files.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...adapter.expert_layouts import GROUPED_BY_EXPERT, lora_b_layout
from ...adapter.names import ROLE_A, ROLE_B
from ...adapter.weights import LoraAdapter, LoraModule
from ...errors import IncompatibleError, UnsupportedError
from ...io.checkpoint import Checkpoint
from ...names import ModelNames
from ...ops.lora import ExpertSlice, LayerKind, StackedExperts

FIXED_ORIENTATION = (0, 19, 1)  # the PEFT release that fixed the in/out orientation of 3-D parameters
BASE_LAYER = ".base_layer"


@dataclass(frozen=True)
class ExpertTarget:
    """What one ParamWrapper of an adapter changes."""

    parameter: str  # in-memory name: model.layers.0.mlp.experts.gate_up_proj
    shape: tuple[int, int, int]  # (E, d1, d2) in memory
    transposed: bool  # ΔW[e] = (s·B_e@A_e)ᵀ
    rank: int  # per expert
    scale: float  # alpha / r (or / sqrt(r)), before any merge weight
    layout: str  # how B's E·r columns are packed: expert_layouts.RANK_MAJOR (PEFT's) or GROUPED_BY_EXPERT
    pieces: tuple[tuple[str, LayerKind], ...]  # file key -> how it gets its share


def unwrapped(module: str) -> str:
    """The module a (possibly nested) ParamWrapper stands for: ``experts.base_layer`` -> ``experts``."""
    return module.replace(BASE_LAYER, "")


def _targeted(config_targets: tuple[str, ...], name: str) -> bool:
    """PEFT's match of a parameter against ``target_parameters``: the whole name, or a suffix of it."""
    return any(name == t or name.endswith("." + t) for t in config_targets)


def stack_shape(names: ModelNames, base: Checkpoint, parameter: str) -> tuple[int, int, int] | None:
    """(E, d1, d2) of an in-memory stacked parameter, from the headers of the files that hold it."""
    fused = names.fused.get(parameter)
    if fused is not None:
        shapes = [base.info(part[0]).shape for part in fused.parts]
        if any(len(s) != 2 for s in shapes):
            return None
        if fused.axis == 1:
            return (fused.experts, sum(s[0] for s in shapes), shapes[0][1])
        return (fused.experts, shapes[0][0], sum(s[1] for s in shapes))
    key = names.file_key(parameter) or parameter
    if key in base and len(base.info(key).shape) == 3:
        d = base.info(key).shape
        return (d[0], d[1], d[2])
    return None


def resolve_expert_module(
    module: LoraModule, adapter: LoraAdapter, names: ModelNames, base: Checkpoint
) -> ExpertTarget:
    """The stacked parameter a ParamWrapper adapts, the way round, and where its change goes.

    Raises:
        IncompatibleError: no parameter of the module fits the LoRA factors.
        UnsupportedError: more than one fits (named), or PEFT variants a ParamWrapper cannot hold.
    """
    where = f"{adapter.path}: module {module.name!r} (target_parameters)"
    extra = sorted(set(module.keys) - {ROLE_A, ROLE_B})
    if extra:  # PEFT refuses DoRA and lora_bias on parameters; a file that has them is not PEFT's
        raise UnsupportedError(f"{where}: has {', '.join(extra)}, which PEFT's ParamWrapper does not support")
    owner = unwrapped(module.name)
    candidates = [p for p in names.parameters_of(owner) if _targeted(adapter.config.target_parameters, p)]
    a = adapter.checkpoint.info(module.keys[ROLE_A]).shape
    b = adapter.checkpoint.info(module.keys[ROLE_B]).shape
    fits: list[tuple[str, tuple[int, int, int], bool]] = []
    for parameter in candidates:
        shape = stack_shape(names, base, parameter)
        if shape is None:
            continue
        e, d1, d2 = shape
        if len(a) != 2 or len(b) != 2 or a[0] != b[1] or a[0] % e:
            continue
        fits += [(parameter, shape, t) for t, (i, o) in ((False, (d2, d1)), (True, (d1, d2))) if (a[1], b[0]) == (i, o)]
    if not fits:
        raise IncompatibleError(
            f"{where}: lora_A {list(a)} / lora_B {list(b)} fit none of {owner!r}'s targeted parameters "
            f"({', '.join(candidates) or 'none found in the base'}); is this adapter for another model?"
        )
    if len({f[0] for f in fits}) > 1:
        raise UnsupportedError(
            f"{where}: lora_A {list(a)} / lora_B {list(b)} fit more than one parameter "
            f"({', '.join(sorted({f[0] for f in fits}))}): which one it adapts is ambiguous"
        )
    parameter, shape, transposed = fits[0]
    if len(fits) == 2:  # a square (E, d, d) stack: the orientation is PEFT's convention of the day
        version = adapter.config.peft_version
        if parameter in names.transposed:  # (E, in, out): every PEFT version agrees
            transposed = True
        elif version is not None and version >= FIXED_ORIENTATION:
            transposed = False
        else:
            raise UnsupportedError(
                f"{where}: {parameter!r} is square {list(shape)}, and this adapter was written by PEFT "
                f"{adapter.config.raw.get('peft_version') or '(version not recorded)'}: PEFT before 0.19.1 took "
                "3-D parameters the other way round, so whether ΔW is B·A or its transpose cannot be told"
            )
    experts = shape[0]
    rank = a[0] // experts
    scale = adapter.config.scale(parameter, rank)
    layout = lora_b_layout(adapter, parameter, experts, rank, where)
    pieces = _pieces(names, base, parameter, experts, transposed, layout == GROUPED_BY_EXPERT)
    return ExpertTarget(parameter, shape, transposed, rank, scale, layout, pieces)


def _pieces(
    names: ModelNames, base: Checkpoint, parameter: str, experts: int, transposed: bool, grouped: bool = False
) -> tuple[tuple[str, LayerKind], ...]:
    """The file tensors a stacked parameter's change lands in, each with the kind that computes its share
    (``grouped``: B's columns grouped by expert, as Unsloth packed them before unsloth-zoo #1269)."""
    fused = names.fused.get(parameter)
    if fused is None:
        key = names.file_key(parameter) or parameter
        return ((key, StackedExperts("experts", transposed, experts=experts, grouped=grouped)),)
    pieces: list[tuple[str, LayerKind]] = []
    start = 0
    for part in fused.parts:  # the parts are concatenated along the axis, in order (gate rows, then up rows)
        size = base.info(part[0]).shape[fused.axis - 1]
        span = (start, start + size)
        rows, cols = (span, None) if fused.axis == 1 else (None, span)
        for e, key in enumerate(part):
            kind = ExpertSlice("experts", transposed, expert=e, experts=experts, rows=rows, cols=cols, grouped=grouped)
            pieces.append((key, kind))
        start += size
    return tuple(pieces)


def expert_terms(
    module: LoraModule, adapter: LoraAdapter, names: ModelNames, base: Checkpoint
) -> tuple[str, float, tuple[tuple[str, LayerKind], ...]]:
    """(the stacked parameter, its scale, each file tensor with the kind computing its share), checked
    against the files' shapes and dtypes.

    Raises:
        IncompatibleError, UnsupportedError: as ``resolve_expert_module``; a share that does not fit its file
            tensor, or a file tensor that is not a float weight.
    """
    expert = resolve_expert_module(module, adapter, names, base)
    a = adapter.checkpoint.info(module.keys[ROLE_A]).shape
    b = adapter.checkpoint.info(module.keys[ROLE_B]).shape
    for key, kind in expert.pieces:
        info = base.info(key)
        if kind.delta_shape(a, b) != info.shape or not info.dtype.is_floating_point:
            raise IncompatibleError(
                f"{adapter.path}: module {module.name!r}: its share of {expert.parameter!r} is "
                f"{list(kind.delta_shape(a, b))}, the base's {key!r} is {info.dtype} {list(info.shape)}"
            )
    return expert.parameter, expert.scale, expert.pieces
