"""Inputs opened once (issue #24): each input's safetensors header is parsed once per command."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

import lorasurgeon
from lorasurgeon.io import checkpoint

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture
def header_reads(monkeypatch) -> Counter[str]:
    """Each safetensors file's header parses, counted by the input folder it is in."""
    counts: Counter[str] = Counter()
    real = checkpoint.read_header

    def counting(file, *args, **kwargs):
        counts[Path(file).parent.name] += 1
        return real(file, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "read_header", counting)
    return counts


@pytest.mark.parametrize("unmerge", [False, True])
def test_merge_reads_each_header_once(tmp_path, header_reads, unmerge):
    base, adapter = FIXTURES / "base", FIXTURES / "adapter"
    lorasurgeon.merge(base, adapter, tmp_path / "warm")  # a first run caches the names
    header_reads.clear()
    lorasurgeon.merge(base, adapter, tmp_path / "out", unmerge=unmerge)
    assert dict(header_reads) == {"base": 1, "adapter": 1}


def test_iter_merged_reads_each_header_once(header_reads):
    base, adapter = FIXTURES / "base", FIXTURES / "adapter"
    list(lorasurgeon.iter_merged(base, adapter))
    header_reads.clear()
    tensors = lorasurgeon.iter_merged(base, adapter)
    assert dict(header_reads) == {"base": 1, "adapter": 1}
    list(tensors)


def test_check_and_resize_read_the_adapter_header_once(tmp_path, header_reads):
    adapter = FIXTURES / "adapter"
    lorasurgeon.check(adapter, consumer="vllm")
    header_reads.clear()
    lorasurgeon.check(adapter, consumer="vllm")
    assert dict(header_reads) == {"adapter": 1}
    header_reads.clear()
    lorasurgeon.resize(adapter, tmp_path / "small", rank=2)
    assert dict(header_reads) == {"adapter": 1}


@pytest.fixture
def tuned(tmp_path) -> Path:
    """A fine-tune of the base: the adapter merged into it."""
    lorasurgeon.merge(FIXTURES / "base", FIXTURES / "adapter", tmp_path / "tuned")
    return tmp_path / "tuned"


def test_extract_reads_each_header_once(tmp_path, tuned, header_reads):
    base = FIXTURES / "base"
    lorasurgeon.extract(base, tuned, tmp_path / "warm", rank=2)
    header_reads.clear()
    lorasurgeon.extract(base, tuned, tmp_path / "out", rank=2)
    assert dict(header_reads) == {"base": 1, "tuned": 1}


def test_diff_reads_each_header_once(tuned, header_reads):
    base = FIXTURES / "base"
    lorasurgeon.diff(base, tuned)
    header_reads.clear()
    lorasurgeon.diff(base, tuned)
    assert dict(header_reads) == {"base": 1, "tuned": 1}


@pytest.mark.parametrize("to", ["merged", "adapter"])
def test_convert_augmented_reads_its_header_once(tmp_path, header_reads, to):
    lorasurgeon.merge(FIXTURES / "base", FIXTURES / "adapter", tmp_path / "aug", form="augmented")
    lorasurgeon.convert(tmp_path / "aug", tmp_path / "warm", to=to)
    header_reads.clear()
    lorasurgeon.convert(tmp_path / "aug", tmp_path / "out", to=to)
    assert dict(header_reads) == {"aug": 1}


def test_convert_model_dtype_reads_its_header_once(tmp_path, header_reads):
    base = FIXTURES / "base"
    lorasurgeon.convert(base, tmp_path / "warm", dtype="bfloat16")
    header_reads.clear()
    lorasurgeon.convert(base, tmp_path / "out", dtype="bfloat16")
    assert dict(header_reads) == {"base": 1}
