"""check: what a consumer (vLLM, llama.cpp) will refuse in an adapter, or silently compute otherwise.

From the adapter's config and headers alone, each rule of the consumer's loader (see
docs/formats.md §7-8, with the loaders' source named there) is checked and reported with its
severity: ``error`` (the consumer refuses it, or computes something else, and no exact rewrite
exists), ``fix`` (it would be wrong as it is, and an exact rewrite exists: the report names the
command), ``note`` (loads, with a condition to know). The exit status is 1 when anything is an error
or needs a fix.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from ..adapter.config import UNSUPPORTED_INITS, UNSUPPORTED_KEYS
from ..adapter.weights import LoraAdapter, load_adapter
from ..errors import InvalidOptionError
from ..words import plural
from ._inputs import Input, prepare

Consumer = Literal["vllm", "llama.cpp"]
Severity = Literal["error", "fix", "note"]
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks
VLLM_SAVE_OK = ("classifier", "score")  # the modules_to_save newer vLLM accepts
PACKED = {"qkv_proj": "q_proj, k_proj, v_proj", "gate_up_proj": "gate_proj, up_proj"}


def vllm_loads_whole(tensor: str) -> bool:
    """Whether vLLM loads this whole tensor of an adapter (a parameter of a classifier or score head)."""
    return tensor.rpartition(".")[0].split(".")[-1] in VLLM_SAVE_OK


@dataclass(frozen=True)
class Problem:
    rule: str  # a short name: "dora", "rank", "alpha_pattern", ...
    severity: Severity
    message: str
    fix: str = ""  # the command that rewrites the adapter exactly, where one exists


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


def _common(adapter: LoraAdapter, consumer: str) -> list[Problem]:
    cfg, raw = adapter.config, adapter.config.raw
    found = []
    if cfg.use_dora:
        found.append(Problem("dora", "error", f"{consumer} does not apply DoRA's magnitude vectors"))
    if cfg.bias != "none":
        found.append(Problem("bias", "error", f"bias={cfg.bias!r}: {consumer} does not load trained biases"))
    if cfg.lora_bias:
        found.append(Problem("lora_bias", "error", f"lora_bias: {consumer} has no lora_B.bias"))
    if adapter.token_deltas:
        found.append(Problem("trainable_tokens", "error", f"trainable tokens: {consumer} loads no token deltas"))
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(UNSUPPORTED_INITS):
        found.append(
            Problem("init_lora_weights", "error", f"init_lora_weights={init!r} changed the base weights when training")
        )
    for key, label in UNSUPPORTED_KEYS.items():
        if raw.get(key):
            found.append(Problem("variant", "error", f"{label}: not plain LoRA, and {consumer} does not apply it"))
    return found


def _vllm(adapter: LoraAdapter) -> tuple[list[Problem], int | None]:
    cfg, raw = adapter.config, adapter.config.raw
    found = _common(adapter, "vLLM")
    saves = [m for m in cfg.modules_to_save or [] if m.split(".")[-1] not in VLLM_SAVE_OK]
    if saves:
        found.append(
            Problem("modules_to_save", "error", f"modules_to_save {saves}: vLLM loads only {list(VLLM_SAVE_OK)}")
        )
    odd = [
        k
        for k in adapter.checkpoint
        if not k.endswith(("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B"))
    ]
    if odd and not saves:
        found.append(
            Problem("weights", "error", f"{plural(len(odd), 'tensor')} vLLM calls unsupported LoRA weights: {odd[:3]}")
        )
    packed = sorted({m.name for m in adapter.modules.values() if m.name.split(".")[-1] in PACKED})
    if packed:
        leaf = packed[0].split(".")[-1]
        found.append(
            Problem(
                "packed_modules",
                "note",
                f"{plural(len(packed), 'module')} named like vLLM's packed layers ({packed[0]}): fine where the model "
                f"itself has them (Phi-3's qkv_proj); where vLLM packs {PACKED[leaf]} into it, it expects LoRA "
                "on those (the base's config tells which)",
            )
        )
    if cfg.rank_pattern or cfg.alpha_pattern:
        found.append(
            Problem(
                "patterns",
                "note",
                "rank_pattern/alpha_pattern: read by vLLM's newer PEFTHelper only; older versions apply the global "
                "alpha/r to every module",
                f"lorasurgeon resize {adapter.path} --rank R -o OUT (one rank, no patterns)",
            )
        )
    if cfg.target_parameters:
        found.append(
            Problem("target_parameters", "note", "3-D expert LoRA: only for models vLLM marks is_3d_moe_weight")
        )
    # vLLM checks the ranks the config states (PEFTHelper.validate_legal: max(r, *rank_pattern.values())) and
    # loads the tensors': --max-lora-rank must admit both
    stated = [int(raw.get("r") or 8), *(int(r) for r in (cfg.rank_pattern or {}).values())]
    top = max([m.rank for m in adapter.modules.values()] + stated)
    allowed = [r for r in VLLM_RANKS if r >= top]
    if not allowed:
        found.append(
            Problem(
                "rank",
                "fix",
                f"rank {top} is more than vLLM's largest max_lora_rank ({VLLM_RANKS[-1]})",
                f"lorasurgeon resize {adapter.path} --for vllm --max-rank {VLLM_RANKS[-1]} --energy 1 -o OUT "
                "(the best factors of that rank)",
            )
        )
    return found, (allowed[0] if allowed else None)


def _llama_cpp(adapter: LoraAdapter) -> list[Problem]:
    cfg = adapter.config
    found = _common(adapter, "llama.cpp")
    full = [k for k in adapter.replacements]
    if full:
        found.append(
            Problem(
                "full_tensors",
                "error",
                f"whole tensors ({', '.join(full[:3])}): convert_lora_to_gguf aborts on modules_to_save "
                "(llama.cpp#11554)",
            )
        )
    scales = {m.name: m.scale * m.rank for m in adapter.modules.values()}  # = the alpha each module needs
    if cfg.use_rslora or cfg.alpha_pattern or len({round(v, 9) for v in scales.values()}) > 1:
        what = "use_rslora" if cfg.use_rslora else "per-module alphas"
        found.append(
            Problem(
                "alpha",
                "fix",
                f"{what}: llama.cpp scales every tensor by one alpha / its rank, so these modules would be scaled "
                "differently from PEFT",
                f"lorasurgeon convert {adapter.path} --for llama.cpp -o OUT (every component kept, each scale "
                "folded into its B)",
            )
        )
    if any(m.name.split(".")[-1] in ("lm_head", "embed_out") for m in adapter.modules.values()):
        found.append(Problem("lm_head", "note", "LoRA on the output head fails on models with tied embeddings (#9065)"))
    if cfg.target_parameters:
        found.append(Problem("target_parameters", "note", "3-D expert LoRA: check that the converter maps the experts"))
    return found


def check(adapter: str | os.PathLike[str], *, consumer: str) -> CheckReport:
    """What ``consumer`` ("vllm" or "llama.cpp") will refuse or compute otherwise in a PEFT adapter, from its
    config and headers (no tensor is read).

    Args:
        adapter: a PEFT adapter folder (or Hub id).
        consumer: "vllm" or "llama.cpp".

    Returns:
        A CheckReport: each problem with its severity and, where an exact rewrite exists, the command;
        for vLLM the smallest --max-lora-rank that admits it. ``exit_code`` is 1 unless it loads as is.

    Raises:
        InvalidOptionError: an unknown consumer.
        InputNotFoundError, AdapterConfigError, IncompatibleError: not a readable PEFT adapter.
    """
    if consumer not in get_args(Consumer):
        raise InvalidOptionError(f"unknown consumer {consumer!r}: choose vllm or llama.cpp")
    (source,) = prepare([Input(adapter, "ADAPTER", "adapter")], None, command="check", overwrite=False, device="cpu")
    loaded = load_adapter(source.path)
    try:
        if consumer == "vllm":
            problems, max_rank = _vllm(loaded)
            loads = all(p.severity == "note" for p in problems)  # a rank to state only for what loads
            return CheckReport(source.label, consumer, problems, max_rank if loads else None)
        return CheckReport(source.label, consumer, _llama_cpp(loaded))
    finally:
        loaded.close()
