"""convert an augmented checkpoint (``merge --form augmented``) back to the merged form or to a PEFT
adapter folder: what each writes (ops, inputs, shards, the files beside them), from headers."""

from __future__ import annotations

import dataclasses
import os
import shlex
from pathlib import Path
from typing import Any

from ...adapter.config import CONFIG_NAME, AdapterConfig
from ...adapter.formats.peft import PREFIX as PEFT_PREFIX
from ...adapter.weights import LoraAdapter
from ...engine.plan import Ref
from ...errors import InvalidOptionError, LorasurgeonError, UnsupportedError
from ...hub.source import Source
from ...io.checkpoint import Checkpoint
from ...io.dtypes import is_floating
from ...io.layout import Shard, plan_shards
from ...io.sidecar import config_bytes, edit_config, sidecar_files
from ...names import ModelNames
from .._inputs import InputKind, check_kind, plain_weights
from ..merge.ops import TensorOp
from ..merge.plan import plan_merge
from ..merge.settings import MergeSettings, Target
from ..merge.write import layout


def augmented_target(
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
    check_kind(kind, source.label, role="INPUT", want="augmented", command="convert", hint=hint)  # kind: known
    if to is None:
        raise InvalidOptionError(f"{source.label} is an augmented checkpoint: give --to merged or --to adapter")
    if kind == "augmented" and plain_weights(ckpt, config, role=source.label)[1] is not None:
        raise UnsupportedError(f"{source.label}: a quantized augmented checkpoint is not something lorasurgeon reads")
    return to


@dataclasses.dataclass
class Conversion:
    """What converting an augmented checkpoint writes: the ops, their inputs and shards, the files beside them."""

    ops: list[TensorOp]
    inputs: list[Checkpoint]
    shards: list[Shard]
    untie: bool
    extra: dict[str, bytes]  # file name -> its bytes (config, model card)
    copies: list[tuple[Path, str]]  # sidecar files copied as they are, each with its name in the result
    index_name: str | None  # the shard index, when sharded


def to_merged(
    ckpt: Checkpoint,
    config: dict[str, Any],
    base: Checkpoint,
    adapter: LoraAdapter,
    names: ModelNames,
    settings: MergeSettings,
) -> Conversion:
    """The merged form: the adapter merged into its base, as ``merge`` would write it."""
    ops, untie = plan_merge(base, [adapter], [1.0], names, dtype=settings.dtype_name)
    extra: dict[str, bytes] = {}
    if config:
        extra["config.json"] = config_bytes(edit_config(config, dtype=settings.dtype_name, untie=untie))
    copies = [(p, p.name) for p in sidecar_files(ckpt.folder) if p.name not in extra]
    shards = layout(ops, base, settings.max_shard_size)
    return Conversion(ops, [base, adapter.checkpoint], shards, untie, extra, copies, "model.safetensors.index.json")


def to_adapter(adapter: LoraAdapter, adapter_config: AdapterConfig, settings: MergeSettings) -> Conversion:
    """The adapter folder in PEFT's format: the adapter's tensors under their saved names (one file, its name PEFT's:
    adapter.formats.peft), its adapter_config.json; written header first, as merge writes, the shapes known."""
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
    shards = plan_shards([op.spec for op in ops], max_shard_size=None, prefix=PEFT_PREFIX)
    extra = {CONFIG_NAME: config_bytes(dict(adapter_config.raw))}
    return Conversion(ops, [adapter.checkpoint], shards, False, extra, [], None)


def _merge_instead(label: str, folder: Path, out: str | os.PathLike[str] | None) -> str:
    """What to run instead of ``convert ADAPTER --to merged``: merge, naming the base the adapter's config records."""
    try:
        base = AdapterConfig.load(folder).base_model
    except LorasurgeonError:
        base = None
    merge = shlex.join(["lorasurgeon", "merge", "BASE", label, "-o", str(out or "OUT")])
    named = f"; its config names {base!r}" if base else ""
    return f"; to merge it into its base model: `{merge}` (BASE: the model it was trained on{named})"
