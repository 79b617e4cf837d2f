"""The commands on adapters: resize, combine, check."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ..console import debug_option
from . import cli
from .options import (
    CALIBRATION,
    CLUSTER,
    CONSUMER,
    CONSUMERS,
    DEVICE,
    FOR,
    PUSH,
    WRITE,
    Job,
    option_group,
    sizing_options,
)

BASE = click.option(
    "--base",
    default=None,
    metavar="BASE",
    help="The base model (folder, file or Hub id): a llama.cpp .gguf adapter is read against it, --calibration runs "
    "it; only with one of those.",
)


@cli.command("resize")
@debug_option
@click.argument("adapter")
@option_group(WRITE, BASE, FOR, sizing_options(), CALIBRATION, DEVICE, CLUSTER, PUSH)
def resize_cmd(adapter: str, **options: Any) -> None:
    """An ADAPTER at a lower rank: the best rank-k factors of each module's own B·A, never forming ΔW.

    \b
    Examples:
      lorasurgeon resize my-lora --rank 8 -o my-lora-r8
      lorasurgeon resize my-lora --budget 15MB -o my-lora-15mb
      lorasurgeon resize my-lora.gguf --base my-base --rank 8 -o my-lora-r8
      lorasurgeon resize my-lora --budget 15MB --base my-base --calibration prompts.jsonl -o my-lora-15mb
    """
    from ..commands.resize import ResizeSettings, run

    job = Job.pop(options)
    job.finish(run([adapter], job.output(), ResizeSettings.parse(adapters=1, **options)))


@cli.command("combine")
@debug_option
@click.argument("adapters", nargs=-1, required=True)
@option_group(
    WRITE,
    click.option("--weight", "weights", type=float, multiple=True, help="Weight of each adapter (default 1.0 each)."),
    click.option(
        "--allow-different-bases",
        is_flag=True,
        help="Combine adapters whose base_model_name_or_path differ (their shapes must still agree).",
    ),
    BASE,
    FOR,
    sizing_options(),
    CALIBRATION,
    DEVICE,
    CLUSTER,
    PUSH,
)
def combine_cmd(adapters: tuple[str, ...], **options: Any) -> None:
    """One adapter for the weighted sum of ADAPTERS: exact (stacked factors) unless a rank, energy or budget
    asks for fewer; then the optimal truncation, never forming ΔW.

    \b
    Examples:
      lorasurgeon combine style-lora facts-lora --weight 1 --weight 0.5 -o both
      lorasurgeon combine A B C --rank 32 -o abc-r32
    """
    from ..commands.resize import ResizeSettings, run

    job = Job.pop(options)
    settings = ResizeSettings.parse(adapters=len(adapters), combining=True, **options)
    job.finish(run(adapters, job.output(), settings))


@cli.command("check")
@debug_option
@click.argument("adapter")
@click.option("--for", "consumer", required=True, type=CONSUMERS, help=f"{CONSUMER}: its loader's rules are checked.")
@BASE
@click.option("--json", "as_json", is_flag=True, help="The report as JSON.")
def check_cmd(adapter: str, consumer: str, base: str | None, as_json: bool) -> None:
    """What CONSUMER will refuse in ADAPTER, or compute otherwise than PEFT: exit 0 if it loads as PEFT
    computes it, 1 if not (each problem named, with the command that rewrites it where one is exact).

    \b
    Examples:
      lorasurgeon check my-lora --for vllm
      lorasurgeon check my-lora --for llama.cpp --json
      lorasurgeon check my-lora.gguf --base my-base --for llama.cpp
    """
    from ..commands.check import check

    report = check(adapter, consumer=consumer, base=base)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.summary())
    sys.exit(report.exit_code)
