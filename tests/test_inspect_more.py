"""inspect of a .gguf: the llama.cpp LoRA adapter convert --to gguf writes (its pairs and ranks against the PEFT
adapter it came from), a full GGUF model (described, not refused), damaged files (one line, exit 2), and the
gguf package missing (refused by name)."""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import make_fixtures as mf
import numpy as np
import pytest
from helpers import FIX_ADAPTER, FIX_BASE, ROOT, one_line_error, run_cli
from test_startup import run_fresh

from lorasurgeon import inspect


@pytest.fixture(scope="module")
def gguf():
    return pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def fixture_gguf(gguf, tmp_path_factory) -> Path:
    """convert fixtures/adapter --to gguf --base fixtures/base, as the user report does it."""
    out = tmp_path_factory.mktemp("gguf") / "a.gguf"
    r = run_cli("convert", FIX_ADAPTER, "--to", "gguf", "--base", FIX_BASE, "-o", out)
    assert r.exit_code == 0, r.output
    return out


def peft_ranks(adapter: Path) -> dict[int, int]:
    """rank -> modules, as the PEFT adapter's own inspect shows them."""
    report = inspect(adapter)
    assert report.adapter is not None
    return dict(Counter(m.rank for m in report.adapter.modules))


def test_the_adapter_convert_writes_is_described(fixture_gguf):
    report = inspect(fixture_gguf)
    g, peft = report.gguf, inspect(FIX_ADAPTER)
    assert g is not None and peft.adapter is not None
    assert (report.format, report.form, report.files) == ("gguf", "adapter", ["a.gguf"])
    assert (g.architecture, g.type, g.adapter_type, g.lora_alpha) == ("llama", "adapter", "lora", 16.0)
    assert g.pairs == len(peft.adapter.modules) == 14 and g.unpaired == []
    assert g.ranks == peft_ranks(FIX_ADAPTER) == {8: 14}
    assert (report.tensors, report.parameters, report.bytes) == (peft.tensors, peft.parameters, peft.bytes)
    assert {k: (v.tensors, v.parameters) for k, v in report.dtypes.items()} == {"F32": (28, 16384)}
    assert g.file_bytes == fixture_gguf.stat().st_size > report.bytes


def test_the_table_and_the_json(fixture_gguf):
    r = run_cli("inspect", fixture_gguf)
    assert r.exit_code == 0, r.output
    for phrase in ("GGUF v3", "llama.cpp adapter (adapter.type lora, adapter.lora.alpha 16)", "arch        llama"):
        assert phrase in r.stdout, r.stdout
    assert "tensors     28" in r.stdout and "F32 (28 tensors" in r.stdout
    assert "lora pairs  14 (.lora_a/.lora_b); ranks r=8: 14" in r.stdout
    doc = json.loads(run_cli("inspect", fixture_gguf, "--json").stdout)
    assert (doc["format"], doc["form"], doc["tensors"]) == ("gguf", "adapter", 28)
    assert doc["gguf"]["ranks"] == {"8": 14} and doc["gguf"]["pairs"] == 14
    assert doc["gguf"]["lora_alpha"] == 16.0 and doc["metadata"]["general.architecture"] == "llama"


def test_mixed_ranks_and_an_embedding_pair(gguf, tmp_path):
    """The rank histogram against PEFT's: rank_pattern, and the token embedding (A stored transposed)."""
    config = mf.llama_config(tied=False)
    mf.save_model(mf.build_model(config), tmp_path / "base")
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"], rank_pattern={"v_proj": 2})
    adapter = mf.make_adapter(mf.build_model(config), tmp_path / "adapter", **kwargs)
    out = tmp_path / "m.gguf"
    assert run_cli("convert", adapter, "--to", "gguf", "--base", tmp_path / "base", "-o", out).exit_code == 0
    g = inspect(out).gguf
    assert g is not None and g.ranks == peft_ranks(adapter) == {4: 3, 2: 2}
    assert "ranks r=2: 2, r=4: 3" in run_cli("inspect", out).stdout


def write_gguf(gguf, path: Path, *, kind: str | None, tensors: dict[str, np.ndarray], model: bool = True) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    if kind:
        w.add_type(kind)
    if model:
        w.add_name("Tiny")
        w.add_block_count(2)
        w.add_embedding_length(64)
        w.add_feed_forward_length(128)
        w.add_head_count(4)
        w.add_head_count_kv(2)
        w.add_token_list([f"t{i}".encode() for i in range(10)])
    for name, array in tensors.items():
        if name.endswith(".q8"):
            q = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name.removesuffix(".q8"), q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_full_gguf_model_is_described_not_refused(gguf, tmp_path):
    tensors = {
        "token_embd.weight": np.ones((10, 64), np.float16),
        "blk.0.attn_q.weight.q8": np.ones((64, 64), np.float32),
    }
    path = write_gguf(gguf, tmp_path / "model.gguf", kind="model", tensors=tensors)
    report = inspect(path)
    assert report.gguf is not None and report.architecture is not None
    assert (report.form, report.gguf.type, report.gguf.name, report.gguf.pairs) == ("model", "model", "Tiny", 0)
    assert (report.tensors, report.parameters) == (2, 640 + 4096)
    assert {k: (v.tensors, v.parameters) for k, v in report.dtypes.items()} == {"F16": (1, 640), "Q8_0": (1, 4096)}
    assert report.bytes == 640 * 2 + 4096 // 32 * 34
    a = report.architecture
    assert (a.model_type, a.layers, a.hidden_size, a.intermediate_size) == ("llama", 2, 64, 128)
    assert (a.attention_heads, a.kv_heads, a.vocab_size) == (4, 2, 10)
    r = run_cli("inspect", path)
    assert r.exit_code == 0, r.output
    assert "  form        model\n" in r.stdout and "arch        llama, 'Tiny'" in r.stdout
    assert "shape       2 layers, hidden 64, intermediate 128, 4 attention heads, 2 kv heads, vocab 10" in r.stdout
    assert "lora pairs" not in r.stdout


def test_an_adapter_without_general_type_is_told_from_its_tensors(gguf, tmp_path):
    tensors = {
        "blk.0.attn_q.weight.lora_a": np.ones((4, 64), np.float32),
        "blk.0.attn_q.weight.lora_b": np.ones((64, 4), np.float32),
        "blk.0.attn_k.weight.lora_a": np.ones((4, 64), np.float32),
    }
    report = inspect(write_gguf(gguf, tmp_path / "old.gguf", kind=None, tensors=tensors, model=False))
    assert report.gguf is not None and report.form == "adapter"
    assert (report.gguf.pairs, report.gguf.ranks, report.gguf.unpaired) == (1, {4: 1}, ["blk.0.attn_k.weight.lora_a"])
    assert "unpaired    blk.0.attn_k.weight.lora_a" in run_cli("inspect", tmp_path / "old.gguf").stdout


SHORT = "run past the end of the file"


def damaged(data: bytes) -> dict[str, tuple[bytes, str]]:
    """case -> (the file's bytes, a phrase its one line must hold)."""
    return {
        "empty": (b"", "an empty file"),
        "magic only": (b"GGUF", SHORT),
        "header cut": (data[:40], SHORT),
        "tensor infos cut": (data[:300], SHORT),
        "data cut": (data[: len(data) // 2], SHORT),
        "last byte gone": (data[:-1], f"{SHORT}, {len(data) - 1:,} bytes"),
        "huge counts": (b"GGUF" + (3).to_bytes(4, "little") + b"\xff" * 16, SHORT),
        "not gguf": (b"hello world, not a gguf at all", "GGUF magic invalid"),
    }


@pytest.mark.parametrize(
    "case",
    ["empty", "magic only", "header cut", "tensor infos cut", "data cut", "last byte gone", "huge counts", "not gguf"],
)
def test_a_damaged_gguf_is_one_line_exit_2(fixture_gguf, tmp_path, case):
    path = tmp_path / "bad.gguf"
    data, phrase = damaged(fixture_gguf.read_bytes())[case]
    path.write_bytes(data)
    one_line_error(run_cli("inspect", path), str(path), "not a readable GGUF file", phrase, "damaged or truncated")


def test_without_the_gguf_package_it_is_refused_by_name(tmp_path, monkeypatch):
    path = tmp_path / "a.gguf"
    path.write_bytes(b"GGUF" + bytes(20))
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    one_line_error(run_cli("inspect", path), "pip install 'lorasurgeon[gguf]'")


def test_inspecting_a_gguf_imports_no_torch(fixture_gguf):
    r = run_fresh([["inspect", str(fixture_gguf)], ["inspect", str(fixture_gguf), "--json"]])
    assert [code for code, _ in r["results"]] == [0, 0], r
    assert "torch" not in r["heavy"] and "transformers" not in r["heavy"], r["heavy"]


def test_a_model_folder_is_still_not_taken_for_gguf():
    assert inspect(ROOT / "fixtures" / "base").gguf is None


def test_verify_reports_a_config_that_is_not_json_and_refuses_a_gguf_by_name(tmp_path):
    from lorasurgeon import verify
    from lorasurgeon.errors import UnsupportedError

    model = shutil.copytree(FIX_BASE, tmp_path / "model")
    (model / "config.json").write_text("{not json")
    report = verify(model)
    assert not report.ok and any(p.where == "config.json" and "not valid JSON" in p.what for p in report.problems)
    gguf_file = tmp_path / "a.gguf"
    assert run_cli("convert", FIX_ADAPTER, "--to", "gguf", "--base", FIX_BASE, "-o", gguf_file).exit_code == 0
    with pytest.raises(UnsupportedError, match="a GGUF file"):
        verify(gguf_file)
