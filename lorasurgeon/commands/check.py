"""check: what a consumer (vLLM, llama.cpp) will refuse in an adapter, or silently compute otherwise.

From the adapter's config and headers alone, each rule of the consumer's loader (see
docs/formats.md §7-8, with the loaders' source named there) is checked and reported with its
severity: ``error`` (the consumer refuses it, or computes something else, and no exact rewrite
exists), ``fix`` (it would be wrong as it is, and an exact rewrite exists: the report names the
command), ``note`` (loads, with a condition to know). The exit status is 1 when anything is an error
or needs a fix. The rules are the consumer's own (``lorasurgeon.consumers``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from ..consumers import Consumer as Consumer
from ..consumers import Problem as Problem
from ..consumers import Severity as Severity
from ..consumers import consumer as consumer_named
from ..consumers.vllm import PACKED as PACKED
from ..consumers.vllm import VLLM_RANKS as VLLM_RANKS
from ..consumers.vllm import VLLM_SAVE_OK as VLLM_SAVE_OK
from ..consumers.vllm import vllm_loads_whole as vllm_loads_whole
from ._inputs import adapters_of, open_inputs, with_base


@dataclass(frozen=True)
class CheckReport:
    """``to_dict()`` is ``check --json``."""

    adapter: str
    consumer: str
    problems: list[Problem] = field(default_factory=list)
    max_lora_rank: int | None = None  # vLLM: the smallest --max-lora-rank that admits it (None: it does not load)

    @property
    def exit_code(self) -> int:
        return 1 if any(p.severity != "note" for p in self.problems) else 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"ok": self.exit_code == 0}

    def summary(self) -> str:
        head = f"{self.adapter} for {self.consumer}: " + (
            "loads as PEFT computes it" if self.exit_code == 0 else "will not load, or not as PEFT computes it"
        )
        if self.max_lora_rank is not None:
            head += f" (needs --max-lora-rank {self.max_lora_rank} or more)"
        lines = [head]
        for p in self.problems:
            lines.append(f"  {p.severity:<5} {p.rule}: {p.message}" + (f"; fix: {p.fix}" if p.fix else ""))
        return "\n".join(lines)


def check(adapter: str | os.PathLike[str], *, consumer: str, base: str | os.PathLike[str] | None = None) -> CheckReport:
    """What ``consumer`` (one of ``lorasurgeon.consumers.CONSUMERS``: "vllm" or "llama.cpp") will refuse or
    compute otherwise in an adapter, from its config and headers (no tensor is read).

    Args:
        adapter: an adapter folder (or Hub id), or a llama.cpp .gguf adapter file.
        consumer: "vllm" or "llama.cpp".
        base: the base model a .gguf ``adapter`` is read against (its names and shapes); refused otherwise.

    Returns:
        A CheckReport: each problem with its severity and, where an exact rewrite exists, the command;
        for vLLM the smallest --max-lora-rank that admits it. ``exit_code`` is 1 unless it loads as is.

    Raises:
        InvalidOptionError: an unknown consumer; a .gguf adapter without ``base``, or ``base`` without one.
        InputNotFoundError, AdapterConfigError, IncompatibleError: not a readable adapter (a .gguf one: not of
            ``base``).
    """
    rules = consumer_named(consumer)
    inputs = with_base([adapter], base)
    with open_inputs(inputs, None, command="check", overwrite=False, device="cpu", in_place=True) as opened:
        (loaded,) = adapters_of(opened[-1:])
    source = opened[-1].source
    try:
        found = rules.check(loaded)
    finally:
        loaded.close()
    loads = all(p.severity == "note" for p in found.problems)  # a rank to state only for what loads
    return CheckReport(source.label, consumer, found.problems, found.max_lora_rank if loads else None)
