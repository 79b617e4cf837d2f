"""An adapter in another adapter format: ``convert ADAPTER --to peft|mlx|...``. Any format of the registry reads it into
the common adapter (PEFT's saved names), and the target format's writer (``adapter.formats.registry.
adapter_writer``) writes each tensor in its own names and layout, then its config: nothing here knows a format."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ...adapter.formats.registry import adapter_writer, writable, writer_refusal
from ...engine.execute import Outcome, run
from ...engine.plan import Ref
from ...errors import InvalidOptionError, UnsupportedError
from ...hub.cards import CARD_NAME, made_by, model_card
from ...io.dtypes import itemsize
from ...io.layout import human_bytes
from ...words import article, plural
from .._inputs import Output, adapters_of, open_inputs, with_base
from .._timing import rate, timed

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorOp:
    """One tensor of the common adapter, read (through the source format's view) and handed to the writer."""

    name: str
    src: Ref
    nbytes: int
    byte_copy: None = None  # a writer may change the layout (MLX transposes): it gets the tensor, not bytes

    def refs(self) -> list[Ref]:
        return [self.src]


def read_tensor(op: TensorOp, tensors: Mapping[Ref, torch.Tensor], device: torch.device) -> Outcome[None]:
    return Outcome([(op.name, tensors[op.src])], None)


@dataclass(frozen=True)
class FormatReport:
    """What ``convert ADAPTER --to FORMAT`` wrote (or, with dry_run, would write)."""

    output: str | None
    source: str
    source_format: str
    target: str
    tensors: int
    bytes: int
    dry_run: bool
    wall: float = 0.0

    def summary(self) -> str:
        what = f"{plural(self.tensors, 'tensor')} of the {self.source_format} adapter {self.source}"
        if self.dry_run:
            return f"Would write {what} as a {self.target} adapter ({human_bytes(self.bytes)})."
        speed = rate(self.bytes, self.wall)
        return (
            f"Wrote {self.output} ({self.target} adapter): {what}, {human_bytes(self.bytes)} in "
            f"{self.wall:.2f} s{f' ({speed})' if speed else ''}."
        )


@timed
def to_format(
    adapter: str | os.PathLike[str],
    out: Output,
    *,
    target: str,
    base: str | os.PathLike[str] | None = None,
    device: str = "cpu",
) -> FormatReport:
    """``adapter`` (any format lorasurgeon reads; a llama.cpp .gguf one read against ``base``) written as an
    adapter in the format called ``target``."""
    if target not in writable():
        raise InvalidOptionError(f"--to {target}: lorasurgeon writes adapters as {', '.join(writable())}")
    inputs = with_base([adapter], base)
    with open_inputs(
        inputs, out.path, command="convert", overwrite=out.overwrite, device=device, in_place=out.in_place
    ) as opened:
        (source,) = adapters_of(opened[-1:])
    try:
        if source.tuned and target != "peft":
            raise UnsupportedError(
                f"{adapter}: {article(source.config.peft_type)} adapter: {target}'s format holds LoRA (and DoRA) only; "
                "`lorasurgeon convert ADAPTER --to lora --base BASE` gives its best LoRA first"
            )
        why = writer_refusal(target, source.config.raw)
        if why is not None:
            raise UnsupportedError(f"{adapter}: {why} (the {target} format cannot hold it)")
        ckpt = source.checkpoint
        ops = [
            TensorOp(k, Ref(0, k), math.prod(i.shape) * itemsize(i.dtype_name))
            for k, i in ((k, ckpt.info(k)) for k in ckpt)
        ]
        report = FormatReport(None, str(adapter), source.format, target, len(ops), sum(o.nbytes for o in ops), True)
        if out.dry_run:
            return report
        where = out.where()
        writer = adapter_writer(where, overwrite=out.overwrite, name=target)
        try:
            stats = run(ops, [ckpt], writer, compute=read_tensor, device=device, progress=out.progress)
            writer.add_file(CARD_NAME, _card(report, source.config.base_model, Path(where).name))
            writer.finish(source.config.raw)
        except BaseException:
            writer.abort()
            raise
        return replace(report, output=str(where), bytes=stats.bytes_written, dry_run=False)
    finally:
        source.close()


def _card(report: FormatReport, base: str | None, title: str) -> str:
    lines = [f"The {report.source_format} adapter `{report.source}` written as a {report.target} adapter."]
    lines += made_by("lorasurgeon", "convert", report.source, f"--to={report.target}", "-o", title)
    return model_card(kind="adapter", base=base, title=title, lines=lines)
