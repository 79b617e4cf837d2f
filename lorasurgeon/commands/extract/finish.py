"""The end of an extraction: complete the adapter (whole modules, bias mode, config) and report what was kept."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ... import __version__
from ...adapter.names import SAVED_PREFIX, saved_key
from ...engine.execute import Outcome, run
from ...engine.plan import Ref
from ...io.checkpoint import Checkpoint, TensorInfo
from ...io.layout import TensorSpec
from ...io.spool import SpoolWriter
from ...names import ModelNames
from ...ops.compare import ROUNDING_NOISE
from ...ops.lora import LAYER_KINDS
from .compute import expert_piece
from .plan import ExtractOp, views
from .report import ExtractReport, FullTensor, ModuleStats, OpInfo, Skipped, Totals
from .settings import ExtractSettings

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch

REPORT_NAME = "extract_report.json"


@dataclass(frozen=True)
class Origin:
    """Where an extraction came from and went (as the user named them: paths or Hub ids)."""

    base: str
    finetuned: str
    output: str


@dataclass(frozen=True)
class CarryOp:
    """A fine-tune tensor stored whole in the adapter, under PEFT's name for it (copied, never computed)."""

    name: str  # its key in the adapter
    src: Ref
    nbytes: int
    byte_copy: TensorSpec | None

    def refs(self) -> list[Ref]:
        return [self.src]


def _carry(op: CarryOp, tensors: Mapping[Ref, torch.Tensor], device: torch.device) -> Outcome[None]:
    """A carried tensor the engine could not copy byte for byte (a legacy .bin input): as read."""
    return Outcome([(op.name, tensors[op.src])], None)


def compress_targets(modules: set[str], all_modules: set[str], segments: int = 1) -> list[str]:
    """target_modules / target_parameters: the last ``segments`` parts of a name (``q_proj``;
    ``experts.gate_up_proj``) where every name ending so is targeted, else full names."""

    def tail(name: str) -> str:
        return ".".join(name.split(".")[-segments:])

    by_tail: dict[str, set[str]] = {}
    for m in all_modules:
        by_tail.setdefault(tail(m), set()).add(m)
    return sorted({tail(m) if by_tail.get(tail(m), set()) <= modules else m for m in modules})


def _wrapper(parameter: str, targeted: set[str], names: ModelNames) -> str:
    """The module path of the ParamWrapper PEFT puts on ``parameter``: one wrapper per targeted parameter of
    the module, nested in the order the module registers them (the first innermost)."""
    owner = parameter.rpartition(".")[0]
    order = [p for p in names.stacked[owner] if p in targeted]
    return owner + ".base_layer" * (len(order) - 1 - order.index(parameter))


def _stack_experts(spool: SpoolWriter, infos: Sequence[OpInfo], names: ModelNames) -> dict[str, int]:
    """Each stacked parameter's per-expert factors (spooled) as PEFT's one lora_A (E·r, in) and lora_B
    (out, E·r): expert e in rows e·r… of A and columns e, e+E, … of B, all at the largest rank (zero rows
    and columns where an expert needed fewer). Returns parameter -> rank."""
    experts: dict[str, int] = {}
    for i in infos:
        assert i.op.experts is not None
        experts[i.op.experts.parameter] = i.op.experts.experts
    ranks: dict[str, int] = {}
    for parameter, count in experts.items():
        pieces = [(e, expert_piece(parameter, e, "A"), expert_piece(parameter, e, "B")) for e in range(count)]
        pieces = [p for p in pieces if p[1] in spool]
        rank = max(spool.info(a).shape[0] for _, a, _ in pieces)
        a0, b0 = spool.info(pieces[0][1]), spool.info(pieces[0][2])
        stacked_a = torch.zeros(count * rank, a0.shape[1], dtype=a0.dtype)
        stacked_b = torch.zeros(b0.shape[0], count * rank, dtype=b0.dtype)
        for e, a_name, b_name in pieces:
            a, b = spool.read(a_name), spool.read(b_name)
            stacked_a[e * rank : e * rank + a.shape[0]] = a
            stacked_b[:, e + count * torch.arange(b.shape[1])] = b
            spool.discard(a_name)
            spool.discard(b_name)
        module = _wrapper(parameter, set(experts), names)  # PEFT's name for it, every targeted one known
        spool.write(saved_key(module, "A"), stacked_a)
        spool.write(saved_key(module, "B"), stacked_b)
        ranks[parameter] = rank
    return ranks


def _expert_stats(infos: Sequence[OpInfo]) -> dict[str, ModuleStats]:
    """Per stacked parameter, its experts' factors as one report line: the largest rank, the share of the
    experts' Σ‖ΔW‖² kept, the relative error over them all; its shape as the model holds it."""
    grouped: dict[str, list[OpInfo]] = {}
    for i in infos:
        if i.op.experts is not None and i.status == "lowrank" and i.stats is not None:
            grouped.setdefault(i.op.experts.parameter, []).append(i)
    lines = {}
    for parameter, group in grouped.items():
        stats = [i.stats for i in group if i.stats is not None]
        energy = sum(s.energy for s in stats)
        kept = sum(s.kept * s.energy for s in stats) / energy
        error = (sum(s.rel_error**2 * s.energy for s in stats) / energy) ** 0.5
        of = group[0].op.experts
        assert of is not None
        shape = [of.experts, *group[0].op.shape] if of.parts else list(group[0].op.shape)
        rank = max(s.rank for s in stats)
        lines[parameter] = ModuleStats(parameter, "experts", shape, rank, kept, error, stats[0].solver, energy)
    return lines


def _out_features(stats: ModuleStats) -> int:
    return stats.shape[1] if LAYER_KINDS[stats.kind].transposed else stats.shape[0]


def finish_adapter(
    spool: SpoolWriter,
    infos: Sequence[OpInfo],
    tuned: Checkpoint,
    names: ModelNames,
    settings: ExtractSettings,
    origin: Origin,
    *,
    excluded: int,
    seconds: float,
    notes_before: Sequence[str] = (),
) -> ExtractReport:
    """Add the whole tensors PEFT needs, adapter_config.json and extract_report.json; return the report.
    Adapter keys are in-memory names (``names``), as PEFT names modules; ``notes_before`` lead its notes."""
    parts = _Parts.of(spool, infos, tuned, names, settings, notes_before)
    parts.leave_out_containers(spool)
    bias_mode = parts.place_biases(spool, settings)
    parts.carry_whole_modules(spool)
    ops = [_carry_op(key, name, tuned.info(name)) for key, name in parts.carried.items()]
    seconds += run(ops, [tuned], spool, compute=_carry).seconds
    kept = (parts.lowrank, parts.stacks, parts.full_modules)
    config = _config(settings, origin, *kept, bias_mode, parts.bias_modules, names, set(parts.in_memory))
    spool.add_file("adapter_config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    shown = {**parts.lowrank, **_expert_stats(parts.infos)}  # each stacked parameter's experts as one line
    report = _report(
        spool, parts.infos, tuned, shown, parts.full_modules, settings, origin, excluded, seconds, parts.notes
    )
    spool.add_file(REPORT_NAME, json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def _carry_op(key: str, name: str, info: TensorInfo) -> CarryOp:
    """The fine-tune's tensor ``name`` copied into the adapter whole, under its adapter key."""
    return CarryOp(key, Ref(0, name), info.nbytes, TensorSpec.of(key, info.dtype, info.shape))


@dataclass
class _Parts:
    """What the adapter is made of, as its finishing decides: factored modules, modules stored whole, biases,
    the notes that explain each decision, and the fine-tune's tensors to carry over whole."""

    infos: list[OpInfo]
    in_memory: dict[str, str]  # in-memory name -> file key
    stacks: dict[str, int]  # stacked experts' parameters given a LoRA -> their rank
    lowrank: dict[str, ModuleStats]
    full_modules: set[str]
    bias_modules: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    carried: dict[str, str] = field(default_factory=dict)  # adapter key -> fine-tune tensor stored whole

    @classmethod
    def of(
        cls,
        spool: SpoolWriter,
        infos: Sequence[OpInfo],
        tuned: Checkpoint,
        names: ModelNames,
        settings: ExtractSettings,
        notes_before: Sequence[str],
    ) -> _Parts:
        stacks = _stack_experts(spool, [i for i in infos if i.op.experts is not None and i.status == "lowrank"], names)
        lowrank = {
            i.op.module: i.stats
            for i in infos
            if i.status == "lowrank" and i.stats is not None and i.op.experts is None
        }
        full = {i.op.module for i in infos if i.status == "full"}
        notes = list(notes_before) + sorted({i.op.note for i in infos if i.op.note and i.status != "unchanged"})
        parts = cls(list(infos), views(tuned, names), stacks, lowrank, full, notes=notes)
        parts.note_capped_ranks(settings)
        return parts

    def note_capped_ranks(self, settings: ExtractSettings) -> None:
        rank = settings.rank
        capped = sorted((s.rank, s.name) for s in self.lowrank.values() if rank is not None and s.rank < rank)
        if capped:
            self.notes.append(
                f"--rank {rank} is more than {len(capped)} modules' matrices allow; each of those got "
                f"its full rank instead (the smallest: {capped[0][1]}, rank {capped[0][0]}); the config's r and "
                "rank_pattern give the ranks stored"
            )

    def leave_out_containers(self, spool: SpoolWriter) -> None:
        """A changed bias whose module's weight did not change: no factors to hang it on, the module goes in full.
        A tensor of a module that also holds adapted layers (BERT's cls.predictions.bias, beside the decoder):
        PEFT saves it only as modules_to_save of the whole module, which clashes with the layers inside."""
        for i in self.infos:
            if i.status == "bias" and i.op.module not in self.lowrank:
                spool.discard(saved_key(i.op.module, "B_bias"))
                self.full_modules.add(i.op.module)
            elif i.status == "bias":
                self.bias_modules.add(i.op.module)
        adapted = set(self.lowrank) | self.full_modules
        owners = {p.rpartition(".")[0] for p in self.stacks}  # modules whose stacked experts get a LoRA
        full = self.full_modules
        containers = {m for m in full if m in owners or any(o.startswith(m + ".") for o in adapted | owners)}
        if not containers:
            return
        left_out = sorted(i.op.name for i in self.infos if i.op.module in containers and i.status == "full")
        for name in left_out:
            spool.discard(SAVED_PREFIX + name)
        self.infos = [replace(i, status="skipped") if i.op.name in left_out else i for i in self.infos]
        self.full_modules -= containers
        self.notes.append(
            f"left out {', '.join(left_out)}: held by a module that also holds adapted layers, so PEFT could "
            "store it only as modules_to_save of the whole module, over those layers"
        )

    def place_biases(self, spool: SpoolWriter, settings: ExtractSettings) -> str:
        """The adapter's ``bias`` mode: lora_bias (a lora_B.bias on every LoRA module, zero where nothing
        changed), or, where PEFT cannot take lora_bias, the biases of LoRA modules stored whole (lora_only)."""
        if not self.bias_modules:
            return "none"
        if all(f"{m}.bias" in self.in_memory and s.kind != "embedding" for m, s in self.lowrank.items()):
            for module, stats in self.lowrank.items():
                if module not in self.bias_modules:
                    zeros = torch.zeros(_out_features(stats), dtype=settings.factor_dtype)
                    spool.write(saved_key(module, "B_bias"), zeros)
            return "none"
        self.notes.append(
            "some LoRA modules have no bias (or are embeddings), where PEFT's lora_bias cannot go: "
            "the biases of LoRA modules are stored in full (bias: lora_only)"
        )
        for module in sorted(self.lowrank):
            spool.discard(saved_key(module, "B_bias"))
            if f"{module}.bias" in self.in_memory:
                self.carried[f"{SAVED_PREFIX}{module}.base_layer.bias"] = self.in_memory[f"{module}.bias"]
        return "lora_only"

    def carry_whole_modules(self, spool: SpoolWriter) -> None:
        """modules_to_save replaces whole modules: every parameter of each is stored, changed or not."""
        for module in sorted(self.full_modules):
            for name in [n for n in self.in_memory if n.rpartition(".")[0] == module]:
                if SAVED_PREFIX + name not in spool:
                    self.carried[SAVED_PREFIX + name] = self.in_memory[name]


def adapter_rank(ranks: Sequence[int], settings: ExtractSettings) -> int:
    """The adapter's r (and lora_alpha): the most common rank stored (the largest of those as common), so r
    is a rank some module has (--rank above a matrix's own is not); --rank (or 8) only where none is stored."""
    if not ranks:
        return settings.rank or 8
    return max(Counter(ranks).items(), key=lambda rank_count: (rank_count[1], rank_count[0]))[0]


def _config(
    settings: ExtractSettings,
    origin: Origin,
    lowrank: Mapping[str, ModuleStats],
    stacks: Mapping[str, int],
    full_modules: set[str],
    bias_mode: str,
    bias_modules: set[str],
    names: ModelNames,
    tensors: set[str],
) -> dict[str, Any]:
    """adapter_config.json: scale 1 everywhere (lora_alpha = r), per-module ranks as patterns, the PEFT
    task type of the model's class (none where PEFT has none for it)."""
    ranks = {m: s.rank for m, s in lowrank.items()} | dict(stacks)
    r = adapter_rank(list(ranks.values()), settings)
    all_modules = set(names.layers) | {n.rpartition(".")[0] for n in tensors}
    return {
        "peft_type": "LORA",
        "task_type": names.task_type if names.layers else "CAUSAL_LM",
        "base_model_name_or_path": origin.base,
        "r": r,
        "lora_alpha": r,
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "fan_in_fan_out": False,
        "bias": bias_mode,
        "inference_mode": True,
        "target_modules": compress_targets(set(lowrank), all_modules) if lowrank else ([] if stacks else None),
        "target_parameters": compress_targets(set(stacks), {p for ps in names.stacked.values() for p in ps}, 2) or None,
        "rank_pattern": {re.escape(m): k for m, k in sorted(ranks.items()) if k != r},
        # scale 1 per module; with --for, each B already carries k / r (extract.profile) and lora_alpha = r is all
        "alpha_pattern": {} if settings.for_ else {re.escape(m): k for m, k in sorted(ranks.items()) if k != r},
        "modules_to_save": sorted(full_modules) or None,
        "lora_bias": bias_mode == "none" and bool(bias_modules),
    }


def _rounding_warning(infos: Sequence[OpInfo], tuned: Checkpoint) -> list[str]:
    """A warning when every changed tensor changed less than its dtype's rounding (ops.compare.rounding_units):
    the two checkpoints differ by rounding noise (a cast and back, a re-save), not by a fine-tune."""
    changed = [i for i in infos if i.status in ("lowrank", "bias", "full", "skipped")]
    if not changed or any(i.rounding is None or i.rounding >= ROUNDING_NOISE for i in changed):
        return []
    dtypes = sorted({tuned.info(i.op.tuned.key).dtype_name for i in changed})
    top = max(i.rounding for i in changed if i.rounding is not None)
    return [
        f"the change is at the level of {'/'.join(dtypes)} rounding: each of the {len(changed)} changed tensors "
        f"moved less than the dtype's eps relative to the base (‖ΔW‖/‖W‖ at most {top:.2g} eps) — rounding "
        "noise (a dtype round trip or re-save), not a fine-tune; the adapter holds that noise"
    ]


def _reason(op: ExtractOp) -> str:
    if op.name.endswith(".weight") and len(op.shape) == 2:
        return "embedding stored in full (--embeddings full)"
    return "changed and not a matrix (--extras full)"


def _report(
    spool: SpoolWriter,
    infos: Sequence[OpInfo],
    tuned: Checkpoint,
    lowrank: Mapping[str, ModuleStats],
    full_modules: set[str],
    settings: ExtractSettings,
    origin: Origin,
    excluded: int,
    seconds: float,
    notes: list[str],
) -> ExtractReport:
    change = sum(i.energy for i in infos)
    kept = sum(i.energy * (i.stats.kept if i.stats else 1.0) for i in infos if i.status in ("lowrank", "bias", "full"))
    full = [
        FullTensor(i.op.name, i.op.note or _reason(i.op), tuned.info(i.op.tuned.key).numel)
        for i in infos
        if i.status == "full"
    ]
    skipped = Skipped(
        sum(i.status == "unchanged" for i in infos), excluded, [i.op.name for i in infos if i.status == "skipped"]
    )
    totals = Totals(
        parameters=sum(spool.info(n).numel for n in spool.names()),
        bytes=sum(spool.info(n).nbytes for n in spool.names()),
        kept=kept / change if change else 1.0,
        change_energy=change,
        seconds=seconds,
        lorasurgeon=__version__,
        modules_to_save=sorted(full_modules),
    )
    return ExtractReport(
        origin.output,
        origin.base,
        origin.finetuned,
        settings.method(),
        list(lowrank.values()),
        full,
        skipped,
        totals,
        notes,
        _rounding_warning(infos, tuned),
    )
