"""extract: a fine-tune minus its base becomes a PEFT LoRA adapter, streamed tensor by tensor."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...adapter.formats.registry import adapter_writer
from ...calibration import measure, samples_for
from ...engine.execute import Progress, Readable
from ...engine.execute import run as engine_run
from ...errors import InvalidOptionError, LorasurgeonError, LorasurgeonWarning, UnsupportedError
from ...hub.cards import CARD_NAME, extract_card
from ...io.checkpoint import Checkpoint
from ...io.sidecar import read_config
from ...io.spool import SpoolWriter
from ...names import ModelNames, model_names
from ...ops.lowrank import Solver
from .._inputs import Input, Output, open_inputs, plain_weights
from .._timing import timed
from ..plot import check_plot_path, extract_figure, save
from .assemble import Factors
from .budget import spend
from .calibrated import calibrate_ops
from .compute import compute_extract
from .finish import Origin, adapter_rank, finish_adapter
from .plan import FACTORED, ExtractOp, plan_extract
from .profile import fold_for
from .report import ExtractReport, Skipped, Totals
from .settings import Embeddings, ExtractSettings, Extras

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch

__all__ = ["ExtractReport", "ExtractSettings", "extract", "run"]


@timed
def extract(
    base: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    out: str | os.PathLike[str] | None,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int | None = None,
    budget: str | int | None = None,
    for_: str | None = None,
    include: str | None = None,
    exclude: str | None = None,
    embeddings: Embeddings = "lowrank",
    extras: Extras = "full",
    solver: Solver = "auto",
    device: str = "cpu",
    seed: int = 0,
    dtype: str | torch.dtype = "float32",
    overwrite: bool = False,
    dry_run: bool = False,
    stream: bool = False,
    allow_nonfinite: bool = False,
    plot: str | os.PathLike[str] | None = None,
    to: str = "peft",
    conv_rank: int | None = None,
    calibration: str | os.PathLike[str] | None = None,
    calibration_samples: int | None = None,
    max_length: int | None = None,
    calibration_split: str | None = None,
    calibration_column: str | None = None,
    calibration_model: str | None = None,
    cluster: str | None = None,
    progress: Progress | None = None,
) -> ExtractReport:
    """Extract a PEFT LoRA adapter from ``finetuned`` − ``base`` by truncated SVD, streamed tensor by tensor.

    Args:
        base: the base model (a folder, a file, or a Hub repo id ``org/name[@revision]``).
        finetuned: the fine-tune of it, in the same architecture.
        out: the adapter folder to write (adapter_config.json, adapter_model.safetensors,
            extract_report.json, README.md); may be None with ``dry_run``.
        rank: a fixed rank for every module (capped by each matrix's own, and reported), or
        energy: per module, the smallest rank keeping this share of ‖ΔW‖² (capped by ``max_rank``); with
            ``budget``, a floor per module.
        budget: the adapter's size, "15MB" (in ``dtype``) or a number of parameters (int): each module's
            rank chosen to keep the most of Σ‖ΔW‖² within it, the whole tensors stored charged too.
        for_: "vllm" or "llama.cpp": one alpha, each module's scale in its B; what it cannot take refused.
        include / exclude: regexes on tensor names (re.search) choosing what is compared.
        embeddings: embedding changes (and a tied head's) as LoRA factors, stored whole, or left out.
        extras: changed norms, biases and other non-matrix tensors: stored whole, or left out.
        solver, seed: "randomized" (block Krylov, from ``seed``), "exact" (full SVD), or "auto"; device: "cpu", "cuda".
        dtype: of the LoRA factors (tensors stored whole keep the fine-tune's dtype).
        overwrite, dry_run, stream, allow_nonfinite, cluster, progress: as for :func:`merge` (a dry run: headers).
        plot: a picture (.png, .pdf, .svg; needs matplotlib): per module the share kept and the rank.
        to: the format written: "peft", "mlx", "kohya" (``out`` may be one .safetensors), "diffusers".
        conv_rank: a fixed rank for k×k convolutions (kohya's --conv_dim), 0 to leave them out; None: as the rest.
        calibration: samples (a text or JSONL file, chat messages in the model's chat template; a Hub dataset id,
            ``calibration_split`` / ``_column``): each module factored, and ``budget`` spent, by its output error on
            ``calibration_samples`` (128) of ≤ ``max_length`` (512) tokens, the fine-tune run layer by layer (or
            ``calibration_model="base"``).

    Returns:
        An ExtractReport (``to_dict()``: extract_report.json): per module rank, kept energy, error; tensors whole.

    Raises:
        InvalidOptionError: an option that cannot be used (both or neither of rank and energy, ...).
        InputNotFoundError, CorruptCheckpointError, UnsafeCheckpointError: an input that cannot be read.
        IncompatibleError: the two are not one architecture, or an argument is an adapter.
        UnsupportedError: a checkpoint quantized in a format lorasurgeon does not read.
        OutputError, OutputExistsError: ``out`` cannot or may not be written.
        NonFiniteError: a change holds NaN or Inf (unless ``allow_nonfinite``).
    """
    settings = ExtractSettings.parse(
        rank=rank, energy=energy, budget=budget, max_rank=max_rank, for_=for_, include=include, exclude=exclude,
        embeddings=embeddings, extras=extras, solver=solver, seed=seed, dtype=dtype, device=device,
        allow_nonfinite=allow_nonfinite, plot=plot, to=to, conv_rank=conv_rank, calibration=calibration,
        calibration_samples=calibration_samples, max_length=max_length, calibration_split=calibration_split,
        calibration_column=calibration_column, calibration_model=calibration_model, cluster=cluster,
    )  # fmt: skip
    return run(base, finetuned, Output(out, overwrite, dry_run, progress, stream), settings)


@timed
def run(
    base: str | os.PathLike[str], finetuned: str | os.PathLike[str], out: Output, settings: ExtractSettings
) -> ExtractReport:
    """The adapter of ``finetuned`` − ``base``, as ``settings`` say, written to ``out``: what :func:`extract`
    builds its two objects for, and the CLI calls."""
    if settings.plot is not None and out.dry_run:
        raise InvalidOptionError("--plot draws what extract computed: it goes without --dry-run")
    picture = check_plot_path(settings.plot, [base, finetuned], overwrite=out.overwrite)
    inputs = [Input(base, "BASE", "model"), Input(finetuned, "FINETUNED", "model")]
    with open_inputs(
        inputs, out.path, command="extract", overwrite=out.overwrite, device=settings.device, in_place=out.in_place
    ) as opened:  # each checkpoint the kind check opened, read from here (its header parsed once)
        (base_src, b_raw), (tuned_src, t_raw) = ((o.source, o.checkpoint) for o in opened)
        assert b_raw is not None and t_raw is not None  # both kinds are checked, so both are open
        if base_src.path.resolve() == tuned_src.path.resolve():
            raise InvalidOptionError(f"{finetuned}: the base and the fine-tune are the same checkpoint")
        origin = Origin(base_src.label, tuned_src.label, str(out.path))
        planned = plan_pair(b_raw, t_raw, origin, settings)
        planned = replace(planned, folders=(tuned_src.path, base_src.path))
        if out.dry_run:
            return dry_report(planned, origin, settings)
        report = write_adapter(planned, out.where(), origin, settings, overwrite=out.overwrite, progress=out.progress)
    for warning in report.warnings:  # the adapter may not be what was meant: said on stderr, kept in the report
        warnings.warn(warning, LorasurgeonWarning, stacklevel=3)
    if picture is not None:
        save(extract_figure(report), picture, overwrite=out.overwrite)
        report = replace(report, plot=str(picture))
    return report


@dataclass(frozen=True)
class Planned:
    """What extract will compare, from the headers: the plain (dequantized where quantized) checkpoints, the
    fine-tune's names, the ops, how many tensors the filters left out, and notes on how the inputs are read."""

    base: Checkpoint
    tuned: Checkpoint
    tuned_names: ModelNames
    ops: list[ExtractOp]
    excluded: int
    read_as: list[str]
    base_names: ModelNames | None = None
    configs: tuple[dict[str, Any], dict[str, Any]] = ({}, {})  # the base's and the fine-tune's config.json
    folders: tuple[Path, ...] = ()  # the fine-tune's and the base's (their tokenizers, for --calibration)
    tied_head: bool = False  # the head is the embedding's tensor in both checkpoints


def plan_pair(b_raw: Checkpoint, t_raw: Checkpoint, origin: Origin, settings: ExtractSettings) -> Planned:
    b_cfg, t_cfg = read_config(b_raw), read_config(t_raw)
    # a quantized base (QLoRA, then a full fine-tune) is read by its values: the change is measured
    # against the dequantized base
    b_ckpt, b_quant = plain_weights(b_raw, b_cfg, role=f"{origin.base}: the base model")
    t_ckpt, t_quant = plain_weights(t_raw, t_cfg, role=f"{origin.finetuned}: the fine-tune")
    read_as = [
        f"{what} is quantized ({q.describe()}): read dequantized, the change measured against its values"
        for what, q in (("the base", b_quant), ("the fine-tune", t_quant))
        if q is not None
    ]
    tuned_names = model_names(t_ckpt.names(), t_cfg)
    base_names = model_names(b_ckpt.names(), b_cfg)
    ops, excluded = plan_extract(b_ckpt, t_ckpt, base_model=base_names, tuned_model=tuned_names, settings=settings)
    if settings.budget_params is not None and any(o.experts is not None for o in ops):
        raise UnsupportedError(
            f"{settings.budget_flag} with stacked MoE experts (target_parameters share one rank per module): "
            "use --rank or --energy, or --exclude the experts"
        )
    head = tuned_names.head
    tied = head is not None and all(
        head in names.tied_absent(set(ckpt)) for names, ckpt in ((base_names, b_ckpt), (tuned_names, t_ckpt))
    )
    return Planned(b_ckpt, t_ckpt, tuned_names, ops, excluded, read_as, base_names, (b_cfg, t_cfg), (), tied)


def dry_report(planned: Planned, origin: Origin, settings: ExtractSettings) -> ExtractReport:
    """The plan as a report: what would be compared, and how."""
    ops = planned.ops
    counts = {k: sum(o.kind == k for o in ops) for k in (*FACTORED, "bias", "full", "skip")}
    compared = f"{len(ops)} tensors compared ({planned.excluded} excluded): " + ", ".join(
        f"{n} {k}" for k, n in counts.items() if n
    )
    notes = [compared, *planned.read_as, *(o.note for o in ops if o.note)]
    if settings.calibration is not None:  # the samples are read (and checked); the model is not run
        cal = settings.calibration
        samples = samples_for(cal, planned.folders)
        whose = "the base's" if cal.model == "base" else "the fine-tune's"
        notes.append(f"would calibrate on {samples.source}: {whose} activations, measured layer by layer")
    nothing = Totals(0, 0, 0.0, 0.0, 0.0, "", [])
    skipped = Skipped(0, planned.excluded, [])
    return ExtractReport(
        None, origin.base, origin.finetuned, settings.method(), [], [], skipped, nothing, notes, dry_run=True
    )


def write_adapter(
    planned: Planned,
    out: str | os.PathLike[str],
    origin: Origin,
    settings: ExtractSettings,
    *,
    overwrite: bool,
    progress: Progress | None,
) -> ExtractReport:
    """Two passes through the engine. The first computes every changed matrix's factors (up to the cap under
    --budget) and each bias change into a scratch spool, reporting what the plan needs (ranks, singular values,
    energies); then the plan is decided from those results and the headers: the ranks within --budget, the
    scales --for folds into B, what is stored whole, the bias mode, the stacked experts. The second pass
    (extract.assemble) writes each adapter tensor once from the scratch spool or the fine-tune; then config,
    report, card, and the adapter is published."""
    factors = SpoolWriter(out, prefix="factors", overwrite=overwrite)  # the first pass's results, never published
    scratch = [factors]
    try:
        if settings.calibration is not None:  # each module's input moments, never published
            scratch.append(SpoolWriter(out, prefix="calibration", overwrite=overwrite))
        adapter = adapter_writer(out, overwrite=overwrite, name=settings.to)
    except BaseException:
        for spool in scratch:
            spool.abort()
        raise
    try:
        compute = partial(compute_extract, settings=settings)
        inputs: list[Checkpoint | Factors] = [planned.base, planned.tuned]
        ops, notes, tied_once = planned.ops, list(planned.read_as), False
        if settings.calibration is not None:
            ops, more, tied_once = calibrate(planned, settings, scratch[1], progress)
            inputs.append(Factors(scratch[1]))
            notes += more
        if settings.cluster == "ray":  # each layer's modules a task; their factors sent back into the spool
            stats = _on_ray(ops, inputs, factors, compute, progress)
        else:
            stats = engine_run(ops, inputs, factors, compute=compute, device=settings.device, progress=progress)
        if not any(i.status in ("lowrank", "full", "bias") for i in stats.infos):
            raise LorasurgeonError(f"{origin.finetuned}: no tensor differs from the base: there is nothing to extract")
        infos, computed = list(stats.infos), Factors(factors)
        if settings.budget_params is not None:
            infos, spent = spend(infos, computed, planned.tuned, settings)
            notes.append(spent)
        scales: dict[str, float] = {}
        if settings.for_ is not None:
            ranks = [i.stats.rank for i in infos if i.status == "lowrank" and i.stats is not None]
            scales = fold_for(infos, settings, adapter_rank(ranks, settings))
        report, config = finish_adapter(
            computed,
            adapter,
            infos,
            planned.tuned,
            planned.tuned_names,
            settings,
            origin,
            scales=scales,
            excluded=planned.excluded,
            seconds=stats.seconds,
            notes_before=notes,
            tied_once=tied_once,
        )
        adapter.add_file(CARD_NAME, _card(report, Path(out).name, origin))
        adapter.finish(config)
    except BaseException:
        adapter.abort()
        raise
    finally:
        for spool in scratch:
            spool.abort()
    return report


def _on_ray(
    ops: Sequence[ExtractOp], inputs: Sequence[Readable], spool: SpoolWriter, compute: Any, progress: Any
) -> Any:
    """--cluster ray: the first pass, one Ray task per decoder layer (and one for the rest), each on as many torch
    threads as this process has (the SVDs' sums split the same way: the same factors, bit for bit)."""
    import torch

    from ...engine.cluster import groups_by, run_on_ray

    layer = re.compile(r"\.(\d+)\.")
    groups = groups_by(ops, lambda op: f"layer {m.group(1)}" if (m := layer.search(op.name)) else "the rest")
    threads = torch.get_num_threads()
    stats, _ = run_on_ray(groups, inputs, spool, compute=compute, threads=threads, progress=progress)
    return stats


def calibrate(
    planned: Planned, settings: ExtractSettings, spool: SpoolWriter, progress: Progress | None
) -> tuple[list[ExtractOp], list[str], bool]:
    """--calibration: the chosen model run on the samples layer by layer, its moments spooled; the ops told where
    their statistics are (extract.calibrated), notes saying what was measured, and whether a tied pair is stored
    once."""
    cal = settings.calibration
    assert cal is not None and planned.base_names is not None
    on_base = cal.model == "base"
    measured = measure(
        cal,
        planned.base if on_base else planned.tuned,
        planned.base_names if on_base else planned.tuned_names,
        planned.configs[0 if on_base else 1],
        planned.folders,
        spool,
        whose="the base's" if on_base else "the fine-tune's",
        device=settings.device,
        progress=progress,
    )
    tie = planned.tied_head and settings.to == "peft"  # PEFT can load one change for both (ensure_weight_tying)
    ops, notes, once = calibrate_ops(planned.ops, measured.gathered, planned.tuned_names.head, tie)
    return ops, [measured.describe(), *notes], once


def _card(report: ExtractReport, title: str, origin: Origin) -> str:
    return extract_card(
        title=title,
        base=origin.base,
        finetuned=origin.finetuned,
        method=report.method,
        modules=report.modules,
        kept=report.totals.kept,
        parameters=report.totals.parameters,
        full=report.full,
        command=origin.command,
    )
