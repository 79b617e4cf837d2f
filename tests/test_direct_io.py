"""Shards written with O_DIRECT (io.direct) are the bytes safetensors writes, whatever the order tensors arrive
in, their sizes against the 4 KiB blocks, and bytes copied from input files; on a filesystem that refuses
O_DIRECT (tmpfs) the writer falls back to the page cache and writes the same bytes. A merge with every
result written directly equals one written through the page cache, byte for byte."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import FIX_ADAPTER, FIX_BASE, listing, run_cli
from safetensors.torch import save_file

import lorasurgeon.io.writer as writer_module
from lorasurgeon.errors import CorruptCheckpointError
from lorasurgeon.io import CheckpointWriter, TensorSpec, open_checkpoint, plan_shards
from lorasurgeon.io.direct import BLOCK, CHUNK

SHM = Path("/dev/shm")


def tensors_of(seed: int) -> dict[str, torch.Tensor]:
    """Sizes around the block and the copy chunk: smaller than a block, straddling one, exact multiples,
    and more than a chunk, in several dtypes."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [1, 7, BLOCK // 2 - 3, BLOCK // 2, BLOCK // 4 + 1, BLOCK, 3 * BLOCK // 2 + 5, CHUNK // 4 + 3, 100_000]
    rng = random.Random(seed)
    out = {}
    for i, n in enumerate(sizes):
        dtype = rng.choice([torch.bfloat16, torch.float32, torch.float16, torch.uint8, torch.int64])
        out[f"t{i:02d}"] = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=gen).view(dtype)
    return out


def write(out: Path, tensors: dict[str, torch.Tensor], order: list[str], *, direct, max_shard_size=None, copies=None):
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    shards = plan_shards(specs, max_shard_size=max_shard_size)
    with CheckpointWriter(out, shards, direct=direct) as w:
        for name in order:
            w.write(name, copies[name] if copies and name in copies else tensors[name])
        used = w.direct
    return used


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_direct_shards_are_the_bytes_safetensors_writes(tmp_path, seed):
    tensors = tensors_of(seed)
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    order = list(tensors)
    random.Random(seed).shuffle(order)  # any order: blocks shared by two tensors complete whenever both are in
    assert write(tmp_path / "ours", tensors, order, direct=True)  # ext4 takes O_DIRECT
    assert (tmp_path / "ours" / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert listing(tmp_path) == {"ref.safetensors", "ours", "ours/model.safetensors"}


def test_direct_sharded_and_copied_from_input_files(tmp_path):
    tensors = tensors_of(3)
    save_file(tensors, tmp_path / "in.safetensors")
    with open_checkpoint(tmp_path / "in.safetensors") as ckpt:
        copies = {n: ckpt.info(n).file_slice() for n in list(tensors)[::2]}  # half of them copied file to file
        order = list(reversed(list(tensors)))
        assert write(tmp_path / "direct", tensors, order, direct=True, max_shard_size=300_000, copies=copies)
        assert not write(tmp_path / "buffered", tensors, order, direct=False, max_shard_size=300_000, copies=copies)
    files = sorted(p.name for p in (tmp_path / "direct").iterdir())
    assert len(files) > 2 and files == sorted(p.name for p in (tmp_path / "buffered").iterdir())
    for name in files:
        assert (tmp_path / "direct" / name).read_bytes() == (tmp_path / "buffered" / name).read_bytes(), name


@pytest.fixture
def ramfs(tmp_path):
    """A ramfs mount, a filesystem that refuses O_DIRECT at open (tmpfs takes it since Linux 6.6); skipped
    where mounting is not allowed."""
    where = tmp_path / "ramfs"
    where.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "ramfs", "ramfs", str(where)], capture_output=True).returncode
    ):
        pytest.skip("cannot mount a ramfs here (needs root)")
    yield where
    subprocess.run(["umount", str(where)], check=True)


def test_where_o_direct_is_refused_the_writer_falls_back_to_the_page_cache(tmp_path, ramfs):
    tensors = tensors_of(4)
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    assert not write(ramfs / "ours", tensors, list(tensors), direct=True)  # asked for, refused: buffered
    assert (ramfs / "ours" / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()


@pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm (tmpfs) here")
def test_on_tmpfs_the_bytes_are_the_same(tmp_path):
    tensors = tensors_of(6)
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    out = Path(tempfile.mkdtemp(dir=SHM)) / "ours"
    try:
        write(out, tensors, list(reversed(list(tensors))), direct=True)  # O_DIRECT or not, as the kernel has it
        assert (out / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    finally:
        shutil.rmtree(out.parent)


def test_a_failure_while_writing_directly_leaves_nothing(tmp_path):
    tensors = tensors_of(5)
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with pytest.raises(RuntimeError):
        with CheckpointWriter(tmp_path / "out", plan_shards(specs, max_shard_size=None), direct=True) as w:
            w.write("t08", tensors["t08"])
            raise RuntimeError("stopped")
    assert listing(tmp_path) == set()
    with pytest.raises(CorruptCheckpointError):  # an input truncated while copied from: named, nothing left
        save_file(tensors, tmp_path / "in.safetensors")
        with open_checkpoint(tmp_path / "in.safetensors") as ckpt:
            piece = ckpt.info("t07").file_slice()
            with CheckpointWriter(tmp_path / "out", plan_shards(specs, max_shard_size=None), direct=True) as w:
                with open(tmp_path / "in.safetensors", "r+b") as fh:
                    fh.truncate(piece.offset + 10)
                w.write("t07", piece)
    assert listing(tmp_path) == {"in.safetensors"}


def test_a_merge_written_directly_is_the_merge_written_through_the_page_cache(tmp_path, monkeypatch):
    assert run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "buffered", "-q").exit_code == 0
    monkeypatch.setattr(writer_module, "DIRECT_MIN_BYTES", 0)  # the fixtures are small: write them directly too
    assert run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "direct", "-q").exit_code == 0
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "direct" / name).read_bytes() == (tmp_path / "buffered" / name).read_bytes()
