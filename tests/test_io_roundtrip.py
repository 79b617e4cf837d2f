"""Reading and writing checkpoints: exact bytes against safetensors, every dtype, shards, .bin."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import listing, seeded
from safetensors.torch import load_file, save_file

from lorasurgeon.errors import OutputError, OutputExistsError
from lorasurgeon.io import CheckpointWriter, TensorSpec, open_checkpoint, plan_shards, shards_like
from lorasurgeon.io.dtypes import torch_dtypes


def all_dtype_tensors() -> dict[str, torch.Tensor]:
    """One tensor per dtype safetensors has in torch, plus 0-d and empty ones."""
    out = {}
    for i, (name, dtype) in enumerate(sorted(torch_dtypes().items())):
        raw = torch.randint(0, 256, (3, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        if dtype.itemsize == 1:
            out[f"t.{name}"] = raw.view(dtype)
        elif dtype == torch.bool:
            out[f"t.{name}"] = raw > 127
        else:  # reinterpret random bytes: covers every bit pattern family, NaNs included
            out[f"t.{name}"] = torch.randint(
                0, 256, (3, 5 * dtype.itemsize), dtype=torch.uint8, generator=torch.Generator().manual_seed(i)
            ).view(dtype)
    out["scalar.f32"] = torch.tensor(3.5)
    out["scalar.bf16"] = torch.tensor(-1.25, dtype=torch.bfloat16)
    out["empty.f32"] = torch.zeros(0, 4)
    out["empty.i64"] = torch.zeros(2, 0, dtype=torch.int64)
    return out


def write_all(out, tensors, **kwargs):
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    shards = plan_shards(specs, max_shard_size=kwargs.pop("max_shard_size", None))
    with CheckpointWriter(out, shards, **kwargs) as writer:
        for name in reversed(list(tensors)):  # any order: the header fixed every offset
            writer.write(name, tensors[name])
    return shards


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def test_single_file_is_byte_identical_to_save_file(tmp_path):
    tensors = all_dtype_tensors()
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    write_all(tmp_path / "ours", tensors)
    assert (tmp_path / "ours" / "model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert listing(tmp_path) == {"ref.safetensors", "ours", "ours/model.safetensors"}


def test_every_dtype_reads_back_bit_for_bit(tmp_path):
    tensors = all_dtype_tensors()
    save_file(tensors, tmp_path / "ref.safetensors")
    ckpt = open_checkpoint(tmp_path / "ref.safetensors")
    assert set(ckpt) == set(tensors)
    for name, t in tensors.items():
        info = ckpt.info(name)
        assert (info.dtype, info.shape) == (t.dtype, tuple(t.shape))
        assert same_bits(ckpt.read(name), t), name


def test_sharded_round_trip_and_index(tmp_path):
    tensors = {f"layer.{i}.weight": seeded((64, 64), torch.bfloat16, seed=i) for i in range(10)}
    shards = write_all(tmp_path / "out", tensors, max_shard_size=3 * 64 * 64 * 2)
    assert [s.filename for s in shards] == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 10 * 64 * 64 * 2
    assert set(index["weight_map"]) == set(tensors)
    ckpt = open_checkpoint(tmp_path / "out")
    assert ckpt.format == "safetensors-sharded" and len(ckpt.files) == 4
    for name, t in tensors.items():
        assert same_bits(ckpt.read(name), t)
        # safetensors itself reads what we wrote
        assert same_bits(load_file(tmp_path / "out" / index["weight_map"][name])[name], t)


def test_transformers_checkpoints_read_back(llama_dir, llama_sharded_dir):
    single, sharded = open_checkpoint(llama_dir), open_checkpoint(llama_sharded_dir)
    assert sharded.format == "safetensors-sharded" and len(sharded.files) > 1
    assert set(single) == set(sharded)
    ref = load_file(llama_dir / "model.safetensors")
    for name in single:
        assert same_bits(single.read(name), ref[name])
        assert same_bits(sharded.read(name), ref[name])


def test_keeping_a_layout_reproduces_transformers_shards(llama_sharded_dir, tmp_path):
    ckpt = open_checkpoint(llama_sharded_dir)
    weight_map = json.loads(ckpt.index_file.read_text())["weight_map"]
    specs = [TensorSpec(i.name, i.dtype, i.shape) for i in ckpt.infos()]
    shards = shards_like(specs, weight_map, fallback="extra.safetensors")
    with CheckpointWriter(tmp_path / "copy", shards, metadata={"format": "pt"}) as writer:
        for name in ckpt:
            writer.write(name, ckpt.read(name))
    for shard in shards:
        assert (tmp_path / "copy" / shard.filename).read_bytes() == (llama_sharded_dir / shard.filename).read_bytes()
    ours = json.loads((tmp_path / "copy" / "model.safetensors.index.json").read_text())
    theirs = json.loads(ckpt.index_file.read_text())
    assert ours["weight_map"] == theirs["weight_map"]
    assert ours["metadata"]["total_size"] == theirs["metadata"]["total_size"]


@pytest.mark.parametrize("sharded", [False, True])
def test_legacy_bin(tmp_path, sharded):
    tensors = {"a.weight": seeded((4, 3)), "b.bias": seeded((3,), torch.bfloat16), "c": torch.tensor(7)}
    folder = tmp_path / "bin"
    folder.mkdir()
    if sharded:
        torch.save({"a.weight": tensors["a.weight"]}, folder / "pytorch_model-00001-of-00002.bin")
        torch.save({"b.bias": tensors["b.bias"], "c": tensors["c"]}, folder / "pytorch_model-00002-of-00002.bin")
        weight_map = {
            "a.weight": "pytorch_model-00001-of-00002.bin",
            "b.bias": "pytorch_model-00002-of-00002.bin",
            "c": "pytorch_model-00002-of-00002.bin",
        }
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        torch.save(tensors, folder / "pytorch_model.bin")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with open_checkpoint(folder) as ckpt:
        assert ckpt.format == ("pytorch-bin-sharded" if sharded else "pytorch-bin")
        for name, t in tensors.items():
            got = ckpt.read(name)
            assert same_bits(got, t)
            got.add_(1)  # the caller owns the memory: the file must not change
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_reading_returns_private_memory(tmp_path):
    save_file({"w": torch.ones(8)}, tmp_path / "m.safetensors")
    before = (tmp_path / "m.safetensors").read_bytes()
    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    t = ckpt.read("w")
    t.mul_(3)
    assert torch.equal(ckpt.read("w"), torch.ones(8))
    assert (tmp_path / "m.safetensors").read_bytes() == before


CARD = "---\ntags:\n- lora\n- lorasurgeon\n---\n\n# a result\n"


def test_existing_output_is_refused_then_replaced_whole(tmp_path):
    out = tmp_path / "out"
    write_all(out, {"a": torch.zeros(2)})
    with pytest.raises(OutputExistsError):
        write_all(out, {"b": torch.ones(2)})
    assert set(load_file(out / "model.safetensors")) == {"a"}
    with pytest.raises(OutputError, match="no lorasurgeon model card"):  # not known to be ours
        write_all(out, {"b": torch.ones(2)}, overwrite=True)
    assert set(load_file(out / "model.safetensors")) == {"a"}
    (out / "README.md").write_text(CARD)  # what every command's result carries
    write_all(out, {"b": torch.ones(2)}, overwrite=True)
    assert set(load_file(out / "model.safetensors")) == {"b"}
    assert listing(tmp_path) == {"out", "out/model.safetensors"}


def test_failure_midway_leaves_nothing(tmp_path):
    tensors = {f"t{i}": torch.full((4,), float(i)) for i in range(4)}
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(tmp_path / "out", plan_shards(specs, max_shard_size=32)) as writer:
            writer.write("t0", tensors["t0"])
            raise RuntimeError("boom")
    assert listing(tmp_path) == set()


def test_wrong_tensor_is_refused(tmp_path):
    spec = [TensorSpec("a", torch.float32, (2, 2))]
    with CheckpointWriter(tmp_path / "out", plan_shards(spec, max_shard_size=None)) as writer:
        with pytest.raises(ValueError, match="planned"):
            writer.write("a", torch.zeros(2, 2, dtype=torch.float16))
        with pytest.raises(ValueError, match="not planned"):
            writer.write("b", torch.zeros(1))
        writer.abort()
    assert listing(tmp_path) == set()


def test_incomplete_write_is_not_committed(tmp_path):
    specs = [TensorSpec("a", torch.float32, (2,)), TensorSpec("b", torch.float32, (2,))]
    writer = CheckpointWriter(tmp_path / "out", plan_shards(specs, max_shard_size=None))
    writer.write("a", torch.zeros(2))
    with pytest.raises(RuntimeError, match="never written"):
        writer.commit()
    assert listing(tmp_path) == set()
