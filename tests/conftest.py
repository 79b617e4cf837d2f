"""pytest's fixtures (tiny transformers models and PEFT adapters built in temporary folders) and the test
environment (offline, quiet). The helpers the tests share are in helpers.py."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", category=UserWarning)

import make_fixtures as mf  # noqa: E402  (fixtures/ is on pytest's pythonpath)


@pytest.fixture(scope="session", autouse=True)
def names_cache(tmp_path_factory) -> Path:
    """The cache of model names (names.cache) in a folder of this run, not the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("cache")
    os.environ["LORASURGEON_CACHE"] = str(folder)
    return folder


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
