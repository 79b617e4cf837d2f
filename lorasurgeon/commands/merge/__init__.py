"""merge, unmerge and convert: plan from headers, execute streaming, write atomically."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import torch

from ...adapter.config import CONFIG_NAME, AdapterConfig
from ...adapter.weights import LoraAdapter, load_adapter
from ...engine.execute import Progress, run
from ...engine.plan import Ref
from ...errors import InvalidOptionError as OptionError, LorasurgeonError
from ...hub.cards import CARD_NAME, convert_card, merge_card
from ...hub.source import resolve_source
from ...io.checkpoint import Checkpoint, open_checkpoint
from ...io.layout import Shard, parse_size, plan_shards, shards_like
from ...io.sidecar import config_bytes, edit_config, is_tied, read_config, sidecar_files
from ...io.writer import CheckpointWriter
from .._inputs import (
    check_device, check_output, check_weights, expect_kind, output_dtype, parse_shard_size, refuse_quantized,
)
from . import augmented as augment
from .compute import compute_merge
from .ops import Plan, TensorOp, describe
from .plan import ModelFacts, check_supported, plan_merge

FORMS = ("merged", "augmented")
DEFAULT_SHARD = "5GB"


@dataclass(frozen=True)
class MergeReport:
    """What a merge/unmerge/convert did (or, with dry_run, would do). Every figure is measured in the run."""

    output: str | None
    form: str
    plan: Plan
    counts: dict[str, int]  # output tensors by action: merge, unmerge, restore, replace, copy, lora
    bytes: int
    seconds: float
    untied_embeddings: bool
    dry_run: bool

    @property
    def tensors_changed(self) -> int:
        return sum(n for a, n in self.counts.items() if a in ("merge", "unmerge", "restore", "replace"))

    @property
    def throughput(self) -> float:
        return self.bytes / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        if self.dry_run:
            return describe(self.plan)
        words = {"merge": "merged", "unmerge": "unmerged",
                 "restore": "restored exactly from the adapter's saved W0", "replace": "replaced by the adapter",
                 "copy": "copied", "lora": "LoRA tensors"}
        done = ", ".join(f"{n} {words[a]}" for a, n in self.counts.items() if n)
        text = (f"Wrote {self.output} ({self.form}): {sum(self.counts.values())} tensors ({done}), "
                f"{self.bytes / 2**20:.1f} MiB in {self.seconds:.2f} s ({self.throughput / 2**20:.0f} MiB/s).")
        if self.untied_embeddings:
            text += " Input and output embeddings now differ: both written, tie_word_embeddings=false."
        return text


def _layout(ops: Sequence[TensorOp], base: Checkpoint, max_shard_size: int | None,
            prefix: str = "model") -> list[Shard]:
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


def _write(out: Path, ops: list[TensorOp], inputs: list[Checkpoint], shards: list[Shard], *,
           extra_files: dict[str, bytes], copy_files: list[Path], overwrite: bool, device: str,
           progress: Progress | None, allow_nonfinite: bool,
           index_name: str | None = "model.safetensors.index.json"):
    with CheckpointWriter(out, shards, overwrite=overwrite, index_name=index_name) as writer:
        for path in copy_files:
            writer.copy_file(path)
        for name, data in extra_files.items():
            writer.add_file(name, data)
        stats = run(ops, inputs, writer, device=device, progress=progress,
                    compute=partial(compute_merge, allow_nonfinite=allow_nonfinite))
    return stats


def _report(out, form, plan, stats, untie, dry_run) -> MergeReport:
    counts = {a: plan.count(a) for a in ("merge", "unmerge", "restore", "replace", "copy", "lora")}
    return MergeReport(None if dry_run else str(out), form, plan, counts,
                       stats.bytes_written if stats else plan.nbytes, stats.seconds if stats else 0.0,
                       untie, dry_run)


def merge(base: str | os.PathLike[str], adapters: Sequence[str | os.PathLike[str]],
          out: str | os.PathLike[str] | None, *, weights: Sequence[float] | None = None,
          form: str = "merged", dtype: str | torch.dtype | None = "auto", device: str = "cpu",
          max_shard_size: str | int | None = None, overwrite: bool = False, dry_run: bool = False,
          unmerge: bool = False, allow_nonfinite: bool = False,
          progress: Progress | None = None) -> MergeReport:
    """Merge PEFT LoRA adapters into a base model: W = W0 + Σ wᵢ·ΔWᵢ, one rounding, streamed.

    Args:
        base: the base model folder or file.
        adapters: PEFT adapter folders, applied in order.
        out: the result folder (must not exist unless ``overwrite``); may be None with ``dry_run``.
        weights: one per adapter (default 1.0 each).
        form: "merged" (plain architecture) or "augmented" (LoRA layers inside; one adapter).
        dtype: "auto" (each tensor keeps the base's dtype) or a floating dtype for all floats.
        device: "cpu", "cuda" or "cuda:N" for the arithmetic.
        max_shard_size: e.g. "5GB"; default keeps the base's file names and shard layout.
        unmerge: subtract instead of add (see :func:`unmerge`).
        allow_nonfinite: write results holding NaN/Inf instead of stopping at the first one.
        progress: told the bytes to write and each tensor written (the CLI's progress bar).

    Returns:
        A MergeReport; raises a LorasurgeonError subclass, with nothing written, on bad input.
    """
    if form not in FORMS:
        raise OptionError(f"unknown form {form!r}: choose one of {', '.join(FORMS)}")
    if not adapters:
        raise OptionError("give at least one adapter")
    weights = list(weights) if weights else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise OptionError(f"{len(weights)} weights for {len(adapters)} adapters: give one --weight per adapter")
    check_weights(weights)
    out_dtype, shard_bytes = output_dtype(dtype), parse_shard_size(max_shard_size)
    base_src = resolve_source(base)
    adapter_srcs = [resolve_source(a) for a in adapters]
    base_path, adapter_paths = base_src.path, [a.path for a in adapter_srcs]
    command = "unmerge" if unmerge else "merge"
    expect_kind(base_path, base_src.label, role="MERGED" if unmerge else "BASE", want="model", command=command,
                others=[(a.path, a.label) for a in adapter_srcs])
    for a in adapter_srcs:
        expect_kind(a.path, a.label, role="ADAPTER", want="adapter", command=command)
    if out is not None:
        check_output(out, [base_path, *adapter_paths], overwrite=overwrite)
    check_device(device)
    ckpt = open_checkpoint(base_path)
    loaded: list[LoraAdapter] = []
    try:
        config = read_config(ckpt.folder)
        refuse_quantized(ckpt, config, role="the merged model" if unmerge else "the base model",
                         command="unmerge" if unmerge else "merge")
        for path, w in zip(adapter_paths, weights):
            adapter = load_adapter(path)
            loaded.append(adapter)
            check_supported(adapter, unmerge=unmerge, weight=w)
        facts = ModelFacts(config.get("model_type"), is_tied(config))
        if form == "augmented":
            if len(loaded) != 1 or weights[0] != 1.0 or unmerge:
                raise LorasurgeonError("the augmented form holds exactly one adapter, with weight 1")
            ops = augment.augmented_ops(ckpt, loaded[0], facts.tied, out_dtype)
            untie = False
        else:
            ops, untie = plan_merge(ckpt, loaded, weights, facts, dtype=out_dtype, unmerge=unmerge)
        plan = Plan(tuple(ops), (str(base_path), *map(str, adapter_paths)))
        if dry_run:
            return _report(out, "unmerged" if unmerge else form, plan, None, untie, True)
        if out is None:
            raise LorasurgeonError("an output folder is needed (or use dry_run)")
        extra = {}
        if config:
            new_dtype = out_dtype if out_dtype is not None else None
            extra["config.json"] = config_bytes(edit_config(config, dtype=new_dtype, untie=untie))
        if form == "augmented":
            extra[CONFIG_NAME] = config_bytes(dict(loaded[0].config.raw))
        extra[CARD_NAME] = merge_card(
            title=Path(out).name, form=form, unmerge=unmerge, base=base_src.label,
            adapters=[a.label for a in adapter_srcs], weights=weights, untied=untie,
            dtype=str(out_dtype).removeprefix("torch.") if out_dtype else "as the base").encode()
        copies = [p for p in sidecar_files(ckpt.folder) if p.name not in extra]
        stats = _write(Path(out), ops, [ckpt] + [a.checkpoint for a in loaded],
                       _layout(ops, ckpt, shard_bytes), extra_files=extra, copy_files=copies,
                       overwrite=overwrite, device=device, progress=progress,
                       allow_nonfinite=allow_nonfinite)
        return _report(out, "unmerged" if unmerge else form, plan, stats, untie, False)
    finally:
        ckpt.close()
        for a in loaded:
            a.close()


def unmerge(merged: str | os.PathLike[str], adapters: Sequence[str | os.PathLike[str]],
            out: str | os.PathLike[str] | None, **kwargs) -> MergeReport:
    """Take adapters back out of a merged model: W0 = W − Σ wᵢ·ΔWᵢ (same options as :func:`merge`).

    DoRA, modules_to_save and trainable tokens replaced weights outright and are refused.
    """
    return merge(merged, adapters, out, unmerge=True, **kwargs)


def convert(augmented: str | os.PathLike[str], out: str | os.PathLike[str] | None, *, to: str,
            dtype: str | torch.dtype | None = "auto", device: str = "cpu",
            max_shard_size: str | int | None = None, overwrite: bool = False, dry_run: bool = False,
            allow_nonfinite: bool = False, progress: Progress | None = None) -> MergeReport:
    """Turn an augmented checkpoint into the merged form or back into a PEFT adapter folder."""
    if to not in ("merged", "adapter"):
        raise OptionError(f"unknown target form {to!r}: choose merged or adapter")
    out_dtype, shard_bytes = output_dtype(dtype), parse_shard_size(max_shard_size)
    source = resolve_source(augmented)
    path = source.path
    expect_kind(path, source.label, role="AUGMENTED", want="augmented", command="convert")
    if out is not None:
        check_output(out, [path], overwrite=overwrite)
    check_device(device)
    ckpt = open_checkpoint(path)
    try:
        config = read_config(ckpt.folder)
        refuse_quantized(ckpt, config, role="the augmented checkpoint", command="convert")
        adapter_config = AdapterConfig.load(ckpt.folder)
        base, adapter = augment.split_augmented(ckpt, adapter_config, is_tied(config))
        if to == "merged":
            facts = ModelFacts(config.get("model_type"), is_tied(config))
            ops, untie = plan_merge(base, [adapter], [1.0], facts, dtype=out_dtype)
            inputs = [base, adapter.checkpoint]
            shards = _layout(ops, base, shard_bytes)
            extra = {"config.json": config_bytes(edit_config(config, dtype=out_dtype, untie=untie))} if config else {}
            copies = [p for p in sidecar_files(ckpt.folder) if p.name not in extra]
            index_name = "model.safetensors.index.json"
        else:
            ops = [TensorOp(k, Ref(0, k), out_dtype if out_dtype and i.dtype.is_floating_point else i.dtype,
                            i.shape, "lora") for k, i in ((k, adapter.checkpoint.info(k)) for k in adapter.checkpoint)]
            inputs, untie = [adapter.checkpoint], False
            shards = plan_shards([op.spec for op in ops], max_shard_size=None, prefix="adapter_model")
            extra = {CONFIG_NAME: config_bytes(dict(adapter_config.raw))}
            copies, index_name = [], None
        plan = Plan(tuple(ops), (str(path),))
        if dry_run:
            return _report(out, to, plan, None, untie, True)
        extra[CARD_NAME] = convert_card(title=Path(out).name if out else "", source=source.label,
                                        base=adapter_config.base_model, to=to).encode()
        if out is None:
            raise LorasurgeonError("an output folder is needed (or use dry_run)")
        stats = _write(Path(out), ops, inputs, shards, extra_files=extra, copy_files=copies,
                       overwrite=overwrite, device=device, progress=progress,
                       allow_nonfinite=allow_nonfinite, index_name=index_name)
        return _report(out, to, plan, stats, untie, False)
    finally:
        ckpt.close()
