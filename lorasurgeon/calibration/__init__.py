"""Calibration: what a model computes on data, for the commands that choose factors by it (extract --calibration).

``Calibration`` is the options, checked once; :func:`measure` reads the samples (``samples``), runs the chosen model
on them layer by layer (``layerwise``) and leaves each linear module's input second moment, and the embedding's
token counts, in a scratch spool the engine reads like any checkpoint.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

from ..engine.plan import Ref
from ..errors import InvalidOptionError, LorasurgeonWarning, UnsupportedError
from ..ops.whitened import RIDGE, Whitening

if TYPE_CHECKING:
    from collections.abc import Mapping

    import torch

    from ..engine.execute import Progress
    from ..io.checkpoint import Checkpoint
    from ..io.spool import SpoolWriter
    from ..names import ModelNames
    from .layerwise import Gathered
    from .samples import Samples
else:
    from .._lazy import torch


@dataclass(frozen=True)
class Moments:
    """Where an op's calibration statistics are in the moments spool (the engine's third input)."""

    inputs: Ref | None = None  # E[x xᵀ] of a linear module's inputs
    tokens: Ref | None = None  # an embedding's token counts
    rows: Ref | None = None  # a tied head's input moment: the weight on an embedding's rows
    outputs: Ref | None = None  # E[g gᵀ] of the loss gradient at its output (a head's: its Fisher diagonal)
    head: Ref | None = None  # a tied head's Fisher diagonal, for the embedding that shares its change

    def refs(self) -> list[Ref]:
        return [r for r in (self.inputs, self.tokens, self.rows, self.outputs, self.head) if r is not None]


def linear_moments(gathered: Gathered, module: str, source: int) -> Moments | None:
    """Where a linear module's statistics are (the engine's input ``source`` is the spool): its inputs' moment, and
    its output gradients' where the backward ran; None where the run did not reach it."""
    if module not in gathered.moments:
        return None
    outputs = gathered.outputs.get(module)
    return Moments(
        inputs=Ref(source, gathered.moments[module]), outputs=None if outputs is None else Ref(source, outputs)
    )


def embedding_moments(gathered: Gathered, source: int, tied_head: str | None = None) -> Moments:
    """An embedding's: its tokens' counts (and its output gradients'); with ``tied_head`` (a head sharing its one
    change) that head's input moment and Fisher diagonal weighing its rows."""
    from .backward import EMBEDDING
    from .layerwise import TOKENS

    rows = None if tied_head is None else Ref(source, gathered.moments[tied_head])
    if not gathered.outputs:
        return Moments(tokens=Ref(source, TOKENS), rows=rows)
    head = gathered.outputs.get(tied_head) if tied_head is not None else None
    return Moments(
        tokens=Ref(source, TOKENS),
        rows=rows,
        outputs=Ref(source, EMBEDDING),
        head=None if head is None else Ref(source, head),
    )


def whitening_of(moments: Moments, tensors: Mapping[Ref, torch.Tensor], device: torch.device) -> Whitening:
    """The op's change of variables from its statistics, on ``device``: its inputs' moment, or its tokens'
    frequencies (and a tied head's rows), each weighed on the output side by its gradients' where measured."""

    def get(ref: Ref | None) -> torch.Tensor | None:
        return None if ref is None else tensors[ref].to(device=device, dtype=torch.float64)

    outputs = get(moments.outputs)
    if moments.inputs is not None:
        return Whitening.of(tensors[moments.inputs].to(device), outputs)
    counts = get(moments.tokens)
    assert counts is not None
    p = counts / max(1.0, float(counts.sum()))
    rows, head = get(moments.rows), get(moments.head)
    if outputs is None:  # inputs only: each row counted once for the head, and by how often the embedding reads it
        return Whitening.of(p if rows is None else 1.0 + len(p) * p, rows)
    if rows is None or head is None:  # the embedding alone: its tokens, its output's gradients
        return Whitening.of(p, outputs)
    # A tied pair: the head's cost Σ_v F_v·eᵥᵀ·H·eᵥ plus the embedding's Σ_v p_v·eᵥᵀ·G₀·eᵥ (eᵥ: row v's error), one
    # Kronecker product when G₀ is taken as H scaled to its trace: rows H, each vocabulary row F_v + α·p_v.
    alpha = float(torch.trace(outputs) / torch.trace(rows).clamp_min(torch.finfo(torch.float64).tiny))
    return Whitening.of(head + alpha * p, rows)


Whose = Literal["finetuned", "base"]  # whose activations are measured: the fine-tune's (default) or the base's


@dataclass(frozen=True)
class Calibration:
    """--calibration SOURCE and its options: the samples (a text or JSONL file, or a Hub dataset id with its split
    and column), how many and how long, and whose activations are measured."""

    source: str
    samples: int = 128
    max_length: int = 512
    split: str = "train"
    column: str | None = None
    model: Whose = "finetuned"
    fisher: bool = True  # each module's rows weighed by its output gradients (calibration.backward) too

    def __post_init__(self) -> None:
        if not str(self.source).strip():
            raise InvalidOptionError("--calibration needs a text or JSONL file, or a Hub dataset id")
        for flag, value in (("--calibration-samples", self.samples), ("--max-length", self.max_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidOptionError(f"{flag} must be a whole number of at least 1, not {value!r}")
        if not isinstance(self.fisher, bool):
            raise InvalidOptionError(f"Calibration(fisher=...) is True or False, not {self.fisher!r}")
        if self.model not in get_args(Whose):
            raise InvalidOptionError(f"--calibration-model {self.model!r}: choose {', '.join(get_args(Whose))}")
        object.__setattr__(self, "source", os.fspath(self.source))

    def method(self) -> dict[str, Any]:
        """What the report's and the card's ``method`` say of it."""
        return {
            "source": self.source,
            "samples": self.samples,
            "max_length": self.max_length,
            "split": self.split,
            "column": self.column,
            "activations": self.model,
            "ridge": RIDGE,  # λ = ridge × mean(diag G), added to each module's G (ops.whitened)
            # each module's error weighed by its inputs' second moment, and with fisher by its output gradients' too
            "weight": "inputs and output gradients (K-FAC Fisher)" if self.fisher else "inputs",
        }


def calibration_of(
    source: str | os.PathLike[str] | Calibration | None,
    samples: int | None = None,
    max_length: int | None = None,
    split: str | None = None,
    column: str | None = None,
    model: str | None = None,
) -> Calibration | None:
    """The options as the CLI and the library take them (None: not given) as one Calibration, or None without
    ``source``; an option given without it refused by name."""
    given = {
        "--calibration-samples": samples,
        "--max-length": max_length,
        "--calibration-split": split,
        "--calibration-column": column,
        "--calibration-model": model,
    }
    if source is None or isinstance(source, Calibration):
        flag = next((f for f, v in given.items() if v is not None), None)
        if source is None and flag is not None:
            raise InvalidOptionError(f"{flag} goes with --calibration SOURCE (the samples to run the model on)")
        return source
    defaults = Calibration("-")
    return Calibration(
        os.fspath(source),
        samples=defaults.samples if samples is None else samples,
        max_length=defaults.max_length if max_length is None else max_length,
        split=defaults.split if split is None else split,
        column=column,
        model=defaults.model if model is None else cast(Whose, model),  # checked by Calibration
    )


@dataclass(frozen=True)
class Measured:
    """What calibration measured, and where: the spool's keys (``gathered``), and a line saying what was read."""

    gathered: Gathered
    source: str  # the samples, as read
    whose: str  # "the fine-tune's" or "the base's"

    def describe(self) -> str:
        g = self.gathered
        return (
            f"calibrated on {self.source}: {self.whose} activations"
            + (" and output gradients" if g.outputs else "")
            + f", measured layer by layer over {g.layers} layers ({g.seconds:.1f} s)"
            + (f"; {self.too_few()}" if self.too_few() else "")
        )

    def too_few(self) -> str:
        """What is wrong with fewer tokens than a module has inputs ('' when there are enough)."""
        g = self.gathered
        if g.tokens >= g.widest:
            return ""
        return (
            f"{g.tokens:,} tokens for modules of up to {g.widest:,} inputs: most of their input directions are never "
            "seen, count by the ridge only, and the adapter may be worse than plain SVD's on other inputs; give more "
            "samples (--calibration-samples, --max-length)"
        )


def tokenizer_folder(*folders: Path) -> Path:
    """The first of ``folders`` (the fine-tune's, then the base's) that holds a tokenizer; the first if none does
    (reading the samples then refuses by name)."""
    from .samples import TOKENIZER_FILES

    for folder in folders:
        folder = folder if folder.is_dir() else folder.parent
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            return folder
    first = folders[0]
    return first if first.is_dir() else first.parent


def samples_for(calibration: Calibration, folders: tuple[Path, ...]) -> Samples:
    """The calibration's samples, tokenized by the first of ``folders`` that holds a tokenizer (what a dry run
    checks, and the run measures on)."""
    from .samples import read_samples

    return read_samples(
        calibration.source,
        tokenizer_folder(*folders),
        samples=calibration.samples,
        max_length=calibration.max_length,
        split=calibration.split,
        column=calibration.column,
    )


def measure(
    calibration: Calibration,
    model: Checkpoint,
    names: ModelNames,
    config: Mapping[str, Any],
    folders: tuple[Path, ...],
    out: SpoolWriter,
    *,
    whose: str,
    device: str = "cpu",
    progress: Progress | None = None,
) -> Measured:
    """The samples read (the tokenizer of the first of ``folders`` that has one) and ``model`` run on them layer by
    layer; each module's input moment spooled to ``out``.

    Raises:
        InvalidOptionError, InputNotFoundError, UnsupportedError: samples that cannot be had, or a model that
            cannot be run this way (each by name).
    """
    from .layerwise import gather

    try:
        import transformers  # noqa: F401  (the model is transformers' own class)
    except ImportError:
        raise UnsupportedError("--calibration runs the model with transformers: pip install transformers") from None
    samples = samples_for(calibration, folders)
    gathered = gather(
        model, names, config, samples.ids, out, device=device, progress=progress, fisher=calibration.fisher
    )
    measured = Measured(gathered, samples.source, whose)
    if measured.too_few():
        warnings.warn(f"--calibration: {measured.too_few()}", LorasurgeonWarning, stacklevel=2)
    return measured
