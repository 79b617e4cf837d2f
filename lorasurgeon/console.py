"""What the command line needs beyond click: one line and an exit status for every failure, stop
signals that remove an unfinished result, the progress bar, and the option types the commands share."""

from __future__ import annotations

import signal
import sys
import warnings
from collections.abc import Callable
from types import FrameType
from typing import Any, TextIO, TypeVar

import click

from .errors import LorasurgeonError, LorasurgeonWarning, speak_cli
from .io.publish import forget_published, in_place, published
from .io.scratch import before_writing

F = TypeVar("F", bound=Callable[..., Any])


class Stopped(BaseException):
    """A signal asked the run to stop (SIGINT, SIGTERM, SIGHUP). Like KeyboardInterrupt it is not an
    Exception, so it unwinds through every ``except Exception`` and each writer's abort removes the
    unfinished result on the way out. ``kept`` says what is complete nonetheless (a result whose upload
    was stopped)."""

    def __init__(self, signum: int, kept: str = ""):
        super().__init__(signum)
        self.signum, self.kept = signum, kept


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
_armed: list[int] = []  # the signals catch_stop_signals handles
_late: list[int] = []  # a stop that came once the result was in place: the run finishes, and has succeeded
_kept: list[str] = []  # what is complete while later work (an upload) runs, for the line a stop prints


def _stop(signum: int, frame: FrameType | None) -> None:
    # Only the first signal stops the run; later ones must not cut its clean-up short.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if in_place():  # the result is published (or being renamed into place): the run has succeeded
        _late.append(signum)
        return
    raise Stopped(signum, "".join(_kept))


def catch_stop_signals() -> None:
    """timeout, docker stop, batch schedulers and a closed terminal send SIGTERM or SIGHUP: stop as for
    Ctrl-C, removing the unfinished result, instead of dying with it on disk.

    Until the run first writes (``io.scratch.writing``) there is nothing to remove: a stop signal then ends
    the process at once, as the system does by default, instead of waiting for a C extension's import
    (seconds for torch or transformers on a busy machine) to finish before a Python handler could run."""
    _armed.clear()
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup's SIGHUP stays ignored
            signal.signal(sig, signal.SIG_DFL)
            _armed.append(sig)
    before_writing.append(_arm)


def _arm() -> None:
    """The run is about to write: torch imported first (the slow import, while a stop still ends the run at
    once), then a stop signal removes what was written."""
    from ._lazy import torch

    torch.Tensor  # noqa: B018
    for sig in _armed:
        signal.signal(sig, _stop)


def resume_stops(kept: str) -> None:
    """Before more work on a published result (an upload): a stop that came meanwhile stops here, and from
    now on a stop signal stops that work; ``kept`` says what is complete, for the error line."""
    forget_published()
    _kept[:] = [kept]
    if _late:
        raise Stopped(_late.pop(), kept)
    for sig in _armed:
        signal.signal(sig, _stop)


def _stopped(signum: int, kept: str = "") -> str:
    if kept:
        return f"error: stopped by {signal.Signals(signum).name}; {kept}"
    return f"error: stopped by {signal.Signals(signum).name}; no unfinished result is left behind"


def _late_note() -> str:
    names = ", ".join(str(p) for p in published())
    return f"note: {signal.Signals(_late[0]).name} came after {names} was complete; the run finished"


_python_shows = warnings.showwarning


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """lorasurgeon's warnings as one line each, as its errors are; any other library's as Python shows them."""
    if issubclass(category, LorasurgeonWarning):
        click.echo(f"warning: {message}", err=True)
    else:
        _python_shows(message, category, filename, lineno, file, line)


class Group(click.Group):
    """Turns library errors into one line on stderr and exit status 2 (tracebacks with --debug), a stop
    signal into one line and 128 + its number, and anything else into one line and 1."""

    def invoke(self, ctx: click.Context) -> Any:
        forget_published()
        _late.clear()
        _kept.clear()
        speak_cli(True)
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                done = super().invoke(ctx)
        except LorasurgeonError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except Stopped as exc:
            click.echo(_stopped(exc.signum, exc.kept), err=True)
            sys.exit(128 + exc.signum)
        except KeyboardInterrupt:
            click.echo(_stopped(signal.SIGINT), err=True)
            sys.exit(128 + signal.SIGINT)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # a bug, not bad input: still one line unless --debug
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(
                f"error: internal error: {type(exc).__name__}: {exc} "
                "(run with --debug for the traceback, and please report it)",
                err=True,
            )
            sys.exit(1)
        finally:
            speak_cli(False)
            if _late and published():
                click.echo(_late_note(), err=True)
        return done


def debug_option(f: F) -> F:
    """--debug after the command too (lorasurgeon merge ... --debug), as the error messages suggest it."""

    def turn_on(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        if value:
            ctx.find_root().obj["debug"] = True

    return click.option(
        "--debug",
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=turn_on,
        help="Show full tracebacks on errors.",
    )(f)


class Dtype(click.Choice):
    """A dtype choice that also takes the short names people type (bf16, fp16, fp32, half), as the library does."""

    ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return super().convert(self.ALIASES.get(str(value).lower(), value), param, ctx)


class Bar:
    """A tqdm bar in bytes on stderr (the engine's Progress): only on a terminal, and never with --quiet."""

    def __init__(self) -> None:
        from tqdm import tqdm

        self._bar: tqdm[Any] | None = None
        self._tqdm = tqdm

    def start(self, total: int) -> None:
        ctx = click.get_current_context(silent=True)
        self._bar = self._tqdm(
            total=total,
            desc=ctx.info_name if ctx else None,  # the command: merge, extract, ...
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            file=sys.stderr,
            leave=False,
            dynamic_ncols=True,
        )

    def advance(self, nbytes: int) -> None:
        if self._bar is not None:
            self._bar.update(nbytes)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.close()


def progress_bar(quiet: bool, dry_run: bool = False) -> Bar | None:
    return None if quiet or dry_run or not sys.stderr.isatty() else Bar()
