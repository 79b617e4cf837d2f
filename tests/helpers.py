"""What the tests share: the committed fixtures' paths, the CLI run in-process, and a few small checks."""

from __future__ import annotations

from pathlib import Path

import torch
from click.testing import Result

ROOT = Path(__file__).resolve().parents[1]
FIX_BASE, FIX_ADAPTER = ROOT / "fixtures" / "base", ROOT / "fixtures" / "adapter"
FIX_SD_PIPELINE, FIX_SD_LORA = ROOT / "fixtures" / "sd-pipeline", ROOT / "fixtures" / "sd-lora.safetensors"


def run_cli(*args: object) -> Result:
    """Run the real click CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    from click.testing import CliRunner

    from lorasurgeon.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def listing(folder: Path) -> set[str]:
    """Every entry under folder, hidden ones included (to prove nothing was left behind)."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def seeded(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def one_line_error(result: Result, *phrases: str) -> str:
    """The CLI's contract for bad input: exit 2, one line on stderr starting 'error: ', no traceback;
    the line must hold every phrase. Returns the line."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


def byte_tokenizer(folder: Path, chat_template: str | None = None) -> Path:
    """A byte-level tokenizer (ids 0..255, the tiny Llama's vocabulary) saved into ``folder``: make_fixtures'."""
    from make_fixtures import byte_tokenizer as make

    return make(folder, chat_template)
