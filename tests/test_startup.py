"""What reads only headers imports neither torch nor numpy (nor transformers, once the model's names are
cached): each command runs in-process in a fresh interpreter, and sys.modules is looked at afterwards.
(How fast that is, is measured by benchmarks/bench_startup.py, not here.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import FIX_ADAPTER, FIX_BASE, ROOT

from lorasurgeon.names import model_names
from lorasurgeon.names.cache import cache_dir, from_json, to_json

SCRIPT = """
import json, sys
from click.testing import CliRunner
from lorasurgeon.cli import cli

results = []
for args in json.loads(sys.argv[1]):
    r = CliRunner().invoke(cli, args)
    results.append([r.exit_code, r.output.strip().splitlines()[-1] if r.output.strip() else ""])
heavy = sorted(m for m in ("torch", "numpy", "transformers", "safetensors") if m in sys.modules)
print(json.dumps({"results": results, "heavy": heavy}))
"""


def run_fresh(commands: list[list[str]]) -> dict:
    """The commands run one after another in one new interpreter; their exit codes and what it imported."""
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(commands)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=os.environ.copy(),
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("startup") / "merged"
    r = run_fresh([["merge", str(FIX_BASE), str(FIX_ADAPTER), "-o", str(out)]])
    assert r["results"][0][0] == 0, r
    return out


def test_header_only_commands_import_neither_torch_nor_numpy(tmp_path, merged):
    base, adapter, o = str(FIX_BASE), str(FIX_ADAPTER), str(tmp_path / "o")
    alora = shutil.copytree(FIX_ADAPTER, tmp_path / "alora")
    config = json.loads((alora / "adapter_config.json").read_text()) | {"alora_invocation_tokens": [3]}
    (alora / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "taken").mkdir()
    run_fresh([["merge", base, adapter, "-o", o, "--dry-run"]])  # the model's names asked once, then cached
    commands = [
        (["--help"], 0),
        (["merge", "--help"], 0),
        (["inspect", adapter], 0),
        (["inspect", base, "--json"], 0),
        (["inspect", str(merged)], 0),
        (["check", adapter, "--for", "vllm"], 0),
        (["check", adapter, "--for", "llama.cpp", "--json"], 0),
        (["merge", base, adapter, "-o", o, "--dry-run"], 0),
        (["merge", base, adapter, "-o", o, "--dry-run", "--dtype", "float16", "--max-shard-size", "100KB"], 0),
        (["unmerge", str(merged), adapter, "-o", o, "--dry-run"], 0),
        (["extract", base, str(merged), "-o", o, "--rank", "4", "--dry-run"], 0),
        (["extract", base, str(merged), "-o", o, "--budget", "40KB", "--dry-run"], 0),
        (["resize", adapter, "--rank", "2", "-o", o, "--dry-run"], 0),
        # refusals found from headers
        (["merge", adapter, base, "-o", o], 2),  # swapped
        (["merge", base, adapter, "-o", str(tmp_path / "taken")], 2),  # an existing output
        (["merge", base, str(tmp_path / "nope"), "-o", o], 2),  # a typo
        (["merge", base, str(alora), "-o", o], 2),  # a variant that is not plain LoRA
        (["merge", base, adapter, "-o", o, "--dtype", "int8"], 2),
        (["extract", base, str(merged), "-o", o], 2),  # no --rank/--energy/--budget
        (["push", str(tmp_path / "nope"), "org/name"], 2),
        (["check", base, "--for", "vllm"], 2),  # a model, not an adapter
    ]
    got = run_fresh([c for c, _ in commands])
    assert [code for code, _ in got["results"]] == [want for _, want in commands], list(
        zip([c for c, _ in commands], got["results"], strict=True)
    )
    assert got["heavy"] == [], got["heavy"]
    assert not (tmp_path / "o").exists()


def test_a_real_merge_imports_torch_when_it_computes(tmp_path):
    got = run_fresh([["merge", str(FIX_BASE), str(FIX_ADAPTER), "-o", str(tmp_path / "m")]])
    assert got["results"][0][0] == 0 and "torch" in got["heavy"]


def test_the_names_cache_holds_what_transformers_says_and_survives_damage(tmp_path, monkeypatch):
    from architectures import ARCHS, build

    for arch in ("qwen2_moe", "gpt2", "t5"):
        folder = tmp_path / arch
        build(ARCHS[arch]).save_pretrained(folder)
        from lorasurgeon.io import open_checkpoint

        with open_checkpoint(folder) as ckpt:
            keys = list(ckpt.names())
        config = json.loads((folder / "config.json").read_text())
        names = model_names(keys, config)
        assert from_json(json.loads(json.dumps(to_json(names)))) == names, arch
    monkeypatch.setenv("LORASURGEON_CACHE", str(tmp_path / "cache"))
    from lorasurgeon.names import _cached

    _cached.cache_clear()
    first = model_names(keys, config)
    files = list(cache_dir().glob("*.json"))
    assert len(files) == 1
    files[0].write_text("{ not json")  # a damaged entry is recomputed and written again
    _cached.cache_clear()
    assert model_names(keys, config) == first
    assert json.loads(files[0].read_text())["source"] == first.source
    monkeypatch.setenv("LORASURGEON_CACHE", "off")
    assert cache_dir() is None
    _cached.cache_clear()
    assert model_names(keys, config) == first


BLOCKED = """
import importlib, pkgutil, sys

class Block:  # torch and the other heavy imports made impossible
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "numpy", "safetensors", "transformers", "matplotlib", "huggingface_hub"):
            raise ImportError(f"blocked {name}")

sys.meta_path.insert(0, Block())
import lorasurgeon
bad = []
for m in pkgutil.walk_packages(lorasurgeon.__path__, "lorasurgeon."):
    if not m.name.endswith("__main__"):
        try:
            importlib.import_module(m.name)
        except Exception as exc:
            bad.append(f"{m.name}: {exc}")
print(bad)
"""


def test_every_module_imports_without_torch_numpy_or_transformers():
    done = subprocess.run([sys.executable, "-c", BLOCKED], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]", done.stdout
