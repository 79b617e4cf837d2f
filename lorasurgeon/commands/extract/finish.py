"""The end of an extraction: complete the adapter (whole modules, bias mode, config) and report what was kept."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ... import __version__
from ...adapter.names import SAVED_PREFIX, saved_key
from ...engine.execute import Outcome, run
from ...engine.plan import Ref
from ...io.checkpoint import Checkpoint
from ...io.layout import TensorSpec
from ...io.spool import SpoolWriter
from ...ops.lora import LAYER_KINDS
from .plan import ExtractOp
from .report import ExtractReport, FullTensor, ModuleStats, OpInfo, Skipped, Totals
from .settings import ExtractSettings

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


def compress_targets(modules: set[str], all_modules: set[str]) -> list[str]:
    """target_modules: a leaf name where every module with that leaf is targeted, else full names."""
    by_leaf: dict[str, set[str]] = {}
    for m in all_modules:
        by_leaf.setdefault(m.rpartition(".")[2], set()).add(m)
    out: set[str] = set()
    for m in modules:
        leaf = m.rpartition(".")[2]
        out.add(leaf if by_leaf.get(leaf, set()) <= modules else m)
    return sorted(out)


def _out_features(stats: ModuleStats) -> int:
    return stats.shape[1] if LAYER_KINDS[stats.kind].transposed else stats.shape[0]


def finish_adapter(
    spool: SpoolWriter,
    infos: Sequence[OpInfo],
    tuned: Checkpoint,
    settings: ExtractSettings,
    origin: Origin,
    *,
    excluded: int,
    seconds: float,
) -> ExtractReport:
    """Add the whole tensors PEFT needs, adapter_config.json and extract_report.json; return the report."""
    lowrank = {i.op.module: i.stats for i in infos if i.status == "lowrank" and i.stats is not None}
    full_modules = {i.op.module for i in infos if i.status == "full"}
    notes = sorted({i.op.note for i in infos if i.op.note and i.status != "unchanged"})
    capped = sorted((s.rank, s.name) for s in lowrank.values() if settings.rank is not None and s.rank < settings.rank)
    if capped:
        notes.append(
            f"--rank {settings.rank} is more than {len(capped)} modules' matrices allow; each of those got "
            f"its full rank instead (the smallest: {capped[0][1]}, rank {capped[0][0]}; see rank_pattern)"
        )
    carried: dict[str, str] = {}  # adapter key -> fine-tune tensor stored whole
    # A bias that changed while its module's weight did not: no factors to hang it on, keep the module in full.
    bias_modules = set()
    for i in infos:
        if i.status == "bias" and i.op.module not in lowrank:
            spool.discard(saved_key(i.op.module, "B_bias"))
            full_modules.add(i.op.module)
        elif i.status == "bias":
            bias_modules.add(i.op.module)
    bias_mode = "none"
    if bias_modules and not all(f"{m}.bias" in tuned and s.kind != "embedding" for m, s in lowrank.items()):
        # lora_bias gives every LoRA layer a bias: PEFT refuses it on embeddings and cannot merge it
        # into a layer without one. Store the biases of LoRA modules whole instead.
        bias_mode = "lora_only"
        notes.append(
            "some LoRA modules have no bias (or are embeddings), where PEFT's lora_bias cannot go: "
            "the biases of LoRA modules are stored in full (bias: lora_only)"
        )
        for module in sorted(lowrank):
            spool.discard(saved_key(module, "B_bias"))
            if f"{module}.bias" in tuned:
                carried[f"{SAVED_PREFIX}{module}.base_layer.bias"] = f"{module}.bias"
    elif bias_modules:  # lora_bias gives every LoRA module a lora_B.bias: zero where nothing changed
        for module, stats in lowrank.items():
            if module not in bias_modules:
                spool.write(saved_key(module, "B_bias"), torch.zeros(_out_features(stats), dtype=settings.factor_dtype))
    # modules_to_save replaces whole modules: store every parameter of each, changed or not.
    for module in sorted(full_modules):
        for name in [n for n in tuned if n.rpartition(".")[0] == module]:
            if SAVED_PREFIX + name not in spool:
                carried[SAVED_PREFIX + name] = name
    ops = [
        CarryOp(
            key, Ref(0, name), tuned.info(name).nbytes, TensorSpec(key, tuned.info(name).dtype, tuned.info(name).shape)
        )
        for key, name in carried.items()
    ]
    seconds += run(ops, [tuned], spool, compute=_carry).seconds
    spool.add_file(
        "adapter_config.json",
        json.dumps(
            _config(settings, origin, lowrank, full_modules, bias_mode, bias_modules, tuned), indent=2, sort_keys=True
        )
        + "\n",
    )
    report = _report(spool, infos, tuned, lowrank, full_modules, settings, origin, excluded, seconds, notes)
    spool.add_file(REPORT_NAME, json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def _config(
    settings: ExtractSettings,
    origin: Origin,
    lowrank: Mapping[str, ModuleStats],
    full_modules: set[str],
    bias_mode: str,
    bias_modules: set[str],
    tuned: Checkpoint,
) -> dict[str, Any]:
    """adapter_config.json: scale 1 everywhere (lora_alpha = r), per-module ranks as patterns."""
    ranks = {m: s.rank for m, s in lowrank.items()}
    r = settings.rank or (Counter(ranks.values()).most_common(1)[0][0] if ranks else 8)
    all_modules = {n.rpartition(".")[0] for n in tuned}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
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
        "target_modules": compress_targets(set(lowrank), all_modules) if lowrank else None,
        "rank_pattern": {re.escape(m): k for m, k in sorted(ranks.items()) if k != r},
        "alpha_pattern": {re.escape(m): k for m, k in sorted(ranks.items()) if k != r},
        "modules_to_save": sorted(full_modules) or None,
        "lora_bias": bias_mode == "none" and bool(bias_modules),
    }


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
    )
