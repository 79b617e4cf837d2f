"""How a merge's result is laid out in shards, written through the engine, and reported."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...engine.execute import ExecStats, Progress, run
from ...hub.cards import CARD_NAME
from ...io.checkpoint import SAFETENSORS_INDEX, Checkpoint
from ...io.layout import Shard, parse_size, plan_shards, shards_like
from ...io.pipeline import pipeline_files, pipeline_shards
from ...io.sidecar import config_bytes, sidecar_files
from ...io.writer import SHARD_NAME, CheckpointWriter
from .compute import compute_op
from .ops import ACTIONS, MergeOp, Plan, RequantOp
from .quantized import RequantReport
from .report import MergeReport, ResultForm
from .settings import MergeSettings

if TYPE_CHECKING:
    pass

DEFAULT_SHARD = "5GB"
DIFFUSERS_STEM = "diffusion_pytorch_model"  # a diffusers model folder's weights (unet/, transformer/, vae/)
REQUANT_NAME = "requantization.json"  # per re-quantized weight, what keeping the base's format cost


def layout(
    ops: Sequence[MergeOp],
    base: Checkpoint,
    max_shard_size: int | None,
    prefix: str = "model",
    stored: tuple[int, Checkpoint] | None = None,
) -> list[Shard]:
    """The result's shards: the base's own file names and layout unless a shard size is given.

    ``stored``: (input number, checkpoint) of a quantized base as it is on disk, whose stored parts a
    re-quantized result writes back each to its own file."""
    specs = [spec for op in ops for spec in op.specs]
    if base.format == "pipeline":  # each component in its own folder, in files of the base's names
        return pipeline_shards(specs, _homes(ops, base, stored), base.root, max_shard_size)
    if base.root.is_dir() and base.files and base.files[0].name.startswith(DIFFUSERS_STEM):
        prefix = DIFFUSERS_STEM  # a diffusers model folder's files keep their name, or diffusers finds none
    if max_shard_size is not None:
        return plan_shards(specs, max_shard_size=max_shard_size, prefix=prefix)
    if base.format == "safetensors-sharded":
        # Each tensor goes to the shard its source lives in (the base's own, for a tensor the
        # adapter replaced): the base's file names and layout, also for renamed views.
        weight_map = {name: file.name for name, file in _homes(ops, base, stored).items()}
        return shards_like(specs, weight_map, fallback=base.files[-1].name)
    if base.format == "safetensors":
        return plan_shards(specs, max_shard_size=None, prefix=prefix)
    return plan_shards(specs, max_shard_size=parse_size(DEFAULT_SHARD), prefix=prefix)


def _homes(ops: Sequence[MergeOp], base: Checkpoint, stored: tuple[int, Checkpoint] | None) -> dict[str, Path]:
    """The base file each result tensor comes from (the base's own, for a tensor the adapter replaced)."""
    homes: dict[str, Path] = {}
    for op in ops:
        if isinstance(op, RequantOp):
            homes.update((i.name, i.file) for _, i in op.tensor.parts)
        elif stored is not None and op.src.source == stored[0]:
            homes[op.name] = stored[1].info(op.src.key).file
        elif (home := op.src.key if op.src.source == 0 else op.name) in base:
            homes[op.name] = base.info(home).file
    return homes


def write(
    out: str | os.PathLike[str],
    ops: Sequence[MergeOp],
    inputs: Sequence[Checkpoint],
    shards: list[Shard],
    settings: MergeSettings,
    *,
    extra_files: dict[str, bytes],
    copy_files: list[tuple[Path, str]],
    overwrite: bool,
    progress: Progress | None,
    index_name: str | None = SAFETENSORS_INDEX,
) -> ExecStats[RequantReport | None]:
    direct = False if settings.cluster else None  # other processes write into it: headers on disk at once
    with CheckpointWriter(out, shards, overwrite=overwrite, index_name=index_name, direct=direct) as writer:
        for path, relname in copy_files:
            writer.copy_file(path, relname)
        for name, data in extra_files.items():
            writer.add_file(name, data)
        workers, threads = settings.compute_workers()
        compute = partial(compute_op, allow_nonfinite=settings.allow_nonfinite)
        if settings.cluster == "ray":
            stats = _on_ray(ops, inputs, writer, compute, progress)
        else:
            stats = run(
                ops,
                inputs,
                writer,
                device=settings.device,
                progress=progress,
                compute=compute,
                workers=workers,
                threads=threads,
            )
        requantized = [i.to_dict() for i in stats.infos if i is not None]
        if requantized:
            writer.add_file(REQUANT_NAME, config_bytes({"weights": requantized}))
    # committed: the writer's own counters join the executor's (sync: finished shards' early fdatasync,
    # on a thread of its own while the run went on; commit: the last fsyncs, the index and the renames)
    return dataclasses.replace(
        stats, stages=stats.stages | {"sync": writer.sync_seconds, "commit": writer.commit_seconds}
    )


def _on_ray(
    ops: Sequence[MergeOp],
    inputs: Sequence[Checkpoint],
    writer: CheckpointWriter,
    compute: Any,
    progress: Progress | None,
) -> ExecStats[RequantReport | None]:
    """--cluster ray: one task per result shard (its ops: those whose tensor lands in it), each writing into
    the shard file the writer laid out; the writer told what they wrote."""
    from ...engine.cluster import groups_by, run_on_ray

    places = writer.placed()
    groups = groups_by(ops, lambda op: Path(places[op.name].path).name if op.name in places else "")
    # a task asks Ray for one CPU: it computes on one thread
    stats, names = run_on_ray(groups, inputs, places, compute=compute, threads=1, progress=progress)
    writer.written_elsewhere(names)
    return stats


def write_model(
    out: str | os.PathLike[str],
    ops: Sequence[MergeOp],
    inputs: Sequence[Checkpoint],
    shards: list[Shard],
    settings: MergeSettings,
    *,
    config: dict[str, Any] | None,
    card: str,
    folder: Path,
    overwrite: bool,
    progress: Progress | None,
    extra: Mapping[str, bytes] | None = None,
    base_format: str = "safetensors",
) -> ExecStats[RequantReport | None]:
    """:func:`write` for a model: its config.json (as edited), ``extra`` files, the model card, and the
    sidecar files of ``folder`` that none of those replaces (of a pipeline's, ``base_format`` "pipeline": every
    file but the weights, in its folder)."""
    files = {"config.json": config_bytes(config)} if config else {}
    files |= dict(extra or {})
    files[CARD_NAME] = card.encode()
    around = pipeline_files(folder) if base_format == "pipeline" else [(p, p.name) for p in sidecar_files(folder)]
    copies = [(p, rel) for p, rel in around if rel not in files]
    stem = SHARD_NAME.sub("", shards[0].filename) if shards else "model"  # model, diffusion_pytorch_model
    return write(
        out, ops, inputs, shards, settings, extra_files=files, copy_files=copies, overwrite=overwrite,
        progress=progress, index_name=f"{stem}.safetensors.index.json",
    )  # fmt: skip


def report(
    out: str | os.PathLike[str] | None,
    form: ResultForm,
    plan: Plan,
    stats: ExecStats[RequantReport | None] | None,
    untie: bool,
    notes: tuple[str, ...] = (),
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
        tuple(i for i in stats.infos if i is not None) if stats else (),
        notes,
        dict(stats.stages) if stats else {},
    )
