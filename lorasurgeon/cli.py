"""The command line: each command parses options, calls one library function, prints its report."""

from __future__ import annotations

import json
import os
import shlex
import signal
import sys

import click

from . import __version__
from .errors import LorasurgeonError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Stopped(BaseException):
    """A signal asked the run to stop (SIGINT, SIGTERM, SIGHUP). Like KeyboardInterrupt it is not an
    Exception, so it unwinds through every ``except Exception`` and each writer's abort removes the
    unfinished result on the way out."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def _stop(signum: int, frame: object) -> None:
    # Only the first signal stops the run; later ones must not cut its clean-up short.
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signum)


def _stopped_message(signum: int) -> str:
    name = signal.Signals(signum).name
    return f"error: stopped by {name}; no unfinished result is left behind"


class _Dtype(click.Choice):
    """A dtype choice that also takes the short names people type (bf16, fp16, fp32, half), as the library does."""

    ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}

    def convert(self, value, param, ctx):
        return super().convert(self.ALIASES.get(str(value).lower(), value), param, ctx)


def _debug_option(f):
    """--debug after the command too (lorasurgeon merge ... --debug), as the error messages suggest it."""
    def turn_on(ctx: click.Context, param: click.Parameter, value: bool) -> None:
        if value:
            ctx.find_root().obj["debug"] = True

    return click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=turn_on,
                        help="Show full tracebacks on errors.")(f)


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
        except Stopped as exc:
            click.echo(_stopped_message(exc.signum), err=True)
            sys.exit(128 + exc.signum)
        except KeyboardInterrupt:
            click.echo(_stopped_message(signal.SIGINT), err=True)
            sys.exit(128 + signal.SIGINT)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # a bug, not bad input: still one line unless --debug
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: internal error: {type(exc).__name__}: {exc} "
                       "(run with --debug for the traceback, and please report it)", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings=CONTEXT)
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
    if not debug:  # huggingface_hub logs retries and warnings; errors reach the user as one line
        import logging

        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


@cli.command("inspect")
@_debug_option
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of a table.")
@click.option("--verify", "check", is_flag=True,
              help="Also read every byte: index, layout, readability, NaN/Inf. Exit 1 if anything is wrong.")
def inspect_cmd(path: str, as_json: bool, check: bool) -> None:
    """Describe a checkpoint or PEFT adapter from its headers (no tensor data is read).

    PATH is a folder (model, sharded model or PEFT adapter), a single .safetensors/.bin file,
    or a Hub repo id. --verify reads every byte and checks what headers cannot show.

    \b
    Examples:
      lorasurgeon inspect fixtures/base
      lorasurgeon inspect fixtures/adapter --json
      lorasurgeon inspect merged --verify
    """
    from .commands.inspect import format_report, inspect

    report = inspect(path)
    verified = None
    if check:
        from .commands.verify import verify

        verified = verify(path)
    if as_json:
        doc = report.to_dict() | ({"verify": verified.to_dict()} if verified else {})
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(format_report(report) + (f"\n{verified.summary()}" if verified else ""))
    if verified is not None and not verified.ok:
        sys.exit(1)


class _Bar:
    """A tqdm bar in bytes on stderr: only on a terminal, and never with --quiet."""

    def __init__(self) -> None:
        self._bar = None

    def start(self, total: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                         leave=False, dynamic_ncols=True)

    def advance(self, nbytes: int) -> None:
        self._bar.update(nbytes)

    def finish(self) -> None:
        self._bar.close()


def _bar(quiet: bool, dry_run: bool) -> _Bar | None:
    return None if quiet or dry_run or not sys.stderr.isatty() else _Bar()


def _common(f):
    options = [
        click.option("-o", "--output", "out", required=True, type=click.Path(), help="Result folder."),
        click.option("--weight", "weights", type=float, multiple=True,
                     help="Weight of each adapter, in order (default 1.0 each)."),
        click.option("--dtype", default="auto", show_default=True,
                     type=_Dtype(["auto", "float32", "bfloat16", "float16"]),
                     help="Output dtype of floating tensors; auto keeps the base's (bf16, fp16, fp32 work too)."),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N."),
        click.option("--max-shard-size", default=None, help="e.g. 5GB; default keeps the base's layout."),
        click.option("--overwrite", is_flag=True, help="Replace OUT, if it is an earlier lorasurgeon result (or empty), once the new one is complete."),
        click.option("--dry-run", is_flag=True, help="Print the plan; read and write nothing."),
        click.option("--quiet", "-q", is_flag=True, help="No progress bar or report."),
        click.option("--allow-nonfinite", is_flag=True, help="Write results holding NaN/Inf instead of stopping."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _print(report, quiet: bool) -> None:
    if report.dry_run or not quiet:
        click.echo(report.summary())


def _push_options(f):
    f = click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private.")(f)
    return click.option("--push-to-hub", "push_to_hub", default=None, metavar="REPO_ID",
                        help="Upload the result to this Hub repo when it is complete.")(f)


def _check_push(push_to_hub: str | None, dry_run: bool) -> None:
    """Before any work: the repo id, the token and the Hub, so a bad push fails in seconds, not after a merge."""
    if push_to_hub and not dry_run:
        from .hub.push import check_push_target

        check_push_target(push_to_hub)


def _maybe_push(report, push_to_hub: str | None, private: bool, quiet: bool) -> None:
    if push_to_hub and not report.dry_run:
        from .hub.push import push

        try:
            pushed = push(report.output, push_to_hub, private=private)
        except LorasurgeonError as exc:  # the result stays; say how to send it again
            retry = shlex.join(["lorasurgeon", "push", str(report.output), push_to_hub] + (["--private"] if private else []))
            raise LorasurgeonError(f"{exc}; the result is complete in {report.output}: retry the upload with "
                                   f"`{retry}`") from None
        if not quiet:
            click.echo(pushed.summary())


@cli.command("merge")
@_debug_option
@click.argument("base")
@click.argument("adapters", nargs=-1, required=True)
@click.option("--form", default="merged", show_default=True, type=click.Choice(["merged", "augmented"]),
              help="merged: plain architecture; augmented: LoRA layers inside.")
@_common
@_push_options
def merge_cmd(base, adapters, form, out, weights, dtype, device, max_shard_size, overwrite, dry_run, quiet,
              allow_nonfinite, push_to_hub, private):
    """Merge PEFT LoRA adapters into BASE: W = W0 + Σ w·(α/r)·B·A, streamed tensor by tensor.

    \b
    Examples:
      lorasurgeon merge fixtures/base fixtures/adapter -o merged
      lorasurgeon merge ./Llama-3-8B ./my-lora --dtype bfloat16 -o ./Llama-3-8B-merged
      lorasurgeon merge BASE A1 A2 --weight 1 --weight 0.5 -o OUT
    """
    from .commands.merge import merge

    _check_push(push_to_hub, dry_run)
    report = merge(base, adapters, out, weights=weights, form=form, dtype=dtype, device=device,
                   max_shard_size=max_shard_size, overwrite=overwrite, dry_run=dry_run,
                   allow_nonfinite=allow_nonfinite, progress=_bar(quiet, dry_run))
    _print(report, quiet)
    _maybe_push(report, push_to_hub, private, quiet)


@cli.command("unmerge")
@_debug_option
@click.argument("merged")
@click.argument("adapters", nargs=-1, required=True)
@_common
@_push_options
def unmerge_cmd(merged, adapters, out, weights, dtype, device, max_shard_size, overwrite, dry_run, quiet,
                allow_nonfinite, push_to_hub, private):
    """Take adapters back out of MERGED: W0 = W − Σ w·(α/r)·B·A.

    \b
    Example:
      lorasurgeon unmerge merged fixtures/adapter -o base-again
    """
    from .commands.merge import unmerge

    _check_push(push_to_hub, dry_run)
    report = unmerge(merged, adapters, out, weights=weights, dtype=dtype, device=device,
                     max_shard_size=max_shard_size, overwrite=overwrite, dry_run=dry_run,
                     allow_nonfinite=allow_nonfinite, progress=_bar(quiet, dry_run))
    _print(report, quiet)
    _maybe_push(report, push_to_hub, private, quiet)


@cli.command("convert")
@_debug_option
@click.argument("augmented")
@click.option("--to", "to", required=True, type=click.Choice(["merged", "adapter"]), help="Target form.")
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Result folder.")
@click.option("--dtype", default="auto", show_default=True, type=_Dtype(["auto", "float32", "bfloat16", "float16"]),
              help="Output dtype of floating tensors; auto keeps the checkpoint's (bf16, fp16, fp32 work too).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--max-shard-size", default=None, help="e.g. 5GB.")
@click.option("--overwrite", is_flag=True, help="Replace OUT, if it is an earlier lorasurgeon result (or empty), once the new one is complete.")
@click.option("--dry-run", is_flag=True, help="Print the plan; read and write nothing.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or report.")
@_push_options
def convert_cmd(augmented, to, out, dtype, device, max_shard_size, overwrite, dry_run, quiet, push_to_hub, private):
    """Turn an AUGMENTED checkpoint (from merge --form augmented) into merged or adapter form.

    \b
    Example:
      lorasurgeon convert aug --to adapter -o adapter-again
    """
    from .commands.merge import convert

    _check_push(push_to_hub, dry_run)
    report = convert(augmented, out, to=to, dtype=dtype, device=device, max_shard_size=max_shard_size,
                     overwrite=overwrite, dry_run=dry_run, progress=_bar(quiet, dry_run))
    _print(report, quiet)
    _maybe_push(report, push_to_hub, private, quiet)


@cli.command("extract")
@_debug_option
@click.argument("base")
@click.argument("finetuned")
@click.option("-o", "--output", "out", required=True, type=click.Path(), help="Adapter folder to write.")
@click.option("--rank", type=int, default=None, help="Fixed rank for every module.")
@click.option("--energy", type=float, default=None, help="Per module, the smallest rank keeping this share of ‖ΔW‖².")
@click.option("--max-rank", type=int, default=None, help="Cap for --energy.")
@click.option("--include", default=None, help="Regex: only tensors whose name matches.")
@click.option("--exclude", default=None, help="Regex: leave out tensors whose name matches.")
@click.option("--embeddings", default="lowrank", show_default=True, type=click.Choice(["lowrank", "full", "skip"]),
              help="Embedding changes (and a tied head's) as LoRA factors, stored whole, or left out.")
@click.option("--extras", default="full", show_default=True, type=click.Choice(["full", "skip"]),
              help="Changed norms, biases and other non-matrix tensors.")
@click.option("--solver", default="auto", show_default=True, type=click.Choice(["auto", "randomized", "exact"]),
              help="Truncated SVD: randomized block Krylov, the exact full SVD, or auto (exact where cheaper).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized solver (same seed, same adapter).")
@click.option("--dtype", default="float32", show_default=True, type=_Dtype(["float32", "bfloat16", "float16"]),
              help="dtype of the LoRA factors (bf16, fp16, fp32 work too).")
@click.option("--overwrite", is_flag=True, help="Replace OUT, if it is an earlier lorasurgeon result (or empty), once the new one is complete.")
@click.option("--dry-run", is_flag=True, help="Print what would be compared; write nothing.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or report.")
@click.option("--allow-nonfinite", is_flag=True, help="Do not stop at NaN/Inf deltas.")
@_push_options
def extract_cmd(base, finetuned, out, rank, energy, max_rank, include, exclude, embeddings, extras, solver,
                device, seed, dtype, overwrite, dry_run, quiet, allow_nonfinite, push_to_hub, private):
    """Extract a PEFT LoRA adapter from FINETUNED − BASE by truncated SVD.

    Writes OUT/adapter_config.json, OUT/adapter_model.safetensors and OUT/extract_report.json
    (per module: rank, share of ‖ΔW‖² kept, relative error).

    \b
    Examples:
      lorasurgeon extract ./Llama-3-8B ./my-finetune --rank 16 -o my-lora
      lorasurgeon extract BASE TUNED --energy 0.9 --max-rank 128 -o lora
    """
    from .commands.extract import extract

    _check_push(push_to_hub, dry_run)
    report = extract(base, finetuned, out, rank=rank, energy=energy, max_rank=max_rank, include=include,
                     exclude=exclude, embeddings=embeddings, extras=extras, solver=solver, device=device,
                     seed=seed, dtype=dtype, overwrite=overwrite, dry_run=dry_run,
                     allow_nonfinite=allow_nonfinite, progress=_bar(quiet, dry_run))
    _print(report, quiet)
    _maybe_push(report, push_to_hub, private, quiet)


@cli.command("push")
@_debug_option
@click.argument("folder", type=click.Path())
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repo private (if it does not exist).")
@click.option("--revision", default=None, help="Branch to push to (created if missing).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing.")
@click.option("--message", "-m", default=None, help="Commit message.")
def push_cmd(folder, repo_id, private, revision, create_pr, message):
    """Upload a result FOLDER (with its model card) to the Hub repo REPO_ID.

    Uses HF_TOKEN (or your saved login) and HF_ENDPOINT.

    \b
    Example:
      lorasurgeon push merged my-org/my-model-merged --private
    """
    from .hub.push import check_push_target, push

    check_push_target(repo_id)
    click.echo(push(folder, repo_id, private=private, revision=revision, create_pr=create_pr,
                    message=message).summary())


@cli.command("diff")
@_debug_option
@click.argument("a")
@click.argument("b")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON document instead of a table.")
@click.option("--rank-profile", is_flag=True, help="Ranks keeping 50/90/99% of each changed matrix's ‖B − A‖².")
@click.option("--top", type=click.IntRange(min=0), default=20, show_default=True,
              help="How many changed tensors the table shows.")
@click.option("--atol", type=float, default=None, help="Values within this absolute tolerance count as equal.")
@click.option("--include", default=None, help="Regex: only tensors whose name matches.")
@click.option("--exclude", default=None, help="Regex: leave out tensors whose name matches.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def diff_cmd(a, b, as_json, rank_profile, top, atol, include, exclude, device, quiet):
    """Compare checkpoints A and B tensor by tensor; exit 0 if identical, 1 if not, 2 on error.

    \b
    Examples:
      lorasurgeon diff fixtures/base merged --rank-profile
      lorasurgeon diff ./model-fp32 ./model-bf16 --atol 1e-2 --json
    """
    from .commands.diff import diff

    report = diff(a, b, rank_profile=rank_profile, atol=atol, include=include, exclude=exclude,
                  device=device, progress=_bar(quiet, False))
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.table(top))
    sys.exit(report.exit_code)


def main() -> None:
    # Before torch (and its OpenMP runtime) is imported: idle OpenMP workers sleep instead of
    # spinning, so they do not take the cores the reading and writing threads need. Measured in
    # docs/benchmarks.md; set the variable yourself to override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # timeout, docker stop, batch schedulers and a closed terminal send SIGTERM or SIGHUP: stop as
    # for Ctrl-C, removing the unfinished result, instead of dying with it on disk.
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup's SIGHUP stays ignored
            signal.signal(sig, _stop)
    cli(prog_name="lorasurgeon")
