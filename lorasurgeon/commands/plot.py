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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InvalidOptionError, OutputError, UnsupportedError

if TYPE_CHECKING:
    from .diff import DiffReport
    from .extract.report import ExtractReport

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


def check_plot_path(path: str | os.PathLike[str] | None) -> Path | None:
    """The picture's path, checked before any work: a known format, a folder that exists, matplotlib there."""
    if path is None:
        return None
    out = Path(path)
    if out.suffix.lower() not in FORMATS:
        raise InvalidOptionError(f"--plot {out}: give a file ending in {', '.join(FORMATS)}")
    if out.is_dir():
        raise OutputError(f"--plot {out}: a folder; give a file name (e.g. {out / 'plot.png'})")
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


def _heatmap(fig: Any, ax: Any, g: Grid, title: str, label: str, *, log: bool, cmap: str) -> None:
    matplotlib, _ = _matplotlib()
    import numpy as np

    data = np.ma.masked_invalid(np.array(g.values, dtype=np.float64).reshape(len(g.layers), len(g.kinds)))
    colours = matplotlib.colormaps[cmap].with_extremes(bad="#e6e6e6")  # no value: light grey, with its mark
    norm = None
    positive = data[data > 0]
    if log and positive.count() and float(positive.max()) > 10 * float(positive.min()):
        norm = matplotlib.colors.LogNorm(vmin=float(positive.min()), vmax=float(positive.max()))
    image = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=colours, norm=norm)
    ax.set_title(title)
    ax.set_xticks(range(len(g.kinds)), g.kinds, rotation=60, ha="right", fontsize=8)
    step = max(1, len(g.layers) // 24)
    ax.set_yticks(range(0, len(g.layers), step), [str(x) for x in g.layers[::step]], fontsize=8)
    ax.set_ylabel("layer")
    for (i, j), mark in g.marks.items():
        ax.text(j, i, mark, ha="center", va="center", fontsize=7, color="black")
    fig.colorbar(image, ax=ax, label=label)


def _bars(ax: Any, apart: list[tuple[str, float, str]], title: str, label: str) -> None:
    words = {"=": "unchanged", "A": "only in A", "B": "only in B", "≠": "shape or dtype differs"}
    values = [v if math.isfinite(v) else 0.0 for _, v, _ in apart]
    ax.barh(range(len(apart)), values, color="tab:orange")
    for i, (_, value, mark) in enumerate(apart):
        ax.text(0, i, f" {words.get(mark, '') or f'{value:.3g}'}", va="center", fontsize=7)
    ax.set_yticks(range(len(apart)), [n for n, _, _ in apart], fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title)
    ax.set_xlabel(label)


def _drawn(value: float | None, status: str) -> float:
    """A tensor's relative change as drawn: NaN (a grey cell, marked) where there is none to colour."""
    return value if value is not None and status == "changed" else math.nan


def diff_figure(report: DiffReport) -> Any:
    """A layers × module-kind heatmap of relative change (and of rank_90 when the report has rank profiles),
    with unchanged and only-in-one tensors marked, and the tensors outside the layers as bars."""
    _, figure = _matplotlib()
    marks = {"identical": "=", "shape_mismatch": "≠", "dtype_mismatch": "≠"}
    cells = [(t.name, _drawn(t.rel_change, t.status), marks.get(t.status, "")) for t in report.tensors]
    cells += [(n, math.nan, "A") for n in report.only_in_a] + [(n, math.nan, "B") for n in report.only_in_b]
    change = grid(cells)
    profiled = any(t.rank_90 is not None for t in report.tensors)
    panels = 1 + profiled + bool(change.apart)
    width = max(6.0, 0.45 * len(change.kinds) + 3)
    height = max(4.0, 0.22 * len(change.layers) + 3)
    fig = figure(figsize=(width * panels, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    if change.layers:
        _heatmap(fig, axes[0], change, "relative change ‖B − A‖ / ‖A‖", "relative change", log=True, cmap="viridis")
    else:
        axes[0].set_axis_off()
    at = 1
    if profiled:
        ranks = grid(
            (t.name, float(t.rank_90) if t.rank_90 is not None else math.nan, "=" if t.status == "identical" else "")
            for t in report.tensors
        )
        _heatmap(fig, axes[at], ranks, "rank keeping 90% of ‖B − A‖²", "rank_90", log=False, cmap="magma")
        at += 1
    if change.apart:
        _bars(axes[at], change.apart, "outside the layers", "relative change")
    fig.suptitle(f"{report.a}  →  {report.b}", fontsize=10)
    return fig


def extract_figure(report: ExtractReport, *, largest: int = 6) -> Any:
    """Per module, the share of ‖ΔW‖² kept at the chosen rank (and the rank), as layers × module-kind heatmaps;
    and the singular-value decay (σᵢ / σ₁) of the ``largest`` modules by ‖ΔW‖², the chosen rank marked."""
    _, figure = _matplotlib()
    kept = grid((m.name, m.kept, "") for m in report.modules)
    ranks = grid((m.name, float(m.rank), "") for m in report.modules)
    width = max(6.0, 0.45 * len(kept.kinds) + 3)
    height = max(4.0, 0.22 * len(kept.layers) + 3)
    fig = figure(figsize=(width * 2 + 6, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 3, squeeze=False)[0]
    if kept.layers:
        _heatmap(fig, axes[0], kept, "share of ‖ΔW‖² kept", "kept", log=False, cmap="viridis")
        _heatmap(fig, axes[1], ranks, "rank chosen", "rank", log=False, cmap="magma")
    else:
        _bars(axes[0], kept.apart, "share of ‖ΔW‖² kept", "kept")
        _bars(axes[1], ranks.apart, "rank chosen", "rank")
    top = sorted((m for m in report.modules if m.sigma), key=lambda m: -m.energy)[:largest]
    ax = axes[2]
    for m in top:
        s1 = m.sigma[0]
        line = ax.semilogy(range(1, len(m.sigma) + 1), [s / s1 for s in m.sigma], label=_short(m.name), lw=1.2)[0]
        if 0 < m.rank <= len(m.sigma):
            ax.plot([m.rank], [m.sigma[m.rank - 1] / s1], "o", color=line.get_color(), ms=5)
    ax.set_title(f"singular values of the {len(top)} largest changes (• chosen rank)")
    ax.set_xlabel("i")
    ax.set_ylabel("σᵢ / σ₁")
    if top:
        ax.legend(fontsize=7)
    fig.suptitle(f"{report.finetuned} − {report.base}", fontsize=10)
    return fig


def save(fig: Any, out: Path) -> None:
    """The figure written whole (a hidden file renamed into place) in the format its name ends with."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=out.suffix)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # as any file the user writes (mkstemp makes it private)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format=out.suffix.lstrip(".").lower(), dpi=DPI)
        os.replace(tmp, out)
    except OSError as exc:
        raise OutputError(f"--plot {out}: cannot write ({exc.strerror or exc})") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def values_of(fig: Any) -> Mapping[str, Any]:
    """What a figure drew, by panel title: a heatmap's array, a bar panel's widths, the lines' y data (for
    tests and scripts that check a picture against its report)."""
    found: dict[str, Any] = {}
    for ax in fig.axes:
        title = ax.get_title()
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
