"""Flux.1 LoRAs (#26): kohya's Flux files name Black Forest Labs' original modules (``double_blocks_0_img_attn_qkv``,
``single_blocks_0_linear1``), which fuse what diffusers keeps apart. Merged into a diffusers transformer folder
(each fused pair split: lora_down shared, lora_up's rows shared out) and into an original-layout single file (as
BFL ships it, and as ComfyUI saves it with ``model.diffusion_model.``); a diffusers-keyed Flux LoRA into the
single file (each part added to its rows of the fused tensor). The oracle is diffusers' own kohya-Flux loader and
fuse_lora (tests/flux_models.py, which proves it against the kohya formula)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import listing, one_line_error, run_cli
from safetensors.torch import load_file, save_file

pytest.importorskip("diffusers")

from flux_models import (  # noqa: E402  (after the skip: it imports diffusers)
    COMFY_PREFIX,
    fused_flux_reference,
    kohya_flux_lora,
    read_transformer,
    tiny_flux,
    to_bfl,
)

TOL = 1e-6


@pytest.fixture(scope="module")
def flux(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux")
    transformer = tiny_flux(root)
    lora = kohya_flux_lora(transformer, root / "kohya.safetensors", blocks_only=True)
    return {"root": root, "transformer": transformer, "kohya": lora}


@pytest.fixture(scope="module")
def reference(flux: dict[str, Path]) -> dict[str, torch.Tensor]:
    return fused_flux_reference(flux["transformer"], flux["kohya"])


def max_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:4]
    return max((got[k].float() - want[k].float()).abs().max().item() for k in want)


def test_kohya_flux_into_a_diffusers_transformer_splits_the_fused_modules(flux, reference, tmp_path):
    out = tmp_path / "merged"
    done = run_cli("merge", flux["transformer"], flux["kohya"], "-o", out)
    assert done.exit_code == 0, done.output
    assert max_error(read_transformer(out), reference) <= TOL


@pytest.mark.parametrize("prefix", ["", COMFY_PREFIX])
def test_kohya_flux_into_an_original_single_file(flux, reference, prefix, tmp_path):
    base = tmp_path / "flux1.safetensors"
    save_file(
        {prefix + k: v for k, v in to_bfl(read_transformer(flux["transformer"]), flux["transformer"]).items()}, base
    )
    out = tmp_path / "merged.safetensors"
    done = run_cli("merge", base, flux["kohya"], "-o", out)
    assert done.exit_code == 0, done.output
    want = {prefix + k: v for k, v in to_bfl(reference, flux["transformer"]).items()}
    assert max_error(load_file(out), want) <= TOL


def test_a_diffusers_flux_lora_lands_in_the_fused_rows_of_a_single_file(flux, reference, tmp_path):
    """kohya -> diffusers against the diffusers transformer (to_q, to_k, to_v: the fused pair split), then merged
    into the original single file: each part added to its block of qkv's / linear1's rows."""
    as_diffusers = tmp_path / "d"
    done = run_cli("convert", flux["kohya"], "--to", "diffusers", "--base", flux["transformer"], "-o", as_diffusers)
    assert done.exit_code == 0, done.output
    keys = load_file(as_diffusers / "pytorch_lora_weights.safetensors")
    assert any(".attn.to_q.lora_A.weight" in k for k in keys) and any(".proj_mlp.lora_B.weight" in k for k in keys)
    base = tmp_path / "flux1.safetensors"
    original = to_bfl(read_transformer(flux["transformer"]), flux["transformer"])
    save_file({COMFY_PREFIX + k: v for k, v in original.items()}, base)
    out = tmp_path / "merged.safetensors"
    done = run_cli("merge", base, as_diffusers, "-o", out)
    assert done.exit_code == 0, done.output
    want = {COMFY_PREFIX + k: v for k, v in to_bfl(reference, flux["transformer"]).items()}
    assert max_error(load_file(out), want) <= TOL


def test_inspect_says_flux(flux):
    done = run_cli("inspect", flux["kohya"])
    assert done.exit_code == 0 and "for Flux.1" in done.output, done.output


def test_the_final_layers_swapped_halves_are_refused_by_name(flux, tmp_path):
    """final_layer.adaLN_modulation.1 is diffusers' norm_out.linear with its two halves of rows swapped: a LoRA on it
    is not split onto a diffusers base yet -- refused naming it, nothing written."""
    full = kohya_flux_lora(flux["transformer"], tmp_path / "full.safetensors")
    done = run_cli("merge", flux["transformer"], full, "-o", tmp_path / "m")
    one_line_error(done, "final_layer_adaLN_modulation_1", "halves of rows swapped")
    assert listing(tmp_path) == {"full.safetensors"}
    tensors = load_file(full)
    assert any(k.startswith("lora_unet_final_layer_adaLN_modulation_1") for k in tensors)
