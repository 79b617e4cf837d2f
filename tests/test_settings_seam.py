"""Settings are the seam: every command is ``run(inputs, out, settings)``; the public keyword functions and the
CLI build the same two objects, so they give the same bytes, and every option is checked once, by name."""

from __future__ import annotations

import warnings

import pytest
from helpers import FIX_ADAPTER, FIX_BASE, run_cli

import lorasurgeon as ls
from lorasurgeon.adapter.formats.registry import adapter_writer
from lorasurgeon.commands import convert, diff, extract, merge, resize
from lorasurgeon.commands._inputs import Output
from lorasurgeon.commands.resize.settings import ResizeSettings
from lorasurgeon.errors import InvalidOptionError, UnsupportedError


def _bytes(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "README.md"}


def test_run_with_settings_is_the_keyword_function_and_the_cli(tmp_path):
    settings = merge.MergeSettings.parse(adapters=1, weights=[0.5], dtype="float32")
    by_run = merge.run(FIX_BASE, [FIX_ADAPTER], Output(tmp_path / "run"), settings)
    ls.merge(FIX_BASE, FIX_ADAPTER, tmp_path / "kw", weights=[0.5], dtype="float32")
    cli = run_cli("merge", FIX_BASE, FIX_ADAPTER, "--weight", "0.5", "--dtype", "float32", "-o", tmp_path / "cli")
    assert cli.exit_code == 0, cli.output
    assert by_run.counts["merge"] == 14
    assert _bytes(tmp_path / "run") == _bytes(tmp_path / "kw") == _bytes(tmp_path / "cli")


def test_every_command_has_a_run_taking_an_output_and_its_settings(tmp_path):
    merged = tmp_path / "merged"
    merge.run(FIX_BASE, [FIX_ADAPTER], Output(merged), merge.MergeSettings.parse(adapters=1))
    unmerged = merge.run(
        merged, [FIX_ADAPTER], Output(None, dry_run=True), merge.MergeSettings.parse(adapters=1, unmerge=True)
    )
    assert unmerged.dry_run and unmerged.form == "unmerged"
    got = extract.run(FIX_BASE, merged, Output(tmp_path / "x"), extract.ExtractSettings.parse(rank=2))
    assert got.modules and (tmp_path / "x" / "adapter_config.json").is_file()
    small = resize.run([FIX_ADAPTER], Output(tmp_path / "r"), ResizeSettings.parse(adapters=1, rank=2))
    assert {m.rank for m in small.modules} == {2}
    both = resize.run(
        [FIX_ADAPTER, tmp_path / "r"], Output(None, dry_run=True), ResizeSettings.parse(adapters=2, combining=True)
    )
    assert both.dry_run and both.weights == [1.0, 1.0]
    seen = diff.run(FIX_BASE, merged, Output(None), diff.DiffSettings.parse(atol=1.0))
    assert seen.exit_code == 0  # every change is within 1.0
    halves = convert.run(merged, Output(tmp_path / "f32"), convert.ConvertSettings.parse(dtype="float32"))
    assert halves.form == "converted"


def test_a_settings_object_refuses_by_option_name():
    with pytest.raises(InvalidOptionError, match="give one weight per adapter"):
        merge.MergeSettings.parse(adapters=2, weights=[1.0])
    with pytest.raises(InvalidOptionError, match="combine takes two adapters or more"):
        ResizeSettings.parse(adapters=1, combining=True)
    with pytest.raises(InvalidOptionError, match="give rank=N, energy=F or budget"):
        ResizeSettings.parse(adapters=1)
    with pytest.raises(InvalidOptionError, match="unknown for_ 'tgi'"):
        ResizeSettings.parse(adapters=1, rank=2, for_="tgi")
    with pytest.raises(InvalidOptionError, match="atol must be a non-negative number"):
        diff.DiffSettings.parse(atol=-1.0)
    with pytest.raises(InvalidOptionError, match="unknown target form 'gguf'"):
        convert.ConvertSettings.parse(to="gguf")
    with pytest.raises(InvalidOptionError, match="plot draws what extract computed"):
        extract.run(FIX_BASE, FIX_BASE, Output(None, dry_run=True), extract.ExtractSettings.parse(rank=2, plot="x.png"))
    with pytest.raises(InvalidOptionError, match="an output folder is needed"):
        merge.run(FIX_BASE, [FIX_ADAPTER], Output(None), merge.MergeSettings.parse(adapters=1))


def test_merge_unmerge_keyword_still_works_and_says_to_call_unmerge(tmp_path):
    ls.merge(FIX_BASE, FIX_ADAPTER, tmp_path / "m")
    with pytest.warns(FutureWarning, match=r"merge\(unmerge=True\) is unmerge"):
        ls.merge(tmp_path / "m", FIX_ADAPTER, tmp_path / "u1", unmerge=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ls.unmerge(tmp_path / "m", FIX_ADAPTER, tmp_path / "u2")
    assert _bytes(tmp_path / "u1") == _bytes(tmp_path / "u2")


def test_adapters_are_written_through_the_registry_and_an_unknown_format_is_refused(tmp_path):
    with pytest.raises(UnsupportedError, match="does not write 'gguf' adapters \\(it writes .*peft.*\\)"):
        adapter_writer(tmp_path / "a", overwrite=False, name="gguf")  # read (against a base), not written
    assert not (tmp_path / "a").exists()
    writer = adapter_writer(tmp_path / "a", overwrite=False)
    writer.abort()
    assert not any(tmp_path.iterdir())
