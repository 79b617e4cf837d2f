"""MergeReport: what a merge, unmerge or convert did (or, with dry_run, would do)."""

from __future__ import annotations

from dataclasses import dataclass

from .ops import Action, Plan, describe

_WORDS: dict[Action, str] = {
    "merge": "merged",
    "unmerge": "unmerged",
    "restore": "restored exactly from the adapter's saved W0",
    "replace": "replaced by the adapter",
    "copy": "copied",
    "lora": "LoRA tensors",
}


@dataclass(frozen=True)
class MergeReport:
    """What a merge/unmerge/convert did (or, with dry_run, would do). Every figure is measured in the run."""

    output: str | None
    form: str  # merged | augmented | unmerged | adapter
    plan: Plan
    counts: dict[Action, int]  # output tensors by action
    bytes: int
    seconds: float
    untied_embeddings: bool
    dry_run: bool

    @property
    def throughput(self) -> float:
        return self.bytes / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        if self.dry_run:
            return describe(self.plan)
        done = ", ".join(f"{n} {_WORDS[a]}" for a, n in self.counts.items() if n)
        text = (
            f"Wrote {self.output} ({self.form}): {sum(self.counts.values())} tensors ({done}), "
            f"{self.bytes / 2**20:.1f} MiB in {self.seconds:.2f} s ({self.throughput / 2**20:.0f} MiB/s)."
        )
        if self.untied_embeddings:
            text += " Input and output embeddings now differ: both written, tie_word_embeddings=false."
        return text
