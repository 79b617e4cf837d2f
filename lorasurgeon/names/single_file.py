"""ModelNames of a single-file Stable Diffusion checkpoint (the "original" layout ComfyUI, A1111 and kohya's
scripts read): its tensors named as a diffusers pipeline names them in memory -- ``unet.down_blocks.0...``,
``text_encoder.text_model.encoder...`` -- against the file's own keys (``model.diffusion_model.input_blocks...``,
``cond_stage_model.transformer.text_model...``), so a LoRA in any format finds its modules in either layout
and a merge writes the file back under its own keys.

The UNet's map is ``ldm_unet`` (read off the keys, checked against diffusers' own single-file loader); a
CLIP-L text encoder is stored under transformers' names behind a prefix. SDXL's second text encoder
(OpenCLIP, q/k/v fused in ``in_proj_weight``) and the VAE keep their file names: no LoRA module is found
there by a pipeline name, so a LoRA on them is refused by name rather than merged on a guess.
"""

from __future__ import annotations

from collections.abc import Sequence

from .builtin import layers
from .ldm_unet import ldm_unet_map
from .model import ModelNames

UNET_PREFIX = "model.diffusion_model."
# the file's prefix of a CLIP text encoder held under transformers' names -> the pipeline component it is
CLIP_PREFIXES = (
    ("cond_stage_model.transformer.", "text_encoder"),  # SD 1.x
    ("conditioner.embedders.0.transformer.", "text_encoder"),  # SDXL's CLIP-L
)


def single_file_names(file_keys: Sequence[str]) -> ModelNames | None:
    """The names of a single-file SD 1.x / 2.x / SDXL checkpoint (None: the keys are not one)."""
    if not any(k.startswith(UNET_PREFIX) for k in file_keys):
        return None
    unet = ldm_unet_map(file_keys, prefix=UNET_PREFIX)
    if unet is None:
        return None
    file_of = {f"unet.{name}": key for name, key in unet.items()}
    for key in file_keys:
        if key.startswith(UNET_PREFIX):
            continue
        clip = next(((p, c) for p, c in CLIP_PREFIXES if key.startswith(p)), None)
        file_of[f"{clip[1]}.{key[len(clip[0]) :]}" if clip else key] = key
    return ModelNames(
        file_of,
        {},
        None,
        None,
        source="single-file Stable Diffusion (its UNet's original names read as diffusers')",
        layers=layers(file_of, None),
    )
