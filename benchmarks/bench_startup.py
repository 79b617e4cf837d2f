"""Start-up: the wall time of commands that read only headers, as a user runs them (a new process each
time), on the committed fixtures; and what a small merge's whole-process time is made of.

    python benchmarks/bench_startup.py            # median of 10 runs per command
    python benchmarks/bench_startup.py --runs 3   # smoke
    python benchmarks/bench_startup.py --runs 3 --merge-sizes 620 1860   # and what whole merges are made of

The first command on a model asks transformers for its tensor names once and caches them (names.cache);
the runs here come after one such warm-up, as every use after the first does. Prints a markdown table:
command, median and max wall seconds, whether the run imported torch (from ``-X importtime``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE, ADAPTER = ROOT / "fixtures" / "base", ROOT / "fixtures" / "adapter"


def cli(*args: str) -> list[str]:
    exe = shutil.which("lorasurgeon")
    return [exe, *args] if exe else [sys.executable, "-m", "lorasurgeon", *args]


def wall(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    start = time.perf_counter()
    code = subprocess.run(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    return time.perf_counter() - start, code


def imports_torch(args: list[str], env: dict[str, str]) -> bool:
    cmd = [sys.executable, "-X", "importtime", "-m", "lorasurgeon", *args]
    err = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True).stderr
    return any(re.search(r"\|\s+torch(\.\w+)*$", line.rstrip()) for line in err.splitlines())


def breakdown(env: dict[str, str], out: Path) -> dict[str, float]:
    """A small merge in-process: seconds to import the CLI, to import torch, and the merge itself."""
    code = f"""
import time, json
t0 = time.perf_counter()
from lorasurgeon.cli import cli
t1 = time.perf_counter()
import torch
t2 = time.perf_counter()
from click.testing import CliRunner
r = CliRunner().invoke(cli, ["merge", {str(BASE)!r}, {str(ADAPTER)!r}, "-o", {str(out)!r}, "-q", "--overwrite"])
t3 = time.perf_counter()
assert r.exit_code == 0, r.output
print(json.dumps({{"import cli": t1 - t0, "import torch": t2 - t1, "merge (plan, read, compute, write)": t3 - t2}}))
"""
    import json

    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    total = time.perf_counter() - start
    found: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    found["interpreter start and exit"] = total - sum(found.values())
    return found


def merge_parts(size_mb: int, runs: int, env: dict[str, str], work: Path) -> None:
    """A Llama-shaped checkpoint of about ``size_mb`` (bench_merge's): the whole merge process against
    python + the torch import, against start + headers + plan (--dry-run), and cp -r + sync."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_merge import generate, settle

    root = work / f"m{size_mb}"
    root.mkdir()
    base, adapter, layers = generate(root, size_mb, 1024, 16)
    subprocess.run(f"cat {base}/*.safetensors > /dev/null", shell=True, check=True)
    merge = cli("merge", str(base), str(adapter), "-o", str(root / "o"), "-q")
    wall(cli("merge", str(base), str(adapter), "-o", str(root / "o"), "--dry-run"), env)  # names cached
    rows: dict[str, list[float]] = {k: [] for k in ("merge", "python + import torch", "--dry-run", "cp -r + sync")}
    for _ in range(runs):
        rows["python + import torch"].append(wall([sys.executable, "-c", "import lorasurgeon.cli, torch"], env)[0])
        rows["--dry-run"].append(wall([*merge[:-1], "--dry-run"], env)[0])
        settle()
        rows["merge"].append(wall(merge, env)[0])
        shutil.rmtree(root / "o")
        settle()
        rows["cp -r + sync"].append(wall(["sh", "-c", f"cp -r {base} {root}/c && sync {root}/c/*"], env)[0])
        shutil.rmtree(root / "c")
    mib = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**20
    med = {k: statistics.median(v) for k, v in rows.items()}
    rest = med["merge"] - med["python + import torch"] - med["--dry-run"]
    print(
        f"| {layers} layers, {mib:.0f} MiB | {med['merge']:.2f} | {med['python + import torch']:.2f} | "
        f"{med['--dry-run']:.2f} | {rest:.2f} | {med['cp -r + sync']:.2f} |"
    )
    shutil.rmtree(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--merge-sizes", type=int, nargs="*", default=[], help="MB of checkpoints to merge")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        env = dict(os.environ, LORASURGEON_CACHE=str(work / "cache"))
        merged = work / "merged"
        subprocess.run(cli("merge", str(BASE), str(ADAPTER), "-o", str(merged), "-q"), env=env, check=True)
        (work / "taken").mkdir()
        o = str(work / "o")
        commands = {
            "lorasurgeon --help": ["--help"],
            "inspect fixtures/adapter": ["inspect", str(ADAPTER)],
            "inspect fixtures/base": ["inspect", str(BASE)],
            "check fixtures/adapter --for vllm": ["check", str(ADAPTER), "--for", "vllm"],
            "merge --dry-run": ["merge", str(BASE), str(ADAPTER), "-o", o, "--dry-run"],
            "unmerge --dry-run": ["unmerge", str(merged), str(ADAPTER), "-o", o, "--dry-run"],
            "extract --rank 4 --dry-run": ["extract", str(BASE), str(merged), "-o", o, "--rank", "4", "--dry-run"],
            "refused: arguments swapped": ["merge", str(ADAPTER), str(BASE), "-o", o],
            "refused: output exists": ["merge", str(BASE), str(ADAPTER), "-o", str(work / "taken")],
            "refused: no such input": ["merge", str(BASE), str(work / "nope"), "-o", o],
            "push: no such folder": ["push", str(work / "nope"), "org/name"],
            "merge (computes: imports torch)": ["merge", str(BASE), str(ADAPTER), "-o", o, "--overwrite", "-q"],
        }
        print(
            f"python {sys.version.split()[0]}, {os.cpu_count()} cores; median of {args.runs} runs, new process each\n"
        )
        print("| command | median s | max s | imports torch |")
        print("|---|---|---|---|")
        for label, argv in commands.items():
            times = []
            for _ in range(args.runs):
                seconds, _code = wall(cli(*argv), env)
                times.append(seconds)
            torch_in = "yes" if imports_torch(argv, env) else "no"
            print(f"| `{label}` | {statistics.median(times):.3f} | {max(times):.3f} | {torch_in} |")
        print("\nA merge of the committed fixtures, in one process (seconds):\n")
        for what, seconds in breakdown(env, work / "m").items():
            print(f"- {what}: {seconds:.3f}")
        if args.merge_sizes:
            print(f"\nWhole merges (medians of {args.runs}; seconds):\n")
            print("| checkpoint | merge | python + import torch | --dry-run | the rest | cp -r + sync |")
            print("|---|---:|---:|---:|---:|---:|")
            for size in args.merge_sizes:
                merge_parts(size, args.runs, env, work)


if __name__ == "__main__":
    main()
