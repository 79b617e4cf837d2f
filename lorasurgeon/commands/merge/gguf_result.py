"""merge / unmerge into a GGUF model, written as GGUF (``-o NAME.gguf``): one file like the base -- its metadata,
tokenizer and every tensor the adapters do not change, byte for byte -- with each changed tensor computed in
float32 as for any base and encoded in the base's type by gguf's own quantizer (``io.gguf_model_write``: the
types it cannot encode fall back to Q8_0, named in the report). What that costs is measured per weight as for
the other quantized formats (``RequantReport``: the error against the exact W0 + ΔW, the share of ΔW kept)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from ...engine.execute import ExecStats, Outcome, Progress, run
from ...engine.plan import Ref
from ...errors import InvalidOptionError, UnsupportedError
from ...io.checkpoint import Checkpoint
from ...io.gguf_file import SUFFIX, staged_gguf
from ...io.gguf_model import PLAIN, GgufModel
from ...io.gguf_model_write import GgufModelWriter, GgufTarget, encode, written_type
from .compute import compute_merge
from .ops import MergeOp, TensorOp
from .quantized import RequantReport, change_measures
from .settings import MergeSettings

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch


def wants_gguf(out: str | os.PathLike[str] | None) -> bool:
    """The result is a .gguf file (else a folder of safetensors)."""
    return out is not None and Path(out).suffix.lower() == SUFFIX


def check_gguf_result(base: Checkpoint, label: str, settings: MergeSettings) -> None:
    """A .gguf result is the base's own format: a GGUF base, merged in place of its tensors, in their types.

    Raises:
        InvalidOptionError: another base, or an option a .gguf result cannot honour, by name.
    """
    if base.format != "gguf":
        raise InvalidOptionError(
            f"{label}: not a GGUF model: a .gguf result keeps a GGUF base's own types (convert_hf_to_gguf.py makes "
            "a .gguf of a merged folder); give -o FOLDER for safetensors"
        )
    refused = {
        "--dtype": settings.dtype_name is not None,
        "--max-shard-size": settings.max_shard_size is not None,
        "--form augmented": settings.form == "augmented",
    }
    for option, given in refused.items():
        if given:
            raise InvalidOptionError(
                f"{option}: a .gguf result is one file in the base's own types and layout; drop {option}, or "
                "give -o FOLDER for safetensors"
            )


def gguf_targets(ops: Sequence[MergeOp], base: GgufModel) -> dict[str, GgufTarget]:
    """How each tensor the plan changes is written back into the base's file, by its transformers name.

    Raises:
        UnsupportedError: a changed tensor the base has no place for (a tied head untied), or one transformers'
            processor transformed in a way not inverted here.
    """
    targets: dict[str, GgufTarget] = {}
    for op in ops:
        if op.action == "copy":
            continue
        if not isinstance(op, TensorOp) or op.stack or op.name not in base.stored:
            raise UnsupportedError(
                f"{op.name}: the adapters make a tensor the GGUF base does not hold (a tied head changed apart from "
                "the embedding): a .gguf result keeps the base's tensors; give -o FOLDER for safetensors"
            )
        stored, info = base.stored[op.name], base.info(op.name)
        if stored.processed:
            raise UnsupportedError(
                f"{op.name}: transformers transforms this architecture's {info.key} when reading it, which is not "
                "undone here for a .gguf result; give -o FOLDER for safetensors"
            )
        assert info.key is not None  # every tensor of a GgufModel has its GGUF name
        ggml = written_type(stored.ggml, info.shape)
        targets[op.name] = GgufTarget(info.key, stored.ggml, ggml, stored.heads)
    return targets


def write_gguf(
    path: Path,
    ops: Sequence[MergeOp],
    inputs: Sequence[Checkpoint],
    targets: Mapping[str, GgufTarget],
    settings: MergeSettings,
    *,
    overwrite: bool,
    progress: Progress | None,
) -> ExecStats[RequantReport | None]:
    """The .gguf result at ``path``: the base's file, the changed tensors re-encoded; whole or not at all."""
    changed = [op for op in ops if op.action != "copy"]
    workers, threads = settings.compute_workers()
    with staged_gguf(path, overwrite=overwrite) as staged:
        sink = GgufModelWriter(inputs[0].root, staged, targets)
        try:
            compute = partial(compute_encoded, targets=targets, allow_nonfinite=settings.allow_nonfinite)
            stats: ExecStats[RequantReport | None] = run(
                changed, inputs, sink, device=settings.device, progress=progress, compute=compute,
                workers=workers, threads=threads,
            )  # fmt: skip
        finally:
            sink.close()
    return dataclasses.replace(stats, bytes_written=path.stat().st_size)


def compute_encoded(
    op: TensorOp,
    tensors: Mapping[Ref, torch.Tensor],
    device: torch.device,
    *,
    targets: Mapping[str, GgufTarget],
    allow_nonfinite: bool = False,
) -> Outcome[RequantReport | None]:
    """One changed tensor: merged in float32 as for any base, encoded in its GGUF type, the cost measured."""
    w0 = tensors[op.src].to(torch.float32)
    given = {**tensors, op.src: w0.clone()}
    exact = compute_merge(dataclasses.replace(op, dtype_name="F32"), given, device, allow_nonfinite=allow_nonfinite)
    exact_w = exact.outputs[0][1].to("cpu", torch.float32)
    target = targets[op.name]
    raw, stored = encode(target, exact_w)
    if target.ggml in PLAIN:  # rounded once, as any plain result: nothing quantized to report
        return Outcome([(op.name, raw)], None)
    (delta, error), kept = change_measures(w0, exact_w, stored)
    norm, w0_norm = float(torch.linalg.vector_norm(exact_w)), float(torch.linalg.vector_norm(w0))
    values = _block_values(target.ggml)
    changed = int((exact_w != w0).reshape(-1, values).any(dim=1).sum())
    method = f"GGUF {target.was}" + (f" as {target.ggml}" if target.ggml != target.was else "")
    report = RequantReport(
        op.name,
        method,
        exact_w.numel() // values,
        changed,
        changed,
        delta / w0_norm if w0_norm else float("inf"),
        error / norm if norm else 0.0,
        error / norm if norm else 0.0,  # each changed block is encoded afresh by the format's own rule
        kept,
    )
    return Outcome([(op.name, raw)], report)


def _block_values(ggml: str) -> int:
    """Values a block of the type holds (1 for F32, F16, BF16)."""
    import gguf

    return int(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml]][0])
