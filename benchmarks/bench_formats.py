"""The format matrix measured: every adapter format and every PEFT tuner × merge / unmerge / convert / extract /
resize / combine, the cells of tests/test_format_matrix.py (its docstring says what each cell runs and what it is
compared with). Each cell is the largest absolute error (float32) against the adapter's producer (PEFT's
merge_and_unload, mlx-lm's fuse, gguf's reader), or "refused: <the CLI's one line>".

    python benchmarks/bench_formats.py                  # a markdown table (the README's is this script's output)
    python benchmarks/bench_formats.py peft-lora ia3    # some kinds only
"""

from __future__ import annotations

import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "fixtures")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

HEADER = {
    "merge": "merge",
    "unmerge": "unmerge",
    "peft": "convert --to peft",
    "mlx": "convert --to mlx",
    "gguf": "convert --to gguf",
    "lora": "convert --to lora (full rank)",
    "extract": "extract (full rank)",
    "resize": "resize (own rank)",
    "combine": "combine (½ + ½)",
}


SHORT = [  # (a phrase of the one-line refusal, the table's short reason): the first that matches
    ("DoRA cannot be unmerged", "DoRA: ‖W0 + ΔW‖ is lost in the merge"),
    ("cannot be unmerged from the merged weights alone", "no inverse (PEFT keeps a copy of W0)"),
    ("llama.cpp cannot take DoRA", "llama.cpp has no DoRA"),
    ("llama.cpp cannot take a", "llama.cpp takes LoRA only"),
    ("mlx's format holds LoRA", "MLX holds LoRA / DoRA only"),
    ("low-rank factors: DoRA", "DoRA: its magnitude depends on W0"),
    ("low-rank factors", "not LoRA factors"),
    ("a llama.cpp GGUF adapter already", "a GGUF adapter already"),
]
FULL_LINES: dict[str, str] = {}  # short reason -> one full line it stands for (printed under the table)


def cell_text(cell: object, made: Any) -> str:
    from test_format_matrix import Refused

    if not isinstance(cell, Refused):
        return f"{cell:.1e}"
    line = cell.short().replace(str(made.adapter), "ADAPTER").replace(str(made.base), "BASE")
    short = next((s for phrase, s in SHORT if phrase in line), line)
    FULL_LINES.setdefault(short, line)
    return f"refused: {short}"


def main() -> None:
    from test_format_matrix import COMMANDS, DO, KINDS, Made, make

    chosen = sys.argv[1:] or KINDS
    os.environ.setdefault("LORASURGEON_CACHE", tempfile.mkdtemp(prefix="lorasurgeon-cache-"))
    print(f"| adapter format / tuner | {' | '.join(HEADER[c] for c in COMMANDS)} |")
    print(f"|---|{'---:|' * len(COMMANDS)}")
    for kind in chosen:
        with tempfile.TemporaryDirectory() as scratch:
            try:
                made = make(kind, Path(scratch) / "made")
            except Exception as exc:  # a case the producer itself cannot build here: say so in the table
                print(f"| {kind} | not measured ({type(exc).__name__}: {exc})"[:160] + " |", flush=True)
                continue
            cells = []
            for command in COMMANDS:
                root = made.root / command
                root.mkdir()
                try:
                    cells.append(cell_text(DO[command](Made(**{**made.__dict__, "root": root})), made))
                except Exception as exc:  # a crash, not a refusal: shown as such
                    cells.append(f"**crash** ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})")
        print(f"| {kind} | {' | '.join(cells)} |", flush=True)
    print("\nThe refusals, one line each as the CLI prints them (one example per reason):\n")
    for short, line in FULL_LINES.items():
        print(f"- {short}: `error: {line.replace('`', '')}`")


if __name__ == "__main__":
    main()
