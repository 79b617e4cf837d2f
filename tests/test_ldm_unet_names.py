"""The single-file (LDM/SGM) names of a Stable Diffusion UNet (lorasurgeon.names.ldm_unet), against the
oracle: diffusers' own single-file loader. Tiny UNet2DConditionModels shaped as SD1.5, SDXL and a 4-level
SD1 are written under the names ``ldm_unet_keys`` gives, read back with ``from_single_file`` (and
``convert_ldm_unet_checkpoint``), and every tensor must come back under its own name."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("diffusers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from lorasurgeon.names.ldm_unet import ldm_unet_keys, ldm_unet_map  # noqa: E402

PREFIX = "model.diffusion_model."

CONFIGS = {
    "sd15": dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
        sample_size=16,
    ),
    "sdxl": dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,
        transformer_layers_per_block=(1, 2),
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        norm_num_groups=32,
        sample_size=16,
    ),
    "sd1_4level": dict(
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
        sample_size=16,
    ),
}


def tiny_unet(name: str) -> UNet2DConditionModel:
    """A tiny UNet whose every tensor holds its own random values (norms are not all ones, biases not all
    zeros), so that two tensors of one shape swapped by a wrong map cannot pass."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**CONFIGS[name])
    with torch.no_grad():
        for p in unet.parameters():
            p.copy_(torch.randn_like(p))
    return unet


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def written(request, tmp_path_factory):
    """(unet, its state dict, the map diffusers -> LDM, the single file, the config folder)."""
    unet = tiny_unet(request.param)
    state = unet.state_dict()
    names = ldm_unet_keys(state, prefix=PREFIX)
    assert names is not None
    folder = tmp_path_factory.mktemp(request.param)
    path = folder / "unet.safetensors"
    save_file({names[k]: v.contiguous() for k, v in state.items()}, str(path))
    unet.save_config(str(folder / "config"))
    return unet, state, names, path, folder / "config"


def test_from_single_file_reads_every_tensor_back(written):
    unet, state, _, path, config = written
    loaded = UNet2DConditionModel.from_single_file(str(path), config=str(config), local_files_only=True)
    back = loaded.state_dict()
    assert set(back) == set(state)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_convert_ldm_unet_checkpoint_gives_the_original_names(written):
    unet, state, _, path, _ = written
    converted = convert_ldm_unet_checkpoint(load_file(str(path)), dict(unet.config))
    assert set(converted) == set(state)
    assert all(torch.equal(converted[k], state[k]) for k in state)


def test_map_of_the_file_is_the_inverse_of_keys(written):
    _, state, names, path, _ = written
    file_keys = list(load_file(str(path)))
    assert ldm_unet_map(file_keys, prefix=PREFIX) == names
    # other components of a single file (text encoders, VAE) do not disturb the UNet's map
    others = ["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", "first_stage_model.x"]
    assert ldm_unet_map(file_keys + others, prefix=PREFIX) == names
    assert len(names) == len(state) and len(set(names.values())) == len(names)


def test_known_ldm_names(written):
    unet, _, names, _, _ = written
    assert names["conv_in.weight"] == PREFIX + "input_blocks.0.0.weight"
    assert names["time_embedding.linear_2.bias"] == PREFIX + "time_embed.2.bias"
    assert names["conv_out.weight"] == PREFIX + "out.2.weight"
    assert names["mid_block.resnets.1.conv2.weight"] == PREFIX + "middle_block.2.out_layers.3.weight"
    assert names["down_blocks.0.downsamplers.0.conv.weight"] == PREFIX + "input_blocks.3.0.op.weight"
    if unet.config.addition_embed_type == "text_time":
        assert names["add_embedding.linear_1.weight"] == PREFIX + "label_emb.0.0.weight"
    up_attention = unet.config.up_block_types[0].startswith("CrossAttn")
    assert (
        names["up_blocks.0.upsamplers.0.conv.weight"]
        == PREFIX + f"output_blocks.2.{2 if up_attention else 1}.conv.weight"
    )


def test_sd15_names():
    names = ldm_unet_keys(tiny_unet("sd15").state_dict())
    assert names is not None
    expect = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": (
            "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
        ),
        "down_blocks.0.resnets.0.conv1.weight": "input_blocks.1.0.in_layers.2.weight",
        "down_blocks.1.resnets.0.conv_shortcut.weight": "input_blocks.4.0.skip_connection.weight",
        "up_blocks.0.upsamplers.0.conv.weight": "output_blocks.2.1.conv.weight",
        "up_blocks.1.attentions.2.proj_out.weight": "output_blocks.5.1.proj_out.weight",
        "up_blocks.1.resnets.2.time_emb_proj.bias": "output_blocks.5.0.emb_layers.1.bias",
        "mid_block.attentions.0.norm.weight": "middle_block.1.norm.weight",
        "conv_norm_out.weight": "out.0.weight",
    }
    assert {k: names[k] for k in expect} == {k: PREFIX + v for k, v in expect.items()}


LLAMA = [
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
]


def test_not_a_unet():
    assert ldm_unet_map(LLAMA) is None
    assert ldm_unet_map(LLAMA, prefix="") is None
    assert ldm_unet_map(LLAMA, prefix="model.") is None
    assert ldm_unet_map([]) is None
    assert ldm_unet_keys(LLAMA) is None


def test_one_unknown_key_under_the_prefix(written):
    _, state, names, _, _ = written
    keys = list(names.values())
    for extra in ("lora_unet_x.weight", "input_blocks.1.0.in_layers.1.weight", "input_blocks.1.1.extra.weight"):
        assert ldm_unet_map(keys + [PREFIX + extra]) is None, extra
    # a missing downsampler or a stray output block: the levels no longer add up
    assert ldm_unet_map([k for k in keys if ".0.op." not in k]) is None
    assert ldm_unet_map(keys + [PREFIX + "output_blocks.99.0.in_layers.0.weight"]) is None
    last = max(int(k.split(".")[3]) for k in keys if ".output_blocks." in k)
    assert ldm_unet_map(keys + [PREFIX + f"output_blocks.{last}.2.conv.weight"]) is None  # no upsampler there
    assert ldm_unet_keys(list(state) + ["down_blocks.0.resnets.0.extra.weight"]) is None


# The real models' configs (names only: built on the meta device, no memory, no weights)
REAL = {
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8),
    "sd2": dict(
        block_out_channels=(320, 640, 1280, 1280),
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
    ),
    "sdxl": dict(
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
    "x4_upscaler": dict(
        block_out_channels=(256, 512, 512, 1024),
        in_channels=7,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
        cross_attention_dim=1024,
        attention_head_dim=8,
        use_linear_projection=True,
        num_class_embeds=1000,
    ),
}
REAL_NAMES = {
    "sd15": {"up_blocks.0.upsamplers.0.conv.weight": "output_blocks.2.1.conv.weight"},
    "sd2": {"down_blocks.2.downsamplers.0.conv.bias": "input_blocks.9.0.op.bias"},
    "sdxl": {
        "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.weight": (
            "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight"
        ),
        "up_blocks.0.upsamplers.0.conv.weight": "output_blocks.2.2.conv.weight",
        "up_blocks.1.upsamplers.0.conv.weight": "output_blocks.5.2.conv.weight",
        "add_embedding.linear_2.bias": "label_emb.0.2.bias",
    },
    "x4_upscaler": {"class_embedding.weight": "label_emb.weight"},
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_layouts_by_diffusers_own_conversion(name):
    """The full-size layouts: convert_ldm_unet_checkpoint reads every name back (the values here are the
    diffusers names themselves), and the map of the file is the inverse."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**REAL[name])
    state = unet.state_dict()
    names = ldm_unet_keys(state)
    assert names is not None
    converted = convert_ldm_unet_checkpoint({v: k for k, v in names.items()}, dict(unet.config))
    assert converted == {k: k for k in state}
    assert ldm_unet_map(names.values()) == names
    assert {k: names[k] for k in REAL_NAMES[name]} == {k: PREFIX + v for k, v in REAL_NAMES[name].items()}
