"""Hub files read in place: headers and tensors by HTTP range from the loopback Hub stand-in, which counts
every byte it sends and cuts connections off on purpose."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from helpers import FIX_ADAPTER, FIX_BASE, listing, one_line_error, run_cli
from hub_server import serving
from reference import read_folder

from lorasurgeon.hub import stream


@pytest.fixture
def hub(tmp_path, monkeypatch):
    with serving(monkeypatch, tmp_path / "hf_cache") as server:
        monkeypatch.setattr(stream, "WAIT", 0.01)
        server.add_folder("org/base", FIX_BASE)
        server.add_folder("org/adapter", FIX_ADAPTER)
        yield server


def header_bytes(file: Path) -> int:
    """A safetensors file's 8-byte length and its header: what reading its headers takes, and no more."""
    with open(file, "rb") as fh:
        return 8 + struct.unpack("<Q", fh.read(8))[0]


def weights_in_cache(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "hf_cache").rglob("*.safetensors"))


def test_inspect_of_a_hub_repo_reads_only_headers(hub, tmp_path):
    result = run_cli("inspect", "org/base", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    local = json.loads(run_cli("inspect", FIX_BASE, "--json").stdout)
    assert (report["tensors"], report["parameters"], report["architecture"]) == (
        local["tensors"],
        local["parameters"],
        local["architecture"],
    )
    assert hub.served["model.safetensors"] == header_bytes(FIX_BASE / "model.safetensors")
    assert weights_in_cache(tmp_path) == []  # nothing of the weights written to disk
    adapter = run_cli("inspect", "org/adapter")
    assert adapter.exit_code == 0 and "rank" in adapter.stdout
    assert hub.served["adapter_model.safetensors"] == header_bytes(FIX_ADAPTER / "adapter_model.safetensors")


def test_dry_runs_and_check_read_only_headers(hub, tmp_path):
    tuned = tmp_path / "tuned"
    assert run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tuned).exit_code == 0
    hub.add_folder("org/tuned", tuned)
    dry = run_cli("merge", "org/base", "org/adapter", "-o", tmp_path / "m", "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    assert hub.served["model.safetensors"] == header_bytes(FIX_BASE / "model.safetensors")
    assert hub.served["adapter_model.safetensors"] == header_bytes(FIX_ADAPTER / "adapter_model.safetensors")
    hub.served.clear()
    dry = run_cli("extract", "org/base", "org/tuned", "--rank", "4", "--dry-run", "-o", tmp_path / "e")
    assert dry.exit_code == 0, dry.stderr
    # the base's header was read by the merge above: a header is fetched once a process
    assert hub.served["model.safetensors"] == header_bytes(tuned / "model.safetensors")
    checked = run_cli("check", "org/adapter", "--for", "vllm")
    assert checked.exit_code in (0, 1), checked.stderr
    # the adapter's header, read once (by the merge's dry run): check read no more of it
    assert hub.served.get("adapter_model.safetensors", 0) == 0
    assert weights_in_cache(tmp_path) == [] and not (tmp_path / "m").exists()


def test_a_streamed_merge_equals_the_local_one_and_writes_only_its_output(hub, tmp_path):
    result = run_cli("merge", "org/base", "org/adapter", "--stream", "-o", tmp_path / "streamed")
    assert result.exit_code == 0, result.stderr
    assert run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "local").exit_code == 0
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()
    assert weights_in_cache(tmp_path) == []  # the Hub cache holds config and tokenizer files only
    size = (FIX_BASE / "model.safetensors").stat().st_size
    assert size <= hub.served["model.safetensors"] <= size + 2 * header_bytes(FIX_BASE / "model.safetensors")


def test_dropped_connections_are_resumed_and_the_bytes_are_the_same(hub, tmp_path):
    assert run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "local").exit_code == 0
    assert run_cli("inspect", "org/base").exit_code == run_cli("inspect", "org/adapter").exit_code == 0
    hub.drop = 4  # the next four file responses (tensors: small files and headers are had) cut off halfway
    before = stream.FETCHED.resumed
    result = run_cli("merge", "org/base", "org/adapter", "--stream", "-o", tmp_path / "streamed")
    assert result.exit_code == 0, result.stderr
    assert stream.FETCHED.resumed - before == 4
    resumed = [r for p, r in hub.ranges if p == "model.safetensors" and r and not r.startswith("bytes=0-")]
    assert resumed  # some reads went on from the middle of what they asked first
    a, b = read_folder(tmp_path / "streamed"), read_folder(tmp_path / "local")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_connection_that_keeps_dropping_fails_with_one_line_and_nothing_written(hub, tmp_path):
    hub.add_folder("org/base2", FIX_BASE)
    assert run_cli("inspect", "org/base2").exit_code == 0  # its small files cached: only the weights are left
    hub.drop = 1000
    out = tmp_path / "merged"
    result = run_cli("merge", "org/base2", FIX_ADAPTER, "--stream", "-o", out)
    one_line_error(result, "connection dropped", "in a row")
    assert not out.exists() and not [p for p in listing(tmp_path) if "lorasurgeon-partial" in p]


def test_a_server_that_ignores_ranges_is_refused_by_name(hub, tmp_path):
    hub.serve_ranges = False
    one_line_error(run_cli("inspect", "org/base"), "does not serve byte ranges", "drop --stream")


def test_diff_and_extract_stream_too(hub, tmp_path):
    merged = tmp_path / "merged"
    assert run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", merged).exit_code == 0
    hub.add_folder("org/merged", merged)
    streamed = run_cli("diff", "org/base", "org/merged", "--stream", "--json")
    local = run_cli("diff", FIX_BASE, merged, "--json")
    assert streamed.exit_code == local.exit_code == 1
    assert json.loads(streamed.stdout)["tensors"] == json.loads(local.stdout)["tensors"]
    a = run_cli("extract", "org/base", "org/merged", "--rank", "8", "--stream", "-o", tmp_path / "a")
    b = run_cli("extract", FIX_BASE, merged, "--rank", "8", "-o", tmp_path / "b")
    assert a.exit_code == b.exit_code == 0, a.stderr
    name = "adapter_model.safetensors"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert weights_in_cache(tmp_path) == []


def test_weights_too_big_for_the_disk_are_read_in_place_with_a_warning(hub, tmp_path, monkeypatch):
    import shutil

    real = shutil.disk_usage
    cache = tmp_path / "hf_cache"
    cache.mkdir()
    nearly_full = real(cache)._replace(free=1000)  # the cache's disk; the result's is another
    monkeypatch.setattr(shutil, "disk_usage", lambda path: nearly_full if Path(path) == cache else real(path))
    result = run_cli("merge", "org/base", "org/adapter", "-o", tmp_path / "merged")
    assert result.exit_code == 0, result.stderr
    assert "do not fit in the 0.0 GB free" in result.stderr and "read in place" in result.stderr
    assert weights_in_cache(tmp_path) == []


def test_offline_after_reading_in_place_is_a_clear_line(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    assert run_cli("inspect", "org/base").exit_code == 0  # small files cached, weights read in place only
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    one_line_error(run_cli("merge", "org/base", FIX_ADAPTER, "-o", tmp_path / "m"), "offline", "not in the local cache")
    assert not (tmp_path / "m").exists()
