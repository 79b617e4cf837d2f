"""MoE merge benchmark: a Mixtral-shaped bf16 checkpoint (per-expert files, as transformers saves it) and
PEFT's all-linear adapter (target_parameters on the stacked experts), merged by lorasurgeon (merged and
augmented forms) and by transformers + PEFT (load, merge_and_unload, save).

    python benchmarks/bench_moe.py --layers 4 --reps 3
    python benchmarks/bench_moe.py --layers 1 --reps 1 --no-peft   # smoke

Each run is its own process under /usr/bin/time -v, from a synced disk; the table gives medians of
wall time and peak RSS, and checks that both merges hold the same tensors (max |difference|).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PEFT_MERGE = """
import sys, torch, transformers
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
"""


def make_inputs(root: Path, layers: int, experts: int, hidden: int, inter: int, rank: int) -> tuple[Path, Path]:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    config = transformers.MixtralConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        num_local_experts=experts,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(root / "base")
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one process, from a synced disk."""
    subprocess.run(["sync"], check=True)
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", done.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    assert wall and rss
    seconds = int(wall[1] or 0) * 3600 + int(wall[2]) * 60 + float(wall[3])
    return seconds, int(rss[1]) / 1024


def max_difference(a: Path, b: Path) -> float:
    from safetensors import safe_open

    def tensors(folder: Path) -> dict:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, "pt") as h:
                out.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118
        return out

    x, y = tensors(a), tensors(b)
    assert set(x) == set(y), sorted(set(x) ^ set(y))[:5]
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-peft", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-moe-"))
    try:
        base, adapter = make_inputs(root, args.layers, args.experts, args.hidden, args.intermediate, args.rank)
        size = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**20
        cli = [sys.executable, "-m", "lorasurgeon", "merge", str(base), str(adapter), "-q", "-o"]
        runs = {  # label -> (command, its output folder)
            "lorasurgeon merge": (cli + [str(root / "ls")], root / "ls"),
            "lorasurgeon merge --form augmented": (cli + [str(root / "aug"), "--form", "augmented"], root / "aug"),
        }
        if not args.no_peft:
            peft = [sys.executable, "-c", PEFT_MERGE, str(base), str(adapter), str(root / "peft")]
            runs["transformers + PEFT merge_and_unload"] = (peft, root / "peft")
        rows = []
        for label, (cmd, out) in runs.items():
            results = []
            for _ in range(args.reps):
                shutil.rmtree(out, ignore_errors=True)
                results.append(timed(cmd))
            rows.append((label, statistics.median(r[0] for r in results), statistics.median(r[1] for r in results)))
        print(
            f"Mixtral-shaped bf16 checkpoint: {size:.0f} MiB, {args.layers} layers x {args.experts} experts, "
            f"all-linear adapter r={args.rank} (target_parameters on the experts); median of {args.reps}\n"
        )
        print("| tool | wall s | peak RSS MiB |\n|---|---:|---:|")
        for label, wall, rss in rows:
            print(f"| {label} | {wall:.2f} | {rss:.0f} |")
        if not args.no_peft:
            print(f"\nmax |lorasurgeon - PEFT| over all tensors: {max_difference(root / 'ls', root / 'peft'):.3g}")
        print(json.dumps({"size_mib": round(size), "rows": rows}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
