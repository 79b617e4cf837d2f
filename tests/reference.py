"""The references our results are checked against: transformers loading, PEFT's adapter model and merge."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

IDS = torch.tensor([[1, 5, 9, 3, 77, 120, 200, 4, 250, 17]])


def auto_class(folder: Path):
    import json

    from transformers import AutoModelForCausalLM, AutoModelForImageClassification

    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    return AutoModelForImageClassification if model_type == "resnet" else AutoModelForCausalLM


def load_model(folder: Path, dtype: torch.dtype | None = None):
    """transformers loading a folder the way a user would."""
    kwargs = {"dtype": dtype} if dtype is not None else {}
    return auto_class(folder).from_pretrained(folder, **kwargs).eval()


def peft_model(base: Path, adapters: list[Path], weights: list[float] | None = None, dtype=None):
    """PeftModel over a freshly loaded base with every adapter loaded and active (scaled by its weight)."""
    from peft import PeftModel

    names = [f"a{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(load_model(base, dtype), adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:], strict=True):
        model.load_adapter(path, adapter_name=name)
    if len(names) > 1:
        model.base_model.set_adapter(names)
    for name, w in zip(names, weights or [1.0] * len(names), strict=True):
        for module in model.modules():
            scaling = getattr(module, "scaling", None)
            if isinstance(scaling, dict) and name in scaling:
                scaling[name] *= w  # PEFT's own scale: the reference for --weight
    return model.eval(), names


def peft_merged_state(base: Path, adapters: list[Path], weights=None, dtype=None) -> dict[str, torch.Tensor]:
    model, names = peft_model(base, adapters, weights, dtype)
    merged = model.merge_and_unload(adapter_names=names)
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@torch.no_grad()
def logits(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    if (
        hasattr(model, "config")
        and getattr(model.config, "model_type", None) == "resnet"
        or (hasattr(model, "base_model") and getattr(getattr(model, "config", None), "model_type", None) == "resnet")
    ):
        g = torch.Generator().manual_seed(0)
        return model(pixel_values=torch.randn(2, 3, 32, 32, generator=g)).logits.float()
    return model(input_ids=ids).logits.float()
