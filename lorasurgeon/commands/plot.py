"""Pictures of reports: ``diff --plot`` and ``extract --plot``. matplotlib (the ``plot`` extra) is imported
here only, when a picture is asked for; without it the command is refused by name before any work.

Each figure is drawn from the report's own numbers, laid out on a layers × module-kind grid
(``grid``): a tensor named ``<stack>.<layer>.<kind>`` goes to row ``layer``, column ``kind``; tensors
outside the layers (embedding, head, final norm) are drawn apart, as bars.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import InvalidOptionError, LorasurgeonError, OutputError, OutputExistsError, UnsupportedError
from ..io.publish import absolute, check_place, check_replaceable, earlier_file, publish
from ..io.scratch import writing

if TYPE_CHECKING:
    from .diff import DiffReport, TensorDiff
    from .extract.report import ExtractReport, ModuleStats

FORMATS = (".png", ".pdf", ".svg")
DPI = 100
_LAYER = re.compile(r"^(?P<stack>.*?)\.(?P<index>\d+)\.(?P<kind>.+)$")


@dataclass(frozen=True)
class Grid:
    """Values on layers × kinds (NaN where a layer has no such tensor), a mark per cell where the value alone
    does not tell (``=`` unchanged, ``A``/``B`` only in one, ``≠`` shape or dtype mismatch), and the tensors
    outside the layers with their values."""

    layers: list[int]
    kinds: list[str]
    values: list[list[float]]  # [row][column]
    marks: dict[tuple[int, int], str]
    apart: list[tuple[str, float, str]]  # (name, value, mark)


def _short(name: str) -> str:
    return name.removesuffix(".weight")


def grid(cells: Iterable[tuple[str, float, str]]) -> Grid:
    """Lay (tensor name, value, mark) out by layer and kind; a kind keeps its stack's name when there are
    several stacks (encoder / decoder)."""
    placed: list[tuple[str, int, str, float, str]] = []
    apart: list[tuple[str, float, str]] = []
    for name, value, mark in cells:
        found = _LAYER.match(name)
        if found is None:
            apart.append((_short(name), value, mark))
        else:
            placed.append((found["stack"], int(found["index"]), _short(found["kind"]), value, mark))
    stacks = sorted({p[0] for p in placed})
    heads = {s.split(".")[0] for s in stacks}
    short = {s: (s.split(".")[0] if len(heads) == len(stacks) else s) for s in stacks}  # encoder, decoder

    def labelled(stack: str, kind: str) -> str:
        return f"{short[stack]}:{kind}" if len(stacks) > 1 else kind

    kinds: list[str] = []
    for stack, _, kind, _, _ in placed:
        label = labelled(stack, kind)
        if label not in kinds:
            kinds.append(label)
    layers = sorted({p[1] for p in placed})
    row = {layer: i for i, layer in enumerate(layers)}
    column = {k: j for j, k in enumerate(kinds)}
    values = [[math.nan] * len(kinds) for _ in layers]
    marks: dict[tuple[int, int], str] = {}
    for stack, index, kind, value, mark in placed:
        i, j = row[index], column[labelled(stack, kind)]
        values[i][j] = value
        if mark:
            marks[(i, j)] = mark
    return Grid(layers, kinds, values, marks, apart)


def check_plot_path(
    path: str | os.PathLike[str] | None, inputs: Sequence[str | os.PathLike[str]] = (), *, overwrite: bool = False
) -> Path | None:
    """The picture's path, checked before any work: a known format, by every result's rules (``io.publish.
    check_place``: never an input, inside one, or a protected folder), a folder that exists, nothing there
    unless ``overwrite`` (and then an earlier picture), matplotlib there."""
    if path is None:
        return None
    out = Path(path)
    if out.suffix.lower() not in FORMATS:
        raise InvalidOptionError(f"--plot {out}: give a file ending in {', '.join(FORMATS)}")
    if out.is_dir():
        raise OutputError(f"--plot {out}: a folder; give a file name (e.g. {out / 'plot.png'})")
    try:
        check_place(out, inputs)
    except OutputError as exc:
        raise OutputError(f"--plot {exc}") from None
    if os.path.lexists(out):
        if not overwrite:
            raise OutputExistsError(f"--plot {out}: already exists (pass --overwrite to replace an earlier picture)")
        check_replaceable(out, _earlier_picture(out))
    if not out.parent.is_dir():
        raise OutputError(f"--plot {out}: no such folder {out.parent}")
    _matplotlib()
    return out


def _matplotlib() -> Any:
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError:
        raise UnsupportedError(
            "--plot needs matplotlib: pip install 'lorasurgeon[plot]' (or pip install matplotlib)"
        ) from None
    return matplotlib, Figure


Scale = Literal["change", "share", "rank"]  # non-negative, 0..1, integers

CELL = 0.4  # inches a heatmap cell is wide (and tall, until the height's cap)
MIN_HEIGHT, MAX_HEIGHT = 4.0, 16.0  # inches: a figure of a shallow model still holds its labels; a deep one fits
MAX_CELLS_WIDTH = 12.0  # inches of cells in one heatmap at most (many kinds: narrower cells)
SIGMA_WIDTH = 5.5  # inches of the singular-value panel


def _heatmap_size(g: Grid) -> tuple[float, float]:
    """Inches for one heatmap: its cells, plus room for the layer labels and colourbar (across) and the title
    and the kinds' slanted labels (down)."""
    slant = 0.056 * max((len(k) for k in g.kinds), default=0)
    width = min(MAX_CELLS_WIDTH, CELL * len(g.kinds)) + 2.3
    return width, min(MAX_HEIGHT, max(MIN_HEIGHT, CELL * len(g.layers) + slant + 1.4))


def _bars_size(apart: list[tuple[str, float, str]]) -> tuple[float, float]:
    """Inches for the bars of the tensors outside the layers: their names and, when any has a value, the bars."""
    names = 0.07 * max((len(n) for n, _, _ in apart), default=0)
    drawn = any(math.isfinite(v) and v > 0 for _, v, _ in apart)
    return names + (2.2 if drawn else 1.2), min(MAX_HEIGHT, max(MIN_HEIGHT, 0.3 * len(apart) + 1.5))


def _panels(fig: Any, widths: list[float]) -> list[Any]:
    return list(fig.subplots(1, len(widths), squeeze=False, gridspec_kw={"width_ratios": widths})[0])


def _norm(matplotlib: Any, values: list[float], scale: Scale, colours: int) -> Any:
    """A colour scale anchored so that a small spread looks small: a share from 0 to 1, ranks from 0 in integer
    steps, a relative change from 0 (or over whole decades, log, when it spans more than one)."""
    colors = matplotlib.colors
    top = max(values, default=0.0)
    if scale == "share":
        return colors.Normalize(0.0, 1.0)
    if scale == "rank":
        step = max(1, math.ceil((top + 1) / 16))  # at most 16 colours, each a whole number of ranks
        return colors.BoundaryNorm([-0.5 + step * i for i in range(math.ceil((top + 1) / step) + 1)], colours)
    positive = [v for v in values if v > 0]
    if positive and max(positive) > 10 * min(positive):
        low, high = math.floor(math.log10(min(positive))), math.ceil(math.log10(max(positive)))
        return colors.LogNorm(10.0**low, 10.0**high)
    return colors.Normalize(0.0, top if top > 0 else 1.0)


def _range(values: list[float], scale: Scale) -> str:
    """The values drawn, for the panel's title (the colours alone do not say how close they are)."""
    if not values:
        return "no values"
    shown = {"share": "{:.2%}", "rank": "{:.0f}", "change": "{:.4g}"}[scale]
    low, high = shown.format(min(values)), shown.format(max(values))
    return f"all {low}" if low == high else f"range {low} – {high}"


def _heatmap(fig: Any, ax: Any, g: Grid, title: str, label: str, *, scale: Scale, cmap: str) -> None:
    matplotlib, _ = _matplotlib()
    import numpy as np

    data = np.ma.masked_invalid(np.array(g.values, dtype=np.float64).reshape(len(g.layers), len(g.kinds)))
    values = [float(v) for v in data.compressed()]
    colours = matplotlib.colormaps[cmap].with_extremes(bad="#e6e6e6")  # no value: light grey, with its mark
    norm = _norm(matplotlib, values, scale, colours.N)
    image = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=colours, norm=norm)
    ax.set_title(f"{title}\n{_range(values, scale)}", fontsize=10)
    ax.set_xticks(range(len(g.kinds)), g.kinds, rotation=60, ha="right", fontsize=8)
    step = max(1, len(g.layers) // 24)
    ax.set_yticks(range(0, len(g.layers), step), [str(x) for x in g.layers[::step]], fontsize=8)
    ax.set_ylabel("layer")
    for (i, j), mark in g.marks.items():
        ax.text(j, i, mark, ha="center", va="center", fontsize=7, color="black")
    ticks = matplotlib.ticker.MaxNLocator(integer=True) if scale == "rank" else None
    fig.colorbar(image, ax=ax, label=label, ticks=ticks)


def _bars(ax: Any, apart: list[tuple[str, float, str]], title: str, label: str) -> None:
    words = {"=": "unchanged", "A": "only in A", "B": "only in B", "≠": "shape or dtype differs"}
    values = [v if math.isfinite(v) else 0.0 for _, v, _ in apart]
    ax.barh(range(len(apart)), values, color="tab:orange")
    for i, (_, value, mark) in enumerate(apart):
        ax.text(0, i, f" {words.get(mark, '') or f'{value:.3g}'}", va="center", fontsize=7)
    ax.set_yticks(range(len(apart)), [n for n, _, _ in apart], fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(label)
    if max(values, default=0.0) > 0:
        ax.set_xlim(0, 1.25 * max(values))  # from 0, with room for the last value's label
    else:  # nothing to measure: the words alone
        ax.set_xlim(0, 1)
        ax.set_xticks([])


def _drawn(t: TensorDiff) -> tuple[float, str]:
    """A tensor's relative change as drawn, with its mark: NaN (a grey cell) where there is none to colour."""
    marks = {"identical": "=", "shape_mismatch": "≠", "dtype_mismatch": "≠"}
    if t.non_finite:
        return math.nan, "NaN"
    if t.status != "changed" or t.rel_change is None:
        return math.nan, marks.get(t.status, "")
    return t.rel_change, ("" if math.isfinite(t.rel_change) else "∞")


def diff_figure(report: DiffReport) -> Any:
    """A layers × module-kind heatmap of relative change (and of rank_90 when the report has rank profiles),
    with unchanged and only-in-one tensors marked, and the tensors outside the layers as bars (when any)."""
    _, figure = _matplotlib()
    cells = [(t.name, *_drawn(t)) for t in report.tensors]
    cells += [(n, math.nan, "A") for n in report.only_in_a] + [(n, math.nan, "B") for n in report.only_in_b]
    change = grid(cells)
    profiled = any(t.rank_90 is not None for t in report.tensors)
    sizes = [_heatmap_size(change)] * (1 + profiled) + ([_bars_size(change.apart)] if change.apart else [])
    fig = figure(figsize=(sum(w for w, _ in sizes), max(h for _, h in sizes)), dpi=DPI, layout="constrained")
    axes = _panels(fig, [w for w, _ in sizes])
    if change.layers:
        _heatmap(
            fig, axes[0], change, "relative change ‖B − A‖ / ‖A‖", "relative change", scale="change", cmap="viridis"
        )
    else:
        axes[0].set_axis_off()
    if profiled:
        ranks = grid(
            (t.name, float(t.rank_90) if t.rank_90 is not None else math.nan, "=" if t.status == "identical" else "")
            for t in report.tensors
        )
        _heatmap(fig, axes[1], ranks, "rank keeping 90% of ‖B − A‖²", "rank_90", scale="rank", cmap="magma")
    if change.apart:
        _bars(axes[-1], change.apart, "outside the layers", "relative change")
    fig.suptitle(f"{report.a}  →  {report.b}", fontsize=10)
    return fig


def extract_figure(report: ExtractReport, *, largest: int = 6) -> Any:
    """Per module, the share of ‖ΔW‖² kept at the chosen rank (and the rank), as layers × module-kind heatmaps;
    and the singular-value decay (σᵢ / σ₁) of the ``largest`` modules by ‖ΔW‖², the chosen rank marked."""
    _, figure = _matplotlib()
    calibrated = [m for m in report.modules if m.output is not None]
    first: tuple[str, str, Scale, str]
    if calibrated:  # the share of the output error left, by the factors stored (whitened SVD)
        kept = grid((m.name, _left(m), "") for m in report.modules)
        first = ("output error left (share of E‖ΔW·x‖²)", "left", "change", "viridis_r")
    else:
        kept = grid((m.name, m.kept, "") for m in report.modules)
        first = ("share of ‖ΔW‖² kept", "kept", "share", "viridis")
    ranks = grid((m.name, float(m.rank), "") for m in report.modules)
    size = _heatmap_size(kept) if kept.layers else _bars_size(kept.apart)
    fig = figure(figsize=(2 * size[0] + SIGMA_WIDTH, size[1]), dpi=DPI, layout="constrained")
    axes = _panels(fig, [size[0], size[0], SIGMA_WIDTH])
    if kept.layers:
        _heatmap(fig, axes[0], kept, first[0], first[1], scale=first[2], cmap=first[3])
        _heatmap(fig, axes[1], ranks, "rank chosen", "rank", scale="rank", cmap="magma")
    else:
        _bars(axes[0], kept.apart, first[0], first[1])
        _bars(axes[1], ranks.apart, "rank chosen", "rank")
    if calibrated:
        _against_plain(axes[2], calibrated)
        fig.suptitle(f"{report.finetuned} − {report.base}, calibrated", fontsize=10)
        return fig
    top = sorted((m for m in report.modules if m.sigma), key=lambda m: -m.energy)[:largest]
    ax = axes[2]
    for m in top:
        s1 = m.sigma[0]
        line = ax.semilogy(range(1, len(m.sigma) + 1), [s / s1 for s in m.sigma], label=_short(m.name), lw=1.2)[0]
        if 0 < m.rank <= len(m.sigma):
            ax.plot([m.rank], [m.sigma[m.rank - 1] / s1], "o", color=line.get_color(), ms=5)
    ax.set_title(f"singular values of the {len(top)} largest changes\n• the rank chosen", fontsize=10)
    ax.set_xlabel("i")
    ax.set_ylabel("σᵢ / σ₁")
    if top:
        ax.legend(fontsize=7)
    fig.suptitle(f"{report.finetuned} − {report.base}", fontsize=10)
    return fig


def _left(m: ModuleStats) -> float:
    """The share of a calibrated module's output error its factors leave (NaN for a module not calibrated)."""
    if m.output is None:
        return math.nan
    return m.output.after / m.output.before if m.output.before else 0.0


def _against_plain(ax: Any, modules: Sequence[ModuleStats]) -> None:
    """Each calibrated module's output error left by its factors against the plain SVD's of the same rank
    (relative to E‖W·x‖², log-log): below the diagonal, calibration did better."""
    plain = [max(m.output.plain_svd, 1e-12) for m in modules if m.output is not None]
    ours = [max(m.output.after, 1e-12) for m in modules if m.output is not None]
    ax.loglog(plain, ours, "o", ms=4, alpha=0.8, color="tab:blue", label="modules")
    low, high = min(plain + ours), max(plain + ours)
    ax.plot([low, high], [low, high], "--", color="grey", lw=1)
    better = sum(o < p for o, p in zip(ours, plain, strict=True))
    ax.set_title(
        f"output error at the rank chosen: {better} of {len(ours)}\nbelow plain SVD's (Σ {sum(ours):.3g} vs "
        f"{sum(plain):.3g})",
        fontsize=10,
    )
    matplotlib, _ = _matplotlib()
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("plain SVD (relative to E‖W·x‖², weighed alike)")
    ax.set_ylabel("calibrated (weighted SVD)")


PICTURE_MAGIC = {".png": b"\x89PNG", ".pdf": b"%PDF", ".svg": b"<?xml"}


def _earlier_picture(out: Path) -> Callable[[Path], str | None]:
    return earlier_file(out.suffix.lstrip(".").upper(), PICTURE_MAGIC[out.suffix.lower()])


def save(fig: Any, out: Path, *, overwrite: bool = False) -> None:
    """The figure written whole (a hidden file, published: see ``io.publish``) in the format its name ends with."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    writing()
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=out.suffix)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as any file the user writes (mkstemp makes it private)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format=out.suffix.lstrip(".").lower(), dpi=DPI)
        publish(Path(tmp), absolute(out), overwrite=overwrite, not_replaceable=_earlier_picture(out))
    except OSError as exc:
        if isinstance(exc, LorasurgeonError):
            raise
        raise OutputError(f"--plot {out}: cannot write ({exc.strerror or exc})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def values_of(fig: Any) -> Mapping[str, Any]:
    """What a figure drew, by panel title (its first line): a heatmap's array, a bar panel's widths, the lines'
    y data (for tests and scripts that check a picture against its report)."""
    found: dict[str, Any] = {}
    for ax in fig.axes:
        title = ax.get_title().split("\n")[0]  # a heatmap's second line gives its range
        if not title:
            continue
        if ax.images:
            found[title] = ax.images[0].get_array()
        elif ax.patches:
            found[title] = [p.get_width() for p in ax.patches]
        elif ax.lines:
            found[title] = {
                ln.get_label(): list(ln.get_ydata()) for ln in ax.lines if not ln.get_label().startswith("_")
            }
    return found
