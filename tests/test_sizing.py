"""Sizing: one set of rules for --rank / --energy / --budget / --budget-params / --max-rank, the same for
extract, resize and combine, from Python and from the command line."""

from __future__ import annotations

import pytest
from helpers import FIX_ADAPTER, FIX_BASE, one_line_error, run_cli

import lorasurgeon as ls
from lorasurgeon.commands.extract.settings import BUDGET_RANK, ExtractSettings
from lorasurgeon.commands.resize.settings import Target
from lorasurgeon.commands.sizing import Sizing
from lorasurgeon.errors import InvalidOptionError, speak_cli


@pytest.fixture
def flags():
    """Messages as the command line says them (--rank, not rank=)."""
    speak_cli(True)
    yield
    speak_cli(False)


@pytest.mark.parametrize(
    "options, message",
    [
        ({}, "give --rank N, --energy F or --budget SIZE (e.g. 15MB)"),
        ({"rank": 2, "energy": 0.5}, "--rank and --energy: give one of them (--rank gives every module one rank)"),
        ({"rank": 2, "budget": "1MB"}, "--rank and --budget: give one of them"),
        ({"rank": 2, "budget_params": 10}, "--rank and --budget-params: give one of them"),
        ({"rank": 2, "budget": 10}, "--rank and --budget-params: give one of them"),  # an int budget is parameters
        ({"budget": "1MB", "budget_params": 10}, "--budget and --budget-params: give one of them"),
        ({"energy": 0.5, "budget": "1MB"}, "--energy and --budget: give one of them"),
        ({"rank": 0}, "--rank must be at least 1, got 0"),
        ({"rank": 2.5}, "--rank must be at least 1, got 2.5"),
        ({"energy": 0.0}, "--energy must be in (0, 1], got 0.0"),
        ({"energy": float("nan")}, "--energy must be in (0, 1], got nan"),
        ({"rank": 8, "max_rank": 4}, "--max-rank caps the ranks --energy chooses; with --rank 8 every module"),
        ({"energy": 0.9, "max_rank": 0}, "--max-rank must be at least 1, got 0"),
        ({"budget_params": 0}, "--budget-params must hold at least one parameter, got 0"),
        ({"budget": "lots"}, "--budget 'lots': invalid size 'lots'"),
        ({"budget": 1.5}, "--budget 1.5: give a size (e.g. 15MB) or a number of parameters"),
    ],
)
def test_each_rule_is_named_by_option(flags, options, message):
    with pytest.raises(InvalidOptionError) as exc:
        Sizing.parse(**options)
    assert str(exc.value).startswith(message), str(exc.value)


def test_what_a_sizing_says_of_itself():
    size = Sizing.parse(budget="1KB", max_rank=4)
    assert (size.flag, size.budget_params(4), size.budget_params(2), size.exact) == ("--budget", 250, 500, False)
    count = Sizing.parse(budget_params=300)
    assert (count.budget, count.flag, count.budget_params(4)) == (300, "--budget-params", 300)
    assert Sizing.parse(budget=300) == count  # extract's budget=int: a number of parameters, as --budget-params
    assert Sizing.parse(required=False).exact and not Sizing.parse(rank=4).exact
    assert Sizing.parse(budget="1MB", default_max_rank=BUDGET_RANK).budget_rank == BUDGET_RANK
    assert Sizing.parse(budget="1MB", max_rank=16, default_max_rank=BUDGET_RANK).budget_rank == 16
    assert Sizing.parse(budget="1MB").budget_rank is None  # resize: each module's own rank
    with pytest.raises(InvalidOptionError, match="budget must hold at least one parameter, got '3'"):
        Sizing.parse(budget="3").budget_params(4)


def test_energy_goes_with_a_budget_only_as_a_floor_where_the_command_has_floors():
    floored = Sizing.parse(energy=0.5, budget="1MB", energy_floors=True)
    assert (floored.energy, floored.budget) == (0.5, "1MB")
    with pytest.raises(InvalidOptionError, match="give one of them"):
        Sizing.parse(energy=0.5, budget="1MB")
    with pytest.raises(InvalidOptionError, match="give one of them"):  # --rank goes with neither, floors or not
        Sizing.parse(rank=4, budget="1MB", energy_floors=True)


def test_max_rank_needs_something_to_cap(flags):
    with pytest.raises(InvalidOptionError, match="--max-rank caps the ranks --energy or --budget choose"):
        Sizing.parse(max_rank=4, required=False)
    assert Sizing.parse(energy=0.5, max_rank=4, required=False).max_rank == 4


def test_the_settings_hold_one_sizing():
    settings = ExtractSettings(Sizing.parse(budget="1KB", energy=0.3, energy_floors=True), dtype="bfloat16")
    got = (settings.budget_params, settings.budget_flag, settings.energy, settings.rank)
    assert got == (500, "--budget", 0.3, None)
    assert settings.method()["budget_params"] == 500 and settings.method()["energy"] == 0.3
    with pytest.raises(InvalidOptionError, match="give rank=N"):  # one made by hand, sizing nothing
        ExtractSettings(Sizing())
    target = Target.of(Sizing.parse(budget="1KB", max_rank=4), itemsize=2)
    assert (target.budget, target.max_rank, target.exact) == (500, 4, False)
    assert target.method() == {"budget": 500, "max_rank": 4}
    assert Target.of(Sizing.parse(required=False), itemsize=4).method() == {"exact": True}


def test_extract_resize_and_combine_say_the_same(tmp_path):
    """One mistake, one message, whichever command (and before any input is read)."""
    for command in (["extract", FIX_BASE, FIX_BASE], ["resize", FIX_ADAPTER], ["combine", FIX_ADAPTER, FIX_ADAPTER]):
        out = ["-o", tmp_path / "x"]
        one_line_error(run_cli(*command, "--rank", "0", *out), "--rank must be at least 1, got 0")
        one_line_error(run_cli(*command, "--budget", "1MB", "--budget-params", "9", *out), "--budget and --budget-")
        one_line_error(run_cli(*command, "--rank", "4", "--max-rank", "2", *out), "--max-rank caps the ranks")
        one_line_error(run_cli(*command, "--budget-params", "0", *out), "--budget-params must hold at least one")
        one_line_error(run_cli(*command, "--energy", "2", *out), "--energy must be in (0, 1], got 2.0")
    one_line_error(run_cli("combine", FIX_ADAPTER, FIX_ADAPTER, "--max-rank", "2", "-o", tmp_path / "x"), "--max-rank")
    one_line_error(run_cli("resize", FIX_ADAPTER, "--energy", "0.5", "--budget", "1MB", "-o", tmp_path / "x"), "one")


def test_the_library_names_keywords(tmp_path):
    with pytest.raises(InvalidOptionError) as exc:
        ls.resize(FIX_ADAPTER, tmp_path / "x", rank=4, budget_params=100)
    assert str(exc.value).startswith("rank and budget_params: give one of them") and "--" not in str(exc.value)
    report = ls.resize(FIX_ADAPTER, None, budget_params=2000, dry_run=True)
    assert report.method == {"budget": 2000}
    report = ls.combine([FIX_ADAPTER, FIX_ADAPTER], None, dry_run=True)
    assert report.method == {"exact": True}


def test_the_sizing_options_are_declared_once():
    from lorasurgeon.cli import cli

    def helps(command: str) -> dict[str, str | None]:
        return {p.opts[0]: getattr(p, "help", None) for p in cli.commands[command].params}

    names = ("--rank", "--energy", "--budget", "--budget-params")
    extract, resize, combine = helps("extract"), helps("resize"), helps("combine")
    assert all(extract[n] == resize[n] == combine[n] for n in names)
    assert resize["--max-rank"] == combine["--max-rank"] != extract["--max-rank"]
