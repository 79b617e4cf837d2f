"""merge, unmerge and iter_merged: options checked, a plan made from headers, the engine run, the result written."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from ...adapter.config import CONFIG_NAME
from ...engine.execute import Progress, stream
from ...hub.cards import merge_card
from ...io.sidecar import config_bytes, edit_config
from .._inputs import Output
from .._timing import timed
from .compute import compute_op
from .gguf_result import write_gguf
from .ops import Plan
from .prepare import AdapterPaths, Planned, plan_run
from .report import MergeReport
from .settings import Form, MergeSettings
from .write import layout, report, write_model

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch

__all__ = ["MergeReport", "MergeSettings", "Output", "iter_merged", "merge", "run", "unmerge"]

Paths = AdapterPaths | str | os.PathLike[str]  # what the public functions take: one adapter may come alone


def _adapter_list(adapters: Paths) -> list[str | os.PathLike[str]]:
    """One adapter given alone (a path or repo id, not in a list) is a list of one, not a list of characters."""
    return [adapters] if isinstance(adapters, str | os.PathLike) else list(adapters)


@timed
def merge(
    base: str | os.PathLike[str],
    adapters: Paths,
    out: str | os.PathLike[str] | None,
    *,
    weights: Sequence[float] | None = None,
    form: Form = "merged",
    dtype: str | torch.dtype | None = "auto",
    quantize: str | None = None,
    device: str = "cpu",
    max_shard_size: str | int | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    stream: bool = False,
    unmerge: bool = False,
    allow_nonfinite: bool = False,
    workers: int | None = None,
    cluster: str | None = None,
    progress: Progress | None = None,
) -> MergeReport:
    """Merge PEFT LoRA adapters into a base model: W = W0 + Σ wᵢ·ΔWᵢ in float32, rounded once, streamed.

    Args:
        base: the base model: a folder, a file, or a Hub repo id ``org/name[@revision]``.
        adapters: PEFT adapter folders (or Hub ids), applied in order; one may be given alone.
        out: the result folder; may be None with ``dry_run``.
        weights: one per adapter (default 1.0 each).
        form: "merged" (the plain architecture) or "augmented" (the LoRA layers inside; one adapter).
        dtype: "auto" (each tensor keeps the base's dtype) or a floating dtype for every float tensor; with a
            quantized base, a dtype gives a plain (dequantized) result without its quantization_config.
        quantize: "keep": a quantized base's result in its own format (the default for one, unless ``dtype``
            is given): changed weights re-quantized block by block, the rest copied byte for byte; the cost
            of each in the report and in ``out``/requantization.json.
        device: "cpu", "cuda" or "cuda:N" for the arithmetic.
        max_shard_size: e.g. "5GB"; by default the base's file names and shard layout are kept.
        overwrite: replace ``out`` if it is an earlier lorasurgeon result (or empty).
        dry_run: plan only: headers are read, nothing is written (a Hub input's by range: no weights downloaded).
        stream: a Hub input's weights read in place, by HTTP range, as the plan reads them, instead of downloaded:
            the disk holds the result only.
        unmerge: deprecated: call :func:`unmerge` (this warns, and does the same).
        allow_nonfinite: write results holding NaN/Inf instead of stopping at the first one.
        workers: tensors computed at once on the CPU (default: one per core the reader and writer leave, at
            most 8, each on one torch thread); the result is the same bytes whatever the number.
        cluster: "ray": one Ray task per result shard on the cluster at RAY_ADDRESS (else a local one), inputs and
            ``out`` on storage every node sees; the same bytes as one process (engine.cluster).
        progress: told the bytes to write and each tensor written (the CLI's progress bar).

    Returns:
        A MergeReport: tensors by action, bytes, seconds, whether tied embeddings were untied; with
        ``dry_run`` its ``summary()`` is the plan.

    Raises:
        InvalidOptionError: an option that cannot be used (weights, dtype, device, sizes).
        InputNotFoundError, CorruptCheckpointError, UnsafeCheckpointError: an input that cannot be read.
        AdapterConfigError: adapter_config.json is missing or invalid.
        IncompatibleError: inputs that do not belong together, or arguments of the wrong kind.
        UnsupportedError: a PEFT variant or a quantized checkpoint it does not handle.
        OutputError, OutputExistsError: ``out`` cannot or may not be written.
        NonFiniteError: a result holds NaN or Inf (unless ``allow_nonfinite``).
    """
    if unmerge:
        warnings.warn("merge(unmerge=True) is unmerge(...): call that instead", FutureWarning, stacklevel=3)
    adapters = _adapter_list(adapters)
    settings = MergeSettings.parse(
        adapters=len(adapters),
        weights=weights,
        form=form,
        dtype=dtype,
        quantize=quantize,
        device=device,
        max_shard_size=max_shard_size,
        allow_nonfinite=allow_nonfinite,
        unmerge=unmerge,
        workers=workers,
        cluster=cluster,
    )
    return run(base, adapters, Output(out, overwrite, dry_run, progress, stream), settings)


@timed
def unmerge(
    merged: str | os.PathLike[str],
    adapters: Paths,
    out: str | os.PathLike[str] | None,
    *,
    weights: Sequence[float] | None = None,
    dtype: str | torch.dtype | None = "auto",
    quantize: str | None = None,
    device: str = "cpu",
    max_shard_size: str | int | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    stream: bool = False,
    allow_nonfinite: bool = False,
    workers: int | None = None,
    cluster: str | None = None,
    progress: Progress | None = None,
) -> MergeReport:
    """Take adapters back out of a merged model: W0 = W − Σ wᵢ·ΔWᵢ, or an adapter's own saved W0, exactly.

    DoRA (its norm is lost in the merge), modules_to_save, trained biases and trainable tokens
    replaced weights outright and are refused.

    Args:
        merged: the merged model (folder, file or Hub repo id).
        adapters, out, weights, dtype, quantize, device, max_shard_size, overwrite, dry_run, stream, allow_nonfinite,
            workers, cluster, progress: as for :func:`merge`.

    Returns:
        A MergeReport (form "unmerged").

    Raises:
        InvalidOptionError: an option that cannot be used (weights, dtype, device, sizes).
        InputNotFoundError, CorruptCheckpointError, UnsafeCheckpointError: an input that cannot be read.
        AdapterConfigError: adapter_config.json is missing or invalid.
        IncompatibleError: inputs that do not belong together, or arguments of the wrong kind.
        UnsupportedError: a PEFT variant or a quantized checkpoint it does not handle.
        OutputError, OutputExistsError: ``out`` cannot or may not be written.
        NonFiniteError: a result holds NaN or Inf (unless ``allow_nonfinite``).
    """
    adapters = _adapter_list(adapters)
    settings = MergeSettings.parse(
        adapters=len(adapters),
        weights=weights,
        dtype=dtype,
        quantize=quantize,
        device=device,
        max_shard_size=max_shard_size,
        allow_nonfinite=allow_nonfinite,
        unmerge=True,
        workers=workers,
        cluster=cluster,
    )
    return run(merged, adapters, Output(out, overwrite, dry_run, progress, stream), settings)


@timed
def run(base: str | os.PathLike[str], adapters: AdapterPaths, out: Output, settings: MergeSettings) -> MergeReport:
    """The merge (or, with ``settings.unmerge``, the unmerge) of ``adapters`` into ``base``, as ``settings`` say,
    written to ``out``: what :func:`merge` and :func:`unmerge` build their two objects for, and the CLI calls."""
    planned = plan_run(base, adapters, out.path, settings, overwrite=out.overwrite, in_place=out.in_place)
    form = "unmerged" if settings.unmerge else settings.form
    try:
        ops, untie, config = planned.ops, planned.untie, planned.config
        plan = Plan(
            tuple(ops),
            (str(planned.base.path), *(str(a.path) for a in planned.adapter_sources)),
            planned.names.source if planned.names else "",
        )
        if out.dry_run:
            return report(out.path, form, plan, None, untie, _notes(planned))
        if planned.gguf_path is not None and planned.gguf_targets is not None:
            gguf_args = (planned.gguf_path, ops, planned.inputs, planned.gguf_targets, settings)
            stats = write_gguf(*gguf_args, overwrite=out.overwrite, progress=out.progress)
            return report(planned.gguf_path, form, plan, stats, untie, _notes(planned))
        where = out.where()
        plain = planned.layout is not None and planned.stored is None
        edited = edit_config(config, dtype=settings.dtype_name, untie=untie, dequantized=plain) if config else None
        extra: dict[str, bytes] = {}
        if settings.form == "augmented":
            extra[CONFIG_NAME] = config_bytes(dict(planned.adapters[0].config.raw))
        card = merge_card(
            title=Path(where).name,
            form=settings.form,
            unmerge=settings.unmerge,
            base=planned.base.label,
            adapters=[a.label for a in planned.adapter_sources],
            weights=settings.weights,
            untied=untie,
            library="diffusers" if planned.checkpoint.format == "pipeline" or "_diffusers_version" in config else None,
            dtype=settings.dtype_words,
            quantization=_quantization_words(planned),
        )
        shards = layout(ops, planned.checkpoint, settings.max_shard_size, stored=planned.stored_input)
        stats = write_model(
            where,
            ops,
            planned.inputs,
            shards,
            settings,
            config=edited,
            card=card,
            folder=planned.checkpoint.folder,
            overwrite=out.overwrite,
            progress=out.progress,
            extra=extra,
            base_format=planned.checkpoint.format,
        )
        return report(where, form, plan, stats, untie, _notes(planned))
    finally:
        planned.close()


def _notes(planned: Planned) -> tuple[str, ...]:
    layout = planned.layout
    if layout is None or not layout.static_scales:
        return ()
    if planned.stored is None:
        return (
            f"{len(layout.static_scales)} static activation scales (input_scale, ...) of the quantized base left out",
        )
    return (
        f"{len(layout.static_scales)} static activation scales (input_scale, ...) copied as they are: they were "
        "calibrated on the base's activations, which the merged weights change; recalibrate if accuracy drops",
    )


def _quantization_words(planned: Planned) -> str:
    if planned.layout is None:
        return ""
    if planned.stored is None:
        return f"The base is quantized ({planned.layout.describe()}): it was dequantized (code × scale in float32)."
    return (
        f"Kept in the base's quantized format ({planned.layout.describe()}): each changed weight computed in "
        "float32 and re-quantized, blocks the adapters did not change byte for byte as in the base; "
        "requantization.json gives each weight's error."
    )


def iter_merged(
    base: str | os.PathLike[str],
    adapters: Paths,
    *,
    weights: Sequence[float] | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str = "cpu",
    allow_nonfinite: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """The merged model's tensors as ``(name, tensor)`` pairs, one at a time, in the base's order; nothing
    is written. For programs that hold tensors rather than folders (load them into a model in place,
    hand them to an inference server): the same arithmetic as :func:`merge`, the same streaming.

    Every check and the plan are done when it is called; the tensors are read and merged as the
    iterator is advanced. Iterate it to the end, or ``close()`` it, to release its inputs. When a
    tied head must be untied (the adapters changed the embedding and the head differently),
    ``lm_head.weight`` is yielded last and the model should be loaded with ``tie_word_embeddings=False``.

    Args:
        base, adapters, weights, dtype, device, allow_nonfinite: as for :func:`merge`.

    Returns:
        An iterator of (tensor name, CPU tensor) pairs.

    Raises:
        The errors of :func:`merge` (at the call, or NonFiniteError while iterating).
    """
    adapters = _adapter_list(adapters)
    settings = MergeSettings.parse(
        adapters=len(adapters), weights=weights, dtype=dtype, device=device, allow_nonfinite=allow_nonfinite
    )
    planned = plan_run(base, adapters, None, settings, overwrite=False)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        try:
            compute = partial(compute_op, allow_nonfinite=settings.allow_nonfinite)
            yield from stream(planned.ops, planned.inputs, compute=compute, device=settings.device)
        finally:
            planned.close()

    return tensors()
