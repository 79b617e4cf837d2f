"""extract at a budget against mergekit-extract-lora at the same size, on a real (if small) fine-tune.

    python benchmarks/bench_budget.py --mergekit /path/to/site  # where `import mergekit` works (PYTHONPATH)
    python benchmarks/bench_budget.py --hidden 128 --layers 1 --steps 5 --ranks 4  # smoke, lorasurgeon only

A Llama-shaped model is built at random and fully fine-tuned here (AdamW, every parameter, on fixed
random token sequences), both saved in float32. For each rank r: mergekit-extract-lora --max-rank r
(its default: embeddings stored whole, as modules_to_save), then lorasurgeon extract --budget-params
<the size of mergekit's adapter> and --rank r. Each adapter is loaded by PEFT onto the base; the KL of
its next-token distributions to the fine-tune's over held-out sequences is the quality; wall time is
the extraction's own process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MERGEKIT = "from mergekit.scripts.extract_lora import main; main()"


def build(root: Path, hidden: int, layers: int, vocab: int, steps: int) -> tuple[Path, Path, torch.Tensor]:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3 // 64 * 64 or 64,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    train = torch.randint(3, vocab, (8, 64), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        model(input_ids=train, labels=train).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(root / "tuned")
    held_out = torch.cat([train[:4, :32], torch.randint(3, vocab, (4, 32), generator=g)])
    return root / "base", root / "tuned", held_out


def kl(base: Path, tuned: Path, adapter: Path, ids: torch.Tensor) -> float:
    import transformers
    from peft import PeftModel

    with torch.no_grad():
        want = transformers.AutoModelForCausalLM.from_pretrained(tuned)(input_ids=ids).logits.log_softmax(-1)
        model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), adapter).eval()
        got = model(input_ids=ids).logits.log_softmax(-1)
    return float((want.exp() * (want - got)).sum(-1).mean())


def size(adapter: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(adapter / "adapter_model.safetensors").values())


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--mergekit", default=None, help="a folder to put on PYTHONPATH so that mergekit imports")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-budget-", dir=args.workdir))
    try:
        base, tuned, ids = build(root, args.hidden, args.layers, args.vocab, args.steps)
        cli = [sys.executable, "-m", "lorasurgeon", "extract", str(base), str(tuned), "-q"]
        rows = []
        for r in args.ranks:
            uniform = root / f"uniform-{r}"
            rows.append(
                (f"lorasurgeon extract --rank {r}", uniform, timed(cli + ["--rank", str(r), "-o", str(uniform)]))
            )
            target = size(uniform)
            if args.mergekit:
                env = dict(os.environ, PYTHONPATH=args.mergekit)
                mk = root / f"mergekit-{r}"
                cmd = [sys.executable, "-c", MERGEKIT, "--model", str(tuned), "--base-model", str(base)]
                seconds = timed(cmd + ["--out-path", str(mk), "--max-rank", str(r)], env)
                rows.append((f"mergekit-extract-lora --max-rank {r}", mk, seconds))
                target = size(mk)
            budget = root / f"budget-{r}"
            seconds = timed(cli + ["--budget-params", str(target), "-o", str(budget)])
            rows.append((f"lorasurgeon extract --budget-params {target}", budget, seconds))
        print(
            f"Llama-shaped, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, fully fine-tuned for "
            f"{args.steps} AdamW steps; KL of next-token distributions to the fine-tune, {ids.numel()} positions\n"
        )
        print("| extraction | parameters | KL to the fine-tune | s |\n|---|---:|---:|---:|")
        for label, folder, seconds in rows:
            print(f"| {label} | {size(folder):,} | {kl(base, tuned, folder, ids):.4f} | {seconds:.1f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
