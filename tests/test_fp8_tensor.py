"""FP8 diffusion checkpoints (#26): a single file whose weights are float8 with no scale (ComfyUI's fp8_e4m3fn
files) or with one float32 ``scale_weight`` per tensor and a ``scaled_fp8`` marker (ComfyUI's scaled fp8). Read
dequantized as ComfyUI does (``float(q) · scale``); merged with the format kept (each changed value re-encoded
with the tensor's own scale, as a cast, unchanged bytes kept) or dequantized (--dtype)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import FIX_SD_LORA, FIX_SD_PIPELINE, run_cli
from safetensors.torch import load_file, save_file

from lorasurgeon.names.ldm_unet import ldm_unet_keys

PREFIX = "model.diffusion_model."


def fp8_single_file(out: Path, *, scaled: bool, dtype: torch.dtype = torch.float8_e4m3fn) -> Path:
    """The fixture pipeline's UNet and CLIP as one file, every UNet matrix float8 (scaled: over its own amax/448,
    the scale beside it as X.scale_weight, a scale_input and the scaled_fp8 marker, as ComfyUI writes them)."""
    unet = load_file(FIX_SD_PIPELINE / "unet" / "diffusion_pytorch_model.safetensors")
    names = ldm_unet_keys(unet)
    assert names is not None
    tensors: dict[str, torch.Tensor] = {}
    for name, w in unet.items():
        key = names[name]
        if w.dim() < 2:
            tensors[key] = w
            continue
        scale = (w.abs().max() / 448).reshape(()) if scaled else torch.ones(())
        tensors[key] = (w / scale).clamp(-448, 448).to(dtype)
        if scaled:
            tensors[key.removesuffix(".weight") + ".scale_weight"] = scale.to(torch.float32)
            tensors[key.removesuffix(".weight") + ".scale_input"] = torch.ones((), dtype=torch.float32)
    if scaled:
        tensors[PREFIX + "scaled_fp8"] = torch.zeros(0, dtype=dtype)
    clip = load_file(FIX_SD_PIPELINE / "text_encoder" / "model.safetensors")
    tensors |= {f"cond_stage_model.transformer.text_model.{k}": v for k, v in clip.items()}
    save_file(tensors, out)
    return out


def bytes_of(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def dequantized(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ComfyUI's reading: a float8 weight times its scale_weight (1 without), in float32."""
    out = {}
    for name, t in tensors.items():
        if name.endswith((".scale_weight", ".scale_input", "scaled_fp8")):
            continue
        scale = tensors.get(name.removesuffix(".weight") + ".scale_weight", torch.ones(()))
        out[name] = t.to(torch.float32) * scale.to(torch.float32) if t.dtype == torch.float8_e4m3fn else t.float()
    return out


@pytest.mark.parametrize("scaled", [False, True], ids=["fp8", "scaled-fp8"])
def test_merge_keeps_fp8_as_a_cast_of_the_exact_merge(tmp_path, scaled):
    base = fp8_single_file(tmp_path / "base.safetensors", scaled=scaled)
    exact, kept = tmp_path / "exact.safetensors", tmp_path / "kept.safetensors"
    done = run_cli("merge", base, FIX_SD_LORA, "--dtype", "float32", "-o", exact)
    assert done.exit_code == 0, done.output
    done = run_cli("merge", base, FIX_SD_LORA, "-o", kept)
    assert done.exit_code == 0, done.output
    b, e, k = load_file(base), load_file(exact), load_file(kept)
    assert k.keys() == b.keys() and e.keys() == set(dequantized(b))  # markers and activation scales: kept / dropped
    assert torch.allclose(e[PREFIX + "input_blocks.0.0.weight"], dequantized(b)[PREFIX + "input_blocks.0.0.weight"])
    changed = [n for n, w in dequantized(b).items() if not torch.equal(e[n], w)]
    assert sum(b[n].dtype == torch.float8_e4m3fn for n in changed) >= 40
    for name, stored in b.items():
        if name not in changed:  # every byte as it was
            assert k[name].dtype == stored.dtype and bytes_of(k[name]) == bytes_of(stored), name
            continue
        if stored.dtype != torch.float8_e4m3fn:  # the float32 text encoder: the exact merge
            assert torch.equal(k[name], e[name]), name
            continue
        scale = b.get(name.removesuffix(".weight") + ".scale_weight", torch.ones(()))
        want = (e[name] / scale).clamp(-448, 448).to(torch.float8_e4m3fn)  # the producer's cast, same scale
        assert torch.equal(k[name].view(torch.uint8), want.view(torch.uint8)), name


def test_dequantized_merge_is_w0_read_as_comfyui_plus_the_lora(tmp_path):
    """The float32 merge of the fp8 file minus its dequantized base is the same ΔW as the float32 pipeline's."""
    base = fp8_single_file(tmp_path / "base.safetensors", scaled=True)
    out = tmp_path / "exact.safetensors"
    assert run_cli("merge", base, FIX_SD_LORA, "--dtype", "float32", "-o", out).exit_code == 0
    merged_pipe = tmp_path / "pipe"
    assert run_cli("merge", FIX_SD_PIPELINE, FIX_SD_LORA, "--dtype", "float32", "-o", merged_pipe).exit_code == 0
    unet = load_file(FIX_SD_PIPELINE / "unet" / "diffusion_pytorch_model.safetensors")
    after = load_file(merged_pipe / "unet" / "diffusion_pytorch_model.safetensors")
    names = ldm_unet_keys(unet)
    assert names is not None
    got, w0 = load_file(out), dequantized(load_file(base))
    for name, key in names.items():
        want = after[name] - unet[name]
        assert torch.allclose(got[key] - w0[key], want, atol=1e-6), name


def test_inspect_names_the_fp8_format(tmp_path):
    done = run_cli("inspect", fp8_single_file(tmp_path / "base.safetensors", scaled=True))
    assert done.exit_code == 0, done.output
    assert "scaled F8_E4M3 (one scale per tensor)" in done.output and "not readable" not in done.output
