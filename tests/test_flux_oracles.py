"""The Flux.1 fixtures of flux_models.py checked against diffusers itself: the BFL single file is what diffusers'
``from_single_file`` reads back bit for bit, the kohya file has sd-scripts' keys and shapes, diffusers attaches a
LoRA layer to every module of it, and diffusers' fused weights are the by-hand merge on the BFL tensors cut back
with BFL_SPLITS / BFL_RENAMES / BFL_SWAPS (so the oracle and the tables are both right). The quirks of diffusers
0.42.1 that flux_models works around are pinned here too, so that a diffusers release that fixes them shows."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("diffusers")

import flux_models as fm  # noqa: E402  (after the skip: it imports diffusers)
from diffusers import FluxPipeline, FluxTransformer2DModel  # noqa: E402

RANK, ALPHA = 4, 8.0
WIDTH = 16  # 2 heads of 8
NON_BLOCK = {
    "x_embedder",
    "context_embedder",
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
    "time_text_embed.text_embedder.linear_1",
    "time_text_embed.text_embedder.linear_2",
    "time_text_embed.guidance_embedder.linear_1",
    "time_text_embed.guidance_embedder.linear_2",
    "proj_out",
    "norm_out.linear",
}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("flux")
    transformer = fm.tiny_flux(root)
    lora = fm.kohya_flux_lora(transformer, root / "kohya_flux.safetensors", rank=RANK, alpha=ALPHA, seed=0)
    return {
        "root": root,
        "transformer": transformer,
        "lora": lora,
        "base": fm.read_transformer(transformer),
        "reference": fm.fused_flux_reference(transformer, lora),
        "by_hand": fm.fused_by_hand(transformer, lora),
    }


def max_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert got.keys() == want.keys()
    return max((got[k].double() - want[k].double()).abs().max().item() for k in want)


def test_the_tiny_transformer_is_seeded_float32_and_has_no_zeros(made, tmp_path):
    base = made["base"]
    assert len(base) == 112
    assert all(v.dtype == torch.float32 and v.count_nonzero() == v.numel() for v in base.values())
    again = fm.read_transformer(fm.tiny_flux(tmp_path))
    assert all(torch.equal(again[k], v) for k, v in base.items())
    assert base["single_transformer_blocks.0.proj_mlp.weight"].shape == (fm.MLP_RATIO * WIDTH, WIDTH)


def test_the_tables_cover_every_linear_of_the_model(made):
    model = FluxTransformer2DModel.from_pretrained(made["transformer"], local_files_only=True)
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    modules = fm.bfl_modules(made["transformer"])
    targets = [name for parts in modules.values() for name, _ in parts]
    assert len(targets) == len(set(targets)) and set(targets) == linears
    bfl = fm.to_bfl(made["base"], made["transformer"])
    for module, parts in modules.items():
        assert bfl[module + ".weight"].shape[0] == sum(made["base"][f"{n}.weight"].shape[0] for n, _ in parts)
        if len(parts) > 1:  # a share is in units of the width
            assert all(made["base"][f"{n}.weight"].shape[0] == share * WIDTH for n, share in parts)


@pytest.mark.parametrize("prefix", ["", fm.COMFY_PREFIX])
def test_from_single_file_reads_the_bfl_file_back_bit_for_bit(made, prefix):
    file = fm.bfl_single_file(made["transformer"], made["root"] / f"bfl{len(prefix)}.safetensors", prefix)
    keys = load_file(str(file)).keys()
    assert all(k.startswith(prefix) for k in keys)
    for name in (
        "double_blocks.0.img_attn.qkv.weight",
        "double_blocks.1.txt_attn.norm.key_norm.scale",
        "single_blocks.1.linear1.bias",
        "single_blocks.0.modulation.lin.weight",
        "final_layer.adaLN_modulation.1.weight",
        "guidance_in.out_layer.bias",
        "img_in.weight",
    ):
        assert prefix + name in keys
    with fm.diffusers_sized_for(made["transformer"]):
        model = FluxTransformer2DModel.from_single_file(
            str(file), config=str(made["transformer"]), local_files_only=True, torch_dtype=torch.float32
        )
    got = model.state_dict()
    assert got.keys() == made["base"].keys()
    assert all(torch.equal(got[k], v) for k, v in made["base"].items())


def test_diffusers_flux_converters_assume_flux1_width(made):
    file = fm.bfl_single_file(made["transformer"], made["root"] / "bfl_plain.safetensors")
    with pytest.raises(RuntimeError, match="split_with_sizes"):
        FluxTransformer2DModel.from_single_file(str(file), config=str(made["transformer"]), local_files_only=True)
    with pytest.raises(AssertionError):
        FluxPipeline.lora_state_dict(str(made["lora"]))


def test_the_kohya_file_has_sd_scripts_keys(made):
    lora = load_file(str(made["lora"]))
    assert len(lora) == 3 * 36  # 2 x 10 double-block, 2 x 3 single-block, 10 other modules
    shapes = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (RANK, WIDTH),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": (3 * WIDTH, RANK),
        "lora_unet_double_blocks_1_txt_attn_qkv.lora_up.weight": (3 * WIDTH, RANK),
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": (WIDTH, RANK),
        "lora_unet_double_blocks_1_img_mlp_0.lora_up.weight": (4 * WIDTH, RANK),
        "lora_unet_double_blocks_1_txt_mlp_2.lora_down.weight": (RANK, 4 * WIDTH),
        "lora_unet_double_blocks_0_img_mod_lin.lora_up.weight": (6 * WIDTH, RANK),
        "lora_unet_double_blocks_0_txt_mod_lin.lora_up.weight": (6 * WIDTH, RANK),
        "lora_unet_single_blocks_1_linear1.lora_up.weight": (3 * WIDTH + 4 * WIDTH, RANK),
        "lora_unet_single_blocks_0_linear2.lora_down.weight": (RANK, WIDTH + 4 * WIDTH),
        "lora_unet_single_blocks_0_modulation_lin.lora_up.weight": (3 * WIDTH, RANK),
        "lora_unet_img_in.lora_down.weight": (RANK, 4),
        "lora_unet_time_in_in_layer.lora_down.weight": (RANK, 256),
        "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight": (2 * WIDTH, RANK),
    }
    for key, shape in shapes.items():
        assert tuple(lora[key].shape) == shape, key
    alpha = lora["lora_unet_double_blocks_0_img_attn_qkv.alpha"]
    assert alpha.dim() == 0 and alpha.dtype == torch.float32 and alpha.item() == ALPHA
    assert lora["lora_unet_final_layer_linear.alpha"].item() == RANK  # see flux_models' docstring
    for key, value in lora.items():
        assert key.startswith("lora_unet_") and key.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
        assert value.count_nonzero() == value.numel(), key


def test_diffusers_attaches_a_lora_layer_to_every_module_of_the_file(made):
    targets = fm.expected_lora_targets(made["transformer"], made["lora"])
    assert len(targets) == 50  # 36 modules: each qkv three, each linear1 four
    pipe = fm.load_flux_pipeline(made["transformer"])
    pipe.load_lora_weights(fm.diffusers_lora_state_dict(made["transformer"], made["lora"]))
    assert fm.lora_layers(pipe.transformer) == targets


def test_plain_load_lora_weights_silently_drops_the_modules_outside_the_blocks(made):
    targets = fm.expected_lora_targets(made["transformer"], made["lora"])
    assert fm.diffusers_attaches(made["transformer"], made["lora"]) == targets - NON_BLOCK


def test_a_blocks_only_file_loads_whole_the_plain_way(made):
    file = fm.kohya_flux_lora(made["transformer"], made["root"] / "blocks.safetensors", blocks_only=True)
    assert all(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in load_file(str(file)))
    targets = fm.expected_lora_targets(made["transformer"], file)
    assert len(targets) == 40 and fm.diffusers_attaches(made["transformer"], file) == targets


def test_diffusers_fuses_the_kohya_file_to_the_by_hand_merge(made):
    assert max_error(made["reference"], made["by_hand"]) < 1e-6


def test_exactly_the_targeted_weights_change_and_the_rest_is_bit_equal(made):
    targets = {f"{n}.weight" for n in fm.expected_lora_targets(made["transformer"], made["lora"])}
    base, reference, by_hand = made["base"], made["reference"], made["by_hand"]
    assert reference.keys() == base.keys()
    changed = {k for k in base if not torch.equal(reference[k], base[k])}
    assert changed == targets
    assert all(torch.equal(by_hand[k], base[k]) for k in base if k not in targets)
    assert min((reference[k] - base[k]).abs().max().item() for k in targets) > 1e-2


def test_the_scale_scales_the_change(made):
    half = fm.fused_flux_reference(made["transformer"], made["lora"], scale=0.5)
    assert max_error(half, fm.fused_by_hand(made["transformer"], made["lora"], scale=0.5)) < 1e-6


def test_diffusers_ignores_the_alpha_of_the_final_layer(made):
    odd = fm.kohya_flux_lora(made["transformer"], made["root"] / "odd.safetensors", seed=3, final_layer_alpha=2.0)
    same = fm.kohya_flux_lora(made["transformer"], made["root"] / "same.safetensors", seed=3)  # same factors
    reference = fm.fused_flux_reference(made["transformer"], odd)
    by_hand = fm.fused_by_hand(made["transformer"], odd)
    off = {k for k in reference if (reference[k] - by_hand[k]).abs().max() > 1e-6}
    assert off == {"proj_out.weight", "norm_out.linear.weight"}
    assert max_error(reference, fm.fused_by_hand(made["transformer"], same)) < 1e-6
