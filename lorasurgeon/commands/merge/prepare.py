"""A merge or unmerge planned from headers (``plan_run``): every input opened once and checked, the base as the
plan sees it (a quantized one's plain view; a .gguf result's checks and place), the adapters read, the ops."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...adapter.expert_layouts import check_pefts_packing
from ...adapter.weights import LoraAdapter, adapter_of
from ...errors import InvalidOptionError, UnsupportedError
from ...formats.layout import QuantLayout
from ...hub.source import Source
from ...io.checkpoint import Checkpoint
from ...io.gguf_file import check_gguf_destination
from ...io.gguf_model import GgufModel
from ...io.gguf_model_write import GgufTarget
from ...io.sidecar import read_config
from ...names import ModelNames, model_names
from .._inputs import Input, OpenedInputs, open_inputs, plain_weights
from . import augmented as augment
from .gguf_result import check_gguf_result, gguf_targets, wants_gguf
from .ops import MergeOp, TensorOp
from .plan import check_supported, plan_merge
from .quantized import keep_ops
from .settings import MergeSettings

AdapterPaths = Sequence[str | os.PathLike[str]]


@dataclass
class Planned:
    """A merge or unmerge planned from headers: its inputs, open, and its ops. ``close()`` when done."""

    base: Source
    adapter_sources: list[Source]
    checkpoint: Checkpoint
    adapters: list[LoraAdapter]
    config: dict[str, Any]
    ops: Sequence[MergeOp]
    untie: bool
    names: ModelNames | None = None
    layout: QuantLayout | None = None  # the base is quantized
    stored: Checkpoint | None = None  # the quantized base as stored, when the result keeps its format
    opened: OpenedInputs | None = None  # the inputs as the kind check opened them (each header read once)
    gguf_path: Path | None = None  # a .gguf result's place, checked
    gguf_targets: dict[str, GgufTarget] | None = None  # how each changed tensor is written into it

    @property
    def inputs(self) -> list[Checkpoint]:
        stored = [self.stored] if self.stored is not None else []
        return [self.checkpoint] + [a.checkpoint for a in self.adapters] + stored

    @property
    def stored_input(self) -> tuple[int, Checkpoint] | None:
        return None if self.stored is None else (len(self.inputs) - 1, self.stored)

    def close(self) -> None:
        for a in self.adapters:
            a.close()
        self.checkpoint.close()
        if self.stored is not None:
            self.stored.close()
        if self.opened is not None:
            self.opened.close()


def plan_run(
    base: str | os.PathLike[str],
    adapters: AdapterPaths,
    out: str | os.PathLike[str] | None,
    settings: MergeSettings,
    *,
    overwrite: bool,
    in_place: bool = False,
) -> Planned:
    """Every check and the plan, from headers: inputs, kinds, output, quantization, PEFT variants, shapes."""
    command = settings.command
    gguf_out = wants_gguf(out)  # one file, whose place is checked below (check_gguf_destination)
    if gguf_out and settings.cluster is not None:
        raise InvalidOptionError("--cluster ray writes safetensors shards: a .gguf result is written by one process")
    opened = open_inputs(
        [
            Input(base, "MERGED" if settings.unmerge else "BASE", "model"),
            *(Input(a, "ADAPTER", "adapter") for a in adapters),
        ],
        None if gguf_out else out,
        command=command,
        overwrite=overwrite,
        device=settings.device,
        in_place=in_place,
    )
    base_src, ckpt = opened[0].source, opened[0].checkpoint
    assert ckpt is not None  # every input's kind is checked, so each is open
    planned = Planned(base_src, [o.source for o in opened[1:]], ckpt, [], {}, [], False, opened=opened)
    try:
        ckpt = _base_view(planned, ckpt, settings, out if gguf_out else None, overwrite=overwrite)
        for src, w in zip(opened[1:], settings.weights, strict=True):
            assert src.checkpoint is not None
            planned.adapters.append(src.adapter if src.adapter is not None else adapter_of(src.checkpoint))
            check_supported(planned.adapters[-1], unmerge=settings.unmerge, weight=w)
        planned.names = model_names(ckpt.names(), planned.config)
        planned.ops = _ops(planned, ckpt, settings)
        if gguf_out:
            assert isinstance(ckpt, GgufModel)
            planned.gguf_targets = gguf_targets(planned.ops, ckpt)
        if planned.layout is not None and planned.stored_input is not None:
            planned.ops = keep_ops(planned.ops, planned.layout, planned.stored_input[0])
    except BaseException:
        planned.close()
        raise
    return planned


def _base_view(
    planned: Planned, ckpt: Checkpoint, settings: MergeSettings, gguf_out: str | os.PathLike[str] | None, *,
    overwrite: bool,
) -> Checkpoint:  # fmt: skip
    """The base's config, and its weights as the plan sees them (a quantized one's plain view, its stored form
    kept where the result keeps its format); a .gguf result's checks and place (``gguf_out``)."""
    label = planned.base.label
    planned.config = read_config(ckpt)
    if gguf_out is not None:
        check_gguf_result(ckpt, label, settings)
        inputs = [planned.base.path, *(a.path for a in planned.adapter_sources)]
        planned.gguf_path = check_gguf_destination(gguf_out, inputs, overwrite=overwrite)
    role = "the merged model" if settings.unmerge else "the base model"
    keep = settings.quantize == "keep" or settings.dtype_name is None
    view, planned.layout = plain_weights(ckpt, planned.config, role=f"{label}: {role}", keep_static=keep)
    if planned.layout is None and settings.quantize == "keep" and gguf_out is None:
        if ckpt.format == "gguf":
            raise InvalidOptionError(
                f"{label}: a GGUF base keeps its types in a .gguf result: give -o NAME.gguf "
                "(a folder gets safetensors: drop --quantize keep)"
            )
        raise InvalidOptionError(f"{label}: {role} is not quantized: --quantize keep has nothing to keep")
    if planned.layout is None:
        return ckpt
    if keep and settings.form == "augmented":
        raise InvalidOptionError(
            f"{label}: {role} is quantized ({planned.layout.describe()}): the augmented form holds "
            "plain weights, give --dtype (e.g. bfloat16)"
        )
    planned.checkpoint, planned.stored = view, (ckpt if keep else None)
    if not keep:
        ckpt.close()
    return view


def _ops(planned: Planned, ckpt: Checkpoint, settings: MergeSettings) -> list[TensorOp]:
    """The plan's ops: the augmented form's, or the merge's (``planned.untie`` set where a tied head is untied)."""
    assert planned.names is not None
    if settings.form == "augmented":
        if ckpt.format == "pipeline":
            raise UnsupportedError(
                f"{planned.base.label}: a diffusers pipeline has no augmented form (diffusers loads a LoRA from "
                "its own file, beside the pipeline): merge it, or keep the adapter as it is"
            )
        if planned.adapters[0].tuned:
            kind = planned.adapters[0].config.peft_type
            raise UnsupportedError(
                f"{planned.adapter_sources[0].label}: a {kind} adapter: the augmented form holds LoRA layers "
                "only (merge it in the merged form, or `convert ADAPTER --to lora` first)"
            )
        check_pefts_packing(planned.adapters[0], planned.adapter_sources[0].label)
        return augment.augmented_ops(ckpt, planned.adapters[0], planned.names, settings.dtype_name)
    ops, planned.untie = plan_merge(
        ckpt, planned.adapters, list(settings.weights), planned.names, dtype=settings.dtype_name,
        unmerge=settings.unmerge,
    )  # fmt: skip
    return ops
