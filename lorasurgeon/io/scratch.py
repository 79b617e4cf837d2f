"""Hidden scratch folders beside an output, and the clean-up of those a killed run left behind.

Names are ``.{output name}.{pid}.{random}.lorasurgeon-{kind}``: a folder whose process is gone
is debris from a killed run and is removed by the next run for the same output; one whose
process is alive belongs to a concurrent run and is left alone.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

KINDS = ("partial", "spool", "old")
_NAME = re.compile(r"^\.(?P<out>.+)\.(?P<pid>\d+)\.[^.]+\.lorasurgeon-(?P<kind>partial|spool|old)$")


def make_scratch(out: Path, kind: str) -> Path:
    """A new hidden folder beside ``out`` (same file system, so a rename can publish it)."""
    assert kind in KINDS
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=f".lorasurgeon-{kind}", dir=out.parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove the scratch folders of ``out`` left by runs that no longer exist; returns them."""
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    for entry in out.parent.iterdir():
        match = _NAME.match(entry.name)
        if match and match.group("out") == out.name and not _alive(int(match.group("pid"))):
            previous = entry / "result"
            if match.group("kind") == "old" and previous.exists() and not out.exists():
                # killed between moving the old result aside and moving the new one in: put it back
                os.replace(previous, out)
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed
