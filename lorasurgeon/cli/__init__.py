"""The command line: each command parses its options, calls one library function, prints its report.

The group and the entry point are here; the commands are in ``models`` (checkpoints: inspect, merge, unmerge,
convert, extract, push, diff) and ``adapters`` (resize, combine, check); the options they share in ``options``.
"""

from __future__ import annotations

import os

import click

from .. import __version__
from ..console import Group, catch_stop_signals

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(cls=Group, context_settings=CONTEXT, invoke_without_command=True, subcommand_metavar="COMMAND [ARGS]...")
@click.version_option(__version__, "--version", prog_name="lorasurgeon")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """LoRA checkpoint surgery: merge, unmerge, extract, diff and inspect, streamed tensor by tensor.

    Inputs are local folders/files or Hub repo ids (org/name[@revision]).

    \b
    Examples:
      lorasurgeon merge fixtures/base fixtures/adapter -o merged
      lorasurgeon merge meta-llama/Llama-3.1-8B my-org/my-lora -o merged --push-to-hub my-org/merged
      lorasurgeon extract BASE FINETUNED --rank 16 -o lora
      lorasurgeon diff fixtures/base merged --rank-profile
      lorasurgeon inspect fixtures/adapter
    """
    ctx.obj = {"debug": debug}
    if ctx.invoked_subcommand is None:  # `lorasurgeon` alone: the help, and success (click's own would exit 2)
        click.echo(ctx.get_help())
        ctx.exit(0)
    if not debug:  # huggingface_hub logs retries and warnings; errors reach the user as one line
        import logging

        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def main() -> None:
    # Before torch (and its OpenMP runtime) is imported: idle OpenMP workers sleep instead of
    # spinning, so they do not take the cores the reading and writing threads need. Measured in
    # docs/benchmarks.md; set the variable yourself to override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    catch_stop_signals()
    cli(prog_name="lorasurgeon")


from . import adapters, convert, models  # noqa: E402, F401  (each adds its commands to cli)

__all__ = ["cli", "main"]
