"""Shared test helpers: tiny transformers models and PEFT adapters built in temporary folders."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", category=UserWarning)

import make_fixtures as mf  # noqa: E402  (fixtures/ is on pytest's pythonpath)

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str):
    """Run the real click CLI in-process; returns click's Result (exit_code, stdout, stderr)."""
    from click.testing import CliRunner

    from lorasurgeon.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def listing(folder: Path) -> set[str]:
    """Every entry under folder, hidden ones included (to prove nothing was left behind)."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llama") / "base"
    return mf.save_model(mf.build_model(mf.llama_config(tied=False), seed=0), out)


@pytest.fixture(scope="session")
def llama_sharded_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llama_sharded") / "base"
    return mf.save_model(mf.build_model(mf.llama_config(tied=False), seed=0), out, max_shard_size="60KB")


@pytest.fixture(scope="session")
def adapter_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    model = mf.build_model(mf.llama_config(tied=False), seed=0)
    return mf.make_adapter(model, out, r=4, lora_alpha=8)


def seeded(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)
