"""What the commands share: option groups declared once (in the order --help lists them), the check of a
--push-to-hub target before any work, and the printing (and pushing) of a report."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ..console import Dtype, progress_bar, resume_stops
from ..consumers import CONSUMERS as consumer_registry
from ..errors import LorasurgeonError

if TYPE_CHECKING:
    from ..commands._inputs import Output

F = TypeVar("F", bound=Callable[..., Any])
DTYPES = ["float32", "bfloat16", "float16"]


def option_group(*decorators: Callable[[F], F]) -> Callable[[F], F]:
    """Several click options as one decorator, in the order they are listed in --help."""

    def apply(f: F) -> F:
        for decorator in reversed(decorators):
            f = decorator(f)
        return f

    return apply


# --- the option groups -------------------------------------------------------------------------
CLUSTER = click.option(
    "--cluster",
    type=click.Choice(["ray"]),
    default=None,
    help="Run on a Ray cluster (RAY_ADDRESS, else a local one): merge one task per result shard, extract, resize "
    "and combine one per layer; inputs and -o on storage every node sees (docs/cluster.md); needs lorasurgeon[ray].",
)
STREAM = click.option(
    "--stream",
    is_flag=True,
    help="Read a Hub input's weights in place, by HTTP range, as they are needed, instead of downloading them: "
    "the disk holds the result only.",
)


def write_options(out_help: str = "Result folder.") -> Callable[[F], F]:
    """-o, --overwrite, --dry-run, --quiet, --stream; ``out_help``: what -o is, where a command writes something
    else."""
    return option_group(
        click.option("-o", "--output", "out", required=True, type=click.Path(), help=out_help),
        click.option(
            "--overwrite",
            is_flag=True,
            help="Replace OUT, if it is an earlier lorasurgeon result (or empty), once the new one is complete.",
        ),
        click.option("--dry-run", is_flag=True, help="Print the plan; write nothing."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar or report."),
        STREAM,
    )


WRITE = write_options()
CONSUMERS = click.Choice(list(consumer_registry))
CONSUMER = "The consumer that will load the adapter"  # --for, in every command that has it
FOR = click.option(
    "--for",
    "for_",
    default=None,
    type=CONSUMERS,
    help=f"{CONSUMER}: written as it computes PEFT's change (one alpha, each module's scale in its B), "
    "or refused by name where it cannot load it.",
)
DEVICE = click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
DTYPE_AUTO = click.option(
    "--dtype",
    default="auto",
    show_default=True,
    type=Dtype(["auto", *DTYPES]),
    help="Output dtype of floating tensors; auto keeps the input's (bf16, fp16, fp32 work too).",
)
SHARDS = click.option("--max-shard-size", default=None, help="e.g. 5GB; by default the input's layout is kept.")
NONFINITE = click.option("--allow-nonfinite", is_flag=True, help="Write results holding NaN/Inf instead of stopping.")
FILTERS = option_group(
    click.option("--include", default=None, help="Regex: only tensors whose name matches."),
    click.option("--exclude", default=None, help="Regex: leave out tensors whose name matches."),
)
CALIBRATION = option_group(
    click.option(
        "--calibration",
        default=None,
        metavar="SOURCE",
        help="Samples to run the model on (a .txt or .jsonl file -- chat messages in the model's chat template -- "
        "or a Hub dataset id): factors and --budget chosen by each module's output error on them, not by ‖ΔW‖.",
    ),
    click.option("--calibration-samples", type=int, default=None, help="How many samples to use [default: 128]."),
    click.option("--max-length", type=int, default=None, help="Tokens per sample, at most [default: 512]."),
    click.option("--calibration-split", default=None, help="With a Hub dataset: the split to read [default: train]."),
    click.option(
        "--calibration-column",
        default=None,
        help="The field of each record to use [default: messages, text, prompt + completion, or content].",
    ),
    click.option(
        "--calibration-model",
        default=None,
        type=click.Choice(["finetuned", "base"]),
        help="Whose activations are measured [default: finetuned].",
    ),
)
PUSH = option_group(
    click.option(
        "--push-to-hub",
        "push_to_hub",
        default=None,
        metavar="REPO_ID",
        help="Upload the result to this Hub repo when it is complete (checked before any work).",
    ),
    click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private."),
)
MERGING = option_group(
    write_options("Result folder; NAME.safetensors: one file (a single-file base); NAME.gguf for a .gguf base."),
    click.option(
        "--weight", "weights", type=float, multiple=True, help="Weight of each adapter, in order (default 1.0 each)."
    ),
    DTYPE_AUTO,
    click.option(
        "--quantize",
        type=click.Choice(["keep"]),
        default=None,
        help="A quantized base (FP8, compressed-tensors, MXFP4, bitsandbytes, MLX): keep its format, the default "
        "unless --dtype asks for a plain result. Changed blocks re-quantized, the others copied byte for byte.",
    ),
    DEVICE,
    click.option(
        "--workers",
        type=click.IntRange(min=1),
        default=None,
        help="Tensors computed at once on the CPU (default: one per core the reader and writer leave, at most 8).",
    ),
    CLUSTER,
    SHARDS,
    NONFINITE,
    PUSH,
)


@dataclass(frozen=True)
class Job:
    """The options every writing command shares (-o, --overwrite, --dry-run, --quiet, --push-to-hub, --private),
    taken out of the command's options by :meth:`pop` -- what remains are its settings' own, passed on as they
    are to the settings' ``parse``. The Job checks a push target before any work, makes the command's Output,
    and prints (and pushes) the report after."""

    out: str | None
    overwrite: bool = False
    dry_run: bool = False
    quiet: bool = False
    push_to_hub: str | None = None
    private: bool = False
    stream: bool = False

    @classmethod
    def pop(cls, options: dict[str, Any]) -> Job:
        """The shared options, removed from ``options``; a --push-to-hub target checked now."""
        fields = ("out", "overwrite", "dry_run", "quiet", "push_to_hub", "private", "stream")
        job = cls(**{f: options.pop(f) for f in fields if f in options})
        check_push(job.push_to_hub, job.dry_run)
        return job

    def output(self) -> Output:
        """Where the command writes, with the progress bar unless --quiet (or --dry-run)."""
        from ..commands._inputs import Output

        return Output(self.out, self.overwrite, self.dry_run, progress_bar(self.quiet, self.dry_run), self.stream)

    def finish(self, report: Any) -> None:
        """Print the report, then push the result if asked."""
        finish(report, self.quiet, self.push_to_hub, self.private)


def check_push(push_to_hub: str | None, dry_run: bool) -> None:
    """Before any work: the repo id, the token and the Hub, so a bad push fails in seconds, not after a merge."""
    if push_to_hub and not dry_run:
        from ..hub.push import check_push_target

        check_push_target(push_to_hub)


def finish(report: Any, quiet: bool, push_to_hub: str | None, private: bool) -> None:
    """Print the report (the plan, with --dry-run), then push the result if asked."""
    if report.dry_run or not quiet:
        click.echo(report.summary())
    if not push_to_hub or report.dry_run:
        return
    from ..hub.push import push

    retry = shlex.join(["lorasurgeon", "push", str(report.output), push_to_hub] + (["--private"] if private else []))
    try:
        resume_stops(f"the result is complete in {report.output}, not uploaded: upload it with `{retry}`")
        pushed = push(report.output, push_to_hub, private=private)
    except LorasurgeonError as exc:  # the result stays; say how to send it again
        raise LorasurgeonError(
            f"{exc}; the result is complete in {report.output}: retry the upload with `{retry}`"
        ) from None
    if not quiet:
        click.echo(pushed.summary())


def sizing_options(default_max_rank: int | None = None) -> Callable[[F], F]:
    """--rank, --energy, --budget, --budget-params, --max-rank (commands.sizing.Sizing); ``default_max_rank``: a
    budget's cap per module when --max-rank is not given (extract's), None: each module's own rank."""
    max_rank_help = (
        "A cap per module (default: none, each module's own rank)."
        if default_max_rank is None
        else f"A cap per module for --energy (default: none) and --budget (default: {default_max_rank})."
    )
    return option_group(
        click.option("--rank", type=int, default=None, help="The same rank for every module."),
        click.option(
            "--energy", type=float, default=None, help="Per module, the smallest rank keeping this share of ‖ΔW‖²."
        ),
        click.option(
            "--budget",
            default=None,
            metavar="SIZE",
            help="The adapter's size (e.g. 15MB): ranks chosen where they keep the most.",
        ),
        click.option("--budget-params", type=int, default=None, help="The budget as a number of parameters."),
        click.option("--max-rank", type=int, default=None, help=max_rank_help),
    )
