"""The commands on adapters: resize, combine, check."""

from __future__ import annotations

import json
import sys

import click

from ..console import debug_option, progress_bar
from . import cli
from .options import (
    CONSUMER,
    CONSUMERS,
    DEVICE,
    FOR,
    PUSH,
    WRITE,
    check_push,
    finish,
    option_group,
    sizing_options,
)


@cli.command("resize")
@debug_option
@click.argument("adapter")
@option_group(WRITE, FOR, sizing_options(), DEVICE, PUSH)
def resize_cmd(
    adapter: str,
    out: str,
    overwrite: bool,
    dry_run: bool,
    quiet: bool,
    for_: str | None,
    rank: int | None,
    energy: float | None,
    budget: str | None,
    budget_params: int | None,
    max_rank: int | None,
    device: str,
    push_to_hub: str | None,
    private: bool,
) -> None:
    """An ADAPTER at a lower rank: the best rank-k factors of each module's own B·A, never forming ΔW.

    \b
    Examples:
      lorasurgeon resize my-lora --rank 8 -o my-lora-r8
      lorasurgeon resize my-lora --budget 15MB -o my-lora-15mb
    """
    from ..commands.resize import resize

    check_push(push_to_hub, dry_run)
    report = resize(
        adapter,
        out,
        rank=rank,
        energy=energy,
        budget=budget,
        budget_params=budget_params,
        max_rank=max_rank,
        for_=for_,
        device=device,
        overwrite=overwrite,
        dry_run=dry_run,
        progress=progress_bar(quiet, dry_run),
    )
    finish(report, quiet, push_to_hub, private)


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
    FOR,
    sizing_options(),
    DEVICE,
    PUSH,
)
def combine_cmd(
    adapters: tuple[str, ...],
    out: str,
    overwrite: bool,
    dry_run: bool,
    quiet: bool,
    weights: tuple[float, ...],
    allow_different_bases: bool,
    for_: str | None,
    rank: int | None,
    energy: float | None,
    budget: str | None,
    budget_params: int | None,
    max_rank: int | None,
    device: str,
    push_to_hub: str | None,
    private: bool,
) -> None:
    """One adapter for the weighted sum of ADAPTERS: exact (stacked factors) unless a rank, energy or budget
    asks for fewer; then the optimal truncation, never forming ΔW.

    \b
    Examples:
      lorasurgeon combine style-lora facts-lora --weight 1 --weight 0.5 -o both
      lorasurgeon combine A B C --rank 32 -o abc-r32
    """
    from ..commands.resize import combine

    check_push(push_to_hub, dry_run)
    report = combine(
        adapters,
        out,
        weights=weights,
        rank=rank,
        energy=energy,
        budget=budget,
        budget_params=budget_params,
        max_rank=max_rank,
        for_=for_,
        allow_different_bases=allow_different_bases,
        device=device,
        overwrite=overwrite,
        dry_run=dry_run,
        progress=progress_bar(quiet, dry_run),
    )
    finish(report, quiet, push_to_hub, private)


@cli.command("check")
@debug_option
@click.argument("adapter")
@click.option("--for", "consumer", required=True, type=CONSUMERS, help=f"{CONSUMER}: its loader's rules are checked.")
@click.option("--json", "as_json", is_flag=True, help="The report as JSON.")
def check_cmd(adapter: str, consumer: str, as_json: bool) -> None:
    """What CONSUMER will refuse in ADAPTER, or compute otherwise than PEFT: exit 0 if it loads as PEFT
    computes it, 1 if not (each problem named, with the command that rewrites it where one is exact).

    \b
    Examples:
      lorasurgeon check my-lora --for vllm
      lorasurgeon check my-lora --for llama.cpp --json
    """
    from ..commands.check import check

    report = check(adapter, consumer=consumer)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.summary())
    sys.exit(report.exit_code)
