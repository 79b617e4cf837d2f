"""convert: an augmented checkpoint back to the merged form or to a PEFT adapter folder; a model (a
quantized one dequantized) to another dtype."""

from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

from ...adapter.config import CONFIG_NAME, AdapterConfig
from ...adapter.weights import LoraAdapter
from ...engine.execute import Progress
from ...engine.plan import Ref
from ...errors import InvalidOptionError, LorasurgeonError, UnsupportedError
from ...hub.cards import CARD_NAME, convert_card
from ...hub.source import Source
from ...io.checkpoint import Checkpoint, open_checkpoint
from ...io.dtypes import is_floating
from ...io.layout import Shard, plan_shards
from ...io.sidecar import config_bytes, edit_config, read_config, sidecar_files
from ...names import ModelNames, model_names
from .._inputs import Input, InputKind, expect_kind, input_kind, plain_weights, prepare
from .._timing import timed
from . import augmented as augment
from .ops import Plan, TensorOp
from .plan import plan_merge
from .report import MergeReport
from .settings import MergeSettings, Target
from .write import layout, report, write, write_model

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch


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
    if to is not None and to not in get_args(Target):
        raise InvalidOptionError(f"unknown target form {to!r}: choose merged or adapter")
    settings = MergeSettings.parse(
        adapters=1, dtype=dtype, device=device, max_shard_size=max_shard_size, allow_nonfinite=allow_nonfinite
    )
    (source,) = prepare([Input(augmented, "INPUT")], out, command="convert", overwrite=overwrite, device=device)
    with open_checkpoint(source.path) as ckpt:
        config = read_config(ckpt.folder)
        kind = input_kind(ckpt)
        if kind == "model" and to != "adapter":
            return _convert_model(ckpt, config, source, out, settings, overwrite, dry_run, progress)
        to = _augmented_target(ckpt, config, source, out, kind, to)
        adapter_config = AdapterConfig.load(ckpt.folder)
        base, adapter, names = augment.split_augmented(ckpt, adapter_config, config)
        if to == "merged":
            conversion = _to_merged(ckpt, config, base, adapter, names, settings)
        else:
            conversion = _to_adapter(adapter, adapter_config, settings)
        plan = Plan(tuple(conversion.ops), (str(source.path),), names.source)
        if dry_run:
            return report(out, to, plan, None, conversion.untie)
        if out is None:
            raise InvalidOptionError("an output folder is needed (or use dry_run)")
        conversion.extra[CARD_NAME] = convert_card(
            title=Path(out).name, source=source.label, base=adapter_config.base_model, to=to
        ).encode()
        stats = write(
            out,
            conversion.ops,
            conversion.inputs,
            conversion.shards,
            settings,
            extra_files=conversion.extra,
            copy_files=conversion.copies,
            overwrite=overwrite,
            progress=progress,
            index_name=conversion.index_name,
        )
        return report(out, to, plan, stats, conversion.untie)


def _augmented_target(
    ckpt: Checkpoint,
    config: dict[str, object],
    source: Source,
    out: str | os.PathLike[str] | None,
    kind: InputKind,
    to: Target | None,
) -> Target:
    """The form an augmented checkpoint is converted to; anything else given as one refused, saying what to run."""
    merging = kind == "adapter" and to == "merged"  # the adapter applied to its base: that is merge
    hint = _merge_instead(source.label, ckpt.folder, out) if merging else None
    expect_kind(source.path, source.label, role="INPUT", want="augmented", command="convert", hint=hint)
    if to is None:
        raise InvalidOptionError(f"{source.label} is an augmented checkpoint: give --to merged or --to adapter")
    if kind == "augmented" and plain_weights(ckpt, config, role=source.label)[1] is not None:
        raise UnsupportedError(f"{source.label}: a quantized augmented checkpoint is not something lorasurgeon reads")
    return to


@dataclasses.dataclass
class _Conversion:
    """What converting an augmented checkpoint writes: the ops, their inputs and shards, the files beside them."""

    ops: list[TensorOp]
    inputs: list[Checkpoint]
    shards: list[Shard]
    untie: bool
    extra: dict[str, bytes]  # file name -> its bytes (config, model card)
    copies: list[Path]  # sidecar files copied as they are
    index_name: str | None  # the shard index, when sharded


def _to_merged(
    ckpt: Checkpoint,
    config: dict[str, Any],
    base: Checkpoint,
    adapter: LoraAdapter,
    names: ModelNames,
    settings: MergeSettings,
) -> _Conversion:
    """The merged form: the adapter merged into its base, as ``merge`` would write it."""
    ops, untie = plan_merge(base, [adapter], [1.0], names, dtype=settings.dtype_name)
    extra: dict[str, bytes] = {}
    if config:
        extra["config.json"] = config_bytes(edit_config(config, dtype=settings.dtype_name, untie=untie))
    copies = [p for p in sidecar_files(ckpt.folder) if p.name not in extra]
    shards = layout(ops, base, settings.max_shard_size)
    return _Conversion(ops, [base, adapter.checkpoint], shards, untie, extra, copies, "model.safetensors.index.json")


def _to_adapter(adapter: LoraAdapter, adapter_config: AdapterConfig, settings: MergeSettings) -> _Conversion:
    """The adapter folder: the adapter's tensors under their saved names (one file), its adapter_config.json."""
    ops = [
        TensorOp(
            k,
            Ref(0, k),
            settings.dtype_name if settings.dtype_name and is_floating(i.dtype_name) else i.dtype_name,
            i.shape,
            "lora",
        )
        for k, i in ((k, adapter.checkpoint.info(k)) for k in adapter.checkpoint)
    ]
    shards = plan_shards([op.spec for op in ops], max_shard_size=None, prefix="adapter_model")
    extra = {CONFIG_NAME: config_bytes(dict(adapter_config.raw))}
    return _Conversion(ops, [adapter.checkpoint], shards, False, extra, [], None)


def _merge_instead(label: str, folder: Path, out: str | os.PathLike[str] | None) -> str:
    """What to run instead of ``convert ADAPTER --to merged``: merge, naming the base the adapter's config records."""
    try:
        base = AdapterConfig.load(folder).base_model
    except LorasurgeonError:
        base = None
    merge = shlex.join(["lorasurgeon", "merge", "BASE", label, "-o", str(out or "OUT")])
    named = f"; its config names {base!r}" if base else ""
    return f"; to merge it into its base model: `{merge}` (BASE: the model it was trained on{named})"


def _convert_model(
    ckpt: Checkpoint,
    config: dict[str, object],
    source: Source,
    out: str | os.PathLike[str] | None,
    settings: MergeSettings,
    overwrite: bool,
    dry_run: bool,
    progress: Progress | None,
) -> MergeReport:
    """A model in another dtype: every tensor read (a quantized one dequantized), rounded once, written."""
    view, quant = plain_weights(ckpt, config, role=f"{source.label}: the model")
    if settings.dtype_name is None:
        what = f"it is quantized ({quant.describe()}); " if quant is not None else ""
        raise InvalidOptionError(
            f"{source.label} is a model: {what}convert writes it in another --dtype (bfloat16, float16 or float32): "
            "give one (an augmented checkpoint takes --to merged|adapter)"
        )
    names = model_names(view.names(), config)
    ops, untie = plan_merge(view, [], [], names, dtype=settings.dtype_name)
    plan = Plan(tuple(ops), (str(source.path),), names.source)
    target = f"--dtype={settings.dtype_words}"
    if dry_run:
        return report(out, "converted", plan, None, untie)
    if out is None:
        raise InvalidOptionError("an output folder is needed (or use dry_run)")
    edited = edit_config(dict(config), dtype=settings.dtype_name, untie=untie, dequantized=quant is not None)
    stats = write_model(
        out,
        ops,
        [view],
        layout(ops, view, settings.max_shard_size),
        settings,
        config=edited if config else None,
        card=convert_card(title=Path(out).name, source=source.label, base=source.label, to=target),
        folder=ckpt.folder,
        overwrite=overwrite,
        progress=progress,
    )
    return report(out, "converted", plan, stats, untie)
