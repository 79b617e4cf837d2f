"""What the LyCORIS tests share: a tiny seeded diffusers UNet saved as a lone UNet folder (kohya's lora_unet_
modules map onto it), the kohya name of its modules, and LyCORIS modules randomized so that no factor is zero."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

WEIGHTS = "diffusion_pytorch_model.safetensors"


def kohya(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
        sample_size=16,
    ).eval()


def lone_unet(root: Path) -> tuple[Path, torch.nn.Module, dict[str, torch.Tensor]]:
    """The tiny UNet saved as ``root/unet``, the model, and its saved tensors."""
    model = tiny_unet()
    folder = root / "unet"
    model.save_pretrained(folder)
    return folder, model, load_file(folder / WEIGHTS)


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter of a LyCORIS module seeded, non-zero, ~0.1 (LyCORIS zero-inits one factor)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_((torch.randn(p.shape, generator=g) * 0.1 + 0.05).to(p.dtype))
