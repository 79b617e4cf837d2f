"""ModelNames of a single-file Stable Diffusion checkpoint (the "original" layout ComfyUI, A1111 and kohya's
scripts read): its tensors named as a diffusers pipeline names them in memory -- ``unet.down_blocks.0...``,
``text_encoder.text_model.encoder...`` -- against the file's own keys (``model.diffusion_model.input_blocks...``,
``cond_stage_model.transformer.text_model...``), so a LoRA in any format finds its modules in either layout
and a merge writes the file back under its own keys.

The UNet's map is ``ldm_unet`` (read off the keys, checked against diffusers' own single-file loader); a
CLIP-L text encoder is stored under transformers' names behind a prefix; an OpenCLIP one (SDXL's second,
SD 2.x's) under its own, renamed as diffusers' ``convert_open_clip_checkpoint`` does, its q/k/v fused in
``in_proj_weight`` (``ModelNames.row_blocks``: a LoRA on q_proj changes its block of rows). The VAE and what
no map covers keep their file names: a LoRA on them finds no module by a pipeline name and is refused by name.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .builtin import layers
from .ldm_unet import ldm_unet_map
from .model import ModelNames

UNET_PREFIX = "model.diffusion_model."
# what a quantized single file holds beside the UNet's tensors (formats.fp8_tensor): under their own names
QUANT_SIDE = (".scale_weight", ".scale_input", "scaled_fp8")
# the file's prefix of a CLIP text encoder held under transformers' names -> the pipeline component it is
CLIP_PREFIXES = (
    ("cond_stage_model.transformer.", "text_encoder"),  # SD 1.x
    ("conditioner.embedders.0.transformer.", "text_encoder"),  # SDXL's CLIP-L
)
# the file's prefix of an OpenCLIP text encoder (its layers under transformer.resblocks.N.) -> its component
OPENCLIP_PREFIXES = (
    ("conditioner.embedders.1.model.", "text_encoder_2"),  # SDXL's OpenCLIP bigG
    ("cond_stage_model.model.", "text_encoder"),  # SD 2.x's OpenCLIP H
)
OPENCLIP_LAYER = re.compile(r"^resblocks\.(\d+)\.(.+)$")
# OpenCLIP's names in a layer -> transformers' CLIP names (diffusers' DIFFUSERS_TO_LDM_MAPPING["openclip"])
OPENCLIP_RENAMES = (("attn.", "self_attn."), ("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."),
                    ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."))  # fmt: skip
OPENCLIP_FUSED = re.compile(r"^(.*\.self_attn\.)in_proj_(weight|bias)$")


def single_file_names(file_keys: Sequence[str]) -> ModelNames | None:
    """The names of a single-file SD 1.x / 2.x / SDXL checkpoint (None: the keys are not one)."""
    if not any(k.startswith(UNET_PREFIX) for k in file_keys):
        return None
    unet = ldm_unet_map([k for k in file_keys if not k.endswith(QUANT_SIDE)], prefix=UNET_PREFIX)
    if unet is None:
        return None
    file_of = {f"unet.{name}": key for name, key in unet.items()}
    blocks: dict[str, tuple[str, int, int, int]] = {}
    for key in file_keys:
        if key.startswith(UNET_PREFIX) and not key.endswith(QUANT_SIDE):
            continue
        clip = next(((p, c) for p, c in CLIP_PREFIXES if key.startswith(p)), None)
        openclip = next(((p, c) for p, c in OPENCLIP_PREFIXES if key.startswith(p + "transformer.")), None)
        if clip is not None:
            file_of[f"{clip[1]}.{key[len(clip[0]) :]}"] = key
        elif openclip is not None:
            _openclip(key, openclip, file_of, blocks)
        else:
            file_of[key] = key
    return ModelNames(
        file_of,
        {},
        None,
        None,
        source="single-file Stable Diffusion (its UNet's and OpenCLIP's original names read as diffusers')",
        layers=layers([*file_of, *blocks], None),
        row_blocks=blocks,
    )


def _openclip(
    key: str,
    where: tuple[str, str],
    file_of: dict[str, str],
    blocks: dict[str, tuple[str, int, int, int]],
) -> None:
    """One OpenCLIP text-encoder tensor (``<prefix>transformer.resblocks.N...``) under transformers' CLIP name:
    renamed (diffusers' DIFFUSERS_TO_LDM_MAPPING["openclip"]), or, for in_proj_weight / in_proj_bias, three
    blocks of rows, q, k and v (convert_open_clip_checkpoint)."""
    prefix, component = where
    inner = key[len(prefix) + len("transformer.") :]
    layer = OPENCLIP_LAYER.match(inner)
    if layer is None:
        file_of[key] = key  # not a layer's tensor: left under its own name (no LoRA targets it)
        return
    rest = layer[2]
    for old, new in OPENCLIP_RENAMES:
        rest = rest.replace(old, new)
    name = f"{component}.text_model.encoder.layers.{layer[1]}.{rest}"
    fused = OPENCLIP_FUSED.match(name)
    if fused is None:
        file_of[name] = key
        return
    for n, part in enumerate(("q_proj", "k_proj", "v_proj")):
        blocks[f"{fused[1]}{part}.{fused[2]}"] = (key, n, n + 1, 3)
