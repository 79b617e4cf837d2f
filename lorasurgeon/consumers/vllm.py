"""vLLM's LoRA loader (docs/formats.md §7): its rules for ``check --for vllm``, and what ``--for vllm`` makes:
ranks within its max_lora_rank choices, whole tensors only for a classifier or score head."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..adapter.expert_layouts import check_pefts_packing
from ..errors import UnsupportedError
from ..words import plural
from .base import Consumer, Findings, Problem

if TYPE_CHECKING:
    from ..adapter.weights import LoraAdapter

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py MaxLoRARanks
VLLM_SAVE_OK = ("classifier", "score")  # the modules_to_save newer vLLM accepts
PACKED = {"qkv_proj": "q_proj, k_proj, v_proj", "gate_up_proj": "gate_proj, up_proj"}
LORA_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B")


def vllm_loads_whole(tensor: str) -> bool:
    """Whether vLLM loads this whole tensor of an adapter (a parameter of a classifier or score head)."""
    return tensor.rpartition(".")[0].split(".")[-1] in VLLM_SAVE_OK


class Vllm(Consumer):
    name = "vllm"
    label = "vLLM"
    max_rank = VLLM_RANKS[-1]
    rank_limit = "vLLM's largest max_lora_rank"

    def loads_whole(self, tensor: str) -> bool:
        return vllm_loads_whole(tensor)

    def check(self, adapter: LoraAdapter) -> Findings:
        found = self.common(adapter) + self._weights(adapter) + self._notes(adapter)
        # vLLM checks the ranks the config states (PEFTHelper.validate_legal: max(r, *rank_pattern.values())) and
        # loads the tensors': --max-lora-rank must admit both
        stated = [
            int(adapter.config.raw.get("r") or 8),
            *(int(r) for r in (adapter.config.rank_pattern or {}).values()),
        ]
        top = max([m.rank for m in adapter.modules.values()] + stated)
        allowed = [r for r in VLLM_RANKS if r >= top]
        if not allowed:
            found.append(
                Problem(
                    "rank",
                    "fix",
                    f"rank {top} is more than {self.rank_limit} ({VLLM_RANKS[-1]})",
                    f"{self.resize(adapter)} --for {self.name} --max-rank {VLLM_RANKS[-1]} --energy 1 "
                    "-o OUT (the best factors of that rank)",
                )
            )
        return Findings(found, allowed[0] if allowed else None)

    def _weights(self, adapter: LoraAdapter) -> list[Problem]:
        """Whole modules it does not load, and keys it calls unsupported LoRA weights."""
        found = []
        saves = [m for m in adapter.config.modules_to_save or [] if m.split(".")[-1] not in VLLM_SAVE_OK]
        if saves:
            found.append(
                Problem("modules_to_save", "error", f"modules_to_save {saves}: vLLM loads only {list(VLLM_SAVE_OK)}")
            )
        odd = [k for k in adapter.checkpoint if not k.endswith(LORA_SUFFIXES)]
        if odd and not saves:
            found.append(
                Problem(
                    "weights", "error", f"{plural(len(odd), 'tensor')} vLLM calls unsupported LoRA weights: {odd[:3]}"
                )
            )
        return found

    def _notes(self, adapter: LoraAdapter) -> list[Problem]:
        """What loads, with a condition to know: packed layer names, patterns, 3-D expert LoRA."""
        cfg, found = adapter.config, []
        packed = sorted({m.name for m in adapter.modules.values() if m.name.split(".")[-1] in PACKED})
        if packed:
            leaf = packed[0].split(".")[-1]
            found.append(
                Problem(
                    "packed_modules",
                    "note",
                    f"{plural(len(packed), 'module')} named like vLLM's packed layers ({packed[0]}): fine where the "
                    f"model itself has them (Phi-3's qkv_proj); where vLLM packs {PACKED[leaf]} into it, it expects "
                    "LoRA on those (the base's config tells which)",
                )
            )
        if cfg.rank_pattern or cfg.alpha_pattern:
            found.append(
                Problem(
                    "patterns",
                    "note",
                    "rank_pattern/alpha_pattern: read by vLLM's newer PEFTHelper only; older versions apply the "
                    "global alpha/r to every module",
                    f"{self.resize(adapter)} --rank R -o OUT (one rank, no patterns)",
                )
            )
        if cfg.target_parameters:
            found.append(
                Problem("target_parameters", "note", "3-D expert LoRA: only for models vLLM marks is_3d_moe_weight")
            )
            try:  # vLLM's _stack_moe_lora_weights reads B rank-major, as PEFT packs it
                check_pefts_packing(adapter, str(adapter.path))
            except UnsupportedError as exc:
                found.append(Problem("lora_B_layout", "error", str(exc).split(": ", 1)[-1]))
        return found


VLLM = Vllm()
