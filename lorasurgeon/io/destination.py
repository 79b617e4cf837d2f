"""Where a result may go, and what ``--overwrite`` may replace.

A result is written beside its output path and renamed into place (``writer.py``). Before any
of that, the output path is checked here:

- it is never an input, inside one, or a folder that holds one;
- it is never the working directory, the home folder, ``/``, or a folder above any of them;
- an existing path is replaced only with ``overwrite``, and only when it is empty or a previous
  lorasurgeon result: a folder of plain files, with our model card (``README.md`` tagged
  ``lorasurgeon``), holding nothing a result would not hold. Anything else is refused by name,
  and nothing is touched.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import OutputError, OutputExistsError
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


def absolute(path: str | os.PathLike[str]) -> Path:
    """``path`` made absolute and normalised lexically (``-o .`` and ``-o x/..`` name real folders)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def check_destination(
    out: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]], *, overwrite: bool
) -> None:
    """Refuse, before any work, an output that would lose or damage anything.

    Raises:
        OutputError: ``out`` overlaps an input, is a protected folder, or is not ours to replace.
        OutputExistsError: ``out`` exists and ``overwrite`` is False.
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
            raise OutputError(f"{out}: overlaps the input {path}; choose an output folder apart from the inputs")
    if os.path.lexists(target):
        if not overwrite:
            raise OutputExistsError(f"{out}: already exists (pass --overwrite to replace an earlier result)")
        check_replaceable(target)


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
