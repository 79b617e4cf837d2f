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


def input_moments(model, samples) -> dict[str, torch.Tensor]:
    """E[x xᵀ] (float64) of every Linear's (and GPT-2's Conv1D's) inputs over ``samples`` (each a (1, L) tensor of
    token ids): the model run whole, with forward hooks -- what calibration gathers layer by layer."""
    from transformers.pytorch_utils import Conv1D

    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook(name):
        def record(_m, args, _o):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            rows[name] = rows.get(name, 0) + x.shape[0]

        return record

    handles = [
        m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | Conv1D)
    ]
    try:
        with torch.no_grad():
            for x in samples:
                model(input_ids=x, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {k: sums[k] / rows[k] for k in sums}


def output_moments(model, samples, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The Fisher's output side, the model run whole with autograd: E[g gᵀ] (float64) of the loss gradient at every
    decoder-layer Linear's (Conv1D's) output, the loss the log-likelihood of a token drawn at every position from
    the model's own next-token distribution (one generator seeded ``seed``, the samples in turn); E[g gᵀ] at the
    embedding's output; and the head's Fisher diagonal E[p(1 − p)] -- what calibration gathers layer by layer."""
    from transformers.pytorch_utils import Conv1D

    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def add(name, g):
        g = g.reshape(-1, g.shape[-1]).double()
        sums[name] = sums.get(name, 0) + g.T @ g
        rows[name] = rows.get(name, 0) + g.shape[0]

    def hook(name):
        def record(_m, _args, out):
            out.register_hook(lambda g: add(name, g))

        return record

    layers = [n for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)][0]
    handles = [
        m.register_forward_hook(hook(n))
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear | Conv1D) and n.startswith(f"{layers}.")
    ]
    handles.append(model.get_input_embeddings().register_forward_hook(hook("@embedding")))
    model.requires_grad_(True)  # a merged PEFT model's weights come frozen
    gen = torch.Generator().manual_seed(seed)
    fisher, tokens = 0, 0
    try:
        for x in samples:
            logits = model(input_ids=x, use_cache=False).logits.float().reshape(-1, model.config.vocab_size)
            p = logits.detach().softmax(-1)
            drawn = torch.multinomial(p, 1, generator=gen)[:, 0]
            torch.nn.functional.cross_entropy(logits, drawn, reduction="sum").backward()
            fisher, tokens = fisher + (p * (1 - p)).sum(0, dtype=torch.float64), tokens + x.numel()
    finally:
        for handle in handles:
            handle.remove()
    embedding = sums.pop("@embedding") / rows.pop("@embedding")
    return {k: sums[k] / rows[k] for k in sums}, embedding, fisher / tokens
