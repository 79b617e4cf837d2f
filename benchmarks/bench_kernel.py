"""The merge's block kernel alone (ops.lora.add_lora_rowwise: convert a block of rows to float32, add
Σ scale·B·A, round back, in cache): bytes of weight per second, per thread count, dtype and rank.

    python benchmarks/bench_kernel.py                       # bf16 and fp16, r = 8, 16, 32, 64
    python benchmarks/bench_kernel.py --ranks 16 --reps 2   # smoke

The weight is a Llama-shaped MLP matrix (5632 × 2048 by default); the output is written in place, as
the merge does. A figure above the disk's (cp -r + sync's) throughput means one compute thread keeps up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from lorasurgeon.ops.lora import add_lora_rowwise


def rate(rows: int, cols: int, dtype: torch.dtype, rank: int, reps: int) -> float:
    """GB/s of weight bytes through the kernel (median of ``reps``)."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, cols, generator=gen).to(dtype)
    left = torch.randn(rows, rank, generator=gen) * 0.01
    right = torch.randn(rank, cols, generator=gen) * 0.01
    add_lora_rowwise(weight, [(left, right, 2.0)], weight)  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        add_lora_rowwise(weight, [(left, right, 2.0)], weight)
        times.append(time.perf_counter() - start)
    return weight.numel() * weight.element_size() / statistics.median(times) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=2, default=[5632, 2048])
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    rows, cols = args.shape
    print(f"add_lora_rowwise on a {rows} × {cols} weight, in place; GB/s of weight bytes, median of {args.reps}\n")
    print("| dtype | r | " + " | ".join(f"{t} thread{'s' if t > 1 else ''}" for t in args.threads) + " |")
    print("|---|---:|" + "---:|" * len(args.threads))
    for dtype in (torch.bfloat16, torch.float16):
        for rank in args.ranks:
            cells = []
            for threads in args.threads:
                torch.set_num_threads(threads)
                cells.append(f"{rate(rows, cols, dtype, rank, args.reps):.2f}")
            print(f"| {str(dtype).removeprefix('torch.')} | {rank} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
