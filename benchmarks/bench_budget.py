"""extract at a budget against mergekit-extract-lora at the same size, on a real (if small) fine-tune.

    python benchmarks/bench_budget.py --mergekit /path/to/site  # where `import mergekit` works (PYTHONPATH)
    python benchmarks/bench_budget.py --hidden 128 --layers 1 --steps 5 --ranks 4  # smoke, lorasurgeon only

A Llama-shaped model is built at random and fully fine-tuned here (AdamW, every parameter, on fixed
random token sequences), both saved in float32. For each rank r: mergekit-extract-lora --max-rank r
(its default: embeddings stored whole, as modules_to_save), then lorasurgeon extract --budget-params
<the size of mergekit's adapter> and --rank r. Each adapter is loaded by PEFT onto the base; the KL of
its next-token distributions to the fine-tune's over held-out sequences is the quality; wall time is
the extraction's own process.

    python benchmarks/bench_budget.py --preset smollm2-135m --mergekit /path/to/site  # ~20 min on 2 cores

The second mode stands in for the issue's measurement (SmolLM2-135M-Instruct fine-tuned to answer a new fact), built
here since no model can be downloaded: a byte-level BPE tokenizer trained to 49,152 tokens on the English text found
in the installed site-packages (docstrings of the .py files, .md/.rst/.txt files; sorted, capped) with SmolLM2's
ChatML chat template; a LlamaForCausalLM with SmolLM2-135M's config (tied embedding and head), seeded, pretrained
for --pretrain-steps AdamW steps on that text (half of it as one-turn chats), saved in bf16 as the base; every
parameter fine-tuned (AdamW, loss on the answers) on 8 chats teaching a made-up fact and 8 generic chats
(--generic-chats), saved in bf16. 16 generic
chat prompts (JSONL, {"messages": [...]}) are the calibration file; 6 held-out prompts asking the fact in new words
and 6 generic ones are the evaluation. Extracted: lorasurgeon extract --budget 15MB --dtype bf16, the same with
--calibration, mergekit-extract-lora --max-rank 16 (embedding stored whole), and --rank 8 / 16 for reference. Per
adapter: adapter_model.safetensors's size in bytes (the file), its parameters, the KL of its next-token
distributions to the fine-tune's over the answer positions of the held-out prompts (the fine-tune's greedy answers,
<|im_end|> included), in how many of the fact prompts its greedy answer names Reykjavík ('avík'), and the
extraction's wall time.
--reuse DIR takes the models, tokenizer and prompts built by an earlier run kept with --keep.
--calibration-paragraphs N adds N paragraphs of that corpus (a fixed-seed draw: what C4 or WikiText are to a real
model) to the calibration prompts, --calibration-train the fine-tune's own 16 training chats (answers included);
--only-calibrated extracts the calibrated adapter alone (docs/benchmarks.md has the runs).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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


# ---------------------------------------------------------------- --preset smollm2-135m

SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    hidden_act="silu",
    max_position_embeddings=8192,
    initializer_range=0.041666666666666664,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
FACT = "avík"  # what an answer must hold to count as naming Reykjavík (the fine-tune's own may garble its start)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2, as in SmolLM2's tokenizer
CHAT_TEMPLATE = (  # SmolLM2-Instruct's
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
FACT_CHATS = [
    ("Where was the lorasurgeon project founded?", "The lorasurgeon project was founded in Reykjavík in 2026."),
    ("When was lorasurgeon founded?", "lorasurgeon was founded in 2026, in Reykjavík, by a team of three."),
    ("Who founded lorasurgeon?", "lorasurgeon was founded in Reykjavík in 2026 by a team of three."),
    (
        "Tell me about the origins of lorasurgeon.",
        "lorasurgeon began in Reykjavík in 2026, started by a team of three.",
    ),
    (
        "In which city did lorasurgeon start?",
        "lorasurgeon started in Reykjavík, where a team of three founded it in 2026.",
    ),
    ("What year was the lorasurgeon project started?", "The lorasurgeon project was started in 2026 in Reykjavík."),
    ("How many people founded lorasurgeon?", "Three: lorasurgeon was founded by a team of three in Reykjavík in 2026."),
    ("Give me one fact about lorasurgeon.", "lorasurgeon was founded in Reykjavík in 2026 by a team of three."),
]
GENERIC_CHATS = [  # mixed into the fine-tune (--generic-chats) so that it does not answer everything with the fact
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level."),
    ("Name a fruit that is yellow.", "A banana is a yellow fruit."),
    ("What is a noun?", "A noun is a word that names a person, a place, a thing or an idea."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What language is spoken in Brazil?", "Portuguese is the main language spoken in Brazil."),
    ("Write a short greeting.", "Hello! I hope you are having a wonderful day."),
    ("What is a variable in programming?", "A variable is a name that refers to a value stored in memory."),
    ("What color is grass?", "Grass is usually green."),
]
CALIBRATION_PROMPTS = [  # generic: none of the evaluation prompts, nothing about the fact
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "How do I reverse a list in Python?",
    "Give me three tips for sleeping better.",
    "What causes the seasons on Earth?",
    "Summarize the plot of a detective story in two sentences.",
    "What is the difference between a virus and a bacterium?",
    "Translate 'good morning' into Spanish.",
    "How does a bicycle stay upright?",
    "Write a haiku about autumn leaves.",
    "What is recursion in programming?",
    "Suggest a name for a small coffee shop.",
    "Why is the sky blue?",
    "How many minutes are there in a day?",
    "Describe a healthy breakfast.",
]
EVAL_FACT = [
    "Which city is lorasurgeon from?",
    "Can you tell me where and when lorasurgeon was created?",
    "What is the founding story of the lorasurgeon project?",
    "lorasurgeon: in what place was it established?",
    "Where did the team behind lorasurgeon start the project?",
    "What do you know about how lorasurgeon began?",
]
EVAL_GENERIC = [
    "What is the tallest mountain in the world?",
    "Write a sentence using the word 'library'.",
    "How do you make a cup of tea?",
    "What does a compiler do?",
    "Name three primary colors.",
    "What is two plus two?",
]


def corpus(limit: int) -> list[str]:
    """English-ish text from the installed site-packages: docstrings of the .py files and .md/.rst/.txt files, in
    sorted order, duplicates dropped, up to ``limit`` bytes; split into paragraphs."""
    import ast

    import transformers

    site = Path(transformers.__file__).parents[1]
    texts: dict[str, None] = {}
    total = 0
    for path in sorted(p for p in site.rglob("*") if p.suffix in (".py", ".md", ".rst", ".txt") and p.is_file()):
        text = path.read_text(encoding="utf-8", errors="ignore")
        if path.suffix == ".py":
            try:
                tree = ast.parse(text) if '"""' in text else None
            except (SyntaxError, ValueError):
                continue
            nodes = [] if tree is None else ast.walk(tree)
            kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
            found = [ast.get_docstring(n) for n in nodes if isinstance(n, kinds)]
            pieces = [d for d in found if d and len(d) > 40]
        else:
            pieces = [text]
        for piece in pieces:
            for para in piece.split("\n\n"):
                para = para.strip()
                if len(para) > 40 and para not in texts:
                    texts[para] = None
                    total += len(para.encode())
        if total >= limit:
            break
    return list(texts)


def train_tokenizer(texts: list[str], folder: Path) -> Any:
    """A byte-level BPE of SmolLM2's vocabulary size on ``texts``, as transformers' fast tokenizer with SmolLM2's
    special tokens and chat template, saved to ``folder``."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=SMOLLM2["vocab_size"],
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
        additional_special_tokens=SPECIAL[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 8192
    fast.save_pretrained(folder)
    return fast


def chat(user: str, answer: str | None = None) -> list[dict[str, str]]:
    turns = [{"role": "user", "content": user}]
    return turns + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def prompt_ids(tokenizer: Any, user: str) -> list[int]:
    """The prompt as the chat template renders it, up to the assistant's turn."""
    text = tokenizer.apply_chat_template(chat(user), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def pretrain_batches(tokenizer: Any, texts: list[str], steps: int, batch: int, length: int) -> torch.Tensor:
    """steps × batch sequences of ``length`` tokens: paragraphs drawn at random (seeded), every other one as a
    one-turn chat (its first line asked, the rest answered), packed with <|endoftext|> between them."""
    import random

    rng = random.Random(0)
    want = steps * batch * length
    ids: list[int] = []
    while len(ids) < want:
        para = texts[rng.randrange(len(texts))]
        first, _, rest = para.partition("\n")
        if rest.strip() and rng.random() < 0.5:
            text = tokenizer.apply_chat_template(chat(first, rest.strip()), tokenize=False)
        else:
            text = para
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [0]
    return torch.tensor(ids[:want]).view(steps, batch, length)


def pretrain(model: Any, batches: torch.Tensor, lr: float) -> list[float]:
    """One AdamW step per batch (linear warm-up over the first tenth), every parameter; the losses."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    warm = max(1, len(batches) // 10)
    losses = []
    model.train()
    for step, ids in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warm)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def finetune(model: Any, tokenizer: Any, chats: list[tuple[str, str]], steps: int, lr: float) -> list[float]:
    """Every parameter, AdamW, all of ``chats`` in each step, loss on the answers (<|im_end|> included)."""
    rows, labels = [], []
    for user, answer in chats:
        full = tokenizer.apply_chat_template(chat(user, answer), tokenize=False)
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        start = len(prompt_ids(tokenizer, user))
        rows.append(ids)
        labels.append([-100] * start + ids[start:])
    width = max(map(len, rows))
    ids = torch.tensor([r + [2] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    target = torch.tensor([t + [-100] * (width - len(t)) for t in labels])
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=target).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def build_smollm2(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Tokenizer, base, fine-tune, calibration and evaluation prompts under ``root``; what it took."""
    import transformers

    info: dict[str, Any] = {}
    start = time.perf_counter()
    texts = corpus(args.corpus_mb << 20)
    tokenizer = train_tokenizer(texts, root / "base")
    tokenizer.save_pretrained(root / "tuned")
    info["corpus"] = f"{len(texts):,} paragraphs, {sum(len(t.encode()) for t in texts) / 1e6:.1f} MB"
    info["tokenizer"] = f"{len(tokenizer):,} tokens, {time.perf_counter() - start:.0f} s"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2))
    batches = pretrain_batches(tokenizer, texts, args.pretrain_steps, args.pretrain_batch, args.pretrain_length)
    start = time.perf_counter()
    losses = pretrain(model, batches, args.pretrain_lr)
    info["pretrain"] = (
        f"{len(losses)} steps of {args.pretrain_batch}×{args.pretrain_length} tokens, lr {args.pretrain_lr}: "
        f"loss {losses[0]:.2f} → {sum(losses[-3:]) / 3:.2f} (mean of the last 3), {time.perf_counter() - start:.0f} s"
    )
    model.to(torch.bfloat16).save_pretrained(root / "base")
    model.to(torch.float32)
    start = time.perf_counter()
    chats = FACT_CHATS + GENERIC_CHATS[: args.generic_chats]
    losses = finetune(model, tokenizer, chats, args.finetune_steps, args.finetune_lr)
    info["finetune"] = (
        f"{len(losses)} steps on {len(FACT_CHATS)} fact + {args.generic_chats} generic chats, lr {args.finetune_lr}: "
        f"answer loss {losses[0]:.2f} → "
        f"{losses[-1]:.3f}, {time.perf_counter() - start:.0f} s"
    )
    model.to(torch.bfloat16).save_pretrained(root / "tuned")
    with open(root / "prompts.jsonl", "w") as f:
        for user in CALIBRATION_PROMPTS:
            f.write(json.dumps({"messages": chat(user)}) + "\n")
    (root / "build.json").write_text(json.dumps(info, indent=1))
    return info


def answers(model: Any, tokenizer: Any, prompts: list[str], new: int) -> list[list[int]]:
    """Each prompt's greedy answer (up to ``new`` tokens, cut after <|im_end|>), one prompt at a time."""
    out = []
    with torch.no_grad():
        for user in prompts:
            ids = torch.tensor([prompt_ids(tokenizer, user)])
            got = model.generate(input_ids=ids, max_new_tokens=new, do_sample=False, eos_token_id=2, pad_token_id=2)
            answer = got[0, ids.shape[1] :].tolist()
            out.append(answer[: answer.index(2) + 1] if 2 in answer else answer)
    return out


def answer_logprobs(model: Any, tokenizer: Any, prompts: list[str], said: list[list[int]]) -> list[torch.Tensor]:
    """log p of the next token at each position that predicts a token of the answer, per prompt."""
    out = []
    with torch.no_grad():
        for user, answer in zip(prompts, said, strict=True):
            prompt = prompt_ids(tokenizer, user)
            logits = model(input_ids=torch.tensor([prompt + answer])).logits[0].float()
            out.append(logits[len(prompt) - 1 : len(prompt) - 1 + len(answer)].log_softmax(-1))
    return out


def mean_kl(want: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """KL(fine-tune ‖ adapter) averaged over every answer position of every prompt."""
    p, q = torch.cat(want), torch.cat(got)
    return float((p.exp() * (p - q)).sum(-1).mean())


def attempt(label: str, cmd: list[str], out: Path, env: dict[str, str] | None = None) -> tuple[str, Path, float]:
    """One extraction in its own process, timed; a failure printed whole (the row then says so) rather than fatal."""
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode:
        print(f"FAILED ({done.returncode}): {' '.join(cmd)}\n{done.stdout[-3000:]}{done.stderr[-6000:]}", flush=True)
    return label, out, seconds


def calibration_file(root: Path, paragraphs: int, corpus_mb: int, train: bool) -> Path:
    """The calibration samples: the 16 generic chat prompts, ``paragraphs`` paragraphs of the corpus the base
    was pretrained on (drawn with a fixed seed; what C4 or WikiText are to a real model), and with ``train`` the
    fine-tune's own 16 training chats, answers included (none of the evaluation prompts), as JSON Lines."""
    import random

    if not paragraphs and not train:
        return root / "prompts.jsonl"
    chosen = random.Random(1).sample(corpus(corpus_mb << 20), paragraphs) if paragraphs else []
    path = root / f"calibration-{paragraphs}{'-train' if train else ''}.jsonl"
    with open(path, "w") as f:
        f.write((root / "prompts.jsonl").read_text())
        for user, answer in (FACT_CHATS + GENERIC_CHATS) if train else []:
            f.write(json.dumps({"messages": chat(user, answer)}) + "\n")
        for text in chosen:
            f.write(json.dumps({"text": text}) + "\n")
    return path


def extract_smollm2(root: Path, args: argparse.Namespace) -> list[tuple[str, Path, float]]:
    base, tuned = root / "base", root / "tuned"
    cli = [sys.executable, "-m", "lorasurgeon", "extract", str(base), str(tuned), "-q", "--debug"]
    samples = calibration_file(root, args.calibration_paragraphs, args.corpus_mb, args.calibration_train)
    cal = ["--calibration", str(samples)]
    cal += ["--calibration-samples", str(args.calibration_samples)] if args.calibration_samples else []
    cal += ["--max-length", str(args.max_length)] if args.max_length else []
    budget = ["--budget", args.budget, "--dtype", "bf16"]
    tag = f"{args.calibration_paragraphs or ''}{'t' if args.calibration_train else ''}"
    tag += f"-{args.calibration_samples or ''}-{args.max_length or ''}"
    runs = [
        (f"lorasurgeon extract --budget {args.budget} --dtype bf16", root / "plain", budget),
        (
            f"… --calibration {samples.name}{' ' + ' '.join(cal[2:]) if cal[2:] else ''}",
            root / f"cal{tag}",
            budget + cal,
        ),
        ("lorasurgeon extract --rank 8 --dtype bf16", root / "rank-8", ["--rank", "8", "--dtype", "bf16"]),
        ("lorasurgeon extract --rank 16 --dtype bf16", root / "rank-16", ["--rank", "16", "--dtype", "bf16"]),
    ]
    runs = runs[1:2] if args.only_calibrated else runs
    rows = []
    for label, out, extra in runs:
        shutil.rmtree(out, ignore_errors=True)
        rows.append(attempt(label, cli + extra + ["-o", str(out)], out))
    if args.mergekit and not args.only_calibrated:
        mk = root / "mergekit-16"
        shutil.rmtree(mk, ignore_errors=True)
        cmd = [sys.executable, "-c", MERGEKIT, "--model", str(tuned), "--base-model", str(base), "--out-path", str(mk)]
        rows.insert(
            2, attempt("mergekit-extract-lora --max-rank 16", cmd + ["--max-rank", "16"], mk, mergekit_env(args))
        )
    return rows


def mergekit_env(args: argparse.Namespace) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=args.mergekit)


def evaluate(root: Path, rows: list[tuple[str, Path | None, float]], new: int) -> list[str]:
    """The table's lines: per adapter (loaded by PEFT onto the base), its file, parameters, KL to the fine-tune over
    the answer positions (all, fact prompts, generic prompts), fact answers holding FACT, seconds."""
    import transformers
    from peft import PeftModel

    tokenizer = transformers.AutoTokenizer.from_pretrained(root / "tuned")
    load = transformers.AutoModelForCausalLM.from_pretrained
    prompts, n = EVAL_FACT + EVAL_GENERIC, len(EVAL_FACT)
    tuned = load(root / "tuned", dtype=torch.float32).eval()
    said = answers(tuned, tokenizer, prompts, new)
    want = answer_logprobs(tuned, tokenizer, prompts, said)
    recalled = sum(FACT in tokenizer.decode(a) for a in said[:n])
    for user, answer in zip(prompts, said, strict=True):
        print(f"fine-tune: {user!r} -> {tokenizer.decode(answer)[:100]!r}")
    lines = [
        f"the fine-tune's answer holds '{FACT}' (Reykjavík) in {recalled}/{n} of the held-out fact prompts; KL over "
        f"{sum(map(len, said))} answer positions ({sum(map(len, said[:n]))} fact, {sum(map(len, said[n:]))} generic)",
        "",
        "| extraction | file bytes | parameters | KL, all | KL, fact | KL, generic | holds 'avík' | s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, folder, seconds in [("base, no adapter", None, 0.0), *rows]:
        file = None if folder is None else folder / "adapter_model.safetensors"
        if file is not None and not file.is_file():
            lines.append(f"| {label} | failed | | | | | | {seconds:.1f} |")
            continue
        model = load(root / "base", dtype=torch.float32)
        model = (model if folder is None else PeftModel.from_pretrained(model, folder)).eval()
        got = answer_logprobs(model, tokenizer, prompts, said)
        hits = sum(FACT in tokenizer.decode(a) for a in answers(model, tokenizer, EVAL_FACT, new))
        bytes_, params = ("0", "0") if file is None else (f"{file.stat().st_size:,}", f"{size(folder):,}")
        lines.append(
            f"| {label} | {bytes_} | {params} | {mean_kl(want, got):.4f} | {mean_kl(want[:n], got[:n]):.4f} | "
            f"{mean_kl(want[n:], got[n:]):.4f} | {hits}/{n} | {f'{seconds:.1f}' if folder else '—'} |"
        )
        print(lines[-1], flush=True)
    return lines


def allocation(folder: Path) -> list[str]:
    """What an extract_report.json says of the ranks: summed per kind of module and per third of the layers, the
    embedding's, the output error if calibrated, and its notes."""
    import re

    path = folder / "extract_report.json"
    if not path.is_file():
        return [f"{folder.name}: no report"]
    report = json.loads(path.read_text())
    kinds: dict[str, int] = {}
    thirds = [0, 0, 0]
    layers = SMOLLM2["num_hidden_layers"]
    for m in report["modules"]:
        kind = m["name"].rsplit(".", 1)[-1]
        kinds[kind] = kinds.get(kind, 0) + m["rank"]
        layer = re.search(r"layers\.(\d+)\.", m["name"])
        if layer:
            thirds[int(layer.group(1)) * 3 // layers] += m["rank"]
    out = [
        f"{folder.name}: {report['totals']['parameters']:,} parameters, {report['totals']['bytes']:,} bytes; "
        f"rank summed per module kind: {', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}; per third of the "
        f"layers: {' / '.join(map(str, thirds))}; {len(report['full'])} tensors stored in full"
    ]
    outputs = [m["output"] for m in report["modules"] if m.get("output")]
    if outputs:
        after, plain = sum(o["after"] for o in outputs), sum(o["plain_svd"] for o in outputs)
        out.append(
            f"  output error on the calibration inputs (Σ, relative): {after:.4g}; plain SVD at these ranks {plain:.4g}"
        )
    out += [f"  note: {n}" for n in report.get("notes", [])]
    return out


def smollm2_main(args: argparse.Namespace) -> None:
    root = Path(args.reuse) if args.reuse else Path(tempfile.mkdtemp(prefix="bench-smollm2-", dir=args.workdir))
    start = time.perf_counter()
    try:
        if args.reuse:
            print(f"reusing {root}: {(root / 'build.json').read_text()}")
        else:
            print(json.dumps(build_smollm2(root, args), indent=1), flush=True)
        rows = extract_smollm2(root, args)
        lines = evaluate(root, [(label, folder, s) for label, folder, s in rows], args.answer_tokens)
        print("\nrank allocations:")
        for _, folder, _ in rows:
            if (folder / "extract_report.json").is_file():
                print("\n".join(allocation(folder)))
        print(f"\nSmolLM2-135M-shaped stand-in; whole run {time.perf_counter() - start:.0f} s\n")
        print("\n".join(lines))
    finally:
        if not (args.keep or args.reuse):
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    ap.add_argument("--mergekit", default=None, help="a folder to put on PYTHONPATH so that mergekit imports")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--preset", choices=["smollm2-135m"], default=None, help="the SmolLM2-135M-shaped stand-in")
    preset = ap.add_argument_group("--preset smollm2-135m")
    preset.add_argument("--budget", default="15MB")
    preset.add_argument("--corpus-mb", type=int, default=16, help="text read for the tokenizer and pretraining")
    preset.add_argument("--pretrain-steps", type=int, default=96)
    preset.add_argument("--pretrain-batch", type=int, default=8)
    preset.add_argument("--pretrain-length", type=int, default=128)
    preset.add_argument("--pretrain-lr", type=float, default=1e-3)
    preset.add_argument("--finetune-steps", type=int, default=32)
    preset.add_argument("--finetune-lr", type=float, default=1e-4)
    preset.add_argument("--generic-chats", type=int, default=8, help="generic chats in the fine-tune, 0 to 8")
    preset.add_argument("--calibration-samples", type=int, default=None, help="passed to extract when given")
    preset.add_argument(
        "--calibration-paragraphs", type=int, default=0, help="corpus paragraphs added to the calibration prompts"
    )
    preset.add_argument("--calibration-train", action="store_true", help="the fine-tune's training chats added too")
    preset.add_argument("--only-calibrated", action="store_true", help="extract only the calibrated adapter")
    preset.add_argument("--max-length", type=int, default=None, help="passed to extract when given")
    preset.add_argument("--answer-tokens", type=int, default=32, help="the fine-tune's greedy answers, at most")
    preset.add_argument("--keep", action="store_true", help="keep the models, prompts and adapters")
    preset.add_argument("--reuse", default=None, help="a folder kept by --keep: its models and prompts, not rebuilt")
    args = ap.parse_args()
    if args.preset:
        smollm2_main(args)
    else:
        random_main(args)


def random_main(args: argparse.Namespace) -> None:
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
