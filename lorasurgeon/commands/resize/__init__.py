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

from ...adapter.formats.registry import adapter_writer, result_format
from ...adapter.weights import LoraAdapter
from ...consumers import Consumer
from ...engine.execute import Discard, Progress, Readable
from ...engine.execute import run as engine_run
from ...errors import InvalidOptionError, UnsupportedError
from ...hub.cards import CARD_NAME, made_by, method_flags, method_words, model_card
from ...io.checkpoint import Checkpoint
from ...io.dtypes import itemsize, torch_dtype
from ...io.sidecar import config_bytes, read_config
from ...io.spool import SpoolWriter
from .._inputs import Output, adapters_of, open_inputs, plain_weights, with_base
from ..extract.assemble import Factors
from .calibrated import attach, measure_for
from .compute import choose_ranks, factors, spectrum
from .plan import CopyOp, ModuleOp, check_adapter, check_same_base, plan_modules
from .report import ModuleResult, ResizeReport
from .settings import ResizeSettings, Target

__all__ = ["ModuleResult", "ResizeReport", "ResizeSettings", "Target", "combine", "resize", "run"]


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
    base: str | os.PathLike[str] | None = None,
    calibration: str | os.PathLike[str] | None = None,
    calibration_samples: int | None = None,
    max_length: int | None = None,
    calibration_split: str | None = None,
    calibration_column: str | None = None,
    calibration_model: str | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    dry_run: bool = False,
    stream: bool = False,
    cluster: str | None = None,
    progress: Progress | None = None,
) -> ResizeReport:
    """An adapter at a lower rank: per module the best rank-k factors of its own B A (Eckart–Young),
    found by QR of B and Aᵀ and the SVD of the small core, never forming the dense ΔW.

    Args:
        adapter: an adapter folder (or Hub id) in a format lorasurgeon reads, or a llama.cpp .gguf adapter file.
        out: the new adapter folder (None with ``dry_run``).
        rank, energy, budget, budget_params: one of: a rank for every module; per module the smallest rank
            keeping this share of ‖ΔW‖²; a size ("15MB", in the adapter's dtype) or a number of parameters
            for all LoRA factors together, spent where it removes the most squared error.
        max_rank: a cap per module.
        for_: "vllm" or "llama.cpp": make (or refuse by name) what that consumer needs: one alpha, scales in B
            (always), ranks within vLLM's 512, no whole tensors it refuses.
        base: the base model (folder, file or Hub id) a .gguf ``adapter`` is read against, and ``calibration`` runs;
            refused otherwise.
        calibration, calibration_samples, max_length, calibration_split, calibration_column, calibration_model: as
            for :func:`extract`: each module's new factors (and a budget's ranks) chosen by the output error on the
            samples, the model run being ``base`` with the adapter merged in (``calibration_model="base"``: the
            base alone).
        device, overwrite, dry_run, stream, progress: as for :func:`merge`.
        cluster: "ray": each layer's modules resized by a Ray task (on the cluster at RAY_ADDRESS, else a local
            one; the adapter and ``out`` on storage every node sees), the same bytes as one process.

    Returns:
        A ResizeReport: per module the rank in and out and the share of ‖ΔW‖² kept.

    Raises:
        InvalidOptionError: options that contradict each other or are out of range.
        UnsupportedError: DoRA, lora_bias, target_parameters, trainable tokens, variants.
    """
    settings = ResizeSettings.parse(
        adapters=1,
        rank=rank,
        energy=energy,
        budget=budget,
        budget_params=budget_params,
        max_rank=max_rank,
        for_=for_,
        device=device,
        base=base,
        calibration=calibration,
        calibration_samples=calibration_samples,
        max_length=max_length,
        calibration_split=calibration_split,
        calibration_column=calibration_column,
        calibration_model=calibration_model,
        cluster=cluster,
    )
    return run([adapter], Output(out, overwrite, dry_run, progress, stream), settings)


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
    base: str | os.PathLike[str] | None = None,
    calibration: str | os.PathLike[str] | None = None,
    calibration_samples: int | None = None,
    max_length: int | None = None,
    calibration_split: str | None = None,
    calibration_column: str | None = None,
    calibration_model: str | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    dry_run: bool = False,
    stream: bool = False,
    cluster: str | None = None,
    progress: Progress | None = None,
) -> ResizeReport:
    """One adapter for Σ wᵢ·ΔWᵢ: exact at rank Σ rᵢ (the factors stacked), or truncated optimally by the
    same QR + small-SVD route as :func:`resize` (PEFT's add_weighted_adapter "svd" forms each dense ΔW).

    Args:
        adapters: adapters of the same base model (folders, Hub ids, llama.cpp .gguf files).
        weights: one per adapter (default 1.0 each).
        allow_different_bases: combine adapters whose configs name different base models (one model under
            two names); their shapes are checked all the same.
        out, rank, energy, budget, budget_params, max_rank, for_, base, device, overwrite, dry_run, stream, cluster,
            progress, and the calibration's options: as for :func:`resize` (no target: exact; --calibration needs one).

    Returns:
        A ResizeReport.

    Raises:
        InvalidOptionError, UnsupportedError: as for :func:`resize`; modules_to_save is refused too.
        IncompatibleError: a module the adapters hold with different shapes; adapters whose configs name
            different base models (unless ``allow_different_bases``).
    """
    settings = ResizeSettings.parse(
        adapters=len(adapters),
        combining=True,
        weights=weights,
        rank=rank,
        energy=energy,
        budget=budget,
        budget_params=budget_params,
        max_rank=max_rank,
        for_=for_,
        allow_different_bases=allow_different_bases,
        device=device,
        base=base,
        calibration=calibration,
        calibration_samples=calibration_samples,
        max_length=max_length,
        calibration_split=calibration_split,
        calibration_column=calibration_column,
        calibration_model=calibration_model,
        cluster=cluster,
    )
    return run(list(adapters), Output(out, overwrite, dry_run, progress, stream), settings)


def run(paths: Sequence[str | os.PathLike[str]], out: Output, settings: ResizeSettings) -> ResizeReport:
    """Resize the adapter at ``paths[0]``, or combine those at ``paths`` (``settings.combining``), as ``settings``
    say, into ``out``: what :func:`resize` and :func:`combine` build their two objects for, and the CLI calls."""
    inputs = with_base(paths, settings.base, needed=settings.calibration is not None)
    with open_inputs(
        inputs,
        out.path,
        command=settings.command,
        overwrite=out.overwrite,
        device=settings.device,
        in_place=out.in_place,
    ) as opened:  # the base (--base) stays open while --calibration runs it
        read = opened[len(inputs) - len(paths) :]  # after --base, where given
        adapters = adapters_of(read)
        try:
            base = opened[0].checkpoint if settings.calibration is not None else None
            return _run(adapters, base, [o.source.label for o in read], out, settings)
        finally:
            for adapter in adapters:
                adapter.close()


def _run(
    adapters: list[LoraAdapter], base: Checkpoint | None, labels: list[str], out: Output, settings: ResizeSettings
) -> ResizeReport:
    ops, copies = _plan(adapters, labels[0], settings)
    dtype = adapters[0].checkpoint.info(ops[0].a_key).dtype_name
    target = Target.of(settings.sizing, itemsize(dtype))
    parameters_in = sum(op.rank * op.cost for op in ops)
    method = _method(target, settings.for_) | (
        {"calibration": settings.calibration.method()} if settings.calibration is not None else {}
    )
    if out.dry_run:
        results = [ModuleResult(op.name, op.rank, op.rank, 1.0, 0.0) for op in ops]
        planned_at = None if out.path is None else str(out.path)
        return ResizeReport(planned_at, labels, list(settings.weights), method, results, parameters_in, 0, 1.0, True)
    where = out.where()
    inputs: list[Readable] = [a.checkpoint for a in adapters]
    scratch: list[SpoolWriter] = []
    try:
        notes: list[str] = []
        if settings.calibration is not None:
            assert base is not None  # settings require --base with --calibration
            scratch.append(SpoolWriter(where, prefix="calibration", overwrite=out.overwrite))
            ops, notes, plain_base = _calibrate(ops, adapters, base, scratch[0], out, settings)
            inputs += [Factors(scratch[0]), plain_base]
        ranks = _ranks(ops, copies, inputs, target, settings.device, settings.consumer)
        return _write(ops, copies, inputs, adapters, ranks, labels, parameters_in, method, notes, where, out, settings)
    finally:
        for spool in scratch:
            spool.abort()


def _plan(adapters: Sequence[LoraAdapter], label: str, settings: ResizeSettings) -> tuple[list[ModuleOp], list[CopyOp]]:
    """The modules' ops and the whole tensors' copies, from the headers; what cannot be done refused by name."""
    for adapter in adapters:
        check_adapter(adapter, combining=settings.combining)
    if settings.combining and not settings.allow_different_bases:
        check_same_base(adapters)
    ops, copies = plan_modules(adapters, settings.weights)
    if not ops:
        raise UnsupportedError(f"{label}: no LoRA modules to {settings.command}")
    return ops, _copies_for(settings.consumer, adapters, copies, label)


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


def _calibrate(
    ops: list[ModuleOp],
    adapters: Sequence[LoraAdapter],
    base: Checkpoint,
    spool: SpoolWriter,
    out: Output,
    settings: ResizeSettings,
) -> tuple[list[ModuleOp], list[str], Checkpoint]:
    """--calibration: the model run on the samples layer by layer (resize.calibrated); the ops told where their
    moments and base weights are (inputs n and n + 1), a note saying what was measured, and the base as plain
    weights (a quantized one dequantized)."""
    assert settings.calibration is not None
    plain, _ = plain_weights(base, read_config(base), role=f"--base {settings.base}")
    measured, names = measure_for(
        settings.calibration, adapters, settings.weights, plain, spool, device=settings.device, progress=out.progress
    )
    return attach(ops, measured, names, len(adapters)), [measured.describe()], plain


def _write(
    ops: list[ModuleOp],
    copies: list[CopyOp],
    inputs: list[Readable],
    adapters: Sequence[LoraAdapter],
    ranks: dict[str, int],
    labels: list[str],
    parameters_in: int,
    method: dict[str, Any],
    notes: list[str],
    where: str | os.PathLike[str],
    out: Output,
    settings: ResizeSettings,
) -> ResizeReport:
    """The second pass: each module's factors at its rank written, then the report, card and config."""
    top = max(ranks.values())
    dtype = adapters[0].checkpoint.info(ops[0].a_key).dtype_name
    exact = Target.of(settings.sizing, itemsize(dtype)).exact
    writer = adapter_writer(where, overwrite=out.overwrite, name=result_format([a.format for a in adapters]))
    try:
        every: list[ModuleOp | CopyOp] = [*ops, *copies]
        compute = partial(factors, exact=exact, ranks=ranks, top=top, dtype=torch_dtype(dtype))
        if settings.cluster == "ray":
            stats = _on_ray(every, inputs, writer, compute, out.progress)
        else:
            stats = engine_run(every, inputs, writer, compute=compute, device=settings.device, progress=out.progress)
        by_name = {i.name: i for i in stats.infos if isinstance(i, ModuleResult)}
        results = [by_name[op.name] for op in ops]  # in the plan's order, wherever they were computed
        total = sum(r.energy for r in results)
        report = ResizeReport(
            str(where),
            labels,
            list(settings.weights),
            method,
            results,
            parameters_in,
            sum(r.rank * op.cost for r, op in zip(results, ops, strict=True)),
            sum(r.kept * r.energy for r in results) / total if total else 1.0,
            copied=[c.name for c in copies],
            notes=notes,
        )
        writer.add_file("resize_report.json", config_bytes(report.to_dict()))
        card = _card(report, settings.command, Path(where).name, adapters[0].config.base_model, settings.base)
        writer.add_file(CARD_NAME, card)
        writer.finish(_config(adapters, results, top, settings.combining))
        return report
    except BaseException:
        writer.abort()
        raise


def _ranks(
    ops: Sequence[ModuleOp],
    copies: Sequence[CopyOp],
    inputs: Sequence[Readable],
    target: Target,
    device: str,
    profile: Consumer | None,
) -> dict[str, int]:
    """Each module's rank: from the target, after a first pass for each module's spectrum where it needs one
    (under --calibration, the whitened one); refused where the largest is more than ``profile`` loads."""
    fixed = sum(math.prod(c.spec.shape) for c in copies)  # whole tensors are charged to a budget too
    spectra = None
    if target.energy is not None or target.budget is not None:  # a first pass: each module's spectrum
        spectra = list(engine_run(ops, inputs, Discard(), compute=spectrum, device=device).infos)
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


def _card(
    report: ResizeReport, command: str, title: str, base: str | None, given: str | os.PathLike[str] | None
) -> str:
    """The result's card; ``base``: its config's base model, ``given``: --base (a .gguf input's)."""
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
    flags = [*weights, *method_flags(report.method), *([f"--base={given}"] if given is not None else [])]
    lines += made_by("lorasurgeon", command, *report.inputs, *flags, "-o", title)
    return model_card(kind="adapter", base=base, title=title, lines=lines)


def _on_ray(every: list[ModuleOp | CopyOp], inputs: list[Readable], writer: Any, compute: Any, progress: Any) -> Any:
    """--cluster ray: the second pass, one Ray task per decoder layer's modules (and one for the rest), each on as
    many torch threads as this process has (the same factors, bit for bit); the tensors sent back and written here."""
    import torch

    from ...engine.cluster import groups_by, run_on_ray

    layer = re.compile(r"\.(\d+)\.")
    groups = groups_by(every, lambda op: f"layer {m.group(1)}" if (m := layer.search(op.name)) else "the rest")
    stats, _ = run_on_ray(groups, inputs, writer, compute=compute, threads=torch.get_num_threads(), progress=progress)
    return stats
