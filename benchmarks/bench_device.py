"""CPU against CUDA, and one core against many: what --device cuda gives, and whether compute keeps up.

    python benchmarks/bench_device.py --size-mb 2000 --reps 2     # on a machine with a GPU
    python benchmarks/bench_device.py --size-mb 50 --reps 1       # smoke (CPU only: CUDA rows skipped)

1. merge, unmerge and extract of a generated Llama-shaped bf16 checkpoint (bench_merge.generate) on
   cpu and on cuda: wall time and peak RSS, each in its own process, and the agreement of the two
   results (share of bit-identical elements; the rest are boundary cases of one rounding, counted in
   units of the last place); extract's adapters compared by their ΔW.
2. cp -r + sync of the same checkpoint on the same disk: the physical limit.
3. The CPU merge kernel alone (add_lora_rowwise on a bf16 weight, r=16) at 1, 2, 4, ... threads:
   GB/s of weight processed, against the disk's rate in (2).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_merge import generate, settle, timed  # noqa: E402


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def agreement(a: Path, b: Path) -> dict[str, float]:
    """Share of identical elements, and the largest difference in units of the last place (bf16/fp16)."""
    x, y = tensors(a), tensors(b)
    assert set(x) == set(y)
    same = total = 0
    worst = 0.0
    for k in x:
        same += int((x[k] == y[k]).sum())
        total += x[k].numel()
        if x[k].dtype in (torch.bfloat16, torch.float16):
            ulp = torch.finfo(x[k].dtype).eps * x[k].float().abs().clamp_min(torch.finfo(x[k].dtype).tiny)
            worst = max(worst, float(((x[k].float() - y[k].float()).abs() / ulp).max()))
    return {"identical": same / total, "max_ulps": worst}


def delta_difference(a: Path, b: Path) -> float:
    """max over modules of ‖ΔW_a − ΔW_b‖ / ‖ΔW_b‖ (two extracted adapters of the same change)."""
    x, y = tensors(a), tensors(b)
    worst = 0.0
    for k in x:
        if k.endswith("lora_A.weight"):
            kb = k.replace("lora_A", "lora_B")
            da, db = x[kb].float() @ x[k].float(), y[kb].float() @ y[k].float()
            worst = max(worst, float((da - db).norm() / db.norm()))
    return worst


def kernel_scaling(hidden: int, reps: int) -> list[tuple[int, float]]:
    from lorasurgeon.ops.lora import add_lora_rowwise

    inter = int(hidden * 8 / 3) // 64 * 64
    w = (torch.randn(inter, hidden) * 0.02).to(torch.bfloat16)
    b, a = torch.randn(inter, 16) * 0.01, torch.randn(16, hidden) * 0.01
    out = torch.empty_like(w)
    rows = []
    threads = 1
    while threads <= (os.cpu_count() or 1):
        torch.set_num_threads(threads)
        add_lora_rowwise(w, [(b, a, 2.0)], out)  # warm
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            add_lora_rowwise(w, [(b, a, 2.0)], out)
            times.append(time.perf_counter() - t)
        rows.append((threads, w.numel() * 2 / statistics.median(times) / 1e9))
        threads *= 2
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=2000)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-device-", dir=args.workdir))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    try:
        base, adapter, _ = generate(root, args.size_mb, args.hidden, args.rank)
        size = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 1e9
        cli = [sys.executable, "-m", "lorasurgeon"]
        rows: dict[str, dict[str, float]] = {}
        for dev in devices:
            for cmd, extra in (
                ("merge", [str(base), str(adapter)]),
                ("unmerge", [str(root / "merge-cpu"), str(adapter)]),
                ("extract", [str(base), str(root / "merge-cpu"), "--rank", str(args.rank)]),
            ):
                out = root / f"{cmd}-{dev}"
                runs = []
                for _ in range(args.reps):
                    shutil.rmtree(out, ignore_errors=True)
                    settle()
                    runs.append(timed(cli + [cmd, *extra, "-q", "-o", str(out), "--device", dev]))
                rows[f"{cmd} --device {dev}"] = {
                    "seconds": statistics.median(r[0] for r in runs),
                    "peak_rss_mib": statistics.median(r[1] for r in runs),
                }
        copies = []
        for _ in range(args.reps):
            shutil.rmtree(root / "copy", ignore_errors=True)
            settle()
            copies.append(timed(f"cp -r {base} {root / 'copy'} && sync", shell=True))
        rows["cp -r + sync"] = {"seconds": statistics.median(c[0] for c in copies), "peak_rss_mib": 0}
        agree = {}
        if "cuda" in devices:
            agree["merge"] = agreement(root / "merge-cpu", root / "merge-cuda")
            agree["unmerge"] = agreement(root / "unmerge-cpu", root / "unmerge-cuda")
            agree["extract_delta_rel_diff"] = delta_difference(root / "extract-cuda", root / "extract-cpu")
        scaling = kernel_scaling(args.hidden, 5)
        print(f"{size:.2f} GB bf16 checkpoint, hidden {args.hidden}, adapter r={args.rank}; {os.cpu_count()} cores")
        print("\n| run | s | GB/s of checkpoint | peak RSS MiB |\n|---|---:|---:|---:|")
        for label, r in rows.items():
            print(f"| {label} | {r['seconds']:.2f} | {size / r['seconds']:.2f} | {r['peak_rss_mib']:.0f} |")
        if agree:
            print(f"\ncpu vs cuda: {json.dumps(agree)}")
        print("\n| threads | kernel GB/s |\n|---:|---:|")
        for n, gbs in scaling:
            print(f"| {n} | {gbs:.2f} |")
        print(json.dumps({"size_gb": size, "rows": rows, "agreement": agree, "scaling": scaling}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
