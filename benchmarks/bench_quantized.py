"""Quantized merge benchmark: what merging into a quantized base costs, in error, time and memory.

A Llama-shaped bf16 checkpoint stands for the unquantized original; each format's own producer
quantizes it (tests/quantize.py: transformers' FP8 quantizer, compressed-tensors, bitsandbytes); a
LoRA adapter (PEFT's, all linear layers, B rescaled so that ‖ΔW‖ = --change · ‖W0‖) is merged into
it by lorasurgeon, keeping the format and into bfloat16.

    python benchmarks/bench_quantized.py                       # Llama-3-8B-shaped layers, 2 of them
    python benchmarks/bench_quantized.py --layers 1 --hidden 256 --intermediate 512 --formats fp8   # smoke

Errors are relative Frobenius norms, medians over the linear weights:
  base error      the quantized base against the original:           ‖deq(Q(W)) − W‖ / ‖W‖
  merge error     the kept-format merge against the exact merge:      ‖deq(stored) − (W0 + ΔW)‖ / ‖W0 + ΔW‖
  format's own    the changed blocks quantized afresh by the producer's rule (requantization.json)
  ΔW kept         the share of the change the stored weight holds: ⟨deq(stored) − W0, ΔW⟩ / ‖ΔW‖²
Each merge is its own process under /usr/bin/time -v (wall seconds, peak RSS).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the producers of each format: tests/quantize.py
sys.path.insert(0, str(HERE))

from bench_moe import timed  # noqa: E402


def make_inputs(root: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 128),
        num_key_value_heads=max(1, args.hidden // 512),
        head_dim=128 if args.hidden >= 128 else args.hidden,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(root / "original")
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(root / "adapter")
    # B rescaled: ‖ΔW‖ = change · ‖W0‖ per module, the size of a real fine-tune's change
    weights = load_file(root / "original" / "model.safetensors")
    tensors = load_file(root / "adapter" / "adapter_model.safetensors")
    for key in [k for k in tensors if "lora_A" in k]:
        a, bkey = tensors[key].float(), key.replace("lora_A", "lora_B")
        w0 = weights[key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")].float()
        delta = 2.0 * (tensors[bkey].float() @ a)
        tensors[bkey] = (tensors[bkey].float() * (args.change * w0.norm() / delta.norm())).to(torch.bfloat16)
    save_file(tensors, root / "adapter" / "adapter_model.safetensors")
    return root / "original", root / "adapter"


def base_error(original: Path, quantized: Path, fmt: str) -> float:
    from quantize import dequantize_with_library
    from safetensors.torch import load_file

    w = load_file(original / "model.safetensors")
    got = dequantize_with_library(quantized, fmt)
    return statistics.median(float((v.float() - w[k].float()).norm() / w[k].float().norm()) for k, v in got.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=14336)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--change", type=float, default=0.02, help="‖ΔW‖ / ‖W0‖ of every module")
    ap.add_argument("--formats", nargs="+", default=["fp8", "ct-fp8-channel", "ct-w4a16-group", "bnb-nf4", "bnb-int8"])
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    from quantize import quantized_folder

    root = Path(tempfile.mkdtemp(prefix="bench-quant-", dir=args.workdir))
    try:
        original, adapter = make_inputs(root, args)
        cli = [sys.executable, "-m", "lorasurgeon", "merge"]
        rows = []
        for fmt in args.formats:
            q = quantized_folder(original, root / fmt, fmt)
            size = sum(f.stat().st_size for f in q.glob("*.safetensors")) / 2**20
            keep = timed(cli + [str(q), str(adapter), "-q", "-o", str(root / f"{fmt}-keep")])
            plain = timed(cli + [str(q), str(adapter), "-q", "-o", str(root / f"{fmt}-bf16"), "--dtype", "bfloat16"])
            report = json.loads((root / f"{fmt}-keep" / "requantization.json").read_text())["weights"]
            blocks = sum(w["blocks"] for w in report)
            rows.append(
                {
                    "format": fmt,
                    "MiB": round(size),
                    "base_error": base_error(original, q, fmt),
                    "merge_error": statistics.median(w["error"] for w in report),
                    "format_error": statistics.median(w["format_error"] for w in report),
                    "change": statistics.median(w["change"] for w in report),
                    "kept": statistics.median(w["change_kept"] for w in report),
                    "rescaled": sum(w["blocks_rescaled"] for w in report) / blocks,
                    "keep": keep,
                    "bf16": plain,
                }
            )
            for folder in (q, root / f"{fmt}-keep", root / f"{fmt}-bf16"):
                shutil.rmtree(folder)
        print(
            f"Llama-shaped: {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}; adapter "
            f"r={args.rank} on every linear layer, ‖ΔW‖/‖W0‖ = {args.change}\n"
        )
        print(
            "| format | MiB | base error | merge error | format's own | ΔW kept | blocks rescaled | keep: s / peak MiB "
            "| --dtype bfloat16: s / peak MiB |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        )
        for r in rows:
            print(
                f"| {r['format']} | {r['MiB']} | {r['base_error']:.4f} | {r['merge_error']:.4f} | "
                f"{r['format_error']:.4f} | {r['kept']:.2f} | {100 * r['rescaled']:.0f}% | "
                f"{r['keep'][0]:.2f} / {r['keep'][1]:.0f} | {r['bf16'][0]:.2f} / {r['bf16'][1]:.0f} |"
            )
        print(json.dumps(rows))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
