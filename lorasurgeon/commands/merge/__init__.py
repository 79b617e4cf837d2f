"""merge, unmerge and convert: options checked, a plan made from headers, the engine run, the result written."""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import get_args

import torch

from ...adapter.config import CONFIG_NAME, AdapterConfig
from ...adapter.weights import LoraAdapter, load_adapter
from ...engine.execute import ExecStats, Progress, run
from ...engine.plan import Ref
from ...errors import InvalidOptionError
from ...hub.cards import CARD_NAME, convert_card, merge_card
from ...io.checkpoint import Checkpoint, open_checkpoint
from ...io.layout import Shard, parse_size, plan_shards, shards_like
from ...io.sidecar import config_bytes, edit_config, is_tied, read_config, sidecar_files
from ...io.writer import CheckpointWriter
from .._inputs import Input, prepare, refuse_quantized
from . import augmented as augment
from .compute import compute_merge
from .ops import ACTIONS, Plan, TensorOp
from .plan import ModelFacts, check_supported, plan_merge
from .report import MergeReport
from .settings import Form, MergeSettings, Target

__all__ = ["MergeReport", "MergeSettings", "convert", "merge", "unmerge"]

DEFAULT_SHARD = "5GB"
Paths = Sequence[str | os.PathLike[str]]


def merge(
    base: str | os.PathLike[str],
    adapters: Paths,
    out: str | os.PathLike[str] | None,
    *,
    weights: Sequence[float] | None = None,
    form: Form = "merged",
    dtype: str | torch.dtype | None = "auto",
    device: str = "cpu",
    max_shard_size: str | int | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    unmerge: bool = False,
    allow_nonfinite: bool = False,
    progress: Progress | None = None,
) -> MergeReport:
    """Merge PEFT LoRA adapters into a base model: W = W0 + Σ wᵢ·ΔWᵢ in float32, rounded once, streamed.

    Args:
        base: the base model: a folder, a file, or a Hub repo id ``org/name[@revision]``.
        adapters: PEFT adapter folders (or Hub ids), applied in order.
        out: the result folder; may be None with ``dry_run``.
        weights: one per adapter (default 1.0 each).
        form: "merged" (the plain architecture) or "augmented" (the LoRA layers inside; one adapter).
        dtype: "auto" (each tensor keeps the base's dtype) or a floating dtype for every float tensor.
        device: "cpu", "cuda" or "cuda:N" for the arithmetic.
        max_shard_size: e.g. "5GB"; by default the base's file names and shard layout are kept.
        overwrite: replace ``out`` if it is an earlier lorasurgeon result (or empty).
        dry_run: plan only: headers are read, nothing is written.
        unmerge: subtract instead of add; the same as :func:`unmerge`.
        allow_nonfinite: write results holding NaN/Inf instead of stopping at the first one.
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
    settings = MergeSettings.parse(
        adapters=len(adapters),
        weights=weights,
        form=form,
        dtype=dtype,
        device=device,
        max_shard_size=max_shard_size,
        allow_nonfinite=allow_nonfinite,
        unmerge=unmerge,
    )
    return _merge(base, adapters, out, settings, overwrite=overwrite, dry_run=dry_run, progress=progress)


def unmerge(
    merged: str | os.PathLike[str],
    adapters: Paths,
    out: str | os.PathLike[str] | None,
    *,
    weights: Sequence[float] | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str = "cpu",
    max_shard_size: str | int | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    allow_nonfinite: bool = False,
    progress: Progress | None = None,
) -> MergeReport:
    """Take adapters back out of a merged model: W0 = W − Σ wᵢ·ΔWᵢ, or an adapter's own saved W0, exactly.

    DoRA (its norm is lost in the merge), modules_to_save, trained biases and trainable tokens
    replaced weights outright and are refused.

    Args:
        merged: the merged model (folder, file or Hub repo id).
        adapters, out, weights, dtype, device, max_shard_size, overwrite, dry_run, allow_nonfinite,
            progress: as for :func:`merge`.

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
    settings = MergeSettings.parse(
        adapters=len(adapters),
        weights=weights,
        dtype=dtype,
        device=device,
        max_shard_size=max_shard_size,
        allow_nonfinite=allow_nonfinite,
        unmerge=True,
    )
    return _merge(merged, adapters, out, settings, overwrite=overwrite, dry_run=dry_run, progress=progress)


def convert(
    augmented: str | os.PathLike[str],
    out: str | os.PathLike[str] | None,
    *,
    to: Target,
    dtype: str | torch.dtype | None = "auto",
    device: str = "cpu",
    max_shard_size: str | int | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    allow_nonfinite: bool = False,
    progress: Progress | None = None,
) -> MergeReport:
    """Turn an augmented checkpoint (``merge(form="augmented")``) into the merged form or a PEFT adapter.

    Args:
        augmented: the augmented checkpoint (folder, file or Hub repo id).
        out: the result folder; may be None with ``dry_run``.
        to: "merged" (the same as merging its adapter into its base) or "adapter" (the adapter folder).
        dtype, device, max_shard_size, overwrite, dry_run, allow_nonfinite, progress: as for :func:`merge`.

    Returns:
        A MergeReport (form "merged" or "adapter").

    Raises:
        InvalidOptionError: an option that cannot be used (weights, dtype, device, sizes).
        InputNotFoundError, CorruptCheckpointError, UnsafeCheckpointError: an input that cannot be read.
        AdapterConfigError: adapter_config.json is missing or invalid.
        IncompatibleError: inputs that do not belong together, or arguments of the wrong kind.
        UnsupportedError: a PEFT variant or a quantized checkpoint it does not handle.
        OutputError, OutputExistsError: ``out`` cannot or may not be written.
        NonFiniteError: a result holds NaN or Inf (unless ``allow_nonfinite``).
    """
    if to not in get_args(Target):
        raise InvalidOptionError(f"unknown target form {to!r}: choose merged or adapter")
    settings = MergeSettings.parse(
        adapters=1, dtype=dtype, device=device, max_shard_size=max_shard_size, allow_nonfinite=allow_nonfinite
    )
    (source,) = prepare(
        [Input(augmented, "AUGMENTED", "augmented")], out, command="convert", overwrite=overwrite, device=device
    )
    with open_checkpoint(source.path) as ckpt:
        config = read_config(ckpt.folder)
        refuse_quantized(ckpt, config, role="the augmented checkpoint", command="convert")
        adapter_config = AdapterConfig.load(ckpt.folder)
        base, adapter = augment.split_augmented(ckpt, adapter_config, is_tied(config))
        extra: dict[str, bytes] = {}
        copies: list[Path] = []
        if to == "merged":
            facts = ModelFacts(config.get("model_type"), is_tied(config))
            ops, untie = plan_merge(base, [adapter], [1.0], facts, dtype=settings.dtype)
            inputs = [base, adapter.checkpoint]
            shards = _layout(ops, base, settings.max_shard_size)
            if config:
                extra["config.json"] = config_bytes(edit_config(config, dtype=settings.dtype, untie=untie))
            copies = [p for p in sidecar_files(ckpt.folder) if p.name not in extra]
            index_name: str | None = "model.safetensors.index.json"
        else:
            ops = [
                TensorOp(
                    k,
                    Ref(0, k),
                    settings.dtype if settings.dtype and i.dtype.is_floating_point else i.dtype,
                    i.shape,
                    "lora",
                )
                for k, i in ((k, adapter.checkpoint.info(k)) for k in adapter.checkpoint)
            ]
            inputs, untie = [adapter.checkpoint], False
            shards = plan_shards([op.spec for op in ops], max_shard_size=None, prefix="adapter_model")
            extra[CONFIG_NAME] = config_bytes(dict(adapter_config.raw))
            index_name = None
        plan = Plan(tuple(ops), (str(source.path),))
        if dry_run:
            return _report(out, to, plan, None, untie)
        if out is None:
            raise InvalidOptionError("an output folder is needed (or use dry_run)")
        extra[CARD_NAME] = convert_card(
            title=Path(out).name, source=source.label, base=adapter_config.base_model, to=to
        ).encode()
        stats = _write(
            out,
            ops,
            inputs,
            shards,
            settings,
            extra_files=extra,
            copy_files=copies,
            overwrite=overwrite,
            progress=progress,
            index_name=index_name,
        )
        return _report(out, to, plan, stats, untie)


def _merge(
    base: str | os.PathLike[str],
    adapters: Paths,
    out: str | os.PathLike[str] | None,
    settings: MergeSettings,
    *,
    overwrite: bool,
    dry_run: bool,
    progress: Progress | None,
) -> MergeReport:
    command = settings.command
    base_src, *adapter_srcs = prepare(
        [
            Input(base, "MERGED" if settings.unmerge else "BASE", "model"),
            *(Input(a, "ADAPTER", "adapter") for a in adapters),
        ],
        out,
        command=command,
        overwrite=overwrite,
        device=settings.device,
    )
    form = "unmerged" if settings.unmerge else settings.form
    loaded: list[LoraAdapter] = []
    with open_checkpoint(base_src.path) as ckpt:
        try:
            config = read_config(ckpt.folder)
            refuse_quantized(
                ckpt, config, role="the merged model" if settings.unmerge else "the base model", command=command
            )
            for src, w in zip(adapter_srcs, settings.weights, strict=True):
                loaded.append(load_adapter(src.path))
                check_supported(loaded[-1], unmerge=settings.unmerge, weight=w)
            facts = ModelFacts(config.get("model_type"), is_tied(config))
            if settings.form == "augmented":
                ops, untie = augment.augmented_ops(ckpt, loaded[0], facts.tied, settings.dtype), False
            else:
                ops, untie = plan_merge(
                    ckpt, loaded, list(settings.weights), facts, dtype=settings.dtype, unmerge=settings.unmerge
                )
            plan = Plan(tuple(ops), (str(base_src.path), *(str(a.path) for a in adapter_srcs)))
            if dry_run:
                return _report(out, form, plan, None, untie)
            if out is None:
                raise InvalidOptionError("an output folder is needed (or use dry_run)")
            extra: dict[str, bytes] = {}
            if config:
                extra["config.json"] = config_bytes(edit_config(config, dtype=settings.dtype, untie=untie))
            if settings.form == "augmented":
                extra[CONFIG_NAME] = config_bytes(dict(loaded[0].config.raw))
            extra[CARD_NAME] = merge_card(
                title=Path(out).name,
                form=settings.form,
                unmerge=settings.unmerge,
                base=base_src.label,
                adapters=[a.label for a in adapter_srcs],
                weights=settings.weights,
                untied=untie,
                dtype=settings.dtype_words,
            ).encode()
            copies = [p for p in sidecar_files(ckpt.folder) if p.name not in extra]
            stats = _write(
                out,
                ops,
                [ckpt] + [a.checkpoint for a in loaded],
                _layout(ops, ckpt, settings.max_shard_size),
                settings,
                extra_files=extra,
                copy_files=copies,
                overwrite=overwrite,
                progress=progress,
            )
            return _report(out, form, plan, stats, untie)
        finally:
            for a in loaded:
                a.close()


def _layout(
    ops: Sequence[TensorOp], base: Checkpoint, max_shard_size: int | None, prefix: str = "model"
) -> list[Shard]:
    specs = [op.spec for op in ops]
    if max_shard_size is not None:
        return plan_shards(specs, max_shard_size=max_shard_size, prefix=prefix)
    if base.format == "safetensors-sharded":
        # Each tensor goes to the shard its source lives in (the base's own, for a tensor the
        # adapter replaced): the base's file names and layout, also for renamed views.
        homes = {op.name: op.src.key if op.src.source == 0 else op.name for op in ops}
        weight_map = {name: base.info(home).file.name for name, home in homes.items() if home in base}
        return shards_like(specs, weight_map, fallback=base.files[-1].name)
    if base.format == "safetensors":
        return plan_shards(specs, max_shard_size=None, prefix=prefix)
    return plan_shards(specs, max_shard_size=parse_size(DEFAULT_SHARD), prefix=prefix)


def _write(
    out: str | os.PathLike[str],
    ops: Sequence[TensorOp],
    inputs: Sequence[Checkpoint],
    shards: list[Shard],
    settings: MergeSettings,
    *,
    extra_files: dict[str, bytes],
    copy_files: list[Path],
    overwrite: bool,
    progress: Progress | None,
    index_name: str | None = "model.safetensors.index.json",
) -> ExecStats[None]:
    with CheckpointWriter(out, shards, overwrite=overwrite, index_name=index_name) as writer:
        for path in copy_files:
            writer.copy_file(path)
        for name, data in extra_files.items():
            writer.add_file(name, data)
        return run(
            ops,
            inputs,
            writer,
            device=settings.device,
            progress=progress,
            compute=partial(compute_merge, allow_nonfinite=settings.allow_nonfinite),
        )


def _report(
    out: str | os.PathLike[str] | None, form: str, plan: Plan, stats: ExecStats[None] | None, untie: bool
) -> MergeReport:
    counts = {a: plan.count(a) for a in ACTIONS}
    return MergeReport(
        None if stats is None else str(out),
        form,
        plan,
        counts,
        stats.bytes_written if stats else plan.nbytes,
        stats.seconds if stats else 0.0,
        untie,
        stats is None,
    )
