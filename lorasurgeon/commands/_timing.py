"""The wall time of a whole command, as its report states it: from the call to the report, imports (torch,
transformers), planning, reading, computing and writing included."""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, cast

P = ParamSpec("P")
R = TypeVar("R")


def timed(func: Callable[P, R]) -> Callable[P, R]:
    """``func``'s report with ``wall`` set to the seconds the call took (a frozen dataclass with that field)."""

    @functools.wraps(func)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        began = time.perf_counter()
        report: Any = func(*args, **kwargs)
        return cast(R, dataclasses.replace(report, wall=time.perf_counter() - began))

    return call


def rate(nbytes: int, seconds: float) -> str:
    """A rate for people (``212 KiB/s``, ``1.31 GiB/s``), or "" when the time is too short to mean one."""
    from ..io.layout import human_bytes

    if seconds < 0.05 or nbytes <= 0:
        return ""
    return f"{human_bytes(round(nbytes / seconds))}/s"
