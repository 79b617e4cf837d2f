"""The streaming executor: failures in any stage stop it cleanly, leave nothing, and never hang."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from lorasurgeon.errors import CorruptCheckpointError
from lorasurgeon.execute import run
from lorasurgeon.io import CheckpointWriter, open_checkpoint, plan_shards
from lorasurgeon.plan import Ref, TensorOp

from conftest import listing


def copy_ops(ckpt):
    return [TensorOp(i.name, Ref(0, i.name), i.dtype, i.shape, "copy") for i in ckpt.infos()]


def make(tmp_path, n=12):
    src = tmp_path / "src"
    src.mkdir()
    save_file({f"t{i:02d}": torch.full((256, 256), float(i)) for i in range(n)}, src / "model.safetensors")
    return open_checkpoint(src)


def test_streams_every_tensor_in_order(tmp_path):
    ckpt = make(tmp_path)
    ops = copy_ops(ckpt)
    seen = []

    class Count:
        def start(self, total):
            seen.append(total)

        def advance(self, n):
            seen.append(n)

        def finish(self):
            seen.append("done")

    with CheckpointWriter(tmp_path / "out", plan_shards([o.spec for o in ops], max_shard_size=None)) as w:
        stats = run(ops, [ckpt], w, progress=Count())
    assert stats.tensors == 12 and stats.bytes_written == 12 * 256 * 256 * 4
    assert seen[0] == stats.bytes_written and seen[-1] == "done" and sum(seen[1:-1]) == stats.bytes_written
    assert stats.infos == (None,) * 12
    out = open_checkpoint(tmp_path / "out")
    assert all(torch.equal(out.read(n), ckpt.read(n)) for n in ckpt)


def test_a_read_failure_midway_aborts_cleanly(tmp_path):
    ckpt = make(tmp_path)
    ops = copy_ops(ckpt)
    os.truncate(tmp_path / "src" / "model.safetensors", 200_000)  # the file changed after planning
    with pytest.raises(CorruptCheckpointError, match="truncated while reading"):
        with CheckpointWriter(tmp_path / "out", plan_shards([o.spec for o in ops], max_shard_size=None)) as w:
            run(ops, [ckpt], w)
    assert listing(tmp_path) == {"src", "src/model.safetensors"}


def test_a_write_failure_midway_aborts_cleanly(tmp_path):
    ckpt = make(tmp_path)
    ops = copy_ops(ckpt)

    class Failing(CheckpointWriter):
        def write(self, name, tensor):
            if name == "t05":
                raise OSError(28, "No space left on device")
            super().write(name, tensor)

    with pytest.raises(OSError, match="No space"):
        with Failing(tmp_path / "out", plan_shards([o.spec for o in ops], max_shard_size=None)) as w:
            run(ops, [ckpt], w)
    assert listing(tmp_path) == {"src", "src/model.safetensors"}
