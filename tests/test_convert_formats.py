"""convert ADAPTER --to FORMAT: an adapter read by any format of the registry, written by the target format's
writer -- the tensors as they were (checked by reading both back through the registry), the config PEFT's."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FIX_ADAPTER, FIX_BASE, listing, one_line_error, run_cli

from lorasurgeon.adapter.formats.registry import writable
from lorasurgeon.adapter.weights import load_adapter


def _tensors(folder):
    adapter = load_adapter(folder)
    try:
        return {k: adapter.checkpoint.read(k) for k in adapter.checkpoint}, adapter.format
    finally:
        adapter.close()


DIFFUSION = ("kohya", "diffusers")  # formats of diffusion pipelines' LoRAs


def test_every_writable_format_round_trips_the_fixture_adapter_exactly(tmp_path):
    original, _ = _tensors(FIX_ADAPTER)
    for target in writable():
        out = tmp_path / target
        done = run_cli("convert", FIX_ADAPTER, "--to", target, "-o", out)
        if target in DIFFUSION:  # an LLM's adapter has no pipeline component to name (tests/test_diffusion_formats)
            one_line_error(done, "names no pipeline component")
            continue
        assert done.exit_code == 0, done.output
        assert f"({target} adapter)" in done.output
        back = tmp_path / f"{target}-back"
        assert run_cli("convert", out, "--to", "peft", "-o", back).exit_code == 0
        again, fmt = _tensors(back)
        assert fmt == "peft" and again.keys() == original.keys()
        assert all(torch.equal(again[k], original[k]) for k in original), target
        assert _tensors(out)[1] == target
        inspected = run_cli("inspect", out)
        assert f"adapter ({target} format)" in inspected.output
    config = json.loads((tmp_path / "peft-back" / "adapter_config.json").read_text())
    assert config["r"] == json.loads((FIX_ADAPTER / "adapter_config.json").read_text())["r"]


def test_a_dry_run_writes_nothing_and_a_model_is_refused_by_kind(tmp_path):
    dry = run_cli("convert", FIX_ADAPTER, "--to", "peft", "-o", tmp_path / "x", "--dry-run")
    assert dry.exit_code == 0 and "Would write 28 tensors of the peft adapter" in dry.output
    one_line_error(run_cli("convert", FIX_BASE, "--to", "peft", "-o", tmp_path / "x"), "is a model")
    assert listing(tmp_path) == set()


def test_a_gguf_adapter_comes_back_as_peft_and_merges_the_same(tmp_path):
    """PEFT -> llama.cpp GGUF (--to gguf) -> PEFT (--to peft --base): the same merge, bit for bit (the
    fixture's plain LoRA: each B's fold for the file's one alpha is exact); read failures named in one line."""
    pytest.importorskip("gguf")
    assert run_cli("convert", FIX_ADAPTER, "--to", "gguf", "--base", FIX_BASE, "-o", tmp_path / "a.gguf").exit_code == 0
    done = run_cli("convert", tmp_path / "a.gguf", "--to", "peft", "--base", FIX_BASE, "-o", tmp_path / "back")
    assert done.exit_code == 0, done.output
    for adapter, out in ((FIX_ADAPTER, "m1"), (tmp_path / "back", "m2")):
        assert run_cli("merge", FIX_BASE, adapter, "-o", tmp_path / out, "-q").exit_code == 0
    assert run_cli("diff", tmp_path / "m1", tmp_path / "m2").exit_code == 0  # identical
    no_base = run_cli("convert", tmp_path / "a.gguf", "--to", "peft", "-o", tmp_path / "x")
    assert no_base.exit_code == 2 and "needs --base BASE" in no_base.output
    assert not (tmp_path / "x").exists()


def test_merge_takes_a_gguf_adapter_against_its_base_and_the_others_name_the_way(tmp_path):
    """merge reads a llama.cpp .gguf adapter against the base it is given (the same bytes as merging the PEFT
    adapter it came from); a command without a base names `convert --to peft --base`."""
    pytest.importorskip("gguf")
    assert run_cli("convert", FIX_ADAPTER, "--to", "gguf", "--base", FIX_BASE, "-o", tmp_path / "a.gguf").exit_code == 0
    assert run_cli("merge", FIX_BASE, tmp_path / "a.gguf", "-o", tmp_path / "from-gguf", "-q").exit_code == 0
    assert run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "from-peft", "-q").exit_code == 0
    assert run_cli("diff", tmp_path / "from-gguf", tmp_path / "from-peft").exit_code == 0
    one_line_error(run_cli("resize", tmp_path / "a.gguf", "--rank", "2", "-o", tmp_path / "x"), "give --base BASE")
    assert not (tmp_path / "x").exists()


def test_check_says_what_a_consumer_reads_for_an_adapter_in_another_format(tmp_path):
    """vLLM reads PEFT's files, llama.cpp GGUF: an MLX adapter is named as such, with the command that makes it."""
    if "mlx" not in writable():
        pytest.skip("no MLX writer registered")
    assert run_cli("convert", FIX_ADAPTER, "--to", "mlx", "-o", tmp_path / "mx").exit_code == 0
    vllm = run_cli("check", tmp_path / "mx", "--for", "vllm")
    assert vllm.exit_code == 1 and "mlx's format" in vllm.output and "--to peft" in vllm.output
    llama = run_cli("check", tmp_path / "mx", "--for", "llama.cpp")
    assert llama.exit_code == 1 and "--to gguf --base BASE" in llama.output
