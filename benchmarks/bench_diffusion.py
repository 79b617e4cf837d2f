"""Diffusion LoRAs measured: each family (tiny SD 1.5- and SDXL-shaped pipelines built by diffusers, a tiny
Flux.1 transformer) × each LoRA format × merge into a pipeline folder and into a single-file checkpoint,
unmerge, convert (to the other format and back), extract (full rank, from the merged pipeline) and resize (to
its own rank). Each cell is the largest absolute error (float32) against diffusers' ``load_lora_weights`` +
``fuse_lora`` of the same factors, or "bit-identical", or "refused: <why>". The README's "Diffusion models"
table is this script's output.

    python benchmarks/bench_diffusion.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

COLUMNS = ("merge: pipeline", "merge: single file", "unmerge", "convert ⇄ other format", "extract (full rank)",
           "resize (own rank)")  # fmt: skip


def run(*args: object) -> str | None:
    """The CLI's one-line refusal, or None when the command succeeded."""
    from helpers import run_cli

    done = run_cli(*args)
    if done.exit_code == 0:
        return None
    return done.stderr.strip().splitlines()[-1].removeprefix("error: ")


def error(got: dict[str, Any], want: dict[str, Any]) -> str:
    return f"{max((got[k].float() - want[k].float()).abs().max().item() for k in want):.1e}"


def cells(family: str, fmt: str, root: Path) -> list[str]:
    from diffusion_models import diffusers_lora, fused_reference, kohya_lora, read_pipeline, tiny_pipeline
    from safetensors.torch import load_file, save_file
    from test_diffusion_formats import as_single_file

    pipeline = tiny_pipeline(root, family)
    lora = diffusers_lora(pipeline, root / "d", rank=4, alpha=8.0)
    reference = fused_reference(pipeline, lora, family)
    adapter = lora if fmt == "diffusers" else kohya_lora(lora, root / "k.safetensors", family)
    out: list[str] = []
    refused = run("merge", pipeline, adapter, "-o", root / "m")
    merged = read_pipeline(root / "m") if refused is None else {}
    out.append(f"refused: {refused}" if refused else error(merged, reference))
    base = root / "single.safetensors"
    save_file(as_single_file(read_pipeline(pipeline), family), base)
    refused = run("merge", base, adapter, "-o", root / "m.safetensors")
    want = as_single_file(read_pipeline(pipeline) | reference, family)
    out.append(f"refused: {refused}" if refused else error(load_file(root / "m.safetensors"), want))
    refused = run("unmerge", root / "m", adapter, "-o", root / "u")
    out.append(f"refused: {refused}" if refused else error(read_pipeline(root / "u"), read_pipeline(pipeline)))
    other = "kohya" if fmt == "diffusers" else "diffusers"
    there = root / ("there.safetensors" if other == "kohya" else "there")
    run("convert", adapter, "--to", other, "--base", pipeline, "-o", there)
    back = root / ("back.safetensors" if fmt == "kohya" else "back")
    refused = run("convert", there, "--to", fmt, "--base", pipeline, "-o", back)
    a = load_file(adapter if adapter.suffix else adapter / "pytorch_lora_weights.safetensors")
    b = load_file(back if back.suffix else back / "pytorch_lora_weights.safetensors")
    same = a.keys() == b.keys() and all(a[k].float().equal(b[k].float()) for k in a)
    out.append(f"refused: {refused}" if refused else ("bit-identical" if same else "differs"))
    refused = run("extract", pipeline, root / "m", "--rank", "4", "-o", root / "x")
    refused = refused or run("merge", pipeline, root / "x", "-o", root / "xm")
    out.append(f"refused: {refused}" if refused else error(read_pipeline(root / "xm"), merged))
    target = root / ("r.safetensors" if fmt == "kohya" else "r")
    refused = (
        run("resize", adapter, "--base", pipeline, "--rank", "4", "-o", target)
        if fmt == "kohya"
        else run("resize", adapter, "--rank", "4", "-o", target)
    )
    refused = refused or run("merge", pipeline, target, "-o", root / "rm")
    out.append(f"refused: {refused}" if refused else error(read_pipeline(root / "rm"), merged))
    return out


def flux_cells(root: Path) -> list[str]:
    """A kohya Flux.1 LoRA (original names: fused qkv, linear1) against a diffusers transformer folder and a
    single file as ComfyUI saves it; convert: to diffusers' split modules and back into the single file."""
    from flux_models import COMFY_PREFIX, fused_flux_reference, kohya_flux_lora, read_transformer, tiny_flux, to_bfl
    from safetensors.torch import load_file, save_file

    transformer = tiny_flux(root)
    adapter = kohya_flux_lora(transformer, root / "k.safetensors", blocks_only=True)
    reference = fused_flux_reference(transformer, adapter)
    out: list[str] = []
    refused = run("merge", transformer, adapter, "-o", root / "m")
    merged = read_transformer(root / "m") if refused is None else {}
    out.append(f"refused: {refused}" if refused else error(merged, reference))
    base = root / "flux1.safetensors"
    save_file({COMFY_PREFIX + k: v for k, v in to_bfl(read_transformer(transformer), transformer).items()}, base)
    want = {COMFY_PREFIX + k: v for k, v in to_bfl(reference, transformer).items()}
    refused = run("merge", base, adapter, "-o", root / "m.safetensors")
    out.append(f"refused: {refused}" if refused else error(load_file(root / "m.safetensors"), want))
    refused = run("unmerge", root / "m", adapter, "-o", root / "u")
    out.append(f"refused: {refused}" if refused else error(read_transformer(root / "u"), read_transformer(transformer)))
    refused = run("convert", adapter, "--to", "diffusers", "--base", transformer, "-o", root / "d")
    refused = refused or run("merge", base, root / "d", "-o", root / "md.safetensors")
    split = "to diffusers' split modules, merged into the single file: "
    out.append(f"refused: {refused}" if refused else split + error(load_file(root / "md.safetensors"), want))
    refused = run("extract", transformer, root / "m", "--rank", "4", "-o", root / "x")
    refused = refused or run("merge", transformer, root / "x", "-o", root / "xm")
    out.append(f"refused: {refused}" if refused else error(read_transformer(root / "xm"), merged))
    refused = run("resize", adapter, "--base", transformer, "--rank", "4", "-o", root / "r.safetensors")
    refused = refused or run("merge", transformer, root / "r.safetensors", "-o", root / "rm")
    out.append(f"refused: {refused}" if refused else error(read_transformer(root / "rm"), merged))
    return out


def main() -> None:
    os.environ.setdefault("LORASURGEON_CACHE", tempfile.mkdtemp(prefix="lorasurgeon-cache-"))
    print(f"| family | LoRA format | {' | '.join(COLUMNS)} |")
    print(f"|---|---|{'---:|' * len(COLUMNS)}")
    for family in ("sd15", "sdxl"):
        for fmt in ("diffusers", "kohya"):
            with tempfile.TemporaryDirectory() as scratch:
                row = cells(family, fmt, Path(scratch))
            print(f"| {family} | {fmt} | {' | '.join(row)} |", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        print(f"| flux | kohya | {' | '.join(flux_cells(Path(scratch)))} |", flush=True)


if __name__ == "__main__":
    main()
