"""Quantized checkpoints are recognised and refused by name by every command that computes on values,
and described by inspect: stored codes are never taken for weights (until they are supported)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import FIX_ADAPTER, FIX_BASE, listing, one_line_error, run_cli
from safetensors.torch import load_file, save_file

Q = "model.layers.0.self_attn.q_proj"  # a module the committed adapter targets


def fp8_block(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Block FP8 as DeepSeek-V3 and Qwen3-FP8 ship it: F8_E4M3 codes + a float32 scale per 128x128 tile."""
    amax = w.float().abs().amax().clamp_min(1e-12)
    scale = (amax / 448).reshape(1, 1)
    return {"weight": (w.float() / scale).clamp(-448, 448).to(torch.float8_e4m3fn), "weight_scale_inv": scale}


def nf4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """bitsandbytes 4-bit as transformers saves it (packed codes + absmax + quant_map + quant_state)."""
    n = w.numel()
    state = json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": list(w.shape)}).encode()
    return {
        "weight": torch.zeros((n + 1) // 2, 1, dtype=torch.uint8),
        "weight.absmax": torch.ones(-(-n // 64)),
        "weight.quant_map": torch.linspace(-1, 1, 16),
        "weight.quant_state.bitsandbytes__nf4": torch.tensor(list(state), dtype=torch.uint8),
    }


LAYOUTS = {
    # name: (tensors replacing Q's weight, quantization_config or None, the phrase the refusal names)
    "fp8 block": (fp8_block, {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}, "fp8"),
    "fp8 block, no config": (fp8_block, None, "block FP8"),
    "compressed-tensors int4": (
        lambda w: {
            "weight_packed": torch.zeros(w.shape[0], w.shape[1] // 8, dtype=torch.int32),
            "weight_scale": torch.ones(w.shape[0], w.shape[1] // 32, dtype=torch.bfloat16),
            "weight_shape": torch.tensor(list(w.shape), dtype=torch.int32),
        },
        {"quant_method": "compressed-tensors", "format": "pack-quantized"},
        "compressed-tensors",
    ),
    "compressed-tensors, no config": (
        lambda w: {
            "weight_packed": torch.zeros(w.shape[0], w.shape[1] // 8, dtype=torch.int32),
            "weight_scale": torch.ones(w.shape[0], 1, dtype=torch.bfloat16),
        },
        None,
        "pack-quantized",
    ),
    "bnb nf4": (
        nf4,
        {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
        "bitsandbytes",
    ),
    "bnb nf4, no config": (nf4, None, "bitsandbytes 4-bit"),
    "bnb int8, no config": (
        lambda w: {
            "weight": torch.zeros(w.shape, dtype=torch.int8),
            "SCB": torch.ones(w.shape[0]),
            "weight_format": torch.tensor(0, dtype=torch.uint8),
        },
        None,
        "LLM.int8",
    ),
    "gptq, no config": (
        lambda w: {
            "qweight": torch.zeros(w.shape[1] // 8, w.shape[0], dtype=torch.int32),
            "qzeros": torch.zeros(1, w.shape[0] // 8, dtype=torch.int32),
            "scales": torch.ones(1, w.shape[0], dtype=torch.float16),
        },
        None,
        "GPTQ",
    ),
    "int8 weight, no config": (lambda w: {"weight": torch.zeros(w.shape, dtype=torch.int8)}, None, "integer weights"),
    "float8 weight, no scale": (lambda w: {"weight": w.to(torch.float8_e5m2)}, None, "float8"),
    "config only": (lambda w: {"weight": w}, {"quant_method": "awq", "bits": 4}, "awq"),
}


def quantized_copy(root, layout: str):
    """The committed bf16 base with Q's weight in ``layout`` (and its quantization_config, if any)."""
    make, qconfig, _ = LAYOUTS[layout]
    out = shutil.copytree(FIX_BASE, root / layout.replace(" ", "_").replace(",", ""))
    tensors = load_file(out / "model.safetensors")
    w = tensors.pop(f"{Q}.weight")
    tensors.update({f"{Q}.{k}": v for k, v in make(w).items()})
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    if qconfig is not None:
        config = json.loads((out / "config.json").read_text())
        config["quantization_config"] = qconfig
        (out / "config.json").write_text(json.dumps(config))
    return out


def assert_refused(result, phrase: str, folder) -> None:
    one_line_error(result, "is quantized", phrase, str(folder.name))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_command_refuses_a_quantized_checkpoint_by_name(tmp_path, layout):
    q = quantized_copy(tmp_path, layout)
    phrase = LAYOUTS[layout][2]
    work = tmp_path / "out_parent"
    work.mkdir()
    for args in (
        ["merge", q, FIX_ADAPTER, "-o", work / "m"],
        ["unmerge", q, FIX_ADAPTER, "-o", work / "u"],
        ["merge", q, FIX_ADAPTER, "-o", work / "a", "--form", "augmented"],
        ["extract", q, FIX_BASE, "--rank", "2", "-o", work / "x"],
        ["extract", FIX_BASE, q, "--rank", "2", "-o", work / "y"],
        ["diff", FIX_BASE, q],
        ["diff", q, FIX_BASE],
        ["merge", q, FIX_ADAPTER, "-o", work / "d", "--dry-run"],
    ):
        assert_refused(run_cli(*args), phrase, q)
    assert listing(work) == set()


def test_inspect_names_the_quantization(tmp_path):
    q = quantized_copy(tmp_path, "fp8 block")
    doc = json.loads(run_cli("inspect", q, "--json").stdout)
    assert doc["quantization"] == {"method": "fp8", "evidence": "config.json quantization_config.quant_method = fp8"}
    table = run_cli("inspect", quantized_copy(tmp_path, "fp8 block, no config"))
    assert table.exit_code == 0
    assert f"quantized   block FP8 (DeepSeek-V3 / Qwen3-FP8 layout) (tensor {Q}.weight_scale_inv)" in table.stdout
    assert json.loads(run_cli("inspect", FIX_BASE, "--json").stdout)["quantization"] is None


def test_integer_buffers_that_are_not_weights_are_not_quantization(tmp_path):
    """BatchNorm's num_batches_tracked and BERT's position_ids are int64 in unquantized models."""
    folder = tmp_path / "plain"
    folder.mkdir()
    save_file(
        {
            "bn.num_batches_tracked": torch.tensor(3),
            "embeddings.position_ids": torch.arange(8)[None],
            "fc.weight": torch.ones(2, 2),
        },
        folder / "model.safetensors",
    )
    assert json.loads(run_cli("inspect", folder, "--json").stdout)["quantization"] is None
    assert run_cli("diff", folder, folder).exit_code == 0


@pytest.mark.parametrize("dtype", ["F4", "F6_E2M3", "F6_E3M2"])
def test_sub_byte_dtypes_are_named_as_quantized(tmp_path, dtype):
    raw = json.dumps({"w": {"dtype": dtype, "shape": [2, 2], "data_offsets": [0, 2]}}).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0\0")
    result = run_cli("inspect", path)
    assert result.exit_code == 2 and f"dtype {dtype}, a quantized format" in result.stderr, result.stderr
