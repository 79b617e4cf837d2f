"""merge, extract and resize --cluster ray on a local Ray cluster, against one process: time, and the bytes,
with a worker killed.

    python benchmarks/bench_cluster.py                   # a 0.31 GB bf16 Llama in 6 shards, ~2 min on 2 cores
    python benchmarks/bench_cluster.py --hidden 512 --layers 2   # smoke

Builds the model and LoRA of bench_hub_stream.py (hidden 1024, 8 layers, vocab 32000, bf16; r 16 on q_proj and
v_proj) sharded at --shard-mb (50), then runs in child processes: ``lorasurgeon merge`` (one process, its
default compute workers); ``--cluster ray`` with no RAY_ADDRESS (a local cluster started by the run and stopped
after it: its start-up counted); and ``--cluster ray`` again with this script SIGKILLing the first worker seen
running a task (Ray titles it ``ray::_run_group``); then ``extract --rank 16 --dtype bf16`` of the merged result
against the base, the same three ways (one task per decoder layer); then ``resize --rank 8`` of that adapter,
in one process and on Ray. Per run: wall seconds, and whether every output file is the single-process result's,
byte for byte. Prints a markdown table (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_hub_stream import build, weight_bytes  # noqa: E402


def busy_workers() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::_run_group"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def lorasurgeon(args: list[str], kill: bool) -> tuple[float, list[int]]:
    killed: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        while kill and not stop.is_set() and not killed:
            for pid in busy_workers():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.005)

    watcher = threading.Thread(target=killer)
    watcher.start()
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "lorasurgeon", *args, "-q"], capture_output=True, text=True)
    finally:
        stop.set()
        watcher.join()
    if done.returncode:
        sys.exit(f"failed: {' '.join(args)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start, killed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--shard-mb", type=int, default=50)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-cluster-", dir=args.workdir))
    try:
        model, adapter = build(root, args.hidden, args.layers, args.vocab)
        subprocess.run(
            [sys.executable, "-m", "lorasurgeon", "convert", str(model), "--dtype", "bf16", "-q", "-o",
             str(root / "sharded"), "--max-shard-size", f"{args.shard_mb}MB"],
            check=True,
        )  # fmt: skip
        base = root / "sharded"
        files = sorted(p.name for p in base.glob("*.safetensors"))
        print(f"base {weight_bytes(base) / 1e6:.0f} MB in {len(files)} files", flush=True)
        rows = []
        for label, extra, kill in [
            ("one process", [], False),
            ("--cluster ray (local, started by the run)", ["--cluster", "ray"], False),
            ("--cluster ray, a busy worker SIGKILLed", ["--cluster", "ray"], True),
        ]:
            out = root / f"out-{len(rows)}"
            seconds, killed = lorasurgeon(["merge", str(base), str(adapter), "-o", str(out), *extra], kill)
            _, differ, missing = filecmp.cmpfiles(root / "out-0", out, files, shallow=False)
            same = "—" if not rows else ("NO" if differ or missing else "yes")
            rows.append(f"| merge, {label} | {seconds:.1f} | {len(killed)} | {same} |")
            print(rows[-1], flush=True)
        runs = [("one process", [], False), ("--cluster ray", ["--cluster", "ray"], False)]
        for n, (label, extra, kill) in enumerate([*runs, ("--cluster ray, a worker killed", runs[1][1], True)]):
            out = root / f"extract-{n}"
            cmd = ["extract", str(base), str(root / "out-0"), "--rank", "16", "--dtype", "bf16", "-o", str(out)]
            seconds, killed = lorasurgeon(cmd + extra, kill)
            _, differ, missing = filecmp.cmpfiles(root / "extract-0", out, ["adapter_model.safetensors"], shallow=False)
            same = "—" if not n else ("NO" if differ or missing else "yes")
            rows.append(f"| extract --rank 16, {label} | {seconds:.1f} | {len(killed)} | {same} |")
            print(rows[-1], flush=True)
        for n, (label, extra, _) in enumerate(runs):
            out = root / f"resize-{n}"
            cmd = ["resize", str(root / "extract-0"), "--rank", "8", "-o", str(out)]
            seconds, _ = lorasurgeon(cmd + extra, False)
            _, differ, missing = filecmp.cmpfiles(root / "resize-0", out, ["adapter_model.safetensors"], shallow=False)
            same = "—" if not n else ("NO" if differ or missing else "yes")
            rows.append(f"| resize --rank 8, {label} | {seconds:.1f} | 0 | {same} |")
            print(rows[-1], flush=True)
        print("\n| run | s | workers killed | bytes = one process's |\n|---|---:|---:|---|")
        print("\n".join(rows))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
