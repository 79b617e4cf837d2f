"""convert: the three things ``lorasurgeon convert`` does, one module each --

- ``from_augmented``: an augmented checkpoint (``merge --form augmented``) to the merged form or a PEFT adapter folder;
- ``model_dtype``: a model (a quantized one dequantized) to another dtype;
- ``gguf_adapter``: a PEFT adapter to a llama.cpp GGUF adapter file (``--to gguf``, :func:`to_gguf`).

No submodule is named like a function, so ``convert`` and ``to_gguf`` here are always the functions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast, get_args

from ...adapter.config import AdapterConfig
from ...engine.execute import Progress
from ...errors import InvalidOptionError
from ...hub.cards import CARD_NAME, convert_card
from ...io.checkpoint import open_checkpoint
from ...io.sidecar import read_config
from .._inputs import Input, Output, input_kind, prepare
from .._timing import timed
from ..merge import augmented as augment
from ..merge.ops import Plan
from ..merge.report import MergeReport
from ..merge.settings import MergeSettings, Target
from ..merge.write import report, write
from .from_augmented import augmented_target, to_adapter, to_merged
from .gguf_adapter import GgufReport, to_gguf
from .model_dtype import convert_model

if TYPE_CHECKING:
    import torch

__all__ = ["ConvertSettings", "GgufReport", "convert", "run", "to_gguf"]


@timed
def convert(
    augmented: str | os.PathLike[str],
    out: str | os.PathLike[str] | None,
    *,
    to: Target | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str = "cpu",
    max_shard_size: str | int | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
    stream: bool = False,
    allow_nonfinite: bool = False,
    progress: Progress | None = None,
) -> MergeReport:
    """Turn an augmented checkpoint (``merge(form="augmented")``) into the merged form or a PEFT adapter;
    or a model into another ``dtype``, streamed: a quantized model dequantized (block FP8,
    compressed-tensors, MXFP4, bitsandbytes), its quantization_config removed.

    Args:
        augmented: the augmented checkpoint, or a model (folder, file or Hub repo id).
        out: the result folder; may be None with ``dry_run``.
        to: "merged" (the same as merging its adapter into its base) or "adapter" (the adapter folder);
            needed for an augmented checkpoint, None (or "merged") for a model.
        dtype, device, max_shard_size, overwrite, dry_run, stream, allow_nonfinite, progress: as for :func:`merge`.

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
    settings = ConvertSettings.parse(
        to=to, dtype=dtype, device=device, max_shard_size=max_shard_size, allow_nonfinite=allow_nonfinite
    )
    return run(augmented, Output(out, overwrite, dry_run, progress, stream), settings)


@dataclass(frozen=True)
class ConvertSettings:
    """How to convert: the target form (``to``) and the merge settings the writing takes (dtype, device, shard
    size, allow_nonfinite). Make it with :meth:`parse`, which checks every option by name."""

    to: Target | None
    merge: MergeSettings

    @classmethod
    def parse(
        cls,
        *,
        to: str | None = None,
        dtype: str | torch.dtype | None = "auto",
        device: str = "cpu",
        max_shard_size: str | int | None = None,
        allow_nonfinite: bool = False,
    ) -> ConvertSettings:
        if to is not None and to not in get_args(Target):
            raise InvalidOptionError(f"unknown target form {to!r}: choose merged or adapter")
        merge = MergeSettings.parse(
            adapters=1, dtype=dtype, device=device, max_shard_size=max_shard_size, allow_nonfinite=allow_nonfinite
        )
        return cls(cast("Target | None", to), merge)


@timed
def run(augmented: str | os.PathLike[str], out: Output, settings: ConvertSettings) -> MergeReport:
    """Convert ``augmented`` (an augmented checkpoint, or a model) as ``settings`` say, into ``out``: what
    :func:`convert` builds its two objects for, and the CLI calls."""
    to, merge, overwrite = settings.to, settings.merge, out.overwrite
    (source,) = prepare(
        [Input(augmented, "INPUT")],
        out.path,
        command="convert",
        overwrite=overwrite,
        device=merge.device,
        in_place=out.in_place,
    )
    with open_checkpoint(source.path) as ckpt:
        config = read_config(ckpt)
        kind = input_kind(ckpt)
        if kind == "model" and to != "adapter":
            return convert_model(ckpt, config, source, out.path, merge, overwrite, out.dry_run, out.progress)
        to = augmented_target(ckpt, config, source, out.path, kind, to)
        adapter_config = AdapterConfig.load(ckpt.folder)
        base, adapter, names = augment.split_augmented(ckpt, adapter_config, config)
        if to == "merged":
            conversion = to_merged(ckpt, config, base, adapter, names, merge)
        else:
            conversion = to_adapter(adapter, adapter_config, merge)
        plan = Plan(tuple(conversion.ops), (str(source.path),), names.source)
        if out.dry_run:
            return report(out.path, to, plan, None, conversion.untie)
        where = out.where()
        conversion.extra[CARD_NAME] = convert_card(
            title=Path(where).name, source=source.label, base=adapter_config.base_model, to=to
        ).encode()
        stats = write(
            where,
            conversion.ops,
            conversion.inputs,
            conversion.shards,
            merge,
            extra_files=conversion.extra,
            copy_files=conversion.copies,
            overwrite=overwrite,
            progress=out.progress,
            index_name=conversion.index_name,
        )
        return report(where, to, plan, stats, conversion.untie)
