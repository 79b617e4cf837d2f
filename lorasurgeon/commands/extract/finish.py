"""The end of an extraction: complete the adapter (config, full modules), and report what was kept."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch

from ... import __version__
from ...adapter.names import SAVED_PREFIX, saved_key
from ...io.checkpoint import Checkpoint
from ...io.spool import SpoolWriter
from .plan import ExtractOp

REPORT_NAME = "extract_report.json"


@dataclass(frozen=True)
class ModuleStats:
    name: str
    kind: str
    shape: list[int]
    rank: int
    kept: float  # fraction of ‖ΔW‖² the factors keep
    rel_error: float  # ‖ΔW − BA‖ / ‖ΔW‖, measured on the factors as stored
    solver: str


@dataclass(frozen=True)
class FullTensor:
    name: str
    reason: str
    parameters: int


@dataclass(frozen=True)
class OpInfo:
    """What computing one extract op found (the executor hands these back)."""

    op: ExtractOp
    status: str  # unchanged | lowrank | bias | full | skipped
    energy: float = 0.0  # ‖ΔW‖²
    stats: ModuleStats | None = None


@dataclass(frozen=True)
class ExtractReport:
    """What extract did; ``to_dict()`` is extract_report.json."""

    output: str | None
    base: str
    finetuned: str
    method: dict
    modules: list[ModuleStats]
    full: list[FullTensor]
    skipped: dict
    totals: dict
    notes: list[str] = field(default_factory=list)
    dry_run: bool = False

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "dry_run"}

    def summary(self) -> str:
        if self.dry_run:
            return "\n".join([f"would extract from {self.finetuned} (base {self.base}):"] + self.notes)
        lines = []
        if self.modules:
            width = max(len(m.name) for m in self.modules)
            lines.append(f"{'module'.ljust(width)}  {'kind':<9} {'rank':>5} {'kept':>8} {'rel.err':>8}")
            lines += [f"{m.name.ljust(width)}  {m.kind:<9} {m.rank:>5} {m.kept:>8.2%} {m.rel_error:>8.4f}"
                      for m in self.modules]
        lines += [f"stored in full: {f.name} ({f.reason})" for f in self.full]
        t = self.totals
        lines.append(
            f"Wrote {self.output}: {len(self.modules)} low-rank modules, {len(self.full)} full tensors, "
            f"{t['parameters']:,} parameters ({t['bytes'] / 2**20:.1f} MiB); kept {t['kept']:.2%} of the "
            f"fine-tune's change; {self.skipped['unchanged']} tensors unchanged; {t['seconds']:.1f} s.")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


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
    return stats.shape[1] if stats.kind == "conv1d" else stats.shape[0]


def finish_adapter(spool: SpoolWriter, infos: list[OpInfo], tuned: Checkpoint, *, out: str, base: str,
                   finetuned: str, method: dict, excluded: int, fixed_rank: int | None, seconds: float,
                   dtype: torch.dtype) -> ExtractReport:
    """Add adapter_config.json, complete full modules, write extract_report.json; return the report."""
    lowrank = {i.op.module: i.stats for i in infos if i.status == "lowrank"}
    full_modules = {i.op.module for i in infos if i.status == "full"}
    notes = sorted({i.op.note for i in infos if i.op.note and i.status != "unchanged"})
    capped = sorted((s.rank, s.name) for s in lowrank.values() if fixed_rank is not None and s.rank < fixed_rank)
    if capped:
        notes.append(f"--rank {fixed_rank} is more than {len(capped)} modules' matrices allow; each of those got its "
                     f"full rank instead (the smallest: {capped[0][1]}, rank {capped[0][0]}; see rank_pattern)")
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
        notes.append("some LoRA modules have no bias (or are embeddings), where PEFT's lora_bias cannot go: "
                     "the biases of LoRA modules are stored in full (bias: lora_only)")
        for module in sorted(lowrank):
            spool.discard(saved_key(module, "B_bias"))
            if f"{module}.bias" in tuned:
                spool.write(f"{SAVED_PREFIX}{module}.base_layer.bias", tuned.read(f"{module}.bias"))
    elif bias_modules:  # lora_bias gives every LoRA module a lora_B.bias: zero where nothing changed
        for module, stats in lowrank.items():
            if module not in bias_modules:
                spool.write(saved_key(module, "B_bias"), torch.zeros(_out_features(stats), dtype=dtype))
    # modules_to_save replaces whole modules: store every parameter of each, changed or not.
    for module in sorted(full_modules):
        for name in [n for n in tuned if n.rpartition(".")[0] == module]:
            if SAVED_PREFIX + name not in spool:
                spool.write(SAVED_PREFIX + name, tuned.read(name))
    ranks = {m: s.rank for m, s in lowrank.items()}
    r = fixed_rank or (Counter(ranks.values()).most_common(1)[0][0] if ranks else 8)
    all_modules = {n.rpartition(".")[0] for n in tuned}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": r, "lora_alpha": r, "use_rslora": False, "use_dora": False, "lora_dropout": 0.0,
        "init_lora_weights": True, "fan_in_fan_out": False, "bias": bias_mode, "inference_mode": True,
        "target_modules": compress_targets(set(lowrank), all_modules) if lowrank else None,
        "rank_pattern": {re.escape(m): k for m, k in sorted(ranks.items()) if k != r},
        "alpha_pattern": {re.escape(m): k for m, k in sorted(ranks.items()) if k != r},
        "modules_to_save": sorted(full_modules) or None,
        "lora_bias": bias_mode == "none" and bool(bias_modules),
    }
    spool.add_file("adapter_config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    report = _report(spool, infos, tuned, lowrank, full_modules, out=out, base=base, finetuned=finetuned,
                     method=method, excluded=excluded, seconds=seconds, notes=notes)
    spool.add_file(REPORT_NAME, json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def _reason(op: ExtractOp) -> str:
    if op.name.endswith(".weight") and len(op.shape) == 2:
        return "embedding stored in full (--embeddings full)"
    return "changed and not a matrix (--extras full)"


def _report(spool, infos, tuned, lowrank, full_modules, *, out, base, finetuned, method, excluded,
            seconds, notes) -> ExtractReport:
    change = sum(i.energy for i in infos)
    kept = sum(i.energy * (i.stats.kept if i.stats else 1.0) for i in infos if i.status in ("lowrank", "bias", "full"))
    full = [FullTensor(i.op.name, i.op.note or _reason(i.op), tuned.info(i.op.tuned.key).numel)
            for i in infos if i.status == "full"]
    parameters = sum(spool.info(n).numel for n in spool.names())
    nbytes = sum(spool.info(n).nbytes for n in spool.names())
    skipped = {"unchanged": sum(i.status == "unchanged" for i in infos), "excluded": excluded,
               "not_stored": [i.op.name for i in infos if i.status == "skipped"]}
    totals = {"parameters": parameters, "bytes": nbytes, "kept": kept / change if change else 1.0,
              "change_energy": change, "seconds": seconds, "lorasurgeon": __version__,
              "modules_to_save": sorted(full_modules)}
    return ExtractReport(out, base, finetuned, method, list(lowrank.values()), full, skipped, totals, notes)
