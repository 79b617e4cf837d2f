"""Every PEFT tuner lorasurgeon folds, measured end to end against PEFT: for each case of tests/test_tuners_math.py
(a tiny float32 Llama saved by transformers; PEFT's adapter with every parameter moved off its init), the largest
absolute error of

- merge:   `lorasurgeon merge BASE ADAPTER --dtype float32` against PEFT's merge_and_unload();
- unmerge: `lorasurgeon unmerge` of that result against the base (or the refusal, where PEFT has no unmerge);
- to lora: `lorasurgeon convert ADAPTER --to lora --base BASE --rank 4096` (each module at its matrix's full rank)
  merged, against merge_and_unload(): the whole change as a LoRA, exact but for float32 SVD rounding.

    python benchmarks/bench_tuners.py            # a markdown table (the README's is this script's output)
    python benchmarks/bench_tuners.py loha ia3   # some cases only
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "fixtures")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")


def _error(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def measure(name: str, make, config, folder: Path) -> tuple[str, str, str]:
    import torch
    from click.testing import CliRunner
    from reference import read_folder

    from lorasurgeon.cli import cli

    model = make()
    model.save_pretrained(folder / "base")
    base = read_folder(folder / "base")
    import peft

    wrapped = peft.get_peft_model(model, config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, p in wrapped.named_parameters():
            if ".default" in key and ".ranknum." not in key:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    wrapped.save_pretrained(folder / "adapter")
    expected = {k: v.float() for k, v in wrapped.merge_and_unload().state_dict().items()}

    def run(*args: object) -> str | None:
        done = CliRunner().invoke(cli, [str(a) for a in args])
        return None if done.exit_code == 0 else (done.output.strip().splitlines() or ["?"])[-1]

    failed = run("merge", folder / "base", folder / "adapter", "--dtype", "float32", "-o", folder / "m", "-q")
    if failed:
        return (f"refused: {failed}", "", "")
    merged = read_folder(folder / "m")
    merge = f"{_error(merged, {k: expected[k] for k in merged}):.1e}"
    failed = run("unmerge", folder / "m", folder / "adapter", "-o", folder / "u", "-q")
    unmerge = (
        f"refused ({failed.split(':')[-1].strip()})" if failed else f"{_error(read_folder(folder / 'u'), base):.1e}"
    )
    args = ("convert", folder / "adapter", "--to", "lora", "--base", folder / "base", "--rank", "4096")
    failed = run(*args, "-o", folder / "l", "-q") or run(
        "merge", folder / "base", folder / "l", "--dtype", "float32", "-o", folder / "lm", "-q"
    )
    lora = f"refused ({failed})" if failed else f"{_error(read_folder(folder / 'lm'), expected):.1e}"
    return merge, unmerge, lora


def main() -> None:
    from test_tuners_math import cases

    chosen = sys.argv[1:] or list(cases())
    print("| tuner (case) | merge vs PEFT | unmerge vs base | --to lora (full rank) vs PEFT |")
    print("|---|---:|---:|---:|")
    for name in chosen:
        make, config = cases()[name]
        with tempfile.TemporaryDirectory() as scratch:
            try:
                cells = measure(name, make, config(), Path(scratch))
            except Exception as exc:  # a case PEFT itself cannot build here: say so in the table
                cells = (f"not measured ({type(exc).__name__}: {exc})"[:120], "", "")
        print(f"| {name} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
