"""A Flux.1-dev-shaped merge: lorasurgeon against cp and kohya-ss sd-scripts' flux_merge_lora.py, same files.

    python benchmarks/bench_flux_merge.py --workdir /big/disk                    # Flux.1-dev's shapes: 23.8 GB
    python benchmarks/bench_flux_merge.py --double 2 --single 4 --no-kohya       # smoke (2.6 GB)
    python benchmarks/bench_flux_merge.py --kohya "cd sd-scripts && venv/bin/python networks/flux_merge_lora.py \
        --flux_model {base} --models {lora} --ratios 1.0 --precision float --save_precision bf16 \
        --loading_device cpu --working_device cpu --mem_eff_load_save --save_to {out}"

Writes a synthetic bf16 checkpoint in Black Forest Labs' single-file names and shapes (flux1-dev.safetensors:
hidden 3072, 19 double and 38 single blocks, ``double_blocks.N.img_attn.qkv.weight`` ...; streamed to disk by
lorasurgeon's own writer, so it needs no RAM) and a kohya LoRA of rank 16 on every linear layer of every block
(``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` ..., bf16, as sd-scripts' lora_flux.py saves), then
times, each in its own process under /usr/bin/time -v (wall and peak RSS), after a sync:

- ``cp`` of the checkpoint + sync (what copying the file through the page cache costs on this disk);
- ``lorasurgeon merge BASE LORA -o merged.safetensors``;
- the kohya command (``--kohya``, with {base}, {lora}, {out}): sd-scripts' networks/flux_merge_lora.py.

The disk holds the base and one result at a time: lorasurgeon's result is sampled (every tensor the LoRA touches
in the first double and the last single block) and deleted before kohya's run, whose result is compared with the
sample (largest difference in bf16 units of the value, and how many elements differ) and deleted. Prints a
markdown table (docs/benchmarks.md) and the comparison.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorasurgeon.io import CheckpointWriter, TensorSpec, plan_shards

HIDDEN, MLP, HEAD, CONTEXT, VEC, TIME, CHANNELS = 3072, 12288, 128, 4096, 768, 256, 64
DOUBLE_LINEAR = {"img_attn.qkv": (3 * HIDDEN, HIDDEN), "img_attn.proj": (HIDDEN, HIDDEN), "img_mlp.0": (MLP, HIDDEN),
                 "img_mlp.2": (HIDDEN, MLP), "img_mod.lin": (6 * HIDDEN, HIDDEN)}  # fmt: skip
DOUBLE_LINEAR |= {k.replace("img", "txt"): v for k, v in DOUBLE_LINEAR.items()}
SINGLE_LINEAR = {"linear1": (3 * HIDDEN + MLP, HIDDEN), "linear2": (HIDDEN, HIDDEN + MLP),
                 "modulation.lin": (3 * HIDDEN, HIDDEN)}  # fmt: skip


def flux_shapes(double: int, single: int) -> dict[str, tuple[int, ...]]:
    """flux1-dev.safetensors' tensors (names and shapes) with this many double and single blocks."""
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, out: int, inp: int) -> None:
        shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (out, inp), (out,)

    linear("img_in", HIDDEN, CHANNELS)
    for emb, inp in (("time_in", TIME), ("vector_in", VEC), ("guidance_in", TIME)):
        linear(f"{emb}.in_layer", HIDDEN, inp)
        linear(f"{emb}.out_layer", HIDDEN, HIDDEN)
    linear("txt_in", HIDDEN, CONTEXT)
    for n in range(double):
        for module, (out, inp) in DOUBLE_LINEAR.items():
            linear(f"double_blocks.{n}.{module}", out, inp)
        for stream in ("img", "txt"):
            for norm in ("query_norm", "key_norm"):
                shapes[f"double_blocks.{n}.{stream}_attn.norm.{norm}.scale"] = (HEAD,)
    for n in range(single):
        for module, (out, inp) in SINGLE_LINEAR.items():
            linear(f"single_blocks.{n}.{module}", out, inp)
        for norm in ("query_norm", "key_norm"):
            shapes[f"single_blocks.{n}.norm.{norm}.scale"] = (HEAD,)
    linear("final_layer.linear", CHANNELS, HIDDEN)
    linear("final_layer.adaLN_modulation.1", 2 * HIDDEN, HIDDEN)
    return shapes


def lora_modules(double: int, single: int) -> dict[str, tuple[int, int]]:
    """Every linear layer of every block (sd-scripts' lora_flux.py's default targets) -> (out, in)."""
    found = {f"double_blocks.{n}.{m}": s for n in range(double) for m, s in DOUBLE_LINEAR.items()}
    return found | {f"single_blocks.{n}.{m}": s for n in range(single) for m, s in SINGLE_LINEAR.items()}


def write_base(out: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    """The checkpoint, tensor by tensor (weights N(0, 0.02), norm scales 1), one file."""
    specs = [TensorSpec(n, torch.bfloat16, s) for n, s in shapes.items()]
    g = torch.Generator().manual_seed(0)
    with CheckpointWriter(out, plan_shards(specs, max_shard_size=None, prefix="flux1-dev")) as w:
        for spec in specs:
            if spec.name.endswith(".scale"):
                w.write(spec.name, torch.ones(spec.shape, dtype=torch.bfloat16))
            else:
                w.write(spec.name, (torch.randn(spec.shape, generator=g) * 0.02).to(torch.bfloat16))
    return out / "flux1-dev.safetensors"


def write_lora(path: Path, modules: dict[str, tuple[int, int]], rank: int) -> Path:
    """A kohya Flux LoRA: lora_down N(0, 1/in), lora_up N(0, 0.01), alpha = rank (a scale of 1), bf16."""
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for module, (out, inp) in modules.items():
        key = "lora_unet_" + module.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = (torch.randn(rank, inp, generator=g) / math.sqrt(inp)).bfloat16()
        tensors[f"{key}.lora_up.weight"] = (torch.randn(out, rank, generator=g) * 0.01).bfloat16()
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, path, {"ss_network_module": "networks.lora_flux", "ss_network_dim": str(rank)})
    return path


def timed(cmd: str) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, "" or why it failed) of a shell command under /usr/bin/time -v, after a sync;
    a command killed (out of memory) or failing still reports its wall and peak RSS so far."""
    os.sync()
    time.sleep(3)
    res = subprocess.run(["/usr/bin/time", "-v", "bash", "-c", cmd], capture_output=True, text=True)
    wall = re.search(r"Elapsed \(wall clock\) time .*: (?:(\d+):)?(\d+):([\d.]+)", res.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", res.stderr)
    if wall is None or rss is None:
        raise SystemExit(f"no figures from /usr/bin/time for: {cmd}\n{res.stderr[-2000:]}")
    signal = re.search(r"Command terminated by signal (\d+)", res.stderr)
    why = f"killed by signal {signal[1]}" if signal else f"exit {res.returncode}" if res.returncode else ""
    if why:
        print(f"{cmd.split()[0]}: {why}; the end of its output:\n{res.stderr[-1200:]}\n", file=sys.stderr)
    h, m, s = (float(x) if x else 0.0 for x in wall.groups())
    return h * 3600 + m * 60 + s, int(rss[1]) / 1024, why


def sample(path: Path, names: list[str]) -> dict[str, torch.Tensor]:
    with safe_open(path, "pt") as f:
        return {n: f.get_tensor(n) for n in names}


def compare(want: dict[str, torch.Tensor], path: Path) -> str:
    """How kohya's result differs from lorasurgeon's on the sampled tensors."""
    got = sample(path, list(want))
    worst, differ, total = 0.0, 0, 0
    for name, w in want.items():
        g = got[name]
        ulp = torch.finfo(torch.bfloat16).eps * w.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
        worst = max(worst, float(((g.float() - w.float()).abs() / ulp).max()))
        differ += int((g != w).sum())
        total += w.numel()
    return (
        f"{len(want)} sampled tensors ({total:,} values): {differ:,} differ ({differ / total:.4%}), at most "
        f"{worst:.2f} bf16 units of the value apart"
    )


def check(got: dict[str, torch.Tensor], base: Path, lora: Path) -> str:
    """The sampled merged tensors against W0 + (alpha/r)·up·down computed here in float32, rounded to bf16 once."""
    w0 = sample(base, list(got))
    worst = 0.0
    with safe_open(lora, "pt") as f:
        for name, merged in got.items():
            key = "lora_unet_" + name.removesuffix(".weight").replace(".", "_")
            up, down = f.get_tensor(f"{key}.lora_up.weight").float(), f.get_tensor(f"{key}.lora_down.weight").float()
            scale = float(f.get_tensor(f"{key}.alpha")) / down.shape[0]
            want = (w0[name].float() + scale * (up @ down)).bfloat16()
            worst = max(worst, float((merged.float() - want.float()).abs().max()))
    return f"{len(got)} tensors, largest difference {worst:.1e}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--double", type=int, default=19)
    ap.add_argument("--single", type=int, default=38)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--kohya", default=None, help="the kohya command, with {base} {lora} {out}")
    ap.add_argument("--no-kohya", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(dir=args.workdir, prefix="lorasurgeon-flux-"))
    try:
        run(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(root: Path, args: argparse.Namespace) -> None:
    start = time.perf_counter()
    shapes = flux_shapes(args.double, args.single)
    modules = lora_modules(args.double, args.single)
    base = write_base(root / "base", shapes)
    lora = write_lora(root / "lora.safetensors", modules, args.rank)
    size = base.stat().st_size
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    print(
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {ram:.0f} GiB RAM, "
        f"torch {torch.__version__}. Checkpoint: {args.double} double + {args.single} single blocks, "
        f"{sum(math.prod(s) for s in shapes.values()) / 1e9:.2f} B parameters, {size / 1e9:.1f} GB bf16 in one file; "
        f"LoRA: rank {args.rank} on {len(modules)} linear layers, {lora.stat().st_size / 1e6:.0f} MB "
        f"(written in {time.perf_counter() - start:.0f} s).\n"
    )
    rows = []
    out = root / "out.safetensors"
    rows.append(("cp + sync", *timed(f"cp {base} {out} && sync {out}")))
    out.unlink()
    rows.append(("lorasurgeon merge", *timed(f"{sys.executable} -m lorasurgeon merge {base} {lora} -o {out} --quiet")))
    first_and_last = ("double_blocks.0.", f"single_blocks.{args.single - 1}.")
    want = sample(out, [f"{m}.weight" for m in modules if m.startswith(first_and_last)])
    out.unlink()
    print(f"lorasurgeon's result against W0 + up·down (fp32, rounded once): {check(want, base, lora)}")
    verdict = ""
    if args.kohya and not args.no_kohya:
        rows.append(("kohya flux_merge_lora.py", *timed(args.kohya.format(base=base, lora=lora, out=out))))
        verdict = compare(want, out) if not rows[-1][3] else ""
        out.unlink(missing_ok=True)
    cp = rows[0][1]
    print("| tool | wall (s) | GB/s | peak RSS (MiB) | wall / cp+sync |")
    print("|---|---:|---:|---:|---:|")
    for label, wall, rss, why in rows:
        if why:
            print(f"| {label} | {why} after {wall:.1f} s | | {rss:,.0f} at that point | |")
        else:
            print(f"| {label} | {wall:.1f} | {size / 1e9 / wall:.2f} | {rss:,.0f} | {wall / cp:.2f} |")
    if verdict:
        print(f"\nkohya's result against lorasurgeon's: {verdict}")


if __name__ == "__main__":
    main()
