"""convert a model to another dtype: every tensor read (a quantized one dequantized), rounded once, written,
its quantization_config removed."""

from __future__ import annotations

import os
from pathlib import Path

from ...engine.execute import Progress
from ...errors import InvalidOptionError
from ...hub.cards import convert_card
from ...hub.source import Source
from ...io.checkpoint import Checkpoint
from ...io.sidecar import edit_config
from ...names import model_names
from .._inputs import plain_weights
from ..merge.ops import Plan
from ..merge.plan import plan_merge
from ..merge.report import MergeReport
from ..merge.settings import MergeSettings
from ..merge.write import layout, report, write_model


def convert_model(
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
        base_format=ckpt.format,
        progress=progress,
    )
    return report(out, "converted", plan, stats, untie)
