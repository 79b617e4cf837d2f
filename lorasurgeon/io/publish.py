"""Where a result may go, and making it visible there at the end, never replacing what is not ours.

A result is written beside its output path and renamed into place (``writer.py``). Before any
of that, the output path is checked here:

- it is never an input, inside one, or a folder that holds one;
- it is never the working directory, the home folder, ``/``, or a folder above any of them;
- an existing path is replaced only with ``overwrite``, and only when it is empty or a previous
  lorasurgeon result: a folder of plain files, with our model card (``README.md`` tagged
  ``lorasurgeon``), holding nothing a result would not hold. Anything else is refused by name,
  and nothing is touched.

Every result (a checkpoint folder, a GGUF file, a picture) is assembled under a hidden name beside
its output path (``scratch``) and published here, by one rename, at the end. The output path was
checked when the run started (:func:`check_destination`), but anything may appear there while it works:
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

import fnmatch
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import LorasurgeonError, OutputError, OutputExistsError
from .scratch import make_scratch, release, rename_noreplace
from .sidecar import SIDECARS

CARD = "README.md"
CARD_TAG = "lorasurgeon"
# What a result holds: the files we write, and the sidecar files we copy from an input.
RESULT_FILES = (
    "*.safetensors",
    "*.safetensors.index.json",
    CARD,
    "config.json",
    "adapter_config.json",
    "extract_report.json",
    "requantization.json",
    "resize_report.json",
    *SIDECARS,
)
_published: list[Path] = []
_renaming: list[Path] = []  # the result being renamed into place right now


def absolute(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute and normalised lexically (``-o .`` and ``-o x/..`` name real folders)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def check_destination(
    out: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]], *, overwrite: bool
) -> None:
    """Refuse, before any work, an output that would lose or damage anything (a ``.safetensors`` path is a
    one-file result: :func:`is_file_result`).

    Raises:
        OutputError: ``out`` overlaps an input, is a protected folder, or is not ours to replace.
        OutputExistsError: ``out`` exists and ``overwrite`` is False.
    """
    target = check_place(out, inputs)
    if os.path.lexists(target):
        if not overwrite:
            raise OutputExistsError(f"{out}: already exists (pass --overwrite to replace an earlier result)")
        check_replaceable(target, not_a_safetensors_file if is_file_result(target) else None)


def is_file_result(out: str | os.PathLike[str]) -> bool:
    """Whether a result goes to one file, not a folder: ``-o NAME.safetensors`` (a kohya LoRA, a single-file
    checkpoint), which holds the tensors alone."""
    return str(out).endswith(".safetensors")


def not_a_safetensors_file(path: Path) -> str | None:
    """Why what is at ``path`` is not an earlier one-file result (a plain .safetensors file whose header
    reads), None when it is one."""
    from .header import read_header  # only for a file result that exists

    if path.is_symlink() or not path.is_file():
        return "it is not a safetensors file"
    try:
        with open(path, "rb") as fh:
            read_header(path, os.fstat(fh.fileno()).st_size, fh)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    except LorasurgeonError:
        return "it is not a safetensors file"
    return None


def check_place(out: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]]) -> Path:
    """The rules of every result's place, a folder's or a file's (a picture, a .gguf): never the root, the
    working directory or the home folder (nor above them), never an input, inside one or holding one.
    Returns ``out``, absolute.

    Raises:
        OutputError: ``out`` is such a place.
    """
    target = absolute(out)
    real = Path(os.path.realpath(target))
    if real == Path(real.anchor):
        raise OutputError(f"{out}: is the root folder; a result needs a folder of its own (e.g. -o merged)")
    for what, folder in _protected():
        if real == folder or real in folder.parents:
            here = "is" if real == folder else "holds"
            raise OutputError(f"{out}: {here} {what}; a result needs a folder of its own (e.g. -o merged)")
    for path in inputs:
        src = Path(os.path.realpath(absolute(path)))
        if real == src or src in real.parents or real in src.parents:
            raise OutputError(f"{out}: overlaps the input {path}; choose an output apart from the inputs")
    return target


def _protected() -> list[tuple[str, Path]]:
    """The folders a result may never be, nor hold: the working directory and the home folder."""
    found = [("the current folder", Path.cwd())]
    try:
        found.append(("your home folder", Path.home()))
    except (RuntimeError, KeyError):  # no HOME and no passwd entry
        pass
    return [(what, Path(os.path.realpath(folder))) for what, folder in found]


def check_replaceable(out: Path, not_replaceable: Callable[[Path], str | None] | None = None) -> None:
    """Refuse to replace ``out`` unless it is an earlier result (by default: an empty folder or a previous
    lorasurgeon result folder; ``not_replaceable`` says why not for other kinds of result)."""
    reason = (not_replaceable or not_a_result_folder)(out)
    if reason:
        raise OutputError(
            f"{out}: not replaced: {reason}; --overwrite replaces only an earlier lorasurgeon result "
            "(remove it yourself, or choose another -o)"
        )


def not_a_result_folder(folder: Path) -> str | None:
    """Why ``folder`` is not a previous result (None when it is one, or is empty)."""
    if folder.is_symlink() or not folder.is_dir():
        return "it is not a folder"
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        return f"it cannot be listed ({exc.strerror or exc})"
    if not entries:
        return None
    for entry in entries:
        if entry.is_symlink() or not entry.is_file():
            return f"it holds {entry.name}{'/' if entry.is_dir() else ''}, which a result never holds"
        if not any(fnmatch.fnmatchcase(entry.name, p) for p in RESULT_FILES):
            return f"it holds {entry.name}, which lorasurgeon does not write"
    if not _is_our_card(folder / CARD):
        return f"it has no lorasurgeon model card ({CARD} tagged {CARD_TAG!r})"
    return None


def _is_our_card(path: Path) -> bool:
    """True when ``path`` is a model card whose metadata tags it ``lorasurgeon`` (every result's card is)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if not text.startswith("---\n"):
        return False
    front = text[4:].split("\n---", 1)[0]
    return f"- {CARD_TAG}" in (line.strip() for line in front.splitlines())


def earlier_file(kind: str, *magics: bytes) -> Callable[[Path], str | None]:
    """For a one-file result (a GGUF file, a picture): why what is at a path is not an earlier one (a plain file
    starting with one of ``magics``), None when it is."""

    def not_replaceable(path: Path) -> str | None:
        if path.is_symlink() or not path.is_file():
            return f"it is not a {kind} file"
        try:
            with open(path, "rb") as fh:
                head = fh.read(max(map(len, magics)))
        except OSError as exc:
            return f"it cannot be read ({exc.strerror or exc})"
        return None if any(head.startswith(m) for m in magics) else f"it is not a {kind} file"

    return not_replaceable


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
