"""Sharding and sizes, as pure functions of numbers."""

import pytest
import torch

from lorasurgeon.io.layout import TensorSpec, human_bytes, in_file_order, parse_size, plan_shards, split_greedy


def test_split_greedy_fills_in_order():
    assert split_greedy([3, 3, 3, 1], int, 6) == [[3, 3], [3, 1]]


def test_split_greedy_gives_oversized_items_their_own_group():
    # huggingface_hub emits the oversized shard at once, before the one being filled
    assert split_greedy([2, 10, 2, 2], int, 5) == [[10], [2, 2], [2]]


def test_split_greedy_empty():
    assert split_greedy([], int, 5) == []


def test_plan_shards_names_like_hugging_face():
    specs = [TensorSpec(f"w{i}", torch.float32, (10,)) for i in range(5)]
    shards = plan_shards(specs, max_shard_size=80)
    assert [s.filename for s in shards] == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]
    assert plan_shards(specs, max_shard_size=None)[0].filename == "model.safetensors"
    assert plan_shards(specs, max_shard_size=10**9, prefix="adapter_model")[0].filename == "adapter_model.safetensors"


def test_in_file_order_is_by_dtype_then_name():
    specs = [
        TensorSpec("b", torch.float16, (1,)),
        TensorSpec("a", torch.float16, (1,)),
        TensorSpec("z", torch.float32, (1,)),
        TensorSpec("c", torch.bfloat16, (1,)),
    ]
    assert [s.name for s in in_file_order(specs)] == ["z", "c", "a", "b"]


@pytest.mark.parametrize(
    "text,value",
    [
        ("5GB", 5 * 10**9),
        ("500MB", 5 * 10**8),
        ("2GiB", 2 * 2**30),
        ("1.5kb", 1500),
        ("123", 123),
        (" 10 MiB ", 10 * 2**20),
        ("4G", 4 * 10**9),
    ],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "GB", "5XB", "-1GB", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_sizes_for_people():
    assert [human_bytes(n) for n in (0, 812, 1024, 1536, 212 * 1024, 48 * 2**20 + 2**19, 3.41 * 2**30, 2**60)] == [
        "0 B",
        "812 B",
        "1 KiB",
        "1.5 KiB",
        "212 KiB",
        "48.5 MiB",
        "3.41 GiB",
        "1024 PiB",
    ]
