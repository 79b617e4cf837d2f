"""The commands on checkpoints: inspect, merge, unmerge, extract, push, diff (convert: cli/convert.py)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ..adapter.formats.registry import writable
from ..commands.sizing import BUDGET_RANK
from ..console import Dtype, debug_option, progress_bar
from . import cli
from .options import (
    CALIBRATION,
    CLUSTER,
    DEVICE,
    DTYPES,
    FILTERS,
    FOR,
    MERGING,
    NONFINITE,
    PUSH,
    STREAM,
    WRITE,
    Job,
    option_group,
    sizing_options,
)


@cli.command("inspect")
@debug_option
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of a table.")
@click.option(
    "--verify",
    "check",
    is_flag=True,
    help="Also read every byte: index, layout, readability, NaN/Inf. Exit 1 if anything is wrong.",
)
def inspect_cmd(path: str, as_json: bool, check: bool) -> None:
    """Describe a model, PEFT adapter or augmented checkpoint from its headers (no tensor data is read).

    PATH is a folder (model, sharded model or PEFT adapter), a single .safetensors/.bin file, a .gguf
    (a llama.cpp adapter or model), or a Hub repo id. --verify reads every byte and checks what headers cannot show.

    \b
    Examples:
      lorasurgeon inspect fixtures/base
      lorasurgeon inspect fixtures/adapter --json
      lorasurgeon inspect merged --verify
    """
    from ..commands.inspect import format_report, inspect
    from ..commands.verify import verify

    report = inspect(path)
    verified = verify(path) if check else None
    if as_json:
        click.echo(json.dumps(report.to_dict() | ({"verify": verified.to_dict()} if verified else {}), indent=2))
    else:
        click.echo(format_report(report) + (f"\n{verified.summary()}" if verified else ""))
    if verified is not None and not verified.ok:
        sys.exit(1)


@cli.command("merge")
@debug_option
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@click.option(
    "--form",
    default="merged",
    show_default=True,
    type=click.Choice(["merged", "augmented"]),
    help="merged: plain architecture; augmented: LoRA layers inside.",
)
@MERGING
def merge_cmd(base: str, adapters: tuple[str, ...], **options: Any) -> None:
    """Merge adapters into BASE: W = W0 + Σ w·(α/r)·B·A, streamed tensor by tensor.

    Adapters: PEFT's (LoRA and the tuners that fold), MLX-LM's, a llama.cpp .gguf LoRA; diffusion LoRAs
    (kohya's, LyCORIS's, diffusers'). OUT is a folder of safetensors; NAME.safetensors, one file (a
    single-file checkpoint's merge: SD, SDXL, Flux as ComfyUI holds them); or for a .gguf BASE a NAME.gguf
    in the base's own types.

    \b
    Examples:
      lorasurgeon merge fixtures/base fixtures/adapter -o merged
      lorasurgeon merge ./Llama-3-8B ./my-lora --dtype bfloat16 -o ./Llama-3-8B-merged
      lorasurgeon merge BASE A1 A2 --weight 1 --weight 0.5 -o OUT
      lorasurgeon merge model-Q8_0.gguf my-lora -o merged-Q8_0.gguf
      lorasurgeon merge flux1-dev.safetensors my_flux_lora.safetensors -o flux1-dev-merged.safetensors
    """
    from ..commands.merge import MergeSettings, run

    job = Job.pop(options)
    job.finish(run(base, adapters, job.output(), MergeSettings.parse(adapters=len(adapters), **options)))


@cli.command("unmerge")
@debug_option
@click.argument("merged")
@click.argument("adapters", nargs=-1, required=True)
@MERGING
def unmerge_cmd(merged: str, adapters: tuple[str, ...], **options: Any) -> None:
    """Take adapters back out of MERGED: W0 = W − Σ w·(α/r)·B·A.

    \b
    Example:
      lorasurgeon unmerge merged fixtures/adapter -o base-again
    """
    from ..commands.merge import MergeSettings, run

    job = Job.pop(options)
    settings = MergeSettings.parse(adapters=len(adapters), unmerge=True, **options)
    job.finish(run(merged, adapters, job.output(), settings))


@cli.command("extract")
@debug_option
@click.argument("base")
@click.argument("finetuned")
@WRITE
@sizing_options(default_max_rank=BUDGET_RANK)
@FOR
@FILTERS
@click.option(
    "--embeddings",
    default="lowrank",
    show_default=True,
    type=click.Choice(["lowrank", "full", "skip"]),
    help="Embedding changes (and a tied head's) as LoRA factors, stored whole, or left out.",
)
@click.option(
    "--extras",
    default="full",
    show_default=True,
    type=click.Choice(["full", "skip"]),
    help="Changed norms, biases and other non-matrix tensors.",
)
@CLUSTER
@click.option(
    "--solver",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "randomized", "exact"]),
    help="Truncated SVD: randomized block Krylov, the exact full SVD, or auto (exact where cheaper).",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the randomized solver (same seed, same adapter)."
)
@click.option(
    "--dtype",
    default="float32",
    show_default=True,
    type=Dtype(DTYPES),
    help="dtype of the LoRA factors (bf16, fp16, fp32 work too).",
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also draw it: kept share and rank per module, singular-value decay (.png/.pdf/.svg; lorasurgeon[plot]).",
)
@click.option(
    "--to",
    "to",
    default="peft",
    show_default=True,
    type=click.Choice(writable()),
    help="The adapter format written: kohya's is one file (-o NAME.safetensors), for ComfyUI, Forge and A1111.",
)
@click.option(
    "--conv-rank",
    type=click.IntRange(min=0),
    default=None,
    help="A fixed rank for k×k convolutions (a UNet's resnets; kohya's --conv_dim), 0 to leave them out "
    "[default: sized like the rest].",
)
@CALIBRATION
@option_group(DEVICE, NONFINITE, PUSH)
def extract_cmd(base: str, finetuned: str, **options: Any) -> None:
    """Extract a PEFT LoRA adapter from FINETUNED − BASE by truncated SVD (or, with --to, in another format).

    Writes OUT/adapter_config.json, OUT/adapter_model.safetensors and OUT/extract_report.json
    (per module: rank, share of ‖ΔW‖² kept, relative error); --to kohya -o NAME.safetensors: one file.

    \b
    Examples:
      lorasurgeon extract ./Llama-3-8B ./my-finetune --rank 16 -o my-lora
      lorasurgeon extract BASE TUNED --energy 0.9 --max-rank 128 -o lora
      lorasurgeon extract BASE TUNED --budget 15MB -o lora-15mb --plot lora-15mb.png
      lorasurgeon extract BASE TUNED --budget 15MB --dtype bf16 --calibration prompts.jsonl -o lora-15mb
      lorasurgeon extract ./sd15-pipeline ./my-sd15-finetune --rank 32 --to kohya -o my_lora.safetensors
      lorasurgeon extract ./sd15-pipeline ./my-sd15-finetune --rank 32 --conv-rank 8 --to kohya -o locon.safetensors
    """
    from ..commands.extract import ExtractSettings, run

    job = Job.pop(options)
    job.finish(run(base, finetuned, job.output(), ExtractSettings.parse(**options)))


@cli.command("push")
@debug_option
@click.argument("folder", type=click.Path())
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (if it does not exist).")
@click.option("--revision", default=None, help="Branch to push to (created if missing).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing.")
@click.option("--message", "-m", default=None, help="Commit message.")
def push_cmd(
    folder: str, repo_id: str, private: bool, revision: str | None, create_pr: bool, message: str | None
) -> None:
    """Upload a result FOLDER (with its model card) to the Hub repo REPO_ID.

    Uses HF_TOKEN (or your saved login) and HF_ENDPOINT.

    \b
    Example:
      lorasurgeon push merged my-org/my-model-merged --private
    """
    from ..hub.push import check_push_target, push

    check_push_target(repo_id)
    click.echo(
        push(folder, repo_id, private=private, revision=revision, create_pr=create_pr, message=message).summary()
    )


@cli.command("diff")
@debug_option
@click.argument("a")
@click.argument("b")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of a table.")
@click.option("--rank-profile", is_flag=True, help="Ranks keeping 50/90/99% of each changed matrix's ‖B − A‖².")
@click.option(
    "--top", type=click.IntRange(min=0), default=20, show_default=True, help="How many changed tensors the table shows."
)
@click.option("--atol", type=float, default=None, help="Values within this absolute tolerance count as equal.")
@click.option(
    "--plot",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also draw it: a layers × module-kind heatmap (.png/.pdf/.svg; needs lorasurgeon[plot]).",
)
@click.option("--overwrite", is_flag=True, help="Replace an earlier picture at the --plot path.")
@option_group(FILTERS, DEVICE)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@STREAM
def diff_cmd(
    a: str,
    b: str,
    as_json: bool,
    top: int,
    plot: str | None,
    overwrite: bool,
    quiet: bool,
    stream: bool,
    **options: Any,
) -> None:
    """Compare checkpoints A and B tensor by tensor; exit 0 if identical, 1 if not, 2 on error.

    \b
    Examples:
      lorasurgeon diff fixtures/base merged --rank-profile
      lorasurgeon diff ./model-fp32 ./model-bf16 --atol 1e-2 --json
      lorasurgeon diff ./base ./finetuned --rank-profile --plot diff.png
    """
    from ..commands._inputs import Output
    from ..commands.diff import DiffSettings, run

    out = Output(plot, overwrite, progress=progress_bar(quiet), stream=stream)
    report = run(a, b, out, DiffSettings.parse(**options))
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.table(top))
    sys.exit(report.exit_code)
