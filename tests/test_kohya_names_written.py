"""The kohya files lorasurgeon writes name their modules as the tools that load them do (#26).

ComfyUI (and Forge, which took its loader) maps a LoRA's keys to a model's weights in ``comfy/lora.py``'s
``model_lora_keys_unet`` / ``model_lora_keys_clip``: ``lora_unet_`` + the original layout's name below
``diffusion_model.`` with every ``.`` written ``_``, for every model; for Flux also ``lora_transformer_`` + the
diffusers name (OneTrainer's spelling) and ``transformer.`` + the diffusers name; ``lora_te_`` / ``lora_te1_`` +
CLIP's ``text_model...`` names. A Flux module under diffusers' names written ``lora_unet_transformer_blocks_...``
is none of these: ComfyUI says "lora key not loaded" and leaves it out. So a kohya file resized or converted
against a diffusers Flux transformer is written in OneTrainer's spelling, and one resized against an original
single file in kohya's own ``lora_unet_`` + original names (before: refused); each merges back as the file it
came from. (A UNet's diffusers names below ``lora_unet_`` are kohya's SD names, which ComfyUI maps too.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import FIX_SD_LORA, FIX_SD_PIPELINE, run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file

pytest.importorskip("diffusers")

from diffusion_models import read_pipeline  # noqa: E402  (after the skip: it imports diffusers)
from flux_models import COMFY_PREFIX, kohya_flux_lora, read_transformer, tiny_flux, to_bfl  # noqa: E402
from test_diffusion_formats import as_single_file  # noqa: E402

TOL = 1e-6


def modules_of(lora: Path) -> set[str]:
    with safe_open(lora, "pt") as f:
        return {k.rpartition(".lora_down.weight")[0] for k in f.keys() if k.endswith(".lora_down.weight")}


def comfyui_unet_names(single_file_keys: set[str]) -> set[str]:
    """ComfyUI's generic rule: lora_unet_ + every weight's name below diffusion_model., '.' as '_'."""
    stems = {k.removesuffix(".weight") for k in single_file_keys if k.endswith(".weight")}
    below = {s.partition("diffusion_model.")[2] if "diffusion_model." in s else s for s in stems}
    return {"lora_unet_" + s.replace(".", "_") for s in below}


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux")
    transformer = tiny_flux(root)
    return {"transformer": transformer, "kohya": kohya_flux_lora(transformer, root / "k.safetensors", blocks_only=True)}


def test_flux_resized_against_a_diffusers_transformer_is_onetrainers_spelling(flux, tmp_path):
    out = tmp_path / "r.safetensors"
    done = run_cli("resize", flux["kohya"], "--base", flux["transformer"], "--rank", "4", "-o", out)
    assert done.exit_code == 0, done.output
    weights = read_transformer(flux["transformer"])
    comfy = {"lora_transformer_" + k.removesuffix(".weight").replace(".", "_") for k in weights}
    written = modules_of(out)
    assert written and written <= comfy, sorted(written - comfy)[:3]
    for lora, folder in ((flux["kohya"], "a"), (out, "b")):
        assert run_cli("merge", flux["transformer"], lora, "-o", tmp_path / folder).exit_code == 0
    want, got = read_transformer(tmp_path / "a"), read_transformer(tmp_path / "b")
    assert max(float((got[k] - want[k]).abs().max()) for k in want) <= TOL


@pytest.mark.parametrize("prefix", ["", COMFY_PREFIX])
def test_flux_resized_against_an_original_single_file_keeps_kohyas_names(flux, prefix, tmp_path):
    base = tmp_path / "flux1.safetensors"
    bfl = to_bfl(read_transformer(flux["transformer"]), flux["transformer"])
    save_file({prefix + k: v for k, v in bfl.items()}, base)
    out = tmp_path / "r.safetensors"
    done = run_cli("resize", flux["kohya"], "--base", base, "--rank", "4", "-o", out)
    assert done.exit_code == 0, done.output
    assert modules_of(out) == modules_of(flux["kohya"])  # sd-scripts' own names, which ComfyUI maps too
    assert modules_of(out) <= comfyui_unet_names(set(load_file(base)))
    for lora, name in ((flux["kohya"], "a.safetensors"), (out, "b.safetensors")):
        assert run_cli("merge", base, lora, "-o", tmp_path / name).exit_code == 0
    want, got = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert max(float((got[k] - want[k]).abs().max()) for k in want) <= TOL


def test_sd_resized_against_a_single_file_keeps_kohyas_names(tmp_path):
    """kohya's SD 1.x names are diffusers' below lora_unet_, which ComfyUI maps for every UNet
    (``unet_to_diffusers``): resized against a single file, the file keeps them."""
    base = tmp_path / "sd15.safetensors"
    save_file(as_single_file(read_pipeline(FIX_SD_PIPELINE), "sd15"), base)
    out = tmp_path / "r.safetensors"
    done = run_cli("resize", FIX_SD_LORA, "--base", base, "--rank", "4", "-o", out)
    assert done.exit_code == 0, done.output
    assert modules_of(out) == modules_of(FIX_SD_LORA)  # kohya's SD names (diffusers' below lora_unet_), kept
    for lora, name in ((FIX_SD_LORA, "a.safetensors"), (out, "b.safetensors")):
        assert run_cli("merge", base, lora, "-o", tmp_path / name).exit_code == 0
    want, got = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert max(float((got[k].double() - want[k].double()).abs().max()) for k in want) <= 1e-5
    original = load_file(base)
    assert any(not torch.equal(got[k], original[k]) for k in original if k.startswith("model.diffusion_model."))
