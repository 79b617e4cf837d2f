"""Whose packing a LoRA on stacked MoE experts is in: PEFT's, or Unsloth's before unsloth-zoo #1269.

PEFT's ParamWrapper stores A (E·r, in) and B (out, E·r) and flattens them differently: A expert-major
(``reshape(E, r, in)``), B rank-major, expert fastest (``reshape(out, r, E)``: column j is expert j % E)
-- peft/tuners/lora/layer.py, ParamWrapper.get_delta_weight and get_delta_factors (0.18 to 0.21). vLLM's
``_stack_moe_lora_weights`` reads B the same way. Unsloth's grouped-GEMM MoE forward read B expert-major
(``weight_B.view(out, E, r)``: column j is expert j // r; unsloth_zoo/temporary_patches/moe_utils.py,
``_canonical_lora_weights_for_grouped_mm``) until unsloth-zoo #1269 (2026-09-17), so an adapter it trained
has PEFT's keys and shapes but another ΔW (unslothai/unsloth#6930). The two coincide when E == 1 or r == 1.

Since unsloth-zoo #1232 Unsloth records the packing in adapter_config.json: ``"lora_B_layout"``
(``"rank_major"`` or ``"grouped_by_expert"``) and ``"unsloth_fused_expert_lora": {"lora_A_layout":
"grouped_by_expert", "parameters": {"gate_up_proj": {"lora_B_layout": ..., "num_experts": E}}}``.
Before that it recorded nothing -- no version either -- but its loader tags the model ``unsloth``
(unsloth/models/loader.py, ``add_model_tags``), which PEFT writes into the adapter's README.md model card.
An adapter so tagged and unmarked is in either packing, and is refused rather than merged on a guess.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import IncompatibleError, UnsupportedError

if TYPE_CHECKING:
    from .weights import LoraAdapter

RANK_MAJOR = "rank_major"  # PEFT's (and vLLM's, and Unsloth's since unsloth-zoo #1269)
GROUPED_BY_EXPERT = "grouped_by_expert"  # Unsloth's before unsloth-zoo #1269
LAYOUTS = {
    RANK_MAJOR: "PEFT's rank-major lora_B (expert fastest)",
    GROUPED_BY_EXPERT: "Unsloth's grouped-by-expert lora_B (before unsloth-zoo #1269)",
}
MARKER = "lora_B_layout"  # adapter_config.json, written by unsloth-zoo since #1232
DETAIL = "unsloth_fused_expert_lora"  # its per-parameter detail
_SETTLE = f'add "{MARKER}": "{GROUPED_BY_EXPERT}" or "{RANK_MAJOR}" to adapter_config.json'


def _tagged_unsloth(folder: Path) -> bool:
    """Whether the adapter's README.md model card carries the ``unsloth`` tag (its YAML front matter)."""
    try:
        text = (folder / "README.md").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    front = re.match(r"---[ \t]*\r?\n(.*?)\r?\n---", text, re.S)
    if front is None:
        return False
    items: list[str] = []
    lines = front[1].splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("tags:"):
            continue
        inline = line[len("tags:") :].strip()
        if inline:  # tags: [a, b]
            items += inline.strip("[]").split(",")
        else:  # tags:\n- a\n- b
            for item in lines[i + 1 :]:
                if not item.lstrip().startswith("-"):
                    break
                items.append(item.lstrip()[1:])
    return any(item.strip().strip("'\"") == "unsloth" for item in items)


def _declared(raw: dict[str, Any], leaf: str, experts: int, where: str) -> str | None:
    """The packing adapter_config.json declares for parameter ``leaf`` (the per-parameter entry first)."""
    detail = raw.get(DETAIL)
    entry: Any = None
    if detail is not None:
        if not isinstance(detail, dict):
            raise UnsupportedError(f"{where}: {DETAIL} is {type(detail).__name__}, not an object: not Unsloth's")
        a_layout = detail.get("lora_A_layout", GROUPED_BY_EXPERT)
        if a_layout != GROUPED_BY_EXPERT:
            raise UnsupportedError(
                f"{where}: {DETAIL}.lora_A_layout is {a_layout!r}; only {GROUPED_BY_EXPERT!r} "
                "(A's rows expert by expert, as PEFT and Unsloth store them) is known"
            )
        entry = (detail.get("parameters") or {}).get(leaf)
    if isinstance(entry, dict):
        count = entry.get("num_experts")
        if count is not None and count != experts:
            raise IncompatibleError(
                f"{where}: {DETAIL} says {leaf} has {count} experts, the base's stack has {experts}"
            )
    declared = entry.get(MARKER) if isinstance(entry, dict) and MARKER in entry else raw.get(MARKER)
    if declared is not None and declared not in LAYOUTS:
        known = "; ".join(f"{k!r}: {v}" for k, v in LAYOUTS.items())
        raise UnsupportedError(f"{where}: {MARKER} {declared!r} is a packing lorasurgeon does not know ({known})")
    return declared


def lora_b_layout(adapter: LoraAdapter, parameter: str, experts: int, rank: int, where: str) -> str:
    """How B's E·r columns are packed for the LoRA on ``parameter`` (RANK_MAJOR or GROUPED_BY_EXPERT).

    Raises:
        UnsupportedError: a packing declared that is not known, or an adapter Unsloth trained that does not
            say which (the two are told apart by nothing in the file when E > 1 and r > 1).
        IncompatibleError: the declaration names another expert count than the base's.
    """
    raw = dict(adapter.config.raw)
    declared = _declared(raw, parameter.rsplit(".", 1)[-1], experts, where)
    if declared is not None:
        return declared
    if experts > 1 and rank > 1:
        folder = adapter.path if adapter.path.is_dir() else adapter.path.parent
        if _tagged_unsloth(folder):
            raise UnsupportedError(
                f"{where}: Unsloth trained this adapter (README.md tags it 'unsloth') and adapter_config.json "
                f"has no {MARKER}: its lora_B may be {LAYOUTS[GROUPED_BY_EXPERT]} or {LAYOUTS[RANK_MAJOR]}, "
                f"which have the same shapes; {_SETTLE} once known (e.g. by checking one expert against the "
                "fine-tuned model)"
            )
    return RANK_MAJOR


def check_pefts_packing(adapter: LoraAdapter, where: str) -> None:
    """For a result that keeps a stacked-experts B as it is (the augmented form, which PEFT reads rank-major):
    refuse one packed grouped by expert, declared in another packing, or Unsloth's without a declaration."""
    if not adapter.config.target_parameters:
        return
    raw = dict(adapter.config.raw)
    detail = raw.get(DETAIL)
    entries = (detail.get("parameters") or {}).values() if isinstance(detail, dict) else ()
    declared = {raw.get(MARKER)} | {e.get(MARKER) for e in entries if isinstance(e, dict)}
    if declared - {None, RANK_MAJOR}:
        raise UnsupportedError(
            f"{where}: its stacked-expert lora_B is declared {', '.join(sorted(map(str, declared - {None})))}, which "
            f"PEFT would read as {LAYOUTS[RANK_MAJOR]}: merge it instead (the merged form reads it as declared)"
        )
    folder = adapter.path if adapter.path.is_dir() else adapter.path.parent
    if declared == {None} and _tagged_unsloth(folder):
        raise UnsupportedError(
            f"{where}: Unsloth trained this adapter (README.md tags it 'unsloth') and adapter_config.json has no "
            f"{MARKER}, so how its stacked-expert lora_B is packed cannot be told; {_SETTLE} once known"
        )
