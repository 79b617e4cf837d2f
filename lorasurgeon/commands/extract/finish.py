"""The end of an extraction: what the adapter is made of, decided from the first pass's results (whole modules,
bias mode, stacked experts, config), written by the finishing pass (``assemble``); and the report of what was kept."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ... import __version__
from ...adapter.config import Bias
from ...adapter.formats.base import AdapterWriter
from ...adapter.names import ROLE_A, ROLE_B, ROLE_B_BIAS, SAVED_PREFIX, saved_key
from ...engine.execute import run
from ...engine.plan import Ref
from ...io.checkpoint import Checkpoint
from ...names import ModelNames
from ...ops.compare import ROUNDING_NOISE
from ...ops.lora import LAYER_KINDS
from .assemble import FACTORS, TUNED, CopyOp, Factors, FinalOp, StackOp, ZerosOp, assemble, factor_ops
from .compute import expert_piece
from .plan import ExtractOp, views
from .report import ExtractReport, FullTensor, ModuleStats, OpInfo, Skipped, Totals
from .settings import ExtractSettings

REPORT_NAME = "extract_report.json"


@dataclass(frozen=True)
class Origin:
    """Where an extraction came from and went (as the user named them: paths or Hub ids)."""

    base: str
    finetuned: str
    output: str
    command: tuple[str, ...] = ()  # the command line that made it, before its sizing flags (default: extract's)


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


def _stack_ops(factors: Factors, infos: Sequence[OpInfo], names: ModelNames) -> list[StackOp]:
    """Per stacked parameter, the op that gathers its experts' factors (spooled one expert at a time by the
    first pass) into PEFT's one lora_A / lora_B, at the largest rank an expert has."""
    experts: dict[str, int] = {}
    for i in infos:
        assert i.op.experts is not None
        experts[i.op.experts.parameter] = i.op.experts.experts
    ops = []
    for parameter, count in experts.items():
        pieces = [(e, expert_piece(parameter, e, ROLE_A), expert_piece(parameter, e, ROLE_B)) for e in range(count)]
        pieces = [p for p in pieces if p[1] in factors]
        rank = max(factors.info(a).shape[0] for _, a, _ in pieces)
        a0, b0 = factors.info(pieces[0][1]), factors.info(pieces[0][2])
        module = _wrapper(parameter, set(experts), names)  # PEFT's name for it, every targeted one known
        ops.append(
            StackOp(
                parameter,
                (saved_key(module, ROLE_A), saved_key(module, ROLE_B)),
                tuple((e, Ref(FACTORS, a), Ref(FACTORS, b)) for e, a, b in pieces),
                count,
                rank,
                (a0.shape[0], a0.shape[1]),
                (b0.shape[0], b0.shape[1]),
                a0.dtype,
            )
        )
    return ops


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
    factors: Factors,
    spool: AdapterWriter,
    infos: Sequence[OpInfo],
    tuned: Checkpoint,
    names: ModelNames,
    settings: ExtractSettings,
    origin: Origin,
    *,
    scales: Mapping[str, float],
    excluded: int,
    seconds: float,
    notes_before: Sequence[str] = (),
    tied_once: bool = False,
) -> tuple[ExtractReport, dict[str, Any]]:
    """Decide what the adapter holds from the first pass's results (``infos``, each module's rank final, its B's
    ``scales`` for --for) and ``factors`` (its scratch spool: headers only here), write it into ``spool`` as
    the finishing pass, add extract_report.json; return the report and the adapter's PEFT config. Adapter keys are
    in-memory names (``names``), as PEFT names modules; ``notes_before`` lead its notes; ``tied_once``: a tied head's
    change is the embedding's factors alone, and the config says so (ensure_weight_tying)."""
    parts = _Parts.of(factors, infos, tuned, names, settings, notes_before)
    parts.leave_out_containers()
    bias_mode = parts.place_biases(settings)
    parts.carry_whole_modules()
    seconds += run(parts.final_ops(factors, tuned, scales), [factors, tuned], spool, compute=assemble).seconds
    kept = (parts.lowrank, parts.stacks, parts.full_modules)
    config = _config(settings, origin, *kept, bias_mode, parts.bias_modules, names, set(parts.in_memory))
    if tied_once:  # PEFT ties the head's LoRA to the embedding's as it loads (peft.LoraConfig.ensure_weight_tying)
        config["ensure_weight_tying"] = True
    shown = {**parts.lowrank, **_expert_stats(parts.infos)}  # each stacked parameter's experts as one line
    report = _report(
        spool, parts.infos, tuned, shown, parts.full_modules, settings, origin, excluded, seconds, parts.notes
    )
    spool.add_file(REPORT_NAME, json.dumps(report.to_dict(), indent=2) + "\n")
    return report, config


@dataclass
class _Parts:
    """What the adapter is made of, as its finishing decides: factored modules, stacked experts, modules stored
    whole, biases, the notes that explain each decision, and the fine-tune's tensors stored whole."""

    infos: list[OpInfo]
    in_memory: dict[str, str]  # in-memory name -> file key
    stack_ops: list[StackOp]  # stacked experts' parameters given a LoRA
    lowrank: dict[str, ModuleStats]
    full_modules: set[str]
    whole: dict[str, str]  # adapter key -> the fine-tune tensor a changed one stored whole is (extract's "full")
    bias_modules: set[str] = field(default_factory=set)
    lora_bias: bool = False  # bias_modules' changes are stored as their lora_B.bias
    zeros: list[ZerosOp] = field(default_factory=list)  # lora_B.bias of LoRA modules whose bias did not change
    notes: list[str] = field(default_factory=list)
    carried: dict[str, str] = field(default_factory=dict)  # adapter key -> fine-tune tensor stored whole

    @classmethod
    def of(
        cls,
        factors: Factors,
        infos: Sequence[OpInfo],
        tuned: Checkpoint,
        names: ModelNames,
        settings: ExtractSettings,
        notes_before: Sequence[str],
    ) -> _Parts:
        stacks = _stack_ops(factors, [i for i in infos if i.op.experts is not None and i.status == "lowrank"], names)
        lowrank = {
            i.op.module: i.stats
            for i in infos
            if i.status == "lowrank" and i.stats is not None and i.op.experts is None
        }
        full = {i.op.module for i in infos if i.status == "full"}
        whole = {SAVED_PREFIX + i.op.name: i.op.tuned.key for i in infos if i.status == "full"}
        notes = list(notes_before) + sorted({i.op.note for i in infos if i.op.note and i.status != "unchanged"})
        parts = cls(list(infos), views(tuned, names), stacks, lowrank, full, whole, notes=notes)
        parts.note_capped_ranks(settings)
        return parts

    @property
    def stacks(self) -> dict[str, int]:
        """Stacked experts' parameters given a LoRA -> their rank."""
        return {op.name: op.rank for op in self.stack_ops}

    def note_capped_ranks(self, settings: ExtractSettings) -> None:
        """A note per fixed rank (--rank, --conv-rank's for k×k convs) that some modules' matrices were below."""
        asked: dict[str, list[tuple[int, str]]] = {}
        for s in self.lowrank.values():
            conv = settings.fixed_rank(s.kind, s.shape)
            flag, rank = ("--conv-rank", conv) if conv is not None else ("--rank", settings.rank)
            if rank is not None and s.rank < rank:
                asked.setdefault(f"{flag} {rank}", []).append((s.rank, s.name))
        for option, capped in asked.items():
            capped.sort()
            self.notes.append(
                f"{option} is more than {len(capped)} modules' matrices allow; each of those got "
                f"its full rank instead (the smallest: {capped[0][1]}, rank {capped[0][0]}); the config's r and "
                "rank_pattern give the ranks stored"
            )

    def leave_out_containers(self) -> None:
        """A changed bias whose module's weight did not change: no factors to hang it on, the module goes in full.
        A tensor of a module that also holds adapted layers (BERT's cls.predictions.bias, beside the decoder):
        PEFT saves it only as modules_to_save of the whole module, which clashes with the layers inside."""
        for i in self.infos:
            if i.status == "bias" and i.op.module not in self.lowrank:  # its lora_B.bias is not stored
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
            self.whole.pop(SAVED_PREFIX + name, None)
        self.infos = [replace(i, status="skipped") if i.op.name in left_out else i for i in self.infos]
        self.full_modules -= containers
        self.notes.append(
            f"left out {', '.join(left_out)}: held by a module that also holds adapted layers, so PEFT could "
            "store it only as modules_to_save of the whole module, over those layers"
        )

    def place_biases(self, settings: ExtractSettings) -> Bias:
        """The adapter's ``bias`` mode: lora_bias (a lora_B.bias on every LoRA module, zero where nothing
        changed), or, where PEFT cannot take lora_bias, the biases of LoRA modules stored whole (lora_only)."""
        if not self.bias_modules:
            return "none"
        if all(f"{m}.bias" in self.in_memory and s.kind != "embedding" for m, s in self.lowrank.items()):
            self.lora_bias = True
            for module, stats in self.lowrank.items():
                if module not in self.bias_modules:
                    self.zeros.append(
                        ZerosOp(saved_key(module, ROLE_B_BIAS), _out_features(stats), settings.factor_dtype)
                    )
            return "none"
        self.notes.append(
            "some LoRA modules have no bias (or are embeddings), where PEFT's lora_bias cannot go: "
            "the biases of LoRA modules are stored in full (bias: lora_only)"
        )
        for module in sorted(self.lowrank):  # their lora_B.bias is not stored
            if f"{module}.bias" in self.in_memory:
                self.carried[f"{SAVED_PREFIX}{module}.base_layer.bias"] = self.in_memory[f"{module}.bias"]
        return "lora_only"

    def carry_whole_modules(self) -> None:
        """modules_to_save replaces whole modules: every parameter of each is stored, changed or not."""
        for module in sorted(self.full_modules):
            for name in [n for n in self.in_memory if n.rpartition(".")[0] == module]:
                if SAVED_PREFIX + name not in self.whole:
                    self.carried[SAVED_PREFIX + name] = self.in_memory[name]

    def final_ops(self, factors: Factors, tuned: Checkpoint, scales: Mapping[str, float]) -> list[FinalOp]:
        """The finishing pass: each adapter tensor once, from the first pass's ``factors`` or the fine-tune."""
        ops: list[FinalOp] = list(self.stack_ops)
        for module, stats in self.lowrank.items():
            a_role, b_role = LAYER_KINDS[stats.kind].lora_roles
            ops += factor_ops(
                factors, (saved_key(module, a_role), saved_key(module, b_role)), stats.rank, scales.get(module)
            )
        for module in sorted(self.bias_modules) if self.lora_bias else []:
            key = saved_key(module, ROLE_B_BIAS)
            ops.append(CopyOp.of(key, Ref(FACTORS, key), factors.info(key)))
        ops += self.zeros
        whole = {**self.whole, **self.carried}
        ops += [CopyOp.of(key, Ref(TUNED, name), tuned.info(name)) for key, name in whole.items()]
        return ops


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
    bias_mode: Bias,
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
        "task_type": names.task_type,
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
    spool: AdapterWriter,
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
