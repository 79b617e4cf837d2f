"""MergeReport: what a merge, unmerge or convert did (or, with dry_run, would do)."""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import median
from typing import Literal

from ...io.layout import human_bytes
from ...words import plural
from .._timing import rate
from .ops import Action, Plan, describe
from .quantized import RequantReport

# What a MergeReport's result is: merge's forms, unmerge's, convert's targets, or a model converted to safetensors.
ResultForm = Literal["merged", "augmented", "unmerged", "adapter", "converted"]

_WORDS: dict[Action, str] = {
    "merge": "merged",
    "unmerge": "unmerged",
    "restore": "restored exactly from the adapter's saved W0",
    "replace": "replaced by the adapter",
    "copy": "copied",
    "lora": "LoRA",  # counted in words: plural(n, "LoRA tensor")
}


@dataclass(frozen=True)
class MergeReport:
    """What a merge/unmerge/convert did (or, with dry_run, would do). Every figure is measured in the run."""

    output: str | None
    form: ResultForm
    plan: Plan
    counts: dict[Action, int]  # output tensors by action
    bytes: int
    seconds: float
    untied_embeddings: bool
    dry_run: bool
    requantized: tuple[RequantReport, ...] = ()  # each weight re-quantized into the base's format
    notes: tuple[str, ...] = ()  # what a user should know about the result (printed after the summary)
    # seconds by stage, from the executor's and the writer's counters (see engine.execute.ExecStats.stages)
    stages: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0  # the whole call, imports and planning included (``seconds``: the streaming part)

    def __repr__(self) -> str:  # the plan holds every tensor: a repr names the figures, not the plan
        return (
            f"MergeReport(output={self.output!r}, form={self.form!r}, tensors={sum(self.counts.values())}, "
            f"bytes={self.bytes}, wall={self.wall:.3f}, seconds={self.seconds:.3f}, dry_run={self.dry_run})"
        )

    @property
    def throughput(self) -> float:
        return self.bytes / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        if self.dry_run:
            return describe(self.plan)
        done = ", ".join(
            plural(n, "LoRA tensor") if a == "lora" else f"{n:,} {_WORDS[a]}" for a, n in self.counts.items() if n
        )
        speed = rate(self.bytes, self.wall)
        text = (
            f"Wrote {self.output} ({self.form}): {plural(sum(self.counts.values()), 'tensor')} ({done}), "
            f"{human_bytes(self.bytes)} in {self.wall:.2f} s{f' ({speed})' if speed else ''}."
        )
        if self.untied_embeddings:
            text += " Input and output embeddings now differ: both written, tie_word_embeddings=false."
        if self.requantized:
            text += "\n" + self.requant_summary()
        for note in self.notes:
            text += f"\nNote: {note}"
        return text

    def requant_summary(self) -> str:
        """What keeping the base's quantized format cost, in a few lines (every weight: requantization.json)."""
        r = self.requantized
        blocks = sum(x.blocks for x in r)
        lines = [
            f"Re-quantized {plural(len(r), 'weight')} ({', '.join(sorted({x.method for x in r}))}): "
            f"{sum(x.blocks_changed for x in r)} of {plural(blocks, 'block')} changed, "
            f"{sum(x.blocks_rescaled for x in r)} needed a new scale; the rest kept their bytes.",
            f"  error against the exact W0 + ΔW: median {median(x.error for x in r):.3g}, "
            f"max {max(x.error for x in r):.3g} (the format's own, quantizing those values afresh: median "
            f"{median(x.format_error for x in r):.3g}); ‖ΔW‖/‖W0‖ median {median(x.change for x in r):.3g}, "
            f"share of ΔW kept median {median(x.change_kept for x in r):.2f}",
        ]
        if median(x.change_kept for x in r) < 0.5:
            keeps = "-o FOLDER --dtype bfloat16" if any(x.method.startswith("GGUF") for x in r) else "--dtype bfloat16"
            lines.append(
                "  warning: most of the change is finer than the format's steps and was lost in re-quantization: "
                f"{keeps} keeps it"
            )
        for x in sorted(r, key=lambda x: x.change_kept)[:3]:
            lines.append(
                f"  {x.name}: error {x.error:.3g} (format's own {x.format_error:.3g}), change {x.change:.3g}, "
                f"kept {x.change_kept:.2f}"
            )
        return "\n".join(lines)
