"""Making a finished result visible at its output path, and never replacing what is not ours.

Every result (a checkpoint folder, a GGUF file, a picture) is assembled under a hidden name beside
its output path (``scratch``) and published here, by one rename, at the end. The output path was
checked when the run started (``destination``), but anything may appear there while it works:
another run for the same ``-o``, or the user. So at the moment of publishing:

- without ``overwrite``, the rename is an atomic no-replace one (``renameat2(RENAME_NOREPLACE)``
  where the kernel and file system have it; else a hard link for a file, an empty folder claimed by
  ``mkdir`` for a folder). If something is there, it is not touched: the finished result is kept
  under a visible name beside it (``NAME.new``, ``NAME.new-2``, ...) and :class:`ResultKept` says where;
- with ``overwrite``, what is there is checked again (it must still be an earlier result), moved
  aside into a hidden folder, checked once more there (nothing added between the check and the
  move), and only then is the new result renamed in (no-replace again) and the old one deleted.

The paths published in this process are remembered (:func:`published`): a stop signal that
arrives after the result is in place does not turn a finished run into a failed one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ..errors import OutputError, OutputExistsError
from .rename import rename_noreplace
from .scratch import make_scratch, release

_published: list[Path] = []
_renaming: list[Path] = []  # the result being renamed into place right now


class ResultKept(OutputExistsError):
    """The output path was taken while the run worked; the finished result is kept at ``kept``."""

    def __init__(self, message: str, kept: Path):
        super().__init__(message)
        self.kept = kept


def _keep_beside(staged: Path, out: Path) -> Path:
    """Move the finished result to the first free visible name beside ``out``; returns it."""
    stem, suffix = (out.name, "") if staged.is_dir() else (out.stem, out.suffix)
    for n in range(1, 1000):
        kept = out.with_name(f"{stem}.new{suffix}" if n == 1 else f"{stem}.new-{n}{suffix}")
        try:
            rename_noreplace(staged, kept)
            return kept
        except FileExistsError:
            continue
    raise OutputError(f"{out}: no free name beside it to keep the finished result; it is in {staged}")


_APPEARED = "appeared while this run worked (another run, or by hand)"


def _taken(staged: Path, out: Path, what: str) -> ResultKept:
    kept = _keep_beside(staged, out)
    return ResultKept(f"{out}: {what}; it was not touched, and the finished result is kept at {kept}", kept)


def publish(staged: Path, out: Path, *, overwrite: bool, not_replaceable: Callable[[Path], str | None]) -> Path:
    """Rename the finished ``staged`` (a file or folder) to ``out``.

    ``not_replaceable(path)`` says why what is at ``path`` is not an earlier result that ``overwrite``
    may replace (None when it is one). Raises :class:`ResultKept` when ``out`` cannot be taken (the
    finished result then waits at ``.kept``); never deletes anything but an earlier result allowed.
    """
    old: Path | None = None
    if os.path.lexists(out):
        if not overwrite:
            raise _taken(staged, out, _APPEARED)
        reason = not_replaceable(out)
        if reason is None:
            old = _move_aside(out)
            try:
                reason = None if old is None else not_replaceable(old / "result")  # nothing added before the move
            except BaseException:  # a stop signal: the earlier result goes back
                reason = "stopped"
                raise
            finally:
                if reason is not None and old is not None:
                    _return_old(old, out)
        if reason is not None:
            raise _taken(staged, out, f"changed while this run worked and is not replaced: {reason}")
    _renaming.append(out)
    try:
        rename_noreplace(staged, out)
        _published.append(out)
    except FileExistsError:
        if old is not None:
            _return_old(old, out)
        raise _taken(staged, out, _APPEARED) from None
    except BaseException:
        if old is not None:
            _return_old(old, out)
        raise
    finally:
        _renaming.clear()
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
        release(old)
    return out


def _move_aside(out: Path) -> Path | None:
    """Move the earlier result at ``out`` into a hidden folder, where it is checked again; returns the
    folder (None if ``out`` went away meanwhile)."""
    old = make_scratch(out, "old")
    try:
        os.rename(out, old / "result")
    except FileNotFoundError:
        shutil.rmtree(old, ignore_errors=True)
        release(old)
        return None
    return old


def _return_old(old: Path, out: Path) -> None:
    """An earlier result moved aside goes back; if ``out`` was taken meanwhile it stays in ``old`` (the next
    run for this output puts it back when it can, ``scratch.clean_stale``)."""
    try:
        rename_noreplace(old / "result", out)
    except OSError:
        return
    shutil.rmtree(old, ignore_errors=True)
    release(old)


def published() -> list[Path]:
    """The results this process has published since :func:`forget_published`."""
    return list(_published)


def in_place() -> bool:
    """A result is published, or being renamed into place this moment: a stop now must not undo it."""
    return bool(_published or _renaming)


def forget_published() -> None:
    _published.clear()
