"""Calibration's layer-by-layer forward (lorasurgeon.calibration.layerwise.gather) on a model larger than the memory
it is allowed: does it finish, and what does its peak hold?

    sudo python benchmarks/bench_calibration.py                               # 2.4 GB model in 1.25 GiB; 4.8 GB
    sudo python benchmarks/bench_calibration.py --layers 4                     # smoke (0.2 GB and 0.4 GB, 1 min)
    sudo python benchmarks/bench_calibration.py --fisher                      # with the backward (calibration.backward)

Writes a Llama-shaped bf16 checkpoint (hidden 1536, intermediate 3072, 12 heads / 4 KV heads, vocab 8192, 58
layers: 2.42 GB; weights N(0, 0.02), norms 1) into a temporary folder (--workdir, not a tmpfs), one safetensors
file per decoder layer and one for what lies outside the layers, with a model.safetensors.index.json and a
config.json from transformers.LlamaConfig -- one file at a time, never the whole model in memory -- and, with
--deeper (the default), a second one of twice the layers (4.79 GB; its first half the same files, hard-linked).
Then runs ``gather`` on N samples of L random token ids (--samples 16 --length 128), each run in a child process
of its own, put in a cgroup v1 memory group (/sys/fs/cgroup/memory/, so root) before it starts Python:

- the model, no limit, glibc's malloc as it comes;
- the model, --limit-mib (1.25 GiB), the same;
- the deeper model, the same limit (--deeper).

gather gives the heap each layer freed back to the system itself (glibc's ``malloc_trim``: without it, RSS grew by
40-80 MiB a layer and the 1.25 GiB run was killed after 19-32 layers; docs/benchmarks.md). ``--trim`` in a child's
arguments adds the same call from the progress callback, as the first measurements did.

The checkpoint's pages are dropped from the page cache (fadvise) before each run: every run reads from disk.
Per run: the exit status (an OOM kill says after how many layers); the child's peak RSS (VmHWM: getrusage's
ru_maxrss is not used, it carries over the forking parent's RSS through exec); the group's
memory.max_usage_in_bytes (which counts the page cache the child's reads fill: under a limit it reaches the limit,
clean pages being reclaimed); the group's anonymous memory (memory.stat rss sampled every 20 ms: the peak without
the page cache); the child's RSS after its imports; its RSS and peak RSS after each layer, so that a peak that
grows with depth shows; the wall time of ``gather``. Beside them two bounds from the shapes:

- predicted: the import baseline + one layer's float32 weights x 2 (the one materialized, the one the reader
  brings in) + the embedding and head in float32 + the carried activations (N*L*hidden*4) x 2 + the largest
  moment sum (float64);
- accounted: what the live tensors at the peak really are (counted with gc once, see docs/benchmarks.md): the
  baseline + the embedding and head in float32 + one layer's float32 weights x 2 (the module's, and the engine's
  copy its stream still holds) + two layers of bf16 read buffers + every moment sum of one layer (float64) + the
  largest one's mean (float64) and its float32 copy while it is spooled + the activations x 3 (layer 0's inputs,
  which the caught calls keep, this layer's inputs and its outputs).

Prints a markdown table (docs/benchmarks.md) and a layer-by-layer account, and deletes the temporary folder. About
13 minutes on 2 cores (--no-deeper: 6); 4.8 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CGROUPS = Path("/sys/fs/cgroup/memory")
MiB = 1 << 20


# ---------------------------------------------------------------- the checkpoint


def llama_config(args: argparse.Namespace, layers: int) -> dict:
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(2048, args.length),
        tie_word_embeddings=False,
    ).to_dict()
    return cfg | {"architectures": ["LlamaForCausalLM"], "dtype": "bfloat16"}


def shapes_by_file(config: dict) -> dict[str, dict[str, tuple[int, ...]]]:
    """The model's tensors (names and shapes, from transformers' own class on the meta device) by the file that
    holds them: ``outside.safetensors`` and ``layer-NNN.safetensors``."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(config))
    files: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, tensor in model.state_dict().items():
        inside = name.startswith("model.layers.")
        file = f"layer-{int(name.split('.')[2]):03d}.safetensors" if inside else "outside.safetensors"
        files.setdefault(file, {})[name] = tuple(tensor.shape)
    return files


def write_model(folder: Path, config: dict, reuse: Path | None = None) -> int:
    """The checkpoint in ``folder``, one file at a time (files ``reuse`` already holds are hard-linked from it);
    its size in bytes."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    weight_map: dict[str, str] = {}
    total = 0
    for i, (file, shapes) in enumerate(sorted(shapes_by_file(config).items())):
        weight_map |= dict.fromkeys(shapes, file)
        if reuse is not None and (reuse / file).exists():
            os.link(reuse / file, folder / file)
        else:
            g = torch.Generator().manual_seed(i)
            tensors = {
                n: torch.ones(s, dtype=torch.bfloat16)
                if len(s) == 1
                else (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
                for n, s in shapes.items()
            }
            save_file(tensors, folder / file, {"format": "pt"})
            del tensors
        total += (folder / file).stat().st_size
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    return total


def drop_cache(folder: Path) -> None:
    """The checkpoint's pages out of the page cache (clean after a sync), so that a run reads them from disk."""
    os.sync()
    for file in folder.glob("*.safetensors"):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ---------------------------------------------------------------- the bounds


def bounds(args: argparse.Namespace, baseline: int) -> dict[str, dict[str, int]]:
    """The predicted and the accounted bound (bytes), term by term."""
    h, inter, v = args.hidden, args.intermediate, args.vocab
    kv = h // args.heads * args.kv_heads
    layer = h * h * 2 + h * kv * 2 + 3 * h * inter + 2 * h  # q, o; k, v; gate, up, down; two norms
    outside = (2 * v * h + h) * 4
    acts = args.samples * args.length * h * 4
    largest = max(h, inter) ** 2 * 8
    predicted = {
        "import baseline": baseline,
        "2 layers float32": 2 * layer * 4,
        "embedding + head float32": outside,
        "activations x 2": 2 * acts,
        "largest moment float64": largest,
    }
    accounted = {
        "import baseline": baseline,
        "embedding + head float32": outside,
        "2 layers float32": 2 * layer * 4,
        "read buffers, 2 layers bf16": 2 * layer * 2,
        "one layer's moments float64": (3 * h * h + inter * inter) * 8,  # q/k/v, o, gate/up, down inputs
        "largest mean float64 + float32": largest * 3 // 2,
        "activations x 3": 3 * acts,
    }
    return {"predicted": predicted, "accounted": accounted}


# ---------------------------------------------------------------- the child: one gather


def status(*keys: str) -> list[int]:
    """Fields of /proc/self/status, in bytes."""
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            found[key] = int(value.split()[0]) * 1024 if key in keys else 0
    return [found[k] for k in keys]


class Layers:
    """gather's progress: after each layer, the child's RSS, peak RSS and anonymous RSS printed at once (a run
    killed for memory has told how far it got); with ``trim``, glibc's free heap memory given back first."""

    def __init__(self, trim: bool):
        import ctypes

        self.trim = ctypes.CDLL("libc.so.6").malloc_trim if trim else None
        self.done = 0
        self.began = time.perf_counter()

    def start(self, total: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        if self.trim is not None:
            self.trim(0)
        self.done += 1
        seconds = time.perf_counter() - self.began
        print("LAYER " + json.dumps([self.done, *status("VmRSS", "VmHWM", "RssAnon"), seconds]), flush=True)

    def finish(self) -> None:
        pass


def child(model: Path, spool: Path, samples: int, length: int, trim: bool, fisher: bool) -> None:
    """One gather over ``samples`` random sequences (``fisher``: run back too); its figures printed as JSON lines."""
    import torch
    import transformers  # noqa: F401  (the import baseline counts it: gather imports it)

    from lorasurgeon.calibration.layerwise import gather
    from lorasurgeon.io.checkpoint import open_checkpoint
    from lorasurgeon.io.sidecar import read_config
    from lorasurgeon.io.spool import SpoolWriter
    from lorasurgeon.names import model_names

    ckpt = open_checkpoint(model)
    config = read_config(ckpt)
    names = model_names(ckpt.names(), config)
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(0, config["vocab_size"], (length,), generator=g).tolist() for _ in range(samples)]
    out = SpoolWriter(spool, prefix="moments")
    print("BASELINE " + json.dumps(status("VmRSS", "RssAnon", "RssFile")), flush=True)
    began = time.perf_counter()
    try:
        got = gather(ckpt, names, config, ids, out, progress=Layers(trim), fisher=fisher)
    finally:
        out.abort()
    seconds = time.perf_counter() - began
    (peak,) = status("VmHWM")
    figures = {"peak": peak, "seconds": seconds, "layers": got.layers, "modules": len(got.moments)}
    print("FIGURES " + json.dumps(figures), flush=True)


# ---------------------------------------------------------------- the parent: a child in a memory cgroup


class Cgroup:
    """A cgroup v1 memory group of its own, with a limit or none; its anonymous memory sampled while it runs."""

    def __init__(self, name: str, limit: int | None):
        self.path = CGROUPS / name
        if self.path.exists():
            self.path.rmdir()
        self.path.mkdir()
        if limit is not None:
            (self.path / "memory.limit_in_bytes").write_text(str(limit))
        self.anon_peak = 0
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample)

    def __enter__(self) -> Cgroup:
        self._sampler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._sampler.join()

    def read(self, key: str) -> int:
        return int((self.path / key).read_text())

    def stat(self, key: str) -> int:
        for line in (self.path / "memory.stat").read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == key:
                return int(v)
        return 0

    def _sample(self) -> None:
        while not self._done.wait(0.02):
            self.anon_peak = max(self.anon_peak, self.stat("rss"))

    def remove(self) -> None:
        try:
            (self.path / "memory.force_empty").write_text("0")
        except OSError:
            pass
        self.path.rmdir()


def run_child(model: Path, work: Path, args: argparse.Namespace, limit: int | None, trim: bool) -> dict:
    """``gather`` on ``model`` in a child process in a memory group (``limit`` bytes, or none): what it measured."""
    drop_cache(model)
    spool = work / "spool"
    # The child puts itself into the group before it execs Python: everything it allocates is charged there.
    cgroup = Cgroup(f"lorasurgeon-bench-calibration-{os.getpid()}", limit)
    cmd = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup.path / "cgroup.procs"), sys.executable, __file__]
    flags = ",".join(f for f, on in (("trim", trim), ("fisher", args.fisher)) if on) or "-"
    cmd += ["--child", str(model), str(spool), str(args.samples), str(args.length), flags]
    began = time.perf_counter()
    with cgroup:
        res = subprocess.run(cmd, capture_output=True, text=True)
    row = {"limit": limit, "trim": trim, "rc": res.returncode, "wall": time.perf_counter() - began}
    row |= {"cg_peak": cgroup.read("memory.max_usage_in_bytes"), "anon_peak": cgroup.anon_peak}
    row["oom"] = "oom_kill 1" in (cgroup.path / "memory.oom_control").read_text()
    cgroup.remove()
    shutil.rmtree(spool, ignore_errors=True)
    lines = {}
    row["trace"] = []
    for line in res.stdout.splitlines():
        tag, _, doc = line.partition(" ")
        if tag == "LAYER":
            row["trace"].append(json.loads(doc)[1:])
        elif tag in ("BASELINE", "FIGURES"):
            lines[tag] = json.loads(doc)
    if "BASELINE" in lines:
        row["baseline"], row["anon"], row["file"] = lines["BASELINE"]
    if res.returncode or "FIGURES" not in lines:
        why = "OOM-killed" if row["oom"] else f"signal {-res.returncode}" if res.returncode < 0 else "failed"
        print(
            f"run failed ({why}, exit {res.returncode}); the end of its output:\n{res.stderr[-3000:]}", file=sys.stderr
        )
        return row | {"why": f"{why} after {len(row['trace'])} layers"}
    return row | lines["FIGURES"]


# ---------------------------------------------------------------- the report


def mib(n: float) -> str:
    return f"{n / MiB:,.0f}"


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "| model | limit | malloc | result | peak RSS MiB | above imports MiB | cgroup peak MiB "
        "| cgroup anon peak MiB | predicted MiB | accounted MiB | gather s |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        b = {k: sum(v.values()) for k, v in bounds(args, r.get("baseline", 0)).items()}
        done = "seconds" in r
        top = r["peak"] if done else r["trace"][-1][1] if r["trace"] else None
        peak = "?" if top is None else mib(top) if done else f"≥ {mib(top)}"
        above = "?" if top is None or "baseline" not in r else mib(top - r["baseline"])
        cells = [
            f"{r['layers_on_disk']} layers, {r['size'] / 1e9:.2f} GB",
            f"{mib(r['limit'])} MiB" if r["limit"] else "none",
            "trim each layer" if r["trim"] else "glibc",
            "ok" if done else r["why"],
            peak,
            above,
            mib(r["cg_peak"]),
            mib(r["anon_peak"]),
            mib(b["predicted"]),
            mib(b["accounted"]),
            f"{r['seconds']:.0f}" if done else f"({r['wall']:.0f} wall)",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def details(rows: list[dict], args: argparse.Namespace) -> str:
    """Per run: how the RSS went layer by layer, and the bounds term by term (the first run's)."""
    out = []
    for r in rows:
        trace = r["trace"]
        out.append(f"{r['label']}: RSS after imports {mib(r.get('baseline', 0))} MiB")
        if "anon" in r:
            out[-1] += f" ({mib(r['anon'])} anonymous, {mib(r['file'])} mapped files)"
        if not trace:
            continue
        picks = sorted(
            {i for i in (0, len(trace) // 4, len(trace) // 2 - 1, 3 * len(trace) // 4, len(trace) - 1) if i >= 0}
        )
        out.append(
            "  after layer "
            + "; ".join(
                f"{i + 1}: {mib(trace[i][0])} now, {mib(trace[i][1])} peak, {mib(trace[i][2])} anon" for i in picks
            )
        )
        if len(trace) >= 4:
            half, end = trace[len(trace) // 2 - 1][1], trace[-1][1]
            slope = (end - half) / (len(trace) - len(trace) // 2)
            out.append(f"  peak RSS at half depth {mib(half)} MiB, after the last layer {mib(end)}: ")
            out[-1] += f"{slope / MiB:+.1f} MiB a layer"
            times = sorted(b[3] - a[3] for a, b in zip(trace, trace[1:], strict=False))
            out.append(f"  seconds a layer: median {times[len(times) // 2]:.2f}, {times[0]:.2f} to {times[-1]:.2f}")
    for name, terms in bounds(args, rows[0].get("baseline", 0)).items():
        out.append(f"{name} (MiB): " + ", ".join(f"{k} {mib(v)}" for k, v in terms.items()))
    return "\n".join(out)


def plan(args: argparse.Namespace, work: Path) -> list[tuple[Path, int | None, bool, dict]]:
    """The checkpoints written (the deeper one first: the other links its files) and the runs on them."""
    limit = args.limit_mib * MiB
    began = time.perf_counter()
    deep = work / f"llama-{2 * args.layers}" if args.deeper else None
    if deep is not None:
        deep_size = write_model(deep, llama_config(args, 2 * args.layers))
    model = work / f"llama-{args.layers}"
    size = write_model(model, llama_config(args, args.layers), reuse=deep)
    print(f"checkpoints written in {time.perf_counter() - began:.0f} s", file=sys.stderr)
    one = {"layers_on_disk": args.layers, "size": size}
    runs = [(model, None, False, one), (model, limit, False, one)]  # gather gives freed heap back itself
    if deep is not None:
        runs.append((deep, limit, False, {"layers_on_disk": 2 * args.layers, "size": deep_size}))
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--intermediate", type=int, default=3072)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--layers", type=int, default=58)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--limit-mib", type=int, default=1280)
    p.add_argument("--deeper", action=argparse.BooleanOptionalAction, default=True, help="also 2x the layers")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()), help="not a tmpfs: it is memory")
    p.add_argument("--fisher", action="store_true", help="gather(fisher=True): the layers run back from the head too")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        model, spool, n, length, flags = args.child
        child(Path(model), Path(spool), int(n), int(length), "trim" in flags, "fisher" in flags)
        return
    if not os.access(CGROUPS, os.W_OK):
        raise SystemExit(f"{CGROUPS}: not writable (a cgroup v1 memory controller, and root, are needed)")
    work = Path(tempfile.mkdtemp(prefix="bench-calibration-", dir=args.workdir))
    rows = []
    try:
        for model, limit, trim, extra in plan(args, work):
            label = f"{extra['layers_on_disk']} layers, {mib(limit) + ' MiB' if limit else 'no limit'}"
            label += ", trim each layer" if trim else ""
            print(f"running: {label}", file=sys.stderr, flush=True)
            rows.append(run_child(model, work, args, limit, trim) | extra | {"label": label})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(rows, args)


def report(rows: list[dict], args: argparse.Namespace) -> None:
    import torch
    import transformers

    print(
        f"\n{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads), transformers {transformers.__version__}, python {platform.python_version()}, "
        f"glibc {'.'.join(platform.libc_ver()[1:])}"
    )
    print(
        f"Llama: hidden {args.hidden}, intermediate {args.intermediate}, heads {args.heads}/{args.kv_heads}, "
        f"vocab {args.vocab}; {args.samples} samples x {args.length} tokens\n"
    )
    print(table(rows, args))
    print()
    print(details(rows, args))


if __name__ == "__main__":
    main()
