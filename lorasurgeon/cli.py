"""The command line: each command parses options, calls one library function, prints its report."""

from __future__ import annotations

import json
import sys

import click

from . import __version__
from .describe import format_report, inspect
from .errors import LorasurgeonError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class _Group(click.Group):
    """Turns library errors into one line on stderr and exit status 2 (tracebacks with --debug)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LorasurgeonError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted; nothing was written", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="lorasurgeon")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """LoRA checkpoint surgery: merge, unmerge, extract, diff and inspect, streamed tensor by tensor.

    \b
    Examples:
      lorasurgeon inspect fixtures/adapter
      lorasurgeon inspect ./Llama-3-8B --json
    """
    ctx.obj = {"debug": debug}


@cli.command("inspect")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of a table.")
def inspect_cmd(path: str, as_json: bool) -> None:
    """Describe a checkpoint or PEFT adapter from its headers (no tensor data is read).

    PATH is a folder (model, sharded model or PEFT adapter) or a single .safetensors/.bin file.

    \b
    Examples:
      lorasurgeon inspect fixtures/base
      lorasurgeon inspect fixtures/adapter --json
    """
    report = inspect(path)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(format_report(report))


def main() -> None:
    cli(prog_name="lorasurgeon")
