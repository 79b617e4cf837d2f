"""Hub inputs read in place: what inspect, a dry run and a merge fetch and write, with and without --stream.

    python benchmarks/bench_hub_stream.py                  # a 0.33 GB bf16 Llama in 4 shards, ~2 min on 2 cores
    python benchmarks/bench_hub_stream.py --hidden 512 --layers 2   # smoke

Builds a Llama-shaped bf16 model (--hidden 1024, --layers 8, --vocab 32000; sharded at 100 MB) and a PEFT LoRA of
it (r 16 on q_proj and v_proj), publishes both on the tests' Hub stand-in (tests/hub_server.py: the real
huggingface_hub client against a server on loopback, which counts every byte each file's GETs send), and runs
lorasurgeon in a child process for each of:

- ``inspect org/model``; ``merge org/model org/adapter --dry-run``: headers only;
- ``merge org/model org/adapter -o OUT``: the repo downloaded into the Hub cache (HF_HOME, empty before);
- the same with ``--stream``: weights read by range, nothing of them in the cache;
- the same with ``--stream`` and the stand-in cutting the first 8 file responses off halfway.

Per run: the bytes the stand-in sent for the weight files (the model's shards and the adapter's file), the
requests for them, the weight bytes left in the Hub cache, the wall time, and whether the result is byte for byte
the downloaded merge's. Prints a markdown table (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "fixtures")]


def build(root: Path, hidden: int, layers: int, vocab: int) -> tuple[Path, Path]:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 256 or 1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(root / "model", max_shard_size="100MB")
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    peft.save_pretrained(root / "adapter")
    return root / "model", root / "adapter"


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors") if p.is_file()) if folder.exists() else 0


def lorasurgeon(args: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lorasurgeon", *args], env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed: lorasurgeon {' '.join(args)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    from hub_server import HubStandIn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-hub-", dir=args.workdir))
    try:
        model, adapter = build(root, args.hidden, args.layers, args.vocab)
        size = weight_bytes(model) + weight_bytes(adapter)
        print(f"model {weight_bytes(model) / 1e6:.0f} MB in {len(list(model.glob('*.safetensors')))} files; "
              f"adapter {weight_bytes(adapter) / 1e6:.1f} MB")  # fmt: skip
        with HubStandIn() as hub:
            hub.add_folder("org/model", model)
            hub.add_folder("org/adapter", adapter)
            rows = []
            runs = [
                ("inspect org/model", ["inspect", "org/model"], 0),
                ("merge --dry-run", ["merge", "org/model", "org/adapter", "-o", str(root / "x"), "--dry-run"], 0),
                ("merge (download)", ["merge", "org/model", "org/adapter", "-o", str(root / "downloaded")], 0),
                ("merge --stream", ["merge", "org/model", "org/adapter", "--stream", "-o", str(root / "s")], 0),
                (
                    "merge --stream, 8 drops",
                    ["merge", "org/model", "org/adapter", "--stream", "-o", str(root / "d")],
                    8,
                ),
            ]
            for label, cmd, drops in runs:
                home = root / "hf_home"
                shutil.rmtree(home, ignore_errors=True)
                env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_TOKEN="hf_bench")
                hub.served.clear()
                hub.ranges.clear()
                hub.drop = drops
                seconds = lorasurgeon(cmd, env)
                sent = sum(v for k, v in hub.served.items() if k.endswith(".safetensors"))
                asks = sum(1 for p, _ in hub.ranges if p.endswith(".safetensors"))
                out = Path(cmd[cmd.index("-o") + 1]) if "-o" in cmd else root / "x"
                same = "—"
                if out.name in ("s", "d"):
                    files = [p.name for p in (root / "downloaded").glob("*.safetensors")]
                    _, differ, missing = filecmp.cmpfiles(root / "downloaded", out, files, shallow=False)
                    same = "NO" if differ or missing else "yes"
                cached = weight_bytes(home)
                rows.append(
                    f"| {label} | {sent:,} | {sent / size:.4%} | {asks} | {cached:,} | {seconds:.1f} | {same} |"
                )
                print(rows[-1], flush=True)
        print(f"\nweights on the Hub: {size:,} bytes (model + adapter)\n")
        print("| run | weight bytes sent | of the weights | weight requests | weight bytes in the Hub cache | s | "
              "result = the downloaded merge's |")  # fmt: skip
        print("|---|---:|---:|---:|---:|---:|---|")
        print("\n".join(rows))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
