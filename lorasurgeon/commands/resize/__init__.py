"""resize and combine: adapters as algebra, never forming a dense ΔW.

``resize`` gives an adapter a lower rank; ``combine`` makes one adapter of the weighted sum of
several. Per module, the change Σ wᵢ·sᵢ·Bᵢ Aᵢ is one product B A of stacked factors (B = [w₁s₁B₁ |
w₂s₂B₂ | …], A = [A₁; A₂; …]); its SVD comes from QR of B and of Aᵀ and the SVD of a small core
(``ops.lowrank.product_svd``), so the best rank-k factors are exact (Eckart–Young on the adapter's
own product) at the cost of a few (m + n)·r products. combine without a target rank stores the
stacked factors themselves: exact, at rank Σ rᵢ. Ranks come from ``--rank``, ``--energy`` (per
module) or ``--budget`` (all modules at once, ``ops.lowrank.allocate``). The config has r = lora_alpha =
the largest rank kept and the other ranks in ``rank_pattern``; each module's B carries k / r, so whoever
scales by alpha / rank (PEFT, llama.cpp's single alpha, vLLM) gets exactly the change kept.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from ...adapter.config import CONFIG_NAME
from ...adapter.weights import LoraAdapter
from ...consumers import Consumer, consumer
from ...engine.execute import Discard, Progress, run
from ...errors import InvalidOptionError, UnsupportedError
from ...hub.cards import CARD_NAME, made_by, method_flags, method_words, model_card
from ...io.dtypes import itemsize, torch_dtype
from ...io.sidecar import config_bytes
from ...io.spool import SpoolWriter
from ...words import plural
from .._inputs import Input, adapters_of, check_weights, open_inputs
from ..sizing import Sizing
from .compute import choose_ranks, factors, spectrum
from .plan import CopyOp, ModuleOp, check_adapter, check_same_base, plan_modules
from .report import ModuleResult, ResizeReport
from .settings import Target

__all__ = ["ModuleResult", "ResizeReport", "Target", "combine", "resize"]


def _config(
    adapters: Sequence[LoraAdapter], results: Sequence[ModuleResult], top: int, combining: bool
) -> dict[str, Any]:
    """The first adapter's config with r = lora_alpha = the largest rank kept, the others in rank_pattern
    (their scale top / k is folded out of B), no alpha_pattern and no rsLoRA."""
    raw = dict(adapters[0].config.raw)
    raw.update(r=top, lora_alpha=top, use_rslora=False, alpha_pattern={})
    raw["rank_pattern"] = {re.escape(m.name): m.rank for m in results if m.rank != top}  # PEFT matches regexes
    if combining and any(a.config.raw.get("target_modules") != raw.get("target_modules") for a in adapters):
        raw["target_modules"] = sorted(m.name for m in results)
        raw.pop("layers_to_transform", None)
        raw.pop("layers_pattern", None)
    return raw


def resize(
    adapter: str | os.PathLike[str],
    out: str | os.PathLike[str] | None,
    *,
    rank: int | None = None,
    energy: float | None = None,
    budget: str | int | None = None,
    budget_params: int | None = None,
    max_rank: int | None = None,
    for_: str | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> ResizeReport:
    """An adapter at a lower rank: per module the best rank-k factors of its own B A (Eckart–Young),
    found by QR of B and Aᵀ and the SVD of the small core, never forming the dense ΔW.

    Args:
        adapter: a PEFT adapter folder (or Hub id).
        out: the new adapter folder (None with ``dry_run``).
        rank, energy, budget, budget_params: one of: a rank for every module; per module the smallest rank
            keeping this share of ‖ΔW‖²; a size ("15MB", in the adapter's dtype) or a number of parameters
            for all LoRA factors together, spent where it removes the most squared error.
        max_rank: a cap per module.
        for_: "vllm" or "llama.cpp": make (or refuse by name) what that consumer needs: one alpha, scales in B
            (always), ranks within vLLM's 512, no whole tensors it refuses.
        device, overwrite, dry_run, progress: as for :func:`merge`.

    Returns:
        A ResizeReport: per module the rank in and out and the share of ‖ΔW‖² kept.

    Raises:
        InvalidOptionError: options that contradict each other or are out of range.
        UnsupportedError: DoRA, lora_bias, target_parameters, trainable tokens, variants.
    """
    return _run(
        [adapter],
        None,
        out,
        Sizing.of(rank=rank, energy=energy, budget=budget, budget_params=budget_params, max_rank=max_rank),
        for_=for_,
        device=device,
        overwrite=overwrite,
        dry_run=dry_run,
        progress=progress,
        combining=False,
    )


def combine(
    adapters: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str] | None,
    *,
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    energy: float | None = None,
    budget: str | int | None = None,
    budget_params: int | None = None,
    max_rank: int | None = None,
    for_: str | None = None,
    allow_different_bases: bool = False,
    device: str = "cpu",
    overwrite: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> ResizeReport:
    """One adapter for Σ wᵢ·ΔWᵢ: exact at rank Σ rᵢ (the factors stacked), or truncated optimally by the
    same QR + small-SVD route as :func:`resize` (PEFT's add_weighted_adapter "svd" forms each dense ΔW).

    Args:
        adapters: PEFT adapter folders of the same base model.
        weights: one per adapter (default 1.0 each).
        allow_different_bases: combine adapters whose configs name different base models (one model under
            two names); their shapes are checked all the same.
        out, rank, energy, budget, budget_params, max_rank, for_, device, overwrite, dry_run, progress: as for
            :func:`resize` (no target: exact).

    Returns:
        A ResizeReport.

    Raises:
        InvalidOptionError, UnsupportedError: as for :func:`resize`; modules_to_save is refused too.
        IncompatibleError: a module the adapters hold with different shapes; adapters whose configs name
            different base models (unless ``allow_different_bases``).
    """
    return _run(
        list(adapters),
        weights,
        out,
        Sizing.of(
            rank=rank, energy=energy, budget=budget, budget_params=budget_params, max_rank=max_rank, required=False
        ),
        for_=for_,
        device=device,
        overwrite=overwrite,
        dry_run=dry_run,
        progress=progress,
        combining=True,
        allow_different_bases=allow_different_bases,
    )


def _run(
    paths: Sequence[str | os.PathLike[str]],
    weights: Sequence[float] | None,
    out: str | os.PathLike[str] | None,
    sizing: Sizing,
    *,
    device: str,
    overwrite: bool,
    dry_run: bool,
    progress: Progress | None,
    combining: bool,
    for_: str | None = None,
    allow_different_bases: bool = False,
) -> ResizeReport:
    command = "combine" if combining else "resize"
    profile = None if for_ is None else consumer(for_, "--for")
    chosen = _weights(paths, weights, combining)
    inputs = [Input(p, "ADAPTER", "adapter") for p in paths]
    with open_inputs(inputs, out, command=command, overwrite=overwrite, device=device) as opened:
        adapters = adapters_of(opened)
    sources = [o.source for o in opened]
    try:
        for adapter in adapters:
            check_adapter(adapter, combining=combining)
        if combining and not allow_different_bases:
            check_same_base(adapters)
        ops, copies = plan_modules(adapters, chosen)
        if not ops:
            raise UnsupportedError(f"{sources[0].label}: no LoRA modules to {command}")
        copies = _copies_for(profile, adapters, copies, sources[0].label)
        dtype = adapters[0].checkpoint.info(ops[0].a_key).dtype_name
        target = Target.of(sizing, itemsize(dtype))
        parameters_in = sum(op.rank * op.cost for op in ops)
        labels = [s.label for s in sources]
        if dry_run:
            results = [ModuleResult(op.name, op.rank, op.rank, 1.0, 0.0) for op in ops]
            where = None if out is None else str(out)
            return ResizeReport(
                where, labels, list(chosen), _method(target, for_), results, parameters_in, 0, 1.0, True
            )
        if out is None:
            raise InvalidOptionError("an output folder is needed (or use dry_run)")
        ranks = _ranks(ops, copies, adapters, target, device, profile)
        top = max(ranks.values())
        spool = SpoolWriter(out, prefix="adapter_model", overwrite=overwrite)
        try:
            every: list[ModuleOp | CopyOp] = [*ops, *copies]
            stats = run(
                every,
                [a.checkpoint for a in adapters],
                spool,
                compute=partial(factors, exact=target.exact, ranks=ranks, top=top, dtype=torch_dtype(dtype)),
                device=device,
                progress=progress,
            )
            results = [i for i in stats.infos if isinstance(i, ModuleResult)]
            total = sum(r.energy for r in results)
            report = ResizeReport(
                str(out),
                labels,
                list(chosen),
                _method(target, for_),
                results,
                parameters_in,
                sum(r.rank * op.cost for r, op in zip(results, ops, strict=True)),
                sum(r.kept * r.energy for r in results) / total if total else 1.0,
                copied=[c.name for c in copies],
            )
            spool.add_file(CONFIG_NAME, config_bytes(_config(adapters, results, top, combining)))
            spool.add_file("resize_report.json", config_bytes(report.to_dict()))
            spool.add_file(CARD_NAME, _card(report, command, Path(out).name, adapters[0].config.base_model))
            spool.commit()
            return report
        except BaseException:
            spool.abort()
            raise
    finally:
        for adapter in adapters:
            adapter.close()


def _weights(
    paths: Sequence[str | os.PathLike[str]], weights: Sequence[float] | None, combining: bool
) -> tuple[float, ...]:
    """One weight per adapter (1.0 each by default), checked."""
    if combining and len(paths) < 2:
        raise InvalidOptionError("combine takes two adapters or more (resize takes one)")
    chosen = tuple(weights) if weights else (1.0,) * len(paths)
    if len(chosen) != len(paths):
        raise InvalidOptionError(
            f"{plural(len(chosen), 'weight')} for {plural(len(paths), 'adapter')}: give one --weight per adapter"
        )
    check_weights(chosen)
    return chosen


def _copies_for(
    profile: Consumer | None, adapters: Sequence[LoraAdapter], copies: list[CopyOp], label: str
) -> list[CopyOp]:
    """The whole tensors an adapter for ``profile`` keeps: a saved W0 (base_layer.weight) is a copy of the
    base, which no consumer wants, so it is left out; any other the consumer does not load is refused."""
    if profile is None:
        return copies
    saved = {key for adapter in adapters for key in adapter.base_weights.values()}
    copies = [c for c in copies if c.name not in saved]
    refused = [c.name for c in copies if not profile.loads_whole(c.name)]
    if refused:
        raise UnsupportedError(
            f"{label}: --for {profile.name}: whole tensors it does not load ({', '.join(refused[:3])}); "
            "leave them out of the adapter"
        )
    return copies


def _ranks(
    ops: Sequence[ModuleOp],
    copies: Sequence[CopyOp],
    adapters: Sequence[LoraAdapter],
    target: Target,
    device: str,
    profile: Consumer | None,
) -> dict[str, int]:
    """Each module's rank: from the target, after a first pass for each module's spectrum where it needs one;
    refused where the largest is more than ``profile`` loads."""
    fixed = sum(math.prod(c.spec.shape) for c in copies)  # whole tensors are charged to a budget too
    spectra = None
    if target.energy is not None or target.budget is not None:  # a first pass: each module's spectrum
        inputs = [a.checkpoint for a in adapters]
        spectra = list(run(ops, inputs, Discard(), compute=spectrum, device=device).infos)
    ranks = {op.name: k for op, k in zip(ops, choose_ranks(ops, spectra, target, fixed), strict=True)}
    top = max(ranks.values())
    if profile is not None and profile.too_high(top):
        raise InvalidOptionError(
            f"--for {profile.name}: rank {top} is more than {profile.rank_limit} ({profile.max_rank}): "
            f"add --max-rank {profile.max_rank} (the best factors of that rank) or a lower --rank"
        )
    return ranks


def _method(target: Target, for_: str | None = None) -> dict[str, Any]:
    return target.method() | ({"for": for_} if for_ else {})


def _card(report: ResizeReport, command: str, title: str, base: str | None) -> str:
    what = (
        f"The weighted sum of {', '.join(f'`{a}` × {w:g}' for a, w in zip(report.inputs, report.weights, strict=True))}"
        if command == "combine"
        else f"`{report.inputs[0]}` at a lower rank"
    )
    lines = [
        f"{what}: {report.parameters:,} LoRA parameters, {100 * report.kept:.2f}% of ‖ΔW‖² kept "
        f"({method_words(report.method)}).",
    ]
    weights = [f"--weight={w:g}" for w in report.weights] if any(w != 1.0 for w in report.weights) else []
    lines += made_by("lorasurgeon", command, *report.inputs, *weights, *method_flags(report.method), "-o", title)
    return model_card(kind="adapter", base=base, title=title, lines=lines)
