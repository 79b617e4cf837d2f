"""The public Python API, used as people use it: ``import lorasurgeon as ls``, each call made twice,
in a fresh interpreter (this test process has imported everything already)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from helpers import FIX_ADAPTER, FIX_BASE, one_line_error, run_cli

import lorasurgeon
import lorasurgeon as ls


def run_python(code: str, tmp_path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return done


def test_every_public_name_is_what_it_says_twice(tmp_path):
    run_python(
        f"""
        import types
        import lorasurgeon as ls
        for name in ls.__all__:
            first, second = getattr(ls, name), getattr(ls, name)
            assert first is second and not isinstance(first, types.ModuleType), name
        base, adapter = {str(FIX_BASE)!r}, {str(FIX_ADAPTER)!r}
        for i in range(2):
            report = ls.merge(base, [adapter], f"m{{i}}")
            assert isinstance(report, ls.MergeReport) and report.counts["merge"] == 14
            assert isinstance(ls.unmerge(f"m{{i}}", [adapter], f"u{{i}}"), ls.MergeReport)
            assert isinstance(ls.extract(base, f"m{{i}}", f"x{{i}}", rank=2), ls.ExtractReport)
            assert isinstance(ls.diff(base, f"m{{i}}"), ls.DiffReport)
            assert isinstance(ls.inspect(adapter), ls.CheckpointReport)
            assert ls.verify(f"m{{i}}").ok
            ls.merge(base, [adapter], f"a{{i}}", form="augmented")
            assert ls.convert(f"a{{i}}", f"c{{i}}", to="adapter").form == "adapter"
            assert len(dict(ls.iter_merged(base, [adapter]))) == 21
        from lorasurgeon import merge, extract, diff, verify
        import lorasurgeon.commands.merge, lorasurgeon.commands.extract, lorasurgeon.commands.diff
        assert merge is ls.merge and extract is ls.extract and diff is ls.diff and verify is ls.verify
        assert callable(merge) and callable(ls.merge)
    """,
        tmp_path,
    )


def test_from_import_after_the_internals_were_imported(tmp_path):
    """What the CLI does first (imports the command's module) must not change what the names are."""
    run_python(
        """
        import lorasurgeon.commands.merge, lorasurgeon.commands.diff, lorasurgeon.commands.verify
        from lorasurgeon import merge, unmerge, convert, diff, verify, inspect
        assert all(callable(f) and f.__module__.startswith("lorasurgeon.commands")
                   for f in (merge, unmerge, convert, diff, verify, inspect))
    """,
        tmp_path,
    )


def test_every_error_class_is_exported_and_one_family():
    import lorasurgeon.errors as errors

    classes = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, errors.LorasurgeonError)
    }
    assert classes <= set(lorasurgeon.__all__)
    assert all(issubclass(getattr(lorasurgeon, name), lorasurgeon.LorasurgeonError) for name in classes)


def test_an_unknown_name_is_an_attribute_error():
    try:
        lorasurgeon.mergee  # noqa: B018
    except AttributeError as exc:
        assert "mergee" in str(exc)
    else:
        raise AssertionError("no AttributeError")


def test_every_public_function_documents_its_args_returns_and_raises():
    import inspect

    for name in lorasurgeon.__all__:
        obj = getattr(lorasurgeon, name)
        if inspect.isfunction(obj):
            doc = inspect.getdoc(obj) or ""
            assert all(section in doc for section in ("Args:", "Returns:", "Raises:")), name


def test_errors_name_keywords_in_python_and_flags_on_the_command_line(tmp_path):
    """A library user is told overwrite=True, rank=...; a CLI user --overwrite, --rank (the same message)."""
    out = tmp_path / "merged"
    ls.merge(FIX_BASE, [FIX_ADAPTER], out)
    with pytest.raises(ls.OutputExistsError) as exc:
        ls.merge(FIX_BASE, [FIX_ADAPTER], out)
    assert "pass overwrite=True" in str(exc.value) and "--" not in str(exc.value)
    with pytest.raises(ls.InvalidOptionError) as exc:
        ls.extract(FIX_BASE, out, tmp_path / "lora", rank=0)
    assert str(exc.value).startswith("rank must be at least 1") and "--" not in str(exc.value)
    line = one_line_error(run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", out), "pass --overwrite")
    assert "overwrite=True" not in line
    one_line_error(run_cli("extract", FIX_BASE, out, "--rank", "0", "-o", tmp_path / "lora"), "--rank must be")
