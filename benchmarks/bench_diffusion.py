"""Diffusion LoRAs measured: each family (tiny SD 1.5- and SDXL-shaped pipelines built by diffusers) × each LoRA
format × merge into a pipeline folder and into a single-file checkpoint, unmerge, convert (to the other format
and back), extract (full rank, from the merged pipeline) and resize (to its own rank). Each cell is the largest
absolute error (float32) against diffusers' ``load_lora_weights`` + ``fuse_lora`` of the same factors, or
"bit-identical", or "refused: <why>". The README's "Diffusion models" table is this script's output.

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
    from safetensors.torch import load_file
    from test_diffusion_formats import single_file

    from lorasurgeon.names.ldm_unet import ldm_unet_map

    pipeline = tiny_pipeline(root, family)
    lora = diffusers_lora(pipeline, root / "d", rank=4, alpha=8.0)
    reference = fused_reference(pipeline, lora, family)
    adapter = lora if fmt == "diffusers" else kohya_lora(lora, root / "k.safetensors", family)
    out: list[str] = []
    refused = run("merge", pipeline, adapter, "-o", root / "m")
    merged = read_pipeline(root / "m") if refused is None else {}
    out.append(f"refused: {refused}" if refused else error(merged, reference))
    if family == "sdxl":
        out.append("not read yet: OpenCLIP's fused q/k/v")
    else:
        base = single_file(pipeline, root / "single.safetensors")
        refused = run("merge", base, adapter, "-o", root / "m.safetensors")
        got = load_file(root / "m.safetensors") if refused is None else {}
        names = {f"unet.{d}": got[f] for d, f in (ldm_unet_map(got) or {}).items()}
        prefix = "cond_stage_model.transformer.text_model."
        names |= {f"text_encoder.{k.removeprefix(prefix)}": v for k, v in got.items() if k.startswith(prefix)}
        out.append(f"refused: {refused}" if refused else error(names, reference))
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


def main() -> None:
    os.environ.setdefault("LORASURGEON_CACHE", tempfile.mkdtemp(prefix="lorasurgeon-cache-"))
    print(f"| family | LoRA format | {' | '.join(COLUMNS)} |")
    print(f"|---|---|{'---:|' * len(COLUMNS)}")
    for family in ("sd15", "sdxl"):
        for fmt in ("diffusers", "kohya"):
            with tempfile.TemporaryDirectory() as scratch:
                row = cells(family, fmt, Path(scratch))
            print(f"| {family} | {fmt} | {' | '.join(row)} |", flush=True)


if __name__ == "__main__":
    main()
