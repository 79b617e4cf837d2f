"""Merge benchmark: lorasurgeon against the physical limit (cp + sync) and transformers + PEFT.

    python benchmarks/bench_merge.py --size-mb 620 1860 --reps 3   # 1860 MB = the same shapes, 3x the layers
    python benchmarks/bench_merge.py --size-mb 50 --reps 1 --no-peft  # smoke

Generates a Llama-shaped bf16 checkpoint of about the requested size (streamed to disk with
lorasurgeon's own writer, so generating a large one needs no RAM) and a PEFT LoRA adapter
(r=16 on every projection), then times each tool in its own process under /usr/bin/time -v,
page cache warm (when the checkpoint fits in it), each run starting from a synced disk, and
prints a markdown table of medians with peak RSS and ratios.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lorasurgeon.io import CheckpointWriter, TensorSpec, plan_shards

PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, sys.argv[2]).merge_and_unload()
model.save_pretrained(sys.argv[3])
"""
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_shapes(hidden: int, layers: int, vocab: int = 32000) -> dict[str, tuple[int, ...]]:
    inter, kv = int(hidden * 8 / 3) // 64 * 64, hidden // 4
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "lm_head.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    return shapes


def write_random(out: Path, shapes: dict, dtype: torch.dtype, max_shard: int | None, prefix="model"):
    specs = [TensorSpec(n, dtype, s) for n, s in shapes.items()]
    g = torch.Generator().manual_seed(0)
    with CheckpointWriter(out, plan_shards(specs, max_shard_size=max_shard, prefix=prefix)) as w:
        for spec in specs:
            w.write(spec.name, (torch.randn(spec.shape, generator=g) * 0.02).to(dtype))
    return out


def generate(root: Path, size_mb: int, hidden: int, rank: int) -> tuple[Path, Path, int]:
    per_layer = sum(math.prod(s) for n, s in llama_shapes(hidden, 1).items() if "layers" in n) * 2
    fixed = 2 * 32000 * hidden * 2
    layers = max(1, round((size_mb * 2**20 - fixed) / per_layer))
    shapes = llama_shapes(hidden, layers)
    base = write_random(root / "base", shapes, torch.bfloat16, 500 * 2**20)
    from transformers import LlamaConfig

    inter = shapes["model.layers.0.mlp.gate_proj.weight"][0]
    LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 256,
        vocab_size=32000,
        tie_word_embeddings=False,
        dtype="bfloat16",
    ).save_pretrained(base)
    lora = {}
    for n, s in shapes.items():
        if n.endswith(tuple(f"{p}.weight" for p in PROJ)):
            m = "base_model.model." + n.removesuffix(".weight")
            lora[m + ".lora_A.weight"], lora[m + ".lora_B.weight"] = (rank, s[1]), (s[0], rank)
    adapter = write_random(root / "adapter", lora, torch.float32, None, prefix="adapter_model")
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": rank,
                "lora_alpha": 2 * rank,
                "target_modules": list(PROJ),
                "base_model_name_or_path": str(base),
                "task_type": "CAUSAL_LM",
            }
        )
    )
    return base, adapter, layers


def timed(cmd: list[str] | str, shell: bool = False) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of a command, as /usr/bin/time -v reports them."""
    full = ["/usr/bin/time", "-v"] + (["bash", "-c", cmd] if shell else cmd)
    res = subprocess.run(full, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"failed: {cmd}\n{res.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time .*: (?:(\d+):)?(\d+):([\d.]+)", res.stderr)
    h, m, s = (float(x) if x else 0.0 for x in wall.groups())
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr).group(1))
    return h * 3600 + m * 60 + s, rss / 1024


def settle() -> None:
    """Start each run with no dirty pages and no pending discards left by the previous one."""
    os.sync()
    time.sleep(3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, nargs="+", default=[620])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-peft", action="store_true", help="skip transformers + PEFT")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
        f"Python {platform.python_version()}, torch {torch.__version__}; LoRA r={args.rank} on all 7 "
        f"projections; {args.reps} runs each, medians; page cache warm.\n"
    )
    print("| checkpoint | tool | wall (s) | peak RSS (MiB) | wall / cp+sync | wall / lorasurgeon | RSS / lorasurgeon |")
    print("|---|---|---:|---:|---:|---:|---:|")
    walls = [bench_one(size_mb, args) for size_mb in args.size_mb]
    print(
        "\nWhere a merge's time goes (one in-process run per checkpoint; seconds; the stages overlap: reader,"
        " compute and writer are threads of their own, the early shard syncs another):\n"
    )
    print("| checkpoint | run | " + " | ".join(STAGES) + " |")
    print("|---|---:|" + "---:|" * len(STAGES))
    for label, found in breakdowns:
        print(f"| {label} | {found['run']:.2f} | " + " | ".join(f"{found.get(k, 0.0):.2f}" for k in STAGES) + " |")
    if len(walls) >= 2:
        (s0, cp0, ours0), (s1, cp1, ours1) = walls[0], walls[-1]
        print(
            f"\nMarginal: the extra {(s1 - s0) / 2**20:.0f} MiB cost lorasurgeon {ours1 - ours0:.2f} s "
            f"({(s1 - s0) / max(ours1 - ours0, 1e-9) / 2**30:.2f} GiB/s) and cp -r + sync {cp1 - cp0:.2f} s "
            f"({(s1 - s0) / max(cp1 - cp0, 1e-9) / 2**30:.2f} GiB/s): marginal ratio "
            f"{(ours1 - ours0) / max(cp1 - cp0, 1e-9):.2f} "
            f"(whole-process ratios {ours0 / cp0:.2f} and {ours1 / cp1:.2f})"
        )


breakdowns: list[tuple[str, dict[str, float]]] = []
STAGES = ("read", "compute", "write", "sync", "commit", "wait_read", "wait_write")


def breakdown(base: Path, adapter: Path, out: Path) -> dict[str, float]:
    """One merge in this process (page cache warm, after a settle): the executor's and the writer's
    counters by stage, and the run's own seconds (no interpreter, no imports)."""
    import lorasurgeon

    settle()
    report = lorasurgeon.merge(base, [adapter], out)
    shutil.rmtree(out)
    return {"run": report.seconds, **report.stages}


def bench_one(size_mb: int, args) -> tuple[int, float, float]:
    """One checkpoint: the table's rows; returns (its bytes, cp + sync's wall, lorasurgeon's wall)."""
    root = Path(tempfile.mkdtemp(dir=args.workdir, prefix="lorasurgeon-bench-"))
    try:
        base, adapter, layers = generate(root, size_mb, args.hidden, args.rank)
        size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        runs = {
            "cp -r + sync": lambda o: timed(f"cp -r {base} {o} && sync {o}/*", shell=True),
            "lorasurgeon merge": lambda o: timed(
                [sys.executable, "-m", "lorasurgeon", "merge", str(base), str(adapter), "-o", str(o), "--quiet"]
            ),
        }
        if not args.no_peft:
            runs["transformers + PEFT"] = lambda o: timed(
                [sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(o)]
            )
        timed(f"cat {base}/*.safetensors > /dev/null", shell=True)  # warm the page cache
        results = {}
        for name, fn in runs.items():
            samples = []
            for rep in range(args.reps):
                out = root / f"out-{rep}"
                settle()
                samples.append(fn(out))
                shutil.rmtree(out)
            results[name] = (statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples))
        breakdowns.append((f"{layers} layers, {size / 2**20:.0f} MiB", breakdown(base, adapter, root / "in-process")))
        cp_wall = results["cp -r + sync"][0]
        ours = results["lorasurgeon merge"]
        label = f"{layers} layers, {size / 2**20:.0f} MiB"
        for name, (wall, rss) in results.items():
            print(
                f"| {label} | {name} | {wall:.2f} | {rss:.0f} | {wall / cp_wall:.2f} | {wall / ours[0]:.2f} | "
                f"{rss / ours[1]:.2f} |",
                flush=True,
            )
        return size, cp_wall, ours[0]
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
