"""A consumer of adapters (vLLM, llama.cpp): what its loader refuses or computes otherwise in an adapter
(``check --for``), and what ``--for`` it makes (extract, resize, combine, convert). One subclass per consumer,
each in a module of its own, holding every rule of that consumer; the loaders' sources are in docs/formats.md.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from ..adapter.config import UNSUPPORTED_INITS, UNSUPPORTED_KEYS

if TYPE_CHECKING:
    from ..adapter.weights import LoraAdapter

Severity = Literal["error", "fix", "note"]


@dataclass(frozen=True)
class Problem:
    rule: str  # a short name: "dora", "rank", "alpha_pattern", ...
    severity: Severity
    message: str
    fix: str = ""  # the command that rewrites the adapter exactly, where one exists


@dataclass(frozen=True)
class Findings:
    """What ``check`` finds in an adapter for one consumer."""

    problems: list[Problem] = field(default_factory=list)
    max_lora_rank: int | None = None  # the smallest rank limit of the consumer that admits it (None: none applies)


class Consumer(ABC):
    """One consumer's rules. Adding one: a module with a subclass, and its instance in ``consumers.CONSUMERS``."""

    name: str  # what --for and check --for take: "vllm"
    label: str  # what messages call it: "vLLM"
    max_rank: int | None = None  # the largest rank it loads (None: any)
    rank_limit: str = ""  # that limit in words, for messages: "vLLM's largest max_lora_rank"
    formats: tuple[str, ...] = ("peft",)  # the adapter formats its loader (or its converter) takes
    # what it reads, and how to make that from an adapter in another format (check's "format" problem); {base}:
    # " --base BASE" for an adapter read against its base model (a llama.cpp .gguf), else nothing
    reads: str = "it reads PEFT's (`lorasurgeon convert ADAPTER --to peft{base} -o PEFT_ADAPTER` rewrites it, exactly)"

    @staticmethod
    def resize(adapter: LoraAdapter) -> str:
        """The start of the resize command that rewrites ``adapter`` (with --base where its format needs it)."""
        from ..adapter.formats.registry import read_against_base

        return f"lorasurgeon resize {adapter.path}" + (" --base BASE" if read_against_base(adapter.format) else "")

    @abstractmethod
    def check(self, adapter: LoraAdapter) -> Findings:
        """Each rule of this consumer's loader, from the adapter's config and headers (no tensor is read)."""

    def common(self, adapter: LoraAdapter) -> list[Problem]:
        """The rules every consumer here shares: plain LoRA only, no trained biases, no token deltas."""
        cfg, raw, who = adapter.config, adapter.config.raw, self.label
        found = []
        if adapter.format not in self.formats:
            from ..adapter.formats.registry import read_against_base

            reads = self.reads.format(base=" --base BASE" if read_against_base(adapter.format) else "")
            found.append(Problem("format", "error", f"an adapter in {adapter.format}'s format: {reads}"))
        if adapter.tuned:
            found.append(
                Problem(
                    "peft_type",
                    "error",
                    f"peft_type {cfg.peft_type}: {who} loads LoRA adapters only; `lorasurgeon convert ADAPTER "
                    "--to lora --base BASE --rank N -o LORA` gives the best LoRA of its change",
                )
            )
        if cfg.use_dora:
            found.append(Problem("dora", "error", f"{who} does not apply DoRA's magnitude vectors"))
        if cfg.bias != "none":
            found.append(Problem("bias", "error", f"bias={cfg.bias!r}: {who} does not load trained biases"))
        if cfg.lora_bias:
            found.append(Problem("lora_bias", "error", f"lora_bias: {who} has no lora_B.bias"))
        if adapter.token_deltas:
            found.append(Problem("trainable_tokens", "error", f"trainable tokens: {who} loads no token deltas"))
        init = raw.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(UNSUPPORTED_INITS):
            found.append(
                Problem(
                    "init_lora_weights", "error", f"init_lora_weights={init!r} changed the base weights when training"
                )
            )
        for key, label in UNSUPPORTED_KEYS.items():
            if raw.get(key):
                found.append(Problem("variant", "error", f"{label}: not plain LoRA, and {who} does not apply it"))
        return found

    # --for: what an adapter made for this consumer holds

    def loads_whole(self, tensor: str) -> bool:
        """Whether it loads this whole tensor of an adapter (a modules_to_save parameter); none by default."""
        return False

    def too_high(self, rank: int) -> bool:
        """Whether a rank is above the largest it loads."""
        return self.max_rank is not None and rank > self.max_rank

    def fold(self, scale: float, rank: int, alpha: float) -> float:
        """What a module's B is multiplied by so that this consumer, which scales every pair by one alpha / its
        rank, computes ``scale`` · B A (PEFT's scale for the module: rsLoRA and patterns included)."""
        return scale * rank / alpha
