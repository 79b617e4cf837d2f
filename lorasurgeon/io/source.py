"""Turn what the user typed into local files.

This is the single place that resolves an input string. Today it accepts local paths; Hub repo
ids (``org/name@revision``) resolve here too once the Hub issue lands, so every command gets
them at once.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputNotFoundError


def resolve(spec: str | os.PathLike[str]) -> Path:
    """The local path for an input given as a path.

    Raises:
        InputNotFoundError: nothing exists at that path.
    """
    path = Path(spec).expanduser()
    if path.exists():
        return path
    raise InputNotFoundError(f"{spec}: no such file or folder")
