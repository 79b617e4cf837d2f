"""``convert ADAPTER.gguf --to peft --base BASE -o OUT``: a llama.cpp GGUF LoRA adapter as a PEFT adapter folder.

The .gguf is read against its base model (``adapter.formats.gguf``: llama.cpp's names turned back into the base's,
token_embd's A transposed back, LlamaModel's q/k row permutation undone, quantized tensors dequantized), its
pairs are checked by merge's own plan against the base's headers (what merge refuses is refused here too), and
every tensor is written by the PEFT writer (``adapter.formats.registry.adapter_writer``) through the engine, with
a config computing what llama.cpp computes: lora_alpha the file's alpha, each module's r its tensors'.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

from ...adapter.formats.gguf import adapter_with_base
from ...adapter.formats.registry import adapter_writer
from ...adapter.weights import LoraAdapter
from ...engine.execute import run
from ...engine.plan import Ref
from ...hub.cards import CARD_NAME, made_by, model_card
from ...io.checkpoint import Checkpoint
from ...io.dtypes import itemsize
from ...io.layout import human_bytes
from ...io.sidecar import read_config
from ...names import model_names
from ...words import plural
from .._inputs import Input, Output, open_inputs, plain_weights
from .._timing import rate, timed
from ..merge.plan import plan_merge
from .adapter_format import TensorOp, read_tensor


@dataclass(frozen=True)
class FromGgufReport:
    """What ``convert ADAPTER.gguf --to peft --base BASE`` wrote (or, with dry_run, would write)."""

    output: str | None
    source: str
    base: str
    modules: int
    ranks: dict[int, int]  # rank -> modules of that rank
    alpha: float  # lora_alpha: the file's adapter.lora.alpha
    tensors: int
    bytes: int
    dry_run: bool
    wall: float = 0.0

    def summary(self) -> str:
        ranks = ", ".join(f"r={r}" + (f" ×{n}" if len(self.ranks) > 1 else "") for r, n in self.ranks.items())
        what = (
            f"{plural(self.modules, 'module')} ({ranks}, alpha {self.alpha:g}) of the llama.cpp GGUF adapter "
            f"{self.source}, read against {self.base}"
        )
        if self.dry_run:
            return f"Would write {what} as a PEFT adapter ({human_bytes(self.bytes)})."
        speed = rate(self.bytes, self.wall)
        return (
            f"Wrote {self.output} (PEFT adapter): {what}; {plural(self.tensors, 'tensor')}, {human_bytes(self.bytes)} "
            f"in {self.wall:.2f} s{f' ({speed})' if speed else ''}."
        )


@timed
def from_gguf(
    adapter_gguf: str | os.PathLike[str], base: str | os.PathLike[str], out: Output, *, device: str = "cpu"
) -> FromGgufReport:
    """A llama.cpp GGUF LoRA adapter written as a PEFT adapter folder computing the same ΔW per module.

    Args:
        adapter_gguf: the .gguf adapter (``convert --to gguf``'s, or llama.cpp's convert_lora_to_gguf.py's).
        base: the base model it was made for (a folder or Hub repo id: config.json and the weights' headers).
        out: the adapter folder to write (its path may be None with ``dry_run``).
        device: where the tensors pass (nothing is computed but dequantization and row orders).

    Returns:
        A FromGgufReport.

    Raises:
        UnsupportedError: not a GGUF LoRA adapter, or one that cannot be read (adapter.formats.gguf), by name.
        IncompatibleError: a base of another architecture, or pairs that do not fit it.
        InputNotFoundError, CorruptCheckpointError: an input that cannot be read.
        OutputError, OutputExistsError: ``out`` cannot or may not be written.
    """
    inputs = [Input(adapter_gguf, "ADAPTER"), Input(base, "BASE", "model")]
    with open_inputs(
        inputs, out.path, command="convert", overwrite=out.overwrite, device=device, in_place=out.in_place
    ) as opened:
        source, based = opened
        assert based.checkpoint is not None  # the base's kind was checked: it is open
        adapter = adapter_with_base(source.source.path, based.checkpoint)
        try:
            _check_merge(adapter, based.checkpoint)
        except BaseException:
            adapter.close()
            raise
    try:
        return _write(adapter, out, str(adapter_gguf), str(base), device)
    finally:
        adapter.close()


def _check_merge(adapter: LoraAdapter, base: Checkpoint) -> None:
    """The adapter against the base's headers by merge's own plan: what merge refuses is refused here."""
    config = read_config(base)
    weights, _ = plain_weights(base, config, role=f"{base.root}: the base model")
    plan_merge(weights, [adapter], [1.0], model_names(weights.names(), config), dtype=None)


def _write(adapter: LoraAdapter, out: Output, source: str, base: str, device: str) -> FromGgufReport:
    ckpt = adapter.checkpoint
    ops = [
        TensorOp(k, Ref(0, k), math.prod(i.shape) * itemsize(i.dtype_name))
        for k, i in ((k, ckpt.info(k)) for k in ckpt)
    ]
    ranks: dict[int, int] = {}
    for m in adapter.modules.values():
        ranks[m.rank] = ranks.get(m.rank, 0) + 1
    report = FromGgufReport(
        None,
        source,
        base,
        len(adapter.modules),
        dict(sorted(ranks.items())),
        adapter.config.lora_alpha,
        len(ops),
        sum(o.nbytes for o in ops),
        True,
    )
    if out.dry_run:
        return report
    where = out.where()
    writer = adapter_writer(where, overwrite=out.overwrite, name="peft")
    try:
        stats = run(ops, [ckpt], writer, compute=read_tensor, device=device, progress=out.progress)
        writer.add_file(CARD_NAME, _card(report, Path(where).name))
        writer.finish(adapter.config.raw)
    except BaseException:
        writer.abort()
        raise
    return replace(report, output=str(where), bytes=stats.bytes_written, dry_run=False)


def _card(report: FromGgufReport, title: str) -> str:
    lines = [
        f"The llama.cpp GGUF LoRA adapter `{report.source}` as a PEFT adapter of `{report.base}`: each module's "
        "lora_A and lora_B as llama.cpp applies them (lora_alpha the file's alpha, r each module's rank), so PEFT "
        "computes the same change.",
    ]
    lines += made_by("lorasurgeon", "convert", report.source, "--to=peft", f"--base={report.base}", "-o", title)
    return model_card(kind="adapter", base=report.base, title=title, lines=lines)
