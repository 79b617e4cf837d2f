"""convert: one command for every change of form -- an augmented checkpoint to merged or adapter form, a model
to another --dtype (dequantized), an adapter to another adapter format (--to peft|mlx|...), to a llama.cpp GGUF
file (--to gguf), to the best LoRA of its change (--to lora, any PEFT tuner), for a consumer (--for), or a
PiSSA-family adapter to the plain LoRA of its base (--initial). Each mode is one library call."""

from __future__ import annotations

from typing import Any

import click

from ..adapter.formats.registry import writable
from ..commands.sizing import BUDGET_RANK
from ..console import debug_option
from . import cli
from .options import DEVICE, DTYPE_AUTO, FOR, PUSH, SHARDS, Job, option_group, sizing_options, write_options

ADAPTER_FORMATS = writable()  # the adapter formats --to writes (the registry's: one line there adds one here)
SIZING = ("rank", "energy", "budget", "budget_params", "max_rank")  # --to lora's


@cli.command("convert")
@debug_option
@click.argument("augmented", metavar="INPUT")
@click.option(
    "--to",
    "to",
    default=None,
    type=click.Choice(["merged", "adapter", "gguf", "lora", *ADAPTER_FORMATS]),
    help="Target form of an augmented checkpoint; gguf: a PEFT adapter as a llama.cpp adapter file; lora: the best "
    f"LoRA of an adapter's change (any PEFT tuner; with --base and a size); {', '.join(ADAPTER_FORMATS)}: an adapter "
    "in that adapter format (a model is converted with --dtype alone).",
)
@click.option(
    "--base",
    default=None,
    help="With --to gguf, --to lora, or an adapter read against its base (a .gguf, a kohya file): the base model.",
)
@click.option(
    "--initial",
    default=None,
    metavar="DIR",
    help="A PiSSA/OLoRA/CorDA adapter's initial adapter (saved before training): INPUT made the plain LoRA "
    "of the unchanged base, exactly (rank 2r).",
)
@FOR
@option_group(write_options("Result folder (a .gguf file with --to gguf)."), DTYPE_AUTO, DEVICE, SHARDS, PUSH)
@sizing_options(default_max_rank=BUDGET_RANK)
def convert_cmd(
    augmented: str, to: str | None, base: str | None, initial: str | None, for_: str | None, **options: Any
) -> None:
    """Turn an augmented checkpoint (from merge --form augmented) into merged or adapter form; a model into
    another --dtype, a quantized one (FP8, compressed-tensors, MXFP4, bitsandbytes, MLX) dequantized; or an adapter
    into another adapter format, a GGUF file, or the best LoRA of its change.

    \b
    Examples:
      lorasurgeon convert aug --to adapter -o adapter-again
      lorasurgeon convert ./DeepSeek-V3-FP8 --dtype bfloat16 -o ./DeepSeek-V3-bf16
      lorasurgeon convert my-lora --to gguf --base ./Llama-3-8B -o my-lora.gguf
      lorasurgeon convert my-lora.gguf --to peft --base ./Llama-3-8B -o my-lora
      lorasurgeon convert my-lora --to mlx -o my-lora-mlx
      lorasurgeon convert my-loha --to lora --base ./Llama-3-8B --rank 16 -o my-lora
      lorasurgeon convert my-lora --for llama.cpp -o my-lora-llamacpp
      lorasurgeon convert my-pissa-lora --initial my-pissa-init -o my-lora
    """
    sizing = {k: options.pop(k) for k in SIZING}
    _check(augmented, to, base, initial, for_, any(v is not None for v in sizing.values()), options["push_to_hub"])
    job = Job.pop(options)
    device = options["device"]
    if initial is not None:
        from ..commands.convert.initial import from_initial

        job.finish(from_initial(augmented, initial, job.output(), device=device))
    elif for_ is not None:
        from ..commands.resize import ResizeSettings
        from ..commands.resize import run as resize

        job.finish(
            resize([augmented], job.output(), ResizeSettings.parse(adapters=1, energy=1.0, for_=for_, device=device))
        )
    elif to == "lora":
        from ..commands.convert.to_lora import to_lora
        from ..commands.extract import ExtractSettings

        dtype = "float32" if options["dtype"] == "auto" else options["dtype"]
        assert base is not None  # _check: --to lora needs it
        job.finish(to_lora(augmented, base, job.output(), ExtractSettings.parse(**sizing, dtype=dtype, device=device)))
    elif to == "peft" and base is not None and augmented.lower().endswith(".gguf"):  # read back against its base
        from ..commands.convert.from_gguf import from_gguf

        job.finish(from_gguf(augmented, base, job.output(), device=device))
    elif to in ADAPTER_FORMATS:
        from ..commands.convert.adapter_format import to_format

        job.finish(to_format(augmented, job.output(), target=to, base=base, device=device))
    elif to == "gguf":
        from ..commands.convert import to_gguf

        report = to_gguf(augmented, job.out, base=base, overwrite=job.overwrite, dry_run=job.dry_run)
        if report.dry_run or not job.quiet:
            click.echo(report.summary())
    else:
        from ..commands.convert import ConvertSettings, run

        job.finish(run(augmented, job.output(), ConvertSettings.parse(to=to, **options)))


def _check(
    augmented: str,
    to: str | None,
    base: str | None,
    initial: str | None,
    for_: str | None,
    sized: bool,
    push: str | None,
) -> None:
    """The options that go together, before any work."""
    if to == "gguf" and push:
        raise click.UsageError("--to gguf writes one file: upload it with `hf upload REPO FILE`")
    if for_ is not None and to is not None:
        raise click.UsageError("--for rewrites an adapter as an adapter: it goes without --to")
    gguf_in = augmented.lower().endswith(".gguf")
    if base is not None and to not in ("gguf", "lora", *ADAPTER_FORMATS):
        raise click.UsageError(
            "--base goes with --to gguf, --to lora, or an adapter format for an adapter read against its base "
            "(a .gguf, a kohya file)"
        )
    if gguf_in and to in ADAPTER_FORMATS and base is None:
        raise click.UsageError("a .gguf adapter needs --base BASE: the model it was made for (its names, its heads)")
    if to == "lora" and base is None:
        raise click.UsageError("--to lora needs --base BASE: the model the adapter is for (its change depends on it)")
    if initial is not None and (to is not None or for_ is not None):
        raise click.UsageError("--initial makes a plain LoRA adapter: it goes without --to and --for")
    if sized and to != "lora":
        raise click.UsageError("--rank, --energy, --budget, --budget-params and --max-rank go with --to lora")
