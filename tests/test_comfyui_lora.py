"""ComfyUI's own LoRA files (#26): what its "Extract and Save Lora" node writes (comfy_extras/nodes_lora_extract.py,
``calc_lora_model``): ``diffusion_model.<original name>.lora_up.weight`` / ``.lora_down.weight`` and
``text_encoders.clip_l.transformer.<CLIP name>...``, float16, no alpha -- which ComfyUI's loader applies as
W + up·down (alpha None: a scale of 1; comfy/weight_adapter/lora.py). The file is built here by that rule from a
single-file SD 1.5 checkpoint's own keys; the oracle is that formula on the file's tensors. The same file merges
into the diffusers pipeline the single file was made from, and converts to kohya's keys, to the same weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import FIX_SD_PIPELINE, listing, one_line_error, run_cli
from safetensors.torch import load_file, save_file

pytest.importorskip("diffusers")

from diffusion_models import read_pipeline  # noqa: E402  (after the skip: it imports diffusers)
from test_diffusion_formats import as_single_file  # noqa: E402

UNET, CLIP = "model.diffusion_model.", "cond_stage_model.transformer."
TOL = 1e-6


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("comfy")
    base = root / "sd15.safetensors"
    save_file(as_single_file(read_pipeline(FIX_SD_PIPELINE), "sd15"), base)
    weights = load_file(base)
    g = torch.Generator().manual_seed(0)
    lora: dict[str, torch.Tensor] = {}
    for key, w in weights.items():
        linear_or_conv = key.endswith(".weight") and w.ndim in (2, 4) and "embedding" not in key
        if not (linear_or_conv and key.startswith((UNET, CLIP))):
            continue
        stem = key.removesuffix(".weight")
        name = "diffusion_model." + stem.removeprefix(UNET) if key.startswith(UNET) else (
            "text_encoders.clip_l.transformer." + stem.removeprefix(CLIP))  # fmt: skip
        rank = 2
        down = torch.randn(rank, *w.shape[1:], generator=g) * 0.1
        up = torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.1
        lora[f"{name}.lora_up.weight"], lora[f"{name}.lora_down.weight"] = up.half(), down.half()
    path = root / "comfy_lora.safetensors"
    save_file(lora, path)
    return {"base": base, "lora": path, "root": root}


def comfyui_merge(base: Path, lora: Path) -> dict[str, torch.Tensor]:
    """ComfyUI's formula: W + up·down in float32 (no alpha: scale 1), each LoRA on the weight its key names."""
    weights, factors = load_file(base), load_file(lora)
    out = dict(weights)
    for name, up in factors.items():
        if not name.endswith(".lora_up.weight"):
            continue
        stem = name.removesuffix(".lora_up.weight")
        down = factors[f"{stem}.lora_down.weight"].float()
        key = (UNET + stem.removeprefix("diffusion_model.") if stem.startswith("diffusion_model.")
               else CLIP + stem.removeprefix("text_encoders.clip_l.transformer.")) + ".weight"  # fmt: skip
        w = weights[key]
        delta = up.float().flatten(1) @ down.flatten(1)
        out[key] = (w.float() + delta.reshape(w.shape)).to(w.dtype)
    return out


def max_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert set(got) == set(want)
    return max(float((got[k].double() - want[k].double()).abs().max()) for k in want)


def test_merge_into_the_single_file_is_comfyuis_formula(files, tmp_path):
    out = tmp_path / "m.safetensors"
    done = run_cli("merge", files["base"], files["lora"], "-o", out)
    assert done.exit_code == 0, done.output
    want = comfyui_merge(files["base"], files["lora"])
    assert max_error(load_file(out), want) <= TOL
    assert sum(not torch.equal(want[k], v) for k, v in load_file(files["base"]).items()) > 20


def test_merge_into_the_diffusers_pipeline_is_the_same_weights(files, tmp_path):
    """The original names (diffusion_model.input_blocks...) found in a diffusers UNet (names.ldm_unet)."""
    out = tmp_path / "m"
    done = run_cli("merge", FIX_SD_PIPELINE, files["lora"], "-o", out)
    assert done.exit_code == 0, done.output
    got = as_single_file(read_pipeline(out), "sd15")
    assert max_error(got, comfyui_merge(files["base"], files["lora"])) <= TOL


def test_inspect_names_the_format_and_convert_to_kohya_merges_the_same(files, tmp_path):
    shown = run_cli("inspect", files["lora"])
    assert shown.exit_code == 0 and "comfyui" in shown.output, shown.output
    kohya = tmp_path / "k.safetensors"
    done = run_cli("convert", files["lora"], "--to", "kohya", "--base", FIX_SD_PIPELINE, "-o", kohya)
    assert done.exit_code == 0, done.output
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in load_file(kohya))
    assert run_cli("merge", files["base"], kohya, "-o", tmp_path / "m.safetensors").exit_code == 0
    want = comfyui_merge(files["base"], files["lora"])
    assert max_error(load_file(tmp_path / "m.safetensors"), want) <= TOL


def test_a_whole_weight_change_is_refused_by_name(files, tmp_path):
    lora = load_file(files["lora"])
    lora["diffusion_model.out.0.diff"] = torch.zeros(4, dtype=torch.float16)
    path = tmp_path / "diff.safetensors"
    save_file(lora, path)
    done = run_cli("merge", files["base"], path, "-o", tmp_path / "m.safetensors")
    one_line_error(done, "diffusion_model.out.0.diff", "a whole weight change (.diff)")
    assert listing(tmp_path) == {"diff.safetensors"}


def test_without_a_base_it_asks_for_one(files, tmp_path):
    done = run_cli("resize", files["lora"], "--rank", "1", "-o", tmp_path / "r.safetensors")
    one_line_error(done, "--base BASE")
    assert listing(tmp_path) == set()


def test_a_text_encoder_no_component_stands_for_is_refused_by_its_comfyui_name(files, tmp_path):
    lora = load_file(files["lora"])
    lora["text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_down.weight"] = torch.zeros(2, 4)
    lora["text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q.lora_up.weight"] = torch.zeros(4, 2)
    path = tmp_path / "t5.safetensors"
    save_file(lora, path)
    done = run_cli("merge", files["base"], path, "-o", tmp_path / "m.safetensors")
    one_line_error(done, "text_encoders.t5xxl")
    assert listing(tmp_path) == {"t5.safetensors"}
