"""Hostile or broken files: every failure is a LorasurgeonError, never another exception, a hang or a huge allocation.

Property-based (hypothesis): headers, index files, adapter configs and pickles are generated or
mutated, then opened and read in full the way every command does.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_bytes

from lorasurgeon import verify
from lorasurgeon.adapter.weights import load_adapter
from lorasurgeon.errors import LorasurgeonError
from lorasurgeon.io import open_checkpoint

SETTINGS = settings(max_examples=150, deadline=2000, suppress_health_check=list(HealthCheck), derandomize=True)
VALID = save_bytes(
    {
        "a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
        "b": torch.ones(5, dtype=torch.bfloat16),
        "c": torch.tensor(7),
    },
    metadata={"format": "pt"},
)


def mutate(original: bytes, cuts, truncate) -> bytes:
    """``original`` with junk written over it at the given places, then cut short (or not)."""
    data = bytearray(original)
    for pos, junk in cuts:
        data[pos : pos + len(junk)] = junk
    return bytes(data if truncate is None else data[:truncate])


def open_and_read_all(path) -> None:
    """What commands do with an input: open from headers, read every tensor, verify."""
    try:
        with open_checkpoint(path) as ckpt:
            for name in ckpt:
                ckpt.read(name)
        verify(path)
    except LorasurgeonError:
        pass


numbers = st.one_of(
    st.integers(-(2**70), 2**70),
    st.integers(-3, 64),
    st.floats(allow_nan=True),
    st.booleans(),
    st.none(),
    st.text(max_size=4),
)
entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.one_of(st.sampled_from(["F32", "BF16", "I64", "U8", "F8_E4M3", "BOOL", "F4", "X"]), numbers),
        "shape": st.one_of(st.lists(st.one_of(st.integers(-2, 2**40), numbers), max_size=4), numbers),
        "data_offsets": st.one_of(st.lists(st.one_of(st.integers(-10, 2**45), numbers), max_size=3), numbers),
    },
)
headers = st.dictionaries(
    st.text(max_size=8),
    st.one_of(entry, numbers, st.dictionaries(st.text(max_size=3), st.text(max_size=3))),
    max_size=5,
)


@SETTINGS
@given(header=headers, data=st.binary(max_size=256), length_delta=st.integers(-20, 20))
def test_generated_headers(tmp_path_factory, header, data, length_delta):
    raw = json.dumps(header).encode()
    path = tmp_path_factory.mktemp("h") / "model.safetensors"
    path.write_bytes(struct.pack("<Q", max(0, len(raw) + length_delta)) + raw + data)
    open_and_read_all(path)


@SETTINGS
@given(
    cuts=st.lists(st.tuples(st.integers(0, len(VALID)), st.binary(min_size=0, max_size=8)), min_size=1, max_size=6),
    truncate=st.one_of(st.none(), st.integers(0, len(VALID))),
)
def test_mutated_safetensors_bytes(tmp_path_factory, cuts, truncate):
    path = tmp_path_factory.mktemp("m") / "model.safetensors"
    path.write_bytes(mutate(VALID, cuts, truncate))
    open_and_read_all(path)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=12,
)


@SETTINGS
@given(
    index=st.one_of(
        json_values,
        st.fixed_dictionaries(
            {
                "weight_map": st.dictionaries(
                    st.sampled_from(["a.weight", "b", "c", "zz"]),
                    st.sampled_from(
                        [
                            "model-00001-of-00002.safetensors",
                            "model-00002-of-00002.safetensors",
                            "../x.safetensors",
                            "/etc/passwd",
                            "config.json",
                            "model.safetensors.index.json",
                            "",
                            ".",
                        ]
                    ),
                )
            },
            optional={"metadata": json_values},
        ),
    )
)
def test_generated_index_files(tmp_path_factory, index):
    folder = tmp_path_factory.mktemp("idx")
    (folder / "model-00001-of-00002.safetensors").write_bytes(VALID)
    (folder / "model-00002-of-00002.safetensors").write_bytes(VALID[:40])
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    open_and_read_all(folder)


ADAPTER = save_bytes(
    {
        "base_model.model.x.lora_A.weight": torch.ones(2, 4),
        "base_model.model.x.lora_B.weight": torch.ones(3, 2),
        "base_model.model.e.lora_embedding_A": torch.ones(2, 5),
        "base_model.model.e.lora_embedding_B": torch.ones(4, 2),
    }
)
config_fields = st.fixed_dictionaries(
    {},
    optional={
        k: json_values
        for k in (
            "r",
            "lora_alpha",
            "target_modules",
            "rank_pattern",
            "alpha_pattern",
            "use_rslora",
            "use_dora",
            "layers_to_transform",
            "modules_to_save",
            "trainable_token_indices",
            "bias",
            "lora_bias",
            "peft_type",
            "init_lora_weights",
            "exclude_modules",
        )
    },
)
patterns = st.dictionaries(st.sampled_from(["x", "(", "[", "e$", "*", "x|e", "\\"]), st.integers(-2, 9), max_size=3)


@SETTINGS
@given(config=st.one_of(config_fields, json_values), rank_pattern=patterns, alpha_pattern=patterns)
def test_generated_adapter_configs(tmp_path_factory, config, rank_pattern, alpha_pattern):
    folder = tmp_path_factory.mktemp("ad")
    (folder / "adapter_model.safetensors").write_bytes(ADAPTER)
    if isinstance(config, dict):
        config = {**config, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    try:
        load_adapter(folder).close()
    except LorasurgeonError:
        pass


def torch_zip(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


PICKLE = torch_zip({"w": torch.ones(3, 3), "b": torch.arange(4)})


@SETTINGS
@given(
    cuts=st.lists(st.tuples(st.integers(0, len(PICKLE)), st.binary(min_size=1, max_size=6)), min_size=1, max_size=4),
    truncate=st.one_of(st.none(), st.integers(0, len(PICKLE))),
)
def test_mutated_pickles(tmp_path_factory, cuts, truncate):
    path = tmp_path_factory.mktemp("p") / "pytorch_model.bin"
    path.write_bytes(mutate(PICKLE, cuts, truncate))
    open_and_read_all(path)


@pytest.mark.parametrize(
    "payload", [["not", "a", "dict"], {"w": "a string"}, {1: torch.ones(1)}, {"w": {"nested": torch.ones(1)}}]
)
def test_pickles_of_the_wrong_shape(tmp_path, payload):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(torch_zip(payload))
    with pytest.raises(LorasurgeonError):
        open_checkpoint(path)


def test_a_zip_that_is_not_a_torch_file(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    with pytest.raises(LorasurgeonError):
        open_checkpoint(path)
