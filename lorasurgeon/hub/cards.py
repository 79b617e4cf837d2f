"""Model cards (README.md) for every result: Hub metadata, and how the result was made."""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from .. import __version__

CARD_NAME = "README.md"


def model_card(*, kind: str, base: str | None, title: str, lines: Sequence[str], library: str | None = None) -> str:
    """README.md text: metadata (base_model, base_model_relation, library_name, tags) + body.

    ``title``: the result folder's name (``-o out1/sub`` -> ``sub``), the name the result goes by on the Hub;
    each card's "Made by" command writes that same folder (``-o sub``), so the card holds no local path of
    the output. ``kind``: "merged" (relation merge, library transformers), "adapter" / "augmented"
    (relation adapter, library peft), "unmerged" (a base model recovered: no relation). ``library``: the
    library that loads it, where not those (diffusers, for a pipeline).
    """
    from huggingface_hub import ModelCard, ModelCardData

    relation = {"merged": "merge", "adapter": "adapter", "augmented": "adapter"}.get(kind)
    data = ModelCardData(
        base_model=base,
        base_model_relation=relation,
        library_name=library or ("peft" if kind in ("adapter", "augmented") else "transformers"),
        tags=["lora", "lorasurgeon"] + (["merge"] if kind == "merged" else []),
    )
    text = (
        f"---\n{data.to_yaml()}\n---\n\n# {title}\n\n"
        + "\n".join(lines)
        + f"\n\nMade with lorasurgeon {__version__}.\n"
    )
    return str(ModelCard(text))


def command(*words: object) -> list[str]:
    """A shell-quoted command line as a markdown code block."""
    return ["```bash", shlex.join(str(w) for w in words if w is not None and w != ""), "```"]


def made_by(*words: object) -> list[str]:
    """The card's last lines: the command that made the result (its -o: the card's title)."""
    return ["", "Made by:", *command(*words)]


def method_words(method: Mapping[str, Any]) -> str:
    """How ranks were chosen, in words: "rank 4", "energy 0.9, max rank 64", "a budget of 3,840 parameters".

    ``method``: extract's (budget_params) or resize's and combine's (budget: a number of parameters, exact)."""
    budget = method.get("budget_params") or method.get("budget")
    parts = [f"rank {method['rank']}"] if method.get("rank") else []
    parts += [f"energy {method['energy']:g}"] if method.get("energy") else []
    parts += [f"a budget of {budget:,} parameters"] if budget else []
    parts += [f"max rank {method['max_rank']}"] if method.get("max_rank") else []
    parts += ["every component kept"] if method.get("exact") else []
    parts += [f"for {method['for']}"] if method.get("for") else []
    return ", ".join(parts)


def method_flags(method: Mapping[str, Any]) -> list[str]:
    """The same ``method`` as the options that choose it again (a budget as --budget-params)."""
    budget = method.get("budget_params") or method.get("budget")
    flags = [f"--rank={method['rank']}"] if method.get("rank") else []
    flags += [f"--energy={method['energy']:g}"] if method.get("energy") else []
    flags += [f"--budget-params={budget}"] if budget else []
    flags += [f"--max-rank={method['max_rank']}"] if method.get("max_rank") else []
    return flags + ([f"--for={method['for']}"] if method.get("for") else [])


def merge_card(
    *,
    title: str,
    form: str,
    unmerge: bool,
    base: str,
    adapters: Sequence[str],
    weights: Sequence[float],
    dtype: str,
    untied: bool,
    quantization: str = "",
    library: str | None = None,
) -> str:
    """The card of a merge or unmerge; ``quantization``: a sentence on a quantized base's format; ``library``:
    the library that loads the result, where not transformers (model_card)."""
    verb = "unmerge" if unmerge else "merge"
    flags = [f"--weight={w:g}" for w in weights] if any(w != 1.0 for w in weights) else []
    if form != "merged":
        flags.append(f"--form={form}")
    what = {
        ("merge", "merged"): f"`{base}` with LoRA adapters merged into its weights (W0 + Σ wᵢ·(α/r)·BᵢAᵢ, "
        "computed in float32 and rounded once).",
        ("merge", "augmented"): f"`{base}` with the LoRA layers inside (PEFT's in-memory key names, "
        "adapter_config.json beside them).",
        ("unmerge", "merged"): f"`{base}` with LoRA adapters subtracted from its weights (W − Σ wᵢ·(α/r)·BᵢAᵢ).",
    }
    lines = [f"This model is {what[(verb, form)]}", "", "| adapter | weight |", "|---|---:|"]
    lines += [f"| `{a}` | {w:g} |" for a, w in zip(adapters, weights, strict=True)]
    lines += ["", f"Output dtype: {dtype}."]
    if quantization:
        lines += ["", quantization]
    if untied:
        lines.append(
            "The adapters changed the input embedding and lm_head differently, so both are stored and "
            "`tie_word_embeddings` is false."
        )
    lines += ["", "Made by:"] + command("lorasurgeon", verb, base, *adapters, *flags, "-o", title)
    kind = "unmerged" if unmerge else ("augmented" if form == "augmented" else "merged")
    return model_card(kind=kind, base=base, title=title, lines=lines, library=library)


def convert_card(*, title: str, source: str, base: str | None, to: str) -> str:
    if to.startswith("--dtype"):  # a model converted to another dtype (dequantized, if it was quantized)
        lines = [f"`{source}` converted to {to.removeprefix('--dtype=')}.", "", "Made by:"]
        lines += command("lorasurgeon", "convert", source, to, "-o", title)
        return model_card(kind="merged", base=base, title=title, lines=lines)
    lines = (
        [f"Converted from the augmented checkpoint `{source}` to the {to} form."]
        + ["", "Made by:"]
        + command("lorasurgeon", "convert", source, f"--to={to}", "-o", title)
    )
    return model_card(kind="merged" if to == "merged" else "adapter", base=base, title=title, lines=lines)


class _ModuleLine(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def rank(self) -> int: ...
    @property
    def kept(self) -> float: ...
    @property
    def rel_error(self) -> float: ...


class _FullLine(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def reason(self) -> str: ...


def extract_card(
    *,
    title: str,
    base: str,
    finetuned: str,
    method: Mapping[str, Any],
    modules: Sequence[_ModuleLine],
    kept: float,
    parameters: int,
    full: Sequence[_FullLine],
    command: Sequence[str] = (),
) -> str:
    """``command``: the command line that made it, before its sizing flags (default: extract BASE FINETUNED)."""
    how = method_words(method)
    lines = [
        f"A LoRA adapter extracted from the fine-tune `{finetuned}` of `{base}` by truncated SVD of "
        f"each weight delta ({how}; solver {method['solver']}).",
        "",
        f"It keeps **{kept:.2%}** of the fine-tune's change (share of Σ‖ΔW‖²) in {parameters:,} parameters.",
        "",
        "| module | rank | kept ‖ΔW‖² | rel. error |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| `{m.name}` | {m.rank} | {m.kept:.2%} | {m.rel_error:.4f} |" for m in modules]
    if full:
        lines += ["", "Stored in full: " + ", ".join(f"`{f.name}` ({f.reason})" for f in full) + "."]
    words = command or ("lorasurgeon", "extract", base, finetuned)
    lines += made_by(*words, *method_flags(method), "-o", title)
    return model_card(kind="adapter", base=base, title=title, lines=lines)
