"""Inputs that do not belong together, or are broken, refused by name before anything is written: adapters of
different bases combined, an adapter converted to GGUF against a base it does not fit, a config.json that is
not JSON; and an adapter_config.json PEFT would read with a warning, read with the same warning."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import make_fixtures as mf
import pytest
from helpers import FIX_ADAPTER, FIX_BASE, listing, one_line_error, run_cli

from lorasurgeon.commands.resize import combine
from lorasurgeon.errors import IncompatibleError


def edit_json(path: Path, **changes: object) -> Path:
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))
    return path


def llama_adapter(folder: Path, *, hidden: int = 64, base: str = "fixtures/base") -> Path:
    """A PEFT adapter of a tiny Llama (q/k/v/o) whose config names ``base`` as its base model."""
    mf.make_adapter(mf.build_model(mf.llama_config(hidden=hidden)), folder)
    edit_json(folder / "adapter_config.json", base_model_name_or_path=base)
    return folder


@pytest.fixture(scope="module")
def gpt2_adapter(tmp_path_factory) -> Path:
    """A PEFT adapter of a tiny GPT-2 (c_attn), of the base "openai-community/gpt2"."""
    folder = tmp_path_factory.mktemp("gpt2") / "adapter"
    mf.make_adapter(mf.build_model(mf.gpt2_config()), folder, target_modules=["c_attn"])
    edit_json(folder / "adapter_config.json", base_model_name_or_path="openai-community/gpt2")
    return folder


# combine


def test_combine_refuses_adapters_of_different_bases_by_name(tmp_path, gpt2_adapter):
    out = tmp_path / "both"
    line = one_line_error(
        run_cli("combine", FIX_ADAPTER, gpt2_adapter, "-o", out),
        "'fixtures/base'",
        "'openai-community/gpt2'",
        "--allow-different-bases",
    )
    assert str(gpt2_adapter) in line
    assert not out.exists() and listing(tmp_path) == set()


def test_combine_of_different_bases_when_allowed(tmp_path, gpt2_adapter):
    report = combine([FIX_ADAPTER, gpt2_adapter], tmp_path / "both", allow_different_bases=True)
    assert report.kept == pytest.approx(1.0) and (tmp_path / "both" / "adapter_config.json").is_file()


def test_combine_refuses_a_module_of_another_shape_naming_it_and_both_shapes(tmp_path):
    small = llama_adapter(tmp_path / "small")
    wide = llama_adapter(tmp_path / "wide", hidden=96)
    with pytest.raises(IncompatibleError) as caught:
        combine([small, wide], tmp_path / "both", allow_different_bases=True)
    module = r"module 'model\.layers\.0\.self_attn\.[qkvo]_proj' is linear"
    shapes = r"\[\d+, 4\] x \[4, 96\], but .*small has it linear \[\d+, 4\] x \[4, 64\]"
    assert re.search(f"{module} {shapes}", str(caught.value)), caught.value
    assert not (tmp_path / "both").exists()


# convert --to gguf


@pytest.fixture(scope="module")
def wide_base(tmp_path_factory) -> Path:
    """fixtures/base's config with hidden_size 96 instead of 64: the fixture adapter's shapes do not fit it."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(FIX_BASE)
    config.hidden_size = 96
    return mf.save_model(mf.build_model(config), tmp_path_factory.mktemp("wide") / "base")


def test_gguf_refuses_a_base_the_adapter_does_not_fit_as_merge_does(tmp_path, wide_base):
    pytest.importorskip("gguf")
    merged = run_cli("merge", wide_base, FIX_ADAPTER, "-o", tmp_path / "merged")
    merge_line = one_line_error(merged, "do not fit", "[96, ")
    out = tmp_path / "a.gguf"
    gguf_line = one_line_error(run_cli("convert", FIX_ADAPTER, "--to", "gguf", "--base", wide_base, "-o", out))
    assert gguf_line == merge_line and not out.exists()
    assert listing(tmp_path) == set()


# config.json that is not JSON


@pytest.fixture
def broken_base(tmp_path) -> Path:
    base = shutil.copytree(FIX_BASE, tmp_path / "base")
    (base / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": 64,,\n}')
    return base


BROKEN = "config.json: not valid JSON (line 2 column 21: Expecting property name enclosed in double quotes)"


@pytest.mark.parametrize(
    "command",
    [
        ["merge", "{base}", FIX_ADAPTER, "-o", "{out}"],
        ["extract", "{base}", FIX_BASE, "--rank", "2", "-o", "{out}"],
        ["diff", FIX_BASE, "{base}"],
        ["inspect", "{base}"],
        ["inspect", "{base}", "--verify"],
        ["convert", FIX_ADAPTER, "--to", "gguf", "--base", "{base}", "-o", "{out}.gguf"],
    ],
    ids=["merge", "extract", "diff", "inspect", "verify", "gguf"],
)
def test_a_config_that_is_not_json_is_refused_by_name(tmp_path, broken_base, command):
    if "gguf" in command:
        pytest.importorskip("gguf")
    out = tmp_path / "out"
    args = [str(a).format(base=broken_base, out=out) for a in command]
    one_line_error(run_cli(*args), f"{broken_base}/{BROKEN}")
    assert not out.exists() and not out.with_suffix(".gguf").exists()


def test_a_tied_base_whose_config_is_not_json_is_blamed_not_the_adapter(tmp_path):
    base = mf.save_model(mf.build_model(mf.llama_config(tied=True)), tmp_path / "tied")
    model = mf.build_model(mf.llama_config(tied=True))
    adapter = mf.make_adapter(model, tmp_path / "adapter", target_modules=["lm_head"])
    (base / "config.json").write_text("{")
    line = one_line_error(run_cli("merge", base, adapter, "-o", tmp_path / "merged"), f"{base}/config.json")
    assert "adapter" not in line.removeprefix(f"error: {base}/config.json")


# adapter_config.json that PEFT reads with a warning


def run_merge(adapter: Path, out: Path) -> subprocess.CompletedProcess[str]:
    """The real command line (not in-process: pytest records warnings instead of letting them be printed)."""
    command = [sys.executable, "-m", "lorasurgeon", "merge", str(FIX_BASE), str(adapter), "-o", str(out)]
    return subprocess.run(command, capture_output=True, text=True, cwd=out.parent)


def test_an_unknown_adapter_config_key_is_merged_with_a_warning_naming_it(tmp_path):
    adapter = shutil.copytree(FIX_ADAPTER, tmp_path / "adapter")
    edit_json(adapter / "adapter_config.json", use_magic=True)
    done = run_merge(adapter, tmp_path / "merged")
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "'use_magic'" in line]
    assert len(warned) == 1 and f"{adapter}/adapter_config.json: unexpected key" in warned[0], done.stderr


@pytest.mark.parametrize("key", ["lora_alpha", "r"])
def test_a_missing_rank_or_alpha_is_merged_with_a_warning_naming_the_default(tmp_path, key):
    adapter = shutil.copytree(FIX_ADAPTER, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    del config[key]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    done = run_merge(adapter, tmp_path / "merged")
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if f"adapter_config.json: no {key}:" in line]
    assert len(warned) == 1 and f"PEFT's default {key}=8 is used" in warned[0], done.stderr


def test_a_complete_peft_config_is_read_without_a_warning():
    from lorasurgeon.adapter.config import AdapterConfig, AdapterConfigWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", AdapterConfigWarning)
        AdapterConfig.load(FIX_ADAPTER)


def test_a_bias_peft_does_not_know_is_refused_naming_its_values(tmp_path):
    from lorasurgeon.adapter.config import AdapterConfig
    from lorasurgeon.errors import AdapterConfigError

    config = json.loads((FIX_ADAPTER / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {"bias": "some"}))
    with pytest.raises(AdapterConfigError, match="bias must be one of none, all, lora_only, got 'some'"):
        AdapterConfig.load(tmp_path)


def test_the_keys_and_defaults_are_peft_s():
    from lorasurgeon.adapter.config import KNOWN_KEYS, PEFT_DEFAULTS

    peft = pytest.importorskip("peft")
    fields = {f.name: f.default for f in dataclasses.fields(peft.LoraConfig)}
    assert set(fields) <= KNOWN_KEYS
    assert PEFT_DEFAULTS == {key: fields[key] for key in PEFT_DEFAULTS}


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("fixtures/base", "/work/main/fixtures/base", True),
        ("meta-llama/Llama-3.1-8B", "/models/meta-llama/Llama-3.1-8B/", True),
        ("fixtures/base", "openai-community/gpt2", False),
        ("org/base-7b", "org/base-13b", False),
    ],
)
def test_one_base_under_two_names_is_one_base(a, b, same):
    from lorasurgeon.commands.resize.plan import same_base

    assert same_base(a, b) is same and same_base(b, a) is same
