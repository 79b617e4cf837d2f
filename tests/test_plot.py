"""diff --plot and extract --plot: the PNG is written whole with the figure's size, and what each panel draws
is the report's numbers (read back from the figure's artists, not from pixels); mistakes and a missing
matplotlib are refused by name before any work."""

from __future__ import annotations

import math
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import FIX_ADAPTER, FIX_BASE, ROOT, listing, one_line_error, run_cli

import lorasurgeon as ls
from lorasurgeon.commands.plot import DPI, diff_figure, extract_figure, grid, values_of

pytest.importorskip("matplotlib")

LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def expected_grid(values: dict[str, float]) -> tuple[np.ndarray, list[tuple[str, float]]]:
    """The committed Llama's layers × kinds, built here from the names: what a heatmap of these values shows."""
    cells, apart = {}, []
    for name, v in values.items():
        m = LAYER.match(name)
        if m:
            cells[(int(m[1]), m[2])] = v
        else:
            apart.append((name.removesuffix(".weight"), v))
    layers = sorted({k[0] for k in cells})
    kinds = list(dict.fromkeys(k[1] for k in cells))
    out = np.full((len(layers), len(kinds)), np.nan)
    for (layer, kind), v in cells.items():
        out[layers.index(layer), kinds.index(kind)] = v
    return out, apart


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plot") / "merged"
    assert run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", out, "-q").exit_code == 0
    return out


def test_diff_plot_draws_the_reports_changes_and_rank_profile(tmp_path, merged):
    r = run_cli("diff", FIX_BASE, merged, "--rank-profile", "--plot", tmp_path / "diff.png", "-q")
    assert r.exit_code == 1, r.output  # different, as diff(1)
    report = ls.diff(FIX_BASE, merged, rank_profile=True)
    fig = diff_figure(report)
    width, height = fig.get_size_inches() * DPI
    assert png_size(tmp_path / "diff.png") == (round(width), round(height))
    drawn = values_of(fig)
    change = {t.name: t.rel_change if t.status == "changed" else math.nan for t in report.tensors}
    want, apart = expected_grid(change)
    np.testing.assert_array_equal(np.ma.filled(drawn["relative change ‖B − A‖ / ‖A‖"], np.nan), want)
    ranks = {t.name: float(t.rank_90) if t.rank_90 is not None else math.nan for t in report.tensors}
    np.testing.assert_array_equal(np.ma.filled(drawn["rank keeping 90% of ‖B − A‖²"], np.nan), expected_grid(ranks)[0])
    # the embedding, head and final norm apart (all unchanged by this adapter: zero-width bars, marked)
    assert {n for n, _ in apart} == {"model.embed_tokens", "model.norm", "lm_head"}
    assert drawn["outside the layers"] == [0.0, 0.0, 0.0]
    assert listing(tmp_path) == {"diff.png"}  # no scratch file left


def test_diff_plot_marks_tensors_only_in_one(tmp_path):
    report = ls.diff(FIX_BASE, FIX_ADAPTER)  # nothing in common: every tensor only in A or only in B
    g = grid(
        [(t.name, math.nan, "") for t in report.tensors]
        + [(n, math.nan, "A") for n in report.only_in_a]
        + [(n, math.nan, "B") for n in report.only_in_b]
    )
    assert set(g.marks.values()) == {"A", "B"}
    diff_figure(report)  # draws without a value anywhere


def test_the_grid_keeps_encoder_and_decoder_apart():
    g = grid(
        [
            ("encoder.block.0.layer.0.SelfAttention.q.weight", 1.0, ""),
            ("decoder.block.0.layer.0.SelfAttention.q.weight", 2.0, ""),
            ("decoder.block.1.layer.0.SelfAttention.q.weight", 3.0, "="),
            ("shared.weight", 4.0, ""),
        ]
    )
    assert g.layers == [0, 1] and g.kinds == ["encoder:layer.0.SelfAttention.q", "decoder:layer.0.SelfAttention.q"]
    assert g.values[0] == [1.0, 2.0] and g.values[1][1] == 3.0 and math.isnan(g.values[1][0])
    assert g.marks == {(1, 1): "="} and g.apart == [("shared", 4.0, "")]


def test_extract_plot_draws_kept_share_rank_and_singular_value_decay(tmp_path, merged):
    out = tmp_path / "lora"
    r = run_cli("extract", FIX_BASE, merged, "--energy", "0.9", "-o", out, "--plot", tmp_path / "x.png", "-q")
    assert r.exit_code == 0, r.output
    report = ls.extract(FIX_BASE, merged, tmp_path / "again", energy=0.9)
    fig = extract_figure(report)
    width, height = fig.get_size_inches() * DPI
    assert png_size(tmp_path / "x.png") == (round(width), round(height))
    drawn = values_of(fig)
    modules = {f"{m.name}.weight": m for m in report.modules}
    want_kept, _ = expected_grid({n: m.kept for n, m in modules.items()})
    np.testing.assert_array_equal(np.ma.filled(drawn["share of ‖ΔW‖² kept"], np.nan), want_kept)
    want_rank, _ = expected_grid({n: float(m.rank) for n, m in modules.items()})
    np.testing.assert_array_equal(np.ma.filled(drawn["rank chosen"], np.nan), want_rank)
    (title,) = [t for t in drawn if t.startswith("singular values")]
    largest = sorted(report.modules, key=lambda m: -m.energy)[:6]
    assert list(drawn[title]) == [m.name for m in largest]
    for m in largest:
        assert drawn[title][m.name] == [s / m.sigma[0] for s in m.sigma]
        assert 0 < len(m.sigma) <= 64 and m.sigma == sorted(m.sigma, reverse=True)
    doc = (out / "extract_report.json").read_text()
    assert '"sigma"' in doc and '"energy"' in doc  # the numbers the picture is drawn from are in the report


def test_plot_mistakes_are_refused_before_any_work(tmp_path, merged):
    args = ("extract", FIX_BASE, merged, "--rank", "2", "-o", tmp_path / "lora")
    one_line_error(run_cli(*args, "--plot", tmp_path / "x.jpg"), ".png")
    one_line_error(run_cli(*args, "--plot", tmp_path / "nope" / "x.png"), "no such folder")
    one_line_error(run_cli(*args, "--plot", tmp_path / "x.png", "--dry-run"), "--dry-run")
    one_line_error(run_cli("diff", FIX_BASE, merged, "--plot", tmp_path / "d.svgz"), ".png")
    assert listing(tmp_path) == set()


def test_a_picture_goes_by_every_results_rules_never_into_an_input(tmp_path, merged):
    """The picture is a result like any other (io.publish.check_place): never written into an input's folder."""
    before = listing(merged)
    inside = merged / "diff.png"
    one_line_error(run_cli("diff", FIX_BASE, merged, "--plot", inside), "--plot", "overlaps the input")
    extract = ("extract", FIX_BASE, merged, "--rank", "2", "-o", tmp_path / "lora", "--plot", inside)
    one_line_error(run_cli(*extract), "--plot", "overlaps the input")
    assert listing(merged) == before and not (tmp_path / "lora").exists()


def test_without_matplotlib_the_extra_is_named(tmp_path, merged):
    script = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from lorasurgeon.cli import main\n"
        "sys.argv = ['lorasurgeon'] + sys.argv[1:]\n"
        "main()\n"
    )
    args = ["extract", str(FIX_BASE), str(merged), "--rank", "2", "-o", str(tmp_path / "lora"), "--plot"]
    done = subprocess.run(
        [sys.executable, "-c", script, *args, str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=os.environ.copy(),
    )
    assert done.returncode == 2 and "lorasurgeon[plot]" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert listing(tmp_path) == set()


def panel(fig, title: str):
    """The axes whose title's first line is ``title`` (the second line gives the range drawn)."""
    (ax,) = [ax for ax in fig.axes if ax.get_title().split("\n")[0] == title]
    return ax


def synthetic(layers: int, kinds: int, rel=lambda i, j: 0.02 + 1e-5 * j, rank=lambda i, j: 6 + (i + j) % 2):
    from lorasurgeon.commands.diff import DiffReport, TensorDiff

    tensors = [
        TensorDiff(f"model.layers.{i}.k{j}.weight", "changed", rel(i, j), 0.1, 0.99, 0.0, 1, rank(i, j), 9)
        for i in range(layers)
        for j in range(kinds)
    ]
    return DiffReport("a", "b", [], [], tensors, None, 0.0)


def test_relative_change_is_coloured_from_zero_and_the_title_gives_the_range(merged):
    report = ls.diff(FIX_BASE, merged, rank_profile=True)
    ax = panel(diff_figure(report), "relative change ‖B − A‖ / ‖A‖")
    lo, hi = ax.images[0].get_clim()
    values = [t.rel_change for t in report.tensors if t.status == "changed"]
    assert max(values) < 1.01 * min(values)  # a tiny spread: it must not look dramatic
    assert lo == 0 and max(values) <= hi
    assert f"{min(values):.4g}" in ax.get_title() and f"{max(values):.4g}" in ax.get_title()


def test_relative_change_over_decades_is_drawn_on_whole_decades():
    fig = diff_figure(synthetic(3, 4, rel=lambda i, j: 3e-4 * 10 ** (j / 1.5)))
    lo, hi = panel(fig, "relative change ‖B − A‖ / ‖A‖").images[0].get_clim()
    assert (lo, hi) == pytest.approx((1e-4, 0.1))  # data from 3e-4 to 3e-2


def test_ranks_are_drawn_in_integer_steps(tmp_path, merged):
    fig = diff_figure(ls.diff(FIX_BASE, merged, rank_profile=True))
    extract = extract_figure(ls.extract(FIX_BASE, merged, tmp_path / "lora", rank=8))
    for image in (panel(fig, "rank keeping 90% of ‖B − A‖²").images[0], panel(extract, "rank chosen").images[0]):
        ticks = image.colorbar.get_ticks()
        assert len(ticks) >= 2 and all(float(t).is_integer() for t in ticks), ticks
        assert image.to_rgba(6.0) == image.to_rgba(6.3) != image.to_rgba(7.0)  # one colour per rank
    assert panel(extract, "share of ‖ΔW‖² kept").images[0].get_clim() == (0.0, 1.0)
    assert "%" in panel(extract, "share of ‖ΔW‖² kept").get_title().split("\n")[1]


def test_figures_are_sized_to_their_grid(tmp_path, merged):
    def px(fig):
        width, height = fig.get_size_inches() * DPI
        return width, height

    fig = diff_figure(ls.diff(FIX_BASE, merged, rank_profile=True))  # 2 layers × 9 kinds, 3 tensors apart
    width, height = px(fig)
    assert 300 <= height and width <= 1500 and width / height <= 4
    fig.draw_without_rendering()
    apart = panel(fig, "outside the layers").get_position().width
    assert apart < 0.6 * panel(fig, "relative change ‖B − A‖ / ‖A‖").get_position().width
    deep = diff_figure(synthetic(80, 7))
    assert not [ax for ax in deep.axes if ax.get_title() == "outside the layers"]  # none apart: no panel
    deep_width, deep_height = px(deep)
    assert height < deep_height <= 1600 and deep_width <= width
    wide_width, _ = px(diff_figure(synthetic(2, 60)))
    assert wide_width <= 3000
    ew, eh = px(extract_figure(ls.extract(FIX_BASE, merged, tmp_path / "lora", rank=8)))
    assert 300 <= eh and ew <= 1600


def test_a_calibrated_extract_plot_draws_the_output_error_left_against_the_plain_svds(tmp_path, merged):
    report = ls.extract(FIX_BASE, merged, tmp_path / "lora", rank=3, calibration=FIX_BASE.parent / "calibration.txt")
    drawn = values_of(extract_figure(report))
    modules = {f"{m.name}.weight": m for m in report.modules}
    left = {n: m.output.after / m.output.before for n, m in modules.items() if m.output is not None}
    want, _ = expected_grid(left)
    np.testing.assert_array_equal(np.ma.filled(drawn["output error left (share of E‖ΔW·x‖²)"], np.nan), want)
    (title,) = [t for t in drawn if t.startswith("output error at the rank chosen")]
    assert drawn[title]["modules"] == [max(m.output.after, 1e-12) for m in report.modules if m.output is not None]
    assert all(m.output is not None and m.output.after <= m.output.plain_svd for m in report.modules)


def test_extract_plot_says_where_it_wrote_and_sizes_in_words(tmp_path, merged):
    picture = tmp_path / "e.png"
    done = run_cli("extract", FIX_BASE, merged, "--rank", "4", "-o", tmp_path / "lora", "--plot", picture)
    assert done.exit_code == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == f"Wrote {picture}" and picture.read_bytes().startswith(b"\x89PNG")
    assert "0.0 MiB" not in done.stdout and re.search(r"parameters \(\d+(\.\d+)? KiB\)", done.stdout)
