"""Bad input: one line on stderr naming the file, exit 2, no traceback, nothing written."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from helpers import listing, run_cli
from safetensors.torch import save_file


def header_file(path, header: dict | bytes, data: bytes = b"", length: int | None = None):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def good_file(tmp_path):
    save_file({"a": torch.arange(4, dtype=torch.float32), "b": torch.ones(2)}, tmp_path / "good.safetensors")
    return tmp_path / "good.safetensors"


def bad_inputs(tmp_path):
    """name -> (path to inspect, a phrase the message must contain)."""
    cases = {}
    cases["missing path"] = (tmp_path / "nope", "no such file")
    good = good_file(tmp_path).read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(good[:-5])
    cases["truncated"] = (tmp_path / "truncated.safetensors", "truncated")
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01\x02")
    cases["shorter than a header"] = (tmp_path / "tiny.safetensors", "too short")
    cases["header beyond file"] = (header_file(tmp_path / "long.safetensors", {"a": {}}, length=10_000), "past the end")
    cases["huge header length"] = (header_file(tmp_path / "huge.safetensors", b"{}", length=2**62), "exceeds")
    cases["invalid json"] = (header_file(tmp_path / "json.safetensors", b"{not json"), "not valid JSON")
    spec = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    cases["overlapping offsets"] = (
        header_file(tmp_path / "overlap.safetensors", {"a": spec, "b": dict(spec, data_offsets=[4, 12])}, b"\0" * 12),
        "overlaps",
    )
    cases["out of range offsets"] = (
        header_file(tmp_path / "range.safetensors", {"a": dict(spec, data_offsets=[100, 108])}, b"\0" * 8),
        "truncated",
    )
    cases["size mismatch"] = (
        header_file(tmp_path / "size.safetensors", {"a": dict(spec, data_offsets=[0, 4])}, b"\0" * 8),
        "needs 8 bytes",
    )
    cases["negative offsets"] = (
        header_file(tmp_path / "neg.safetensors", {"a": dict(spec, data_offsets=[-8, 0])}, b"\0" * 8),
        "invalid data_offsets",
    )
    cases["unknown dtype"] = (
        header_file(tmp_path / "dtype.safetensors", {"a": dict(spec, dtype="F7")}, b"\0" * 8),
        "dtype F7",
    )
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    save_file({"a": torch.ones(2)}, shard_dir / "model-00001-of-00002.safetensors")
    (shard_dir / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
    )
    cases["index names missing shard"] = (shard_dir, "model-00002-of-00002.safetensors, which is not there")
    escape_dir = tmp_path / "escape"
    escape_dir.mkdir()
    (escape_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../good.safetensors"}}))
    cases["index escapes folder"] = (escape_dir, "outside the checkpoint folder")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    torch.save({"w": Evil()}, tmp_path / "evil.bin")
    cases["malicious pickle"] = (tmp_path / "evil.bin", "refused")
    torch.save({"w": torch.ones(1)}, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    cases["pre-1.6 pickle"] = (tmp_path / "old.bin", "zip format")
    (tmp_path / "empty_dir").mkdir()
    cases["folder without checkpoint"] = (tmp_path / "empty_dir", "no checkpoint found")
    adapter = tmp_path / "bad_adapter"
    adapter.mkdir()
    save_file({"base_model.model.x.lora_A.weight": torch.ones(2, 3)}, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text('{"r": 2,')
    cases["adapter config not json"] = (adapter, "adapter_config.json: not valid JSON")
    return cases


CASES = [
    "missing path",
    "truncated",
    "shorter than a header",
    "header beyond file",
    "huge header length",
    "invalid json",
    "overlapping offsets",
    "out of range offsets",
    "size mismatch",
    "negative offsets",
    "unknown dtype",
    "index names missing shard",
    "index escapes folder",
    "malicious pickle",
    "pre-1.6 pickle",
    "folder without checkpoint",
    "adapter config not json",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_exit_2(tmp_path, case):
    path, phrase = bad_inputs(tmp_path)[case]
    before = listing(tmp_path)
    result = run_cli("inspect", path)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert phrase in lines[0]
    assert str(path.name) in lines[0] or case == "missing path" and "nope" in lines[0]
    assert "Traceback" not in result.stderr
    assert listing(tmp_path) == before


def test_debug_shows_the_traceback(tmp_path):
    from click.testing import CliRunner

    from lorasurgeon.cli import cli
    from lorasurgeon.errors import InputNotFoundError

    result = CliRunner().invoke(cli, ["--debug", "inspect", str(tmp_path / "nope")])
    assert isinstance(result.exception, InputNotFoundError)


def test_every_case_is_tested(tmp_path):
    assert set(bad_inputs(tmp_path)) == set(CASES)


@pytest.mark.parametrize(
    "typo,phrase",
    [
        ("fixtures/bse", "fixtures/bse: no such file or folder (did you mean fixtures/base?)"),
        ("fixtures/adaptr/", "no such file or folder (did you mean fixtures/adapter?)"),
        ("fixtures/bse/model.safetensors", "(did you mean fixtures/base?)"),
        ("fixtures/zzzzzz", "fixtures/zzzzzz: no such file or folder"),
    ],
)
def test_a_mistyped_local_path_is_not_sent_to_the_hub(typo, phrase, monkeypatch):
    """The first part of the path exists here, so it is a path with a typo, not an org/name repo id."""
    from helpers import ROOT

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # were the Hub asked, this would say "cannot reach"
    result = run_cli("inspect", typo)
    assert result.exit_code == 2 and phrase in result.stderr and "hub" not in result.stderr.lower(), result.stderr
