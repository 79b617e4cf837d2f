"""diff: what changed between two checkpoints, and how much of it is low-rank. Streamed."""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Literal, get_args

from ..engine.execute import Discard, Outcome, Progress
from ..engine.execute import run as engine_run
from ..engine.plan import Ref
from ..errors import InvalidOptionError as OptionError
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..io.layout import TensorSpec
from ..io.sidecar import read_config
from ..ops.compare import change, identical_fraction, non_finite, rank_profile, same_bits
from ..words import plural
from ._inputs import Input, NameFilter, Output, plain_weights, prepare
from .plot import check_plot_path, diff_figure, save

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch

Status = Literal["identical", "changed", "shape_mismatch", "dtype_mismatch"]
STATUSES: tuple[Status, ...] = get_args(Status)


@dataclass(frozen=True)
class DiffOp:
    name: str
    a: Ref
    b: Ref
    comparable: bool  # same shape
    nbytes: int
    byte_copy: TensorSpec | None = None  # diff writes nothing

    def refs(self) -> list[Ref]:
        return [self.a, self.b]


@dataclass(frozen=True)
class TensorDiff:
    name: str
    status: Status
    rel_change: float | None = None
    max_abs_diff: float | None = None
    cosine: float | None = None
    identical_fraction: float | None = None  # share of elements bit-identical (equal in value across dtypes)
    rank_50: int | None = None
    rank_90: int | None = None
    rank_99: int | None = None
    nan_in_a: int | None = None  # elements that are NaN (None: not read, as for a shape mismatch)
    nan_in_b: int | None = None
    inf_in_a: int | None = None  # elements that are ±Inf
    inf_in_b: int | None = None

    def to_dict(self) -> dict:
        doc = asdict(self)
        for key in ("rank_50", "rank_90", "rank_99"):
            if doc[key] is None:
                del doc[key]
        return doc

    @property
    def non_finite(self) -> bool:
        """NaN or Inf in A or B: no similarity to report (rel_change, max_abs_diff, cosine None)."""
        return any((self.nan_in_a, self.nan_in_b, self.inf_in_a, self.inf_in_b))

    def non_finite_note(self) -> str:
        counts = [(self.nan_in_a, "NaN in A"), (self.inf_in_a, "Inf in A"), (self.nan_in_b, "NaN in B")]
        counts.append((self.inf_in_b, "Inf in B"))
        return f"{self.name}: " + ", ".join(f"{n} {what}" for n, what in counts if n)


@dataclass(frozen=True)
class DiffReport:
    """The result of comparing A with B; ``to_dict()`` is the ``--json`` document."""

    a: str
    b: str
    only_in_a: list[str]
    only_in_b: list[str]
    tensors: list[TensorDiff]
    atol: float | None
    seconds: float
    plot: str | None = None  # where the picture went (--plot)

    def within_atol(self, t: TensorDiff) -> bool:
        """A tensor that differs, but by no more than ``atol`` anywhere (never without an atol)."""
        return (
            self.atol is not None
            and t.status in ("changed", "dtype_mismatch")
            and t.max_abs_diff is not None
            and t.max_abs_diff <= self.atol
        )

    def differing(self) -> list[TensorDiff]:
        """The tensors that count as different: changed beyond ``atol`` (if any), those holding NaN or Inf
        first, then the most changed."""
        return sorted(
            (t for t in self.tensors if t.status in ("changed", "dtype_mismatch") and not self.within_atol(t)),
            key=lambda t: (not t.non_finite, -(t.rel_change or 0.0)),
        )

    @property
    def identical(self) -> bool:
        """Same keys and shapes; same dtypes and bits (with atol: values within it)."""
        if self.only_in_a or self.only_in_b:
            return False
        return all(t.status == "identical" or self.within_atol(t) for t in self.tensors)

    @property
    def exit_code(self) -> int:
        """As diff(1): 0 identical, 1 different."""
        return 0 if self.identical else 1

    def summary(self) -> dict:
        counts = {s: sum(t.status == s for t in self.tensors) for s in STATUSES}
        within = {"within_atol": sum(self.within_atol(t) for t in self.tensors)} if self.atol is not None else {}
        return {
            **counts,
            **within,
            "only_in_a": len(self.only_in_a),
            "only_in_b": len(self.only_in_b),
            "common": len(self.tensors),
            "non_finite": sum(t.non_finite for t in self.tensors),
            "identical_checkpoints": self.identical,
            "atol": self.atol,
            "seconds": round(self.seconds, 3),
        }

    def to_dict(self) -> dict:
        tensors = [
            _json_safe(t.to_dict() | ({"within_atol": self.within_atol(t)} if self.atol is not None else {}))
            for t in self.tensors
        ]
        return {
            "a": self.a,
            "b": self.b,
            "only_in_a": self.only_in_a,
            "only_in_b": self.only_in_b,
            "tensors": tensors,
            "summary": self.summary(),
        } | ({"plot": self.plot} if self.plot is not None else {})

    def table(self, top: int = 20) -> str:
        """The most changed tensors first (beyond ``atol``, if given), then what else differs (each list cut at
        ``top``, with how many more), a summary line, and where the picture went."""
        if top < 0:
            raise ValueError(f"top must be at least 0, got {top}")
        changed = self.differing()
        lines = _rows(changed[:top])
        if len(changed) > top:
            more = plural(len(changed) - top, "more changed tensor")
            lines.append(f"... {more} (--top N shows more)")
        lines += _cut([t.non_finite_note() for t in self.tensors if t.non_finite], top, "holding NaN or Inf")
        lines += _cut(
            [f"{t.name}: shapes differ" for t in self.tensors if t.status == "shape_mismatch"],
            top,
            "with shapes that differ",
        )
        lines += _cut([f"only in A: {n}" for n in self.only_in_a], top, "only in A")
        lines += _cut([f"only in B: {n}" for n in self.only_in_b], top, "only in B")
        lines.append(self._verdict())
        if self.plot is not None:
            lines.append(f"Wrote {self.plot}")
        return "\n".join(lines)

    def _verdict(self) -> str:
        s = self.summary()
        verdict = "identical" if self.identical else "different"
        if self.atol is not None:
            verdict += f" (within --atol {self.atol:g})"
        beyond = sum(t.status == "changed" and not self.within_atol(t) for t in self.tensors)
        dtype = sum(t.status == "dtype_mismatch" and not self.within_atol(t) for t in self.tensors)
        within = f"{s['within_atol']} within --atol, " if self.atol is not None else ""
        bad = (
            f"; {plural(s['non_finite'], 'tensor')} {'holds' if s['non_finite'] == 1 else 'hold'} NaN or Inf"
            if s["non_finite"]
            else ""
        )
        return (
            f"{verdict}: {plural(s['common'], 'common tensor')} — {s['identical']} identical, {within}"
            f"{beyond} changed, {dtype} dtype mismatches, {s['shape_mismatch']} shape mismatches; "
            f"{s['only_in_a']} only in A, {s['only_in_b']} only in B{bad}"
        )


def _cut(lines: list[str], top: int, what: str) -> list[str]:
    """The first ``top`` lines, and how many more there are."""
    return lines[:top] + ([f"... {len(lines) - top} more {what}"] if len(lines) > top else [])


def _number(value: float | None, width: int, spec: str) -> str:
    """A statistic, or a dash where there is none (a tensor holding NaN or Inf)."""
    if value is None or math.isnan(value):
        return "—".rjust(width)
    return f"{value:>{width}{spec}}"


def _rows(shown: list[TensorDiff]) -> list[str]:
    if not shown:
        return []
    profile = any(t.rank_50 is not None for t in shown)
    width = max(len("tensor"), *(len(t.name) for t in shown))
    head = f"{'tensor'.ljust(width)}  {'status':<14} {'rel.change':>10} {'max|Δ|':>10} {'cosine':>9} {'identical':>9}"
    lines = [head + ("  rank50 rank90 rank99" if profile else "")]
    for t in shown:
        line = (
            f"{t.name.ljust(width)}  {t.status:<14} {_number(t.rel_change, 10, '.3g')} "
            f"{_number(t.max_abs_diff, 10, '.3g')} {_number(t.cosine, 9, '.6f')} "
            f"{_number(t.identical_fraction, 9, '.2%')}"
        )
        if profile and t.rank_50 is not None:
            line += f"  {t.rank_50:>6} {t.rank_90:>6} {t.rank_99:>6}"
        lines.append(line)
    return lines


def _json_safe(doc: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in doc.items()}


def compute_diff(
    op: DiffOp, tensors: Mapping[Ref, torch.Tensor], device: torch.device, *, profile: bool, seed: int
) -> Outcome[TensorDiff]:
    a, b = tensors[op.a], tensors[op.b]
    if not op.comparable:
        return Outcome([], TensorDiff(op.name, "shape_mismatch"))
    if same_bits(a, b):
        return Outcome([], TensorDiff(op.name, "identical", 0.0, 0.0, 1.0, 1.0, **_counts(a, b, same=True)))
    same = identical_fraction(a, b)
    status: Status = "dtype_mismatch" if a.dtype != b.dtype else "changed"
    counts = _counts(a, b, same=False)
    if any(counts.values()):  # no similarity to speak of: report the counts instead
        return Outcome([], TensorDiff(op.name, status, identical_fraction=same, **counts))
    if not a.dtype.is_floating_point and a.dtype == b.dtype:  # integers: exact in float64
        a, b = a.to(torch.float64), b.to(torch.float64)
    a, b = a.to(device), b.to(device)
    stats = change(a, b)
    ranks: Sequence[int | None] = (None, None, None)
    if profile and a.dim() == 2 and stats.max_abs_diff > 0:
        ranks = rank_profile(b.to(torch.float32) - a.to(torch.float32), seed=seed + zlib.crc32(op.name.encode()))
    return Outcome(
        [], TensorDiff(op.name, status, stats.rel_change, stats.max_abs_diff, stats.cosine, same, *ranks, **counts)
    )


def _counts(a: torch.Tensor, b: torch.Tensor, *, same: bool) -> dict[str, int]:
    """NaN and Inf elements in A and in B (B's are A's when the bits are the same)."""
    nan_a, inf_a = non_finite(a)
    nan_b, inf_b = (nan_a, inf_a) if same else non_finite(b)
    return {"nan_in_a": nan_a, "nan_in_b": nan_b, "inf_in_a": inf_a, "inf_in_b": inf_b}


def _kept_names(ca: Checkpoint, cb: Checkpoint, keep: NameFilter) -> tuple[list[str], list[str]]:
    """The tensor names of A and B that --include/--exclude keep; a filter that leaves nothing is refused."""
    names_a, names_b = [n for n in ca if keep(n)], [n for n in cb if keep(n)]
    if keep.active and not names_a and not names_b and (len(ca) or len(cb)):
        example = next(iter(ca), None) or next(iter(cb))
        raise OptionError(
            f"{keep.describe()} leaves none of the {len(ca)} + {len(cb)} tensors of A and B to "
            f"compare (names look like {example!r})"
        )
    return names_a, names_b


def _diff_ops(ca: Checkpoint, cb: Checkpoint, names_a: list[str], in_b: set[str]) -> list[DiffOp]:
    """One op per tensor in both, in A's order; a shape mismatch is planned but reads nothing."""
    ops = []
    for name in (n for n in names_a if n in in_b):
        ia, ib = ca.info(name), cb.info(name)
        same = ia.shape == ib.shape
        ops.append(DiffOp(name, Ref(0, name), Ref(1, name), same, ia.nbytes + ib.nbytes if same else 0))
    return ops


def diff(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    rank_profile: bool = False,
    atol: float | None = None,
    include: str | None = None,
    exclude: str | None = None,
    device: str = "cpu",
    seed: int = 0,
    plot: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    stream: bool = False,
    progress: Progress | None = None,
) -> DiffReport:
    """Compare two checkpoints tensor by tensor (any layouts the reader supports), streamed.

    Args:
        a, b: folders, files or Hub repo ids.
        rank_profile: for each changed 2-D tensor, the ranks keeping 50/90/99% of ‖B − A‖².
        atol: values within this absolute tolerance count as equal for the verdict.
        include / exclude: regexes on tensor names (re.search); one that leaves nothing is an error.
        device: where the comparison runs.
        seed: of the randomized solver behind ``rank_profile``.
        plot: a picture to write (.png, .pdf, .svg; needs matplotlib): a layers × module-kind heatmap of
            relative change (and of rank_90 with ``rank_profile``), the tensors outside the layers apart.
        overwrite: replace an earlier picture at ``plot``.
        stream: a Hub input's weights read in place, by HTTP range, instead of downloaded.
        progress: told the bytes to read and each tensor done.

    Returns:
        A DiffReport: keys only in A or B, each common tensor's status, change statistics and share
        of identical elements; ``exit_code`` as diff(1); ``to_dict()`` is ``diff --json``.

    Raises:
        InputNotFoundError: no such local path, or no such Hub repo or revision.
        CorruptCheckpointError, UnsafeCheckpointError: a file that cannot be read safely.
        InvalidOptionError: a negative atol, an invalid regex, a filter that matches nothing.
        UnsupportedError: a checkpoint quantized in a format lorasurgeon does not read.
    """
    settings = DiffSettings.parse(
        rank_profile=rank_profile, atol=atol, include=include, exclude=exclude, device=device, seed=seed
    )
    return run(a, b, Output(plot, overwrite, progress=progress, stream=stream), settings)


@dataclass(frozen=True)
class DiffSettings:
    """How to compare. Make it with :meth:`parse`, which checks every option by name; the fields are
    :func:`diff`'s keywords (``names``: the --include / --exclude regexes, compiled)."""

    rank_profile: bool = False
    atol: float | None = None
    names: NameFilter = NameFilter()
    device: str = "cpu"
    seed: int = 0

    @classmethod
    def parse(
        cls,
        *,
        rank_profile: bool = False,
        atol: float | None = None,
        include: str | None = None,
        exclude: str | None = None,
        device: str = "cpu",
        seed: int = 0,
    ) -> DiffSettings:
        if atol is not None and not atol >= 0:
            raise OptionError(f"--atol must be a non-negative number, got {atol}")
        return cls(rank_profile, atol, NameFilter.parse(include, exclude), device, seed)


def run(a: str | os.PathLike[str], b: str | os.PathLike[str], out: Output, settings: DiffSettings) -> DiffReport:
    """Compare ``a`` and ``b`` as ``settings`` say; ``out`` is the picture to draw (its path None: none): what
    :func:`diff` builds its two objects for, and the CLI calls."""
    picture = check_plot_path(out.path, [a, b], overwrite=out.overwrite)
    device, keep = settings.device, settings.names
    src_a, src_b = prepare(
        [Input(a, "A"), Input(b, "B")], None, command="diff", overwrite=False, device=device, in_place=out.stream
    )
    with open_checkpoint(src_a.path) as raw_a, open_checkpoint(src_b.path) as raw_b:
        # a quantized checkpoint is compared by its values (dequantized), not its stored codes
        ca, _ = plain_weights(raw_a, read_config(raw_a), role=f"{src_a.label}: A")
        cb, _ = plain_weights(raw_b, read_config(raw_b), role=f"{src_b.label}: B")
        names_a, names_b = _kept_names(ca, cb, keep)
        ops = _diff_ops(ca, cb, names_a, set(names_b))
        stats = engine_run(
            [o for o in ops if o.comparable],  # shape mismatches need no data: don't read them
            [ca, cb],
            Discard(),
            compute=partial(compute_diff, profile=settings.rank_profile, seed=settings.seed),
            device=device,
            progress=out.progress,
        )
        found = {t.name: t for t in stats.infos}
        tensors = [found.get(o.name) or TensorDiff(o.name, "shape_mismatch") for o in ops]
    set_a, set_b = set(names_a), set(names_b)
    only_a, only_b = [n for n in names_a if n not in set_b], [n for n in names_b if n not in set_a]
    report = DiffReport(str(src_a.path), str(src_b.path), only_a, only_b, tensors, settings.atol, stats.seconds)
    if picture is not None:
        save(diff_figure(report), picture, overwrite=out.overwrite)
        report = replace(report, plot=str(picture))
    return report
