"""The commands on checkpoints: inspect, merge, unmerge, convert, extract, push, diff."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, cast

import click

from ..commands.sizing import BUDGET_RANK
from ..console import Dtype, debug_option, progress_bar
from . import cli
from .options import (
    DEVICE,
    DTYPE_AUTO,
    DTYPES,
    FILTERS,
    FOR,
    MERGING,
    NONFINITE,
    PUSH,
    SHARDS,
    WRITE,
    check_push,
    finish,
    option_group,
    sizing_options,
    write_options,
)

if TYPE_CHECKING:  # click's choices guarantee these; the CLI imports no torch before a command runs
    from ..commands.extract.settings import Embeddings, Extras
    from ..commands.merge.settings import Form, Target
    from ..ops.lowrank import Solver


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
def merge_cmd(
    base: str,
    adapters: tuple[str, ...],
    form: Form,
    out: str,
    overwrite: bool,
    dry_run: bool,
    quiet: bool,
    weights: tuple[float, ...],
    dtype: str,
    quantize: str | None,
    device: str,
    workers: int | None,
    max_shard_size: str | None,
    allow_nonfinite: bool,
    push_to_hub: str | None,
    private: bool,
) -> None:
    """Merge PEFT LoRA adapters into BASE: W = W0 + Σ w·(α/r)·B·A, streamed tensor by tensor.

    \b
    Examples:
      lorasurgeon merge fixtures/base fixtures/adapter -o merged
      lorasurgeon merge ./Llama-3-8B ./my-lora --dtype bfloat16 -o ./Llama-3-8B-merged
      lorasurgeon merge BASE A1 A2 --weight 1 --weight 0.5 -o OUT
    """
    from ..commands.merge import merge

    check_push(push_to_hub, dry_run)
    finish(
        merge(
            base,
            adapters,
            out,
            weights=weights,
            form=form,
            dtype=dtype,
            quantize=quantize,
            device=device,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            dry_run=dry_run,
            allow_nonfinite=allow_nonfinite,
            workers=workers,
            progress=progress_bar(quiet, dry_run),
        ),
        quiet,
        push_to_hub,
        private,
    )


@cli.command("unmerge")
@debug_option
@click.argument("merged")
@click.argument("adapters", nargs=-1, required=True)
@MERGING
def unmerge_cmd(
    merged: str,
    adapters: tuple[str, ...],
    out: str,
    overwrite: bool,
    dry_run: bool,
    quiet: bool,
    weights: tuple[float, ...],
    dtype: str,
    quantize: str | None,
    device: str,
    workers: int | None,
    max_shard_size: str | None,
    allow_nonfinite: bool,
    push_to_hub: str | None,
    private: bool,
) -> None:
    """Take adapters back out of MERGED: W0 = W − Σ w·(α/r)·B·A.

    \b
    Example:
      lorasurgeon unmerge merged fixtures/adapter -o base-again
    """
    from ..commands.merge import unmerge

    check_push(push_to_hub, dry_run)
    finish(
        unmerge(
            merged,
            adapters,
            out,
            weights=weights,
            dtype=dtype,
            quantize=quantize,
            device=device,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            dry_run=dry_run,
            allow_nonfinite=allow_nonfinite,
            workers=workers,
            progress=progress_bar(quiet, dry_run),
        ),
        quiet,
        push_to_hub,
        private,
    )


@cli.command("convert")
@debug_option
@click.argument("augmented", metavar="INPUT")
@click.option(
    "--to",
    "to",
    default=None,
    type=click.Choice(["merged", "adapter", "gguf"]),
    help="Target form of an augmented checkpoint; gguf: a PEFT adapter as a llama.cpp adapter file "
    "(a model is converted with --dtype alone).",
)
@click.option("--base", default=None, help="With --to gguf: the base model's folder (its config.json).")
@FOR
@option_group(write_options("Result folder (a .gguf file with --to gguf)."), DTYPE_AUTO, DEVICE, SHARDS, PUSH)
def convert_cmd(
    augmented: str,
    to: str | None,
    base: str | None,
    for_: str | None,
    out: str,
    overwrite: bool,
    dry_run: bool,
    quiet: bool,
    dtype: str,
    device: str,
    max_shard_size: str | None,
    push_to_hub: str | None,
    private: bool,
) -> None:
    """Turn an augmented checkpoint (from merge --form augmented) into merged or adapter form; or a
    model into another --dtype, a quantized one (FP8, compressed-tensors, MXFP4, bitsandbytes) dequantized.

    \b
    Examples:
      lorasurgeon convert aug --to adapter -o adapter-again
      lorasurgeon convert ./DeepSeek-V3-FP8 --dtype bfloat16 -o ./DeepSeek-V3-bf16
      lorasurgeon convert my-lora --to gguf --base ./Llama-3-8B -o my-lora.gguf
      lorasurgeon convert my-lora --for llama.cpp -o my-lora-llamacpp
    """
    if for_ is not None:
        if to is not None:
            raise click.UsageError("--for rewrites an adapter as an adapter: it goes without --to")
        from ..commands.resize import resize

        check_push(push_to_hub, dry_run)
        finish(
            resize(augmented, out, energy=1.0, for_=for_, overwrite=overwrite, dry_run=dry_run),
            quiet,
            push_to_hub,
            private,
        )
        return
    if to == "gguf":
        from ..commands.convert import to_gguf

        if push_to_hub:
            raise click.UsageError("--to gguf writes one file: upload it with `hf upload REPO FILE`")
        report = to_gguf(augmented, out, base=base, overwrite=overwrite, dry_run=dry_run)
        if report.dry_run or not quiet:
            click.echo(report.summary())
        return
    from ..commands.convert import convert

    if base is not None:
        raise click.UsageError("--base goes with --to gguf")
    check_push(push_to_hub, dry_run)
    finish(
        convert(
            augmented,
            out,
            to=cast("Target | None", to),
            dtype=dtype,
            device=device,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            dry_run=dry_run,
            progress=progress_bar(quiet, dry_run),
        ),
        quiet,
        push_to_hub,
        private,
    )


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
@option_group(DEVICE, NONFINITE, PUSH)
def extract_cmd(
    base: str,
    finetuned: str,
    out: str,
    overwrite: bool,
    dry_run: bool,
    quiet: bool,
    rank: int | None,
    energy: float | None,
    max_rank: int | None,
    budget: str | None,
    budget_params: int | None,
    for_: str | None,
    include: str | None,
    exclude: str | None,
    embeddings: Embeddings,
    extras: Extras,
    solver: Solver,
    seed: int,
    dtype: str,
    plot: str | None,
    device: str,
    allow_nonfinite: bool,
    push_to_hub: str | None,
    private: bool,
) -> None:
    """Extract a PEFT LoRA adapter from FINETUNED − BASE by truncated SVD.

    Writes OUT/adapter_config.json, OUT/adapter_model.safetensors and OUT/extract_report.json
    (per module: rank, share of ‖ΔW‖² kept, relative error).

    \b
    Examples:
      lorasurgeon extract ./Llama-3-8B ./my-finetune --rank 16 -o my-lora
      lorasurgeon extract BASE TUNED --energy 0.9 --max-rank 128 -o lora
      lorasurgeon extract BASE TUNED --budget 15MB -o lora-15mb --plot lora-15mb.png
    """
    from ..commands.extract import extract
    from ..commands.sizing import one_budget

    check_push(push_to_hub, dry_run)
    finish(
        extract(
            base,
            finetuned,
            out,
            rank=rank,
            energy=energy,
            max_rank=max_rank,
            budget=one_budget(budget, budget_params),
            for_=for_,
            include=include,
            exclude=exclude,
            embeddings=embeddings,
            extras=extras,
            solver=solver,
            device=device,
            seed=seed,
            dtype=dtype,
            overwrite=overwrite,
            dry_run=dry_run,
            allow_nonfinite=allow_nonfinite,
            plot=plot,
            progress=progress_bar(quiet, dry_run),
        ),
        quiet,
        push_to_hub,
        private,
    )


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
def diff_cmd(
    a: str,
    b: str,
    as_json: bool,
    rank_profile: bool,
    top: int,
    atol: float | None,
    plot: str | None,
    overwrite: bool,
    include: str | None,
    exclude: str | None,
    device: str,
    quiet: bool,
) -> None:
    """Compare checkpoints A and B tensor by tensor; exit 0 if identical, 1 if not, 2 on error.

    \b
    Examples:
      lorasurgeon diff fixtures/base merged --rank-profile
      lorasurgeon diff ./model-fp32 ./model-bf16 --atol 1e-2 --json
      lorasurgeon diff ./base ./finetuned --rank-profile --plot diff.png
    """
    from ..commands.diff import diff

    report = diff(
        a,
        b,
        rank_profile=rank_profile,
        atol=atol,
        plot=plot,
        overwrite=overwrite,
        include=include,
        exclude=exclude,
        device=device,
        progress=progress_bar(quiet),
    )
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.table(top))
    sys.exit(report.exit_code)
