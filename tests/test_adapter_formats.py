"""The adapter-format registry (lorasurgeon.adapter.formats): which format claims an input (from file names
and headers, without torch), load_adapter dispatching through it, a refusal naming every format, a format
registered ahead of PEFT reached by load_adapter and by every command's input check, and PEFT's writer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FIX_ADAPTER, FIX_BASE, ROOT
from safetensors.torch import save_file

from lorasurgeon.adapter.formats import peft, registry
from lorasurgeon.adapter.formats.base import AdapterFormat
from lorasurgeon.adapter.formats.registry import Probe
from lorasurgeon.adapter.names import strip_prefix
from lorasurgeon.adapter.weights import LoraAdapter, load_adapter
from lorasurgeon.commands._inputs import input_kind
from lorasurgeon.errors import InputNotFoundError, UnsupportedError
from lorasurgeon.io.checkpoint import open_checkpoint

CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}


def folder_with(tmp_path: Path, name: str, tensors: dict[str, torch.Tensor], config: dict | None) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    save_file(tensors, str(folder / ("adapter_model.safetensors" if config is not None else "model.safetensors")))
    if config is not None:
        (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def claimed(path: Path) -> str | None:
    found = registry.claiming(Probe(path))
    return None if found is None else found.name


def test_peft_is_the_first_format_and_every_format_is_named_once():
    """The common case asks one format: PEFT's stands first (it claims none of the others' files)."""
    assert registry.ADAPTER_FORMATS[0] is peft.FORMAT
    names = [f.name for f in registry.ADAPTER_FORMATS]
    assert len(names) == len(set(names))
    assert "PEFT (adapter_config.json + adapter_model.safetensors)" in registry.known()


def test_which_inputs_peft_claims(tmp_path):
    w = torch.zeros(4, 4)
    only_full = folder_with(tmp_path, "full", {"base_model.model.lm_head.weight": w}, CONFIG)
    augmented = folder_with(
        tmp_path, "aug", {"model.q_proj.lora_A.default.weight": w, "model.q_proj.weight": w.clone()}, None
    )
    keys_only = folder_with(tmp_path, "keys", {"base_model.model.q_proj.lora_A.weight": w}, None)
    assert claimed(FIX_ADAPTER) == "peft"
    assert claimed(FIX_ADAPTER / "adapter_model.safetensors") == "peft"
    assert claimed(only_full) == "peft"  # modules_to_save only: its files and config say so
    assert claimed(augmented) == "peft"  # read as its adapter (inspect --verify checks its config)
    assert claimed(keys_only) == "peft"  # PEFT's keys, config missing: read, then refused for the config
    assert claimed(FIX_BASE) is None
    assert claimed(tmp_path / "missing") is None
    with open_checkpoint(only_full) as ckpt:
        assert input_kind(ckpt) == "adapter"
    with open_checkpoint(augmented) as ckpt:
        assert input_kind(ckpt) == "augmented"  # told apart before the formats are asked
    with open_checkpoint(FIX_BASE) as ckpt:
        assert input_kind(ckpt) == "model"


def test_claims_read_headers_only_without_torch():
    script = (
        "import sys; from pathlib import Path\n"
        "from lorasurgeon.adapter.formats.registry import Probe\n"
        "from lorasurgeon.adapter.formats.registry import claiming\n"
        f"assert claiming(Probe(Path({str(FIX_ADAPTER)!r}))).name == 'peft'\n"
        f"assert claiming(Probe(Path({str(FIX_BASE)!r}))) is None\n"
        "print(sorted(m for m in ('torch', 'numpy', 'safetensors') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_an_input_no_format_claims_is_refused_by_name(tmp_path):
    with pytest.raises(UnsupportedError, match=r"not an adapter lorasurgeon reads \(it reads .*PEFT \(adapter_config"):
        load_adapter(FIX_BASE)
    with pytest.raises(InputNotFoundError, match="no such file or folder"):  # the reason it could not be read
        load_adapter(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    with pytest.raises(InputNotFoundError, match="no checkpoint found"):
        load_adapter(tmp_path / "other")


def test_a_registered_format_is_asked_first_by_load_adapter_and_input_kind(tmp_path, monkeypatch):
    """A format of its own (a marker file; keys without PEFT's prefix, in model.safetensors) ahead of PEFT: the
    seam MLX and the others use."""
    toy = tmp_path / "toy"
    toy.mkdir()
    shutil.copy(FIX_ADAPTER / "adapter_config.json", toy)
    with open_checkpoint(FIX_ADAPTER) as ckpt:
        save_file({strip_prefix(n): ckpt.read(n) for n in ckpt}, str(toy / "model.safetensors"))
    (toy / "toy.json").write_text("{}")
    read: list[Path] = []

    def read_toy(path: Path) -> LoraAdapter:
        read.append(path)
        return peft.read(path)

    fmt = AdapterFormat(name="toy", holds="toy (toy.json)", claims=lambda p: p.has("toy.json"), read=read_toy)
    with pytest.raises(UnsupportedError, match="it reads .*PEFT"):
        load_adapter(toy)
    with open_checkpoint(toy) as ckpt:
        ckpt_kind_before = input_kind(ckpt)
    monkeypatch.setattr(registry, "ADAPTER_FORMATS", (fmt, *registry.ADAPTER_FORMATS))
    adapter = load_adapter(toy)
    adapter.close()
    assert read == [toy] and len(adapter.modules) == len(load_adapter(FIX_ADAPTER).modules)
    with open_checkpoint(toy) as ckpt:
        assert (ckpt_kind_before, input_kind(ckpt)) == ("model", "adapter")
    assert "toy (toy.json)" in registry.known()


def test_peft_writer_round_trip(tmp_path):
    source = load_adapter(FIX_ADAPTER)
    assert peft.FORMAT.writer is not None
    writer = peft.FORMAT.writer(tmp_path / "out", False)
    try:
        for name in source.checkpoint:
            writer.write(name, source.checkpoint.read(name))
        out = writer.finish(source.config.raw)
    except BaseException:
        writer.abort()
        raise
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    again = load_adapter(out)
    assert registry.adapter_format(out) is peft.FORMAT
    assert again.config == source.config
    assert {n: (m.rank, m.scale, m.keys) for n, m in again.modules.items()} == {
        n: (m.rank, m.scale, m.keys) for n, m in source.modules.items()
    }
    for name in source.checkpoint:
        assert torch.equal(again.checkpoint.read(name), source.checkpoint.read(name)), name
    again.close()
    source.close()


def test_every_role_has_a_saved_key_and_every_augmented_one_is_a_role():
    from typing import get_args

    from lorasurgeon.adapter.names import AUGMENTED_SUFFIX, SAVED_SUFFIX, Role

    assert list(SAVED_SUFFIX) == list(get_args(Role))
    assert set(AUGMENTED_SUFFIX) <= set(get_args(Role))
