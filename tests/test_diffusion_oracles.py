"""The oracles of the diffusion tests (tests/diffusion_models.py) checked against themselves and against kohya's
merge formula: the pipelines are deterministic, the LoRA files hold the keys kohya and diffusers write, and
diffusers' load_lora_weights + fuse_lora changes exactly the targeted weights, by W + scale·(alpha/r)·up@down."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

pytest.importorskip("diffusers")

from diffusion_models import (  # noqa: E402  (after the skip: it imports diffusers)
    FAMILIES,
    TEXT_TARGETS,
    UNET_CONV_TARGETS,
    UNET_TARGETS,
    diffusers_lora,
    fused_reference,
    kohya_lora,
    lora_metadata,
    read_pipeline,
    text_encoders,
    tiny_pipeline,
)

RANK, ALPHA = 4, 8.0  # alpha != rank, so a dropped alpha shows
TOL = 1e-6


@pytest.fixture(scope="module", params=FAMILIES)
def made(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    family = request.param
    root = tmp_path_factory.mktemp(f"oracle-{family}")
    pipeline = tiny_pipeline(root, family)
    lora = diffusers_lora(pipeline, root / "diffusers-lora", rank=RANK, alpha=ALPHA)
    kohya = kohya_lora(lora, root / "kohya.safetensors", family)
    return {
        "family": family,
        "root": root,
        "pipeline": pipeline,
        "diffusers": lora,
        "kohya": kohya,
        "base": read_pipeline(pipeline),
        "reference": fused_reference(pipeline, lora, family),
    }


def targeted(names: set[str], family: str) -> set[str]:
    """The weights the LoRA must touch, by PEFT's own rule (a target names the module path's last parts)."""
    targets = {"unet": UNET_TARGETS + UNET_CONV_TARGETS} | {c: TEXT_TARGETS for c in text_encoders(family)}
    out = set()
    for name in names:
        component, _, rest = name.partition(".")
        module = rest.removesuffix(".weight")
        hit = any(module == t or module.endswith("." + t) for t in targets.get(component, ()))
        if hit and rest.endswith(".weight"):
            out.add(name)
    return out


def kohya_merge(base: dict[str, torch.Tensor], kohya: dict[str, torch.Tensor], family: str, scale: float = 1.0):
    """sd-scripts networks/merge_lora.py merge_to_sd_model, by hand: W + ratio·(alpha/dim)·up@down; 1x1 convs on
    the squeezed factors, 3x3 convs as conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)."""
    prefixes = {"unet": "lora_unet_"}
    if family == "sd15":
        prefixes["text_encoder"] = "lora_te_"
    else:
        prefixes |= {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    by_kohya = {}  # kohya module name -> pipeline tensor name
    for name in base:
        component, _, rest = name.partition(".")
        if component in prefixes and rest.endswith(".weight"):
            if component != "unet" and not rest.startswith("text_model."):
                rest = "text_model." + rest  # transformers 5's CLIPTextModel has no text_model. level; kohya's names do
            by_kohya[prefixes[component] + rest.removesuffix(".weight").replace(".", "_")] = name
    merged = {}
    for key, down in kohya.items():
        if not key.endswith(".lora_down.weight"):
            continue
        module = key.removesuffix(".lora_down.weight")
        up, down = kohya[module + ".lora_up.weight"].float(), down.float()
        alpha = float(kohya.get(module + ".alpha", down.shape[0]))
        name = by_kohya[module]
        weight = base[name]
        if weight.dim() == 2:
            delta = up @ down
        elif down.shape[2:4] == (1, 1):
            delta = (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
        else:
            delta = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        merged[name] = weight + scale * (alpha / down.shape[0]) * delta
    return merged


def max_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:4]
    return max((got[k] - want[k]).abs().max().item() for k in want)


def test_the_pipeline_folder_is_diffusers_and_the_same_bytes_every_time(made, tmp_path):
    folder = made["pipeline"]
    parts = {"unet", "vae", "scheduler", *text_encoders(made["family"])}
    assert {p.name for p in folder.iterdir() if p.is_dir()} == parts
    assert (folder / "model_index.json").is_file()
    again = tiny_pipeline(tmp_path, made["family"])
    files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((folder / f).read_bytes() == (again / f).read_bytes() for f in files)
    base = made["base"]
    assert all(t.dtype == torch.float32 and t.any() for t in base.values())  # nothing left at zero


def test_the_fused_reference_changes_exactly_the_targeted_weights(made):
    base, reference, family = made["base"], made["reference"], made["family"]
    components = ("unet", *text_encoders(family))
    assert set(reference) == {k for k in base if k.split(".")[0] in components}  # the files' own names
    changed = {k for k in reference if not torch.equal(reference[k], base[k])}
    assert changed == targeted(set(reference), family)
    modules = {k.removesuffix(".lora_A.weight") + ".weight" for k in load_file(made["diffusers"]) if "lora_A" in k}
    assert changed == modules
    examples = {
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.weight",
        "unet.mid_block.resnets.0.conv1.weight",  # 3x3
        "unet.up_blocks.0.resnets.0.conv_shortcut.weight",  # 1x1
        "unet.down_blocks.1.resnets.0.time_emb_proj.weight",
        "text_encoder.encoder.layers.1.mlp.fc2.weight",
    }
    if family == "sdxl":
        examples |= {"text_encoder_2.text_model.encoder.layers.0.self_attn.out_proj.weight"}
    else:
        examples |= {"unet.down_blocks.0.attentions.0.proj_in.weight"}  # a 1x1 conv in SD 1.5
    assert examples <= changed
    assert not any(k.endswith(".bias") or "norm" in k for k in changed)
    assert min((reference[k] - base[k]).abs().max().item() for k in changed) > 1e-3  # visibly


def test_the_files_hold_diffusers_and_kohya_keys(made):
    family = made["family"]
    meta = lora_metadata(made["diffusers"])
    for component in ("unet", *text_encoders(family)):
        assert meta[f"{component}.r"] == RANK and meta[f"{component}.lora_alpha"] == ALPHA
    diffusers = load_file(made["diffusers"])
    assert all(re.fullmatch(r"(unet|text_encoder|text_encoder_2)\.[\w.]+\.lora_[AB]\.weight", k) for k in diffusers)
    kohya = load_file(made["kohya"])
    te = ("lora_te_",) if family == "sd15" else ("lora_te1_", "lora_te2_")
    assert {k.split("_text_model_")[0] + "_" for k in kohya if k.startswith("lora_te")} == set(te)
    assert all(k.startswith(("lora_unet_", *te)) for k in kohya)
    q = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    assert {f"{q}.lora_down.weight", f"{q}.lora_up.weight", f"{q}.alpha"} <= set(kohya)
    assert f"{te[0]}text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    alphas = [v for k, v in kohya.items() if k.endswith(".alpha")]
    assert len(alphas) * 3 == len(kohya) == len(diffusers) // 2 * 3
    assert all(a.dim() == 0 and a.dtype == torch.float32 and a.item() == ALPHA for a in alphas)
    conv = "lora_unet_mid_block_resnets_0_conv1"
    assert kohya[f"{conv}.lora_down.weight"].shape[1:] == (64, 3, 3)
    assert kohya[f"{conv}.lora_up.weight"].shape[1:] == (RANK, 1, 1)
    # the same factors, bit for bit
    assert torch.equal(
        kohya[f"{q}.lora_down.weight"],
        diffusers["unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"],
    )


def test_diffusers_fuses_the_kohya_file_to_the_same_weights(made):
    got = fused_reference(made["pipeline"], made["kohya"], made["family"])
    assert max_error(got, made["reference"]) <= TOL


def test_the_fused_reference_is_kohyas_merge_formula(made):
    base, reference, family = made["base"], made["reference"], made["family"]
    kohya = load_file(made["kohya"])
    merged = kohya_merge(base, kohya, family)
    assert {k.split(".")[0] for k in merged} == {"unet", *text_encoders(family)}
    want = {k: merged.get(k, base[k]) for k in reference}
    assert max_error(reference, want) <= TOL


def test_the_scale_scales_the_change(made):
    family, base = made["family"], made["base"]
    half = fused_reference(made["pipeline"], made["diffusers"], family, scale=0.5)
    merged = kohya_merge(base, load_file(made["kohya"]), family, scale=0.5)
    assert max_error(half, {k: merged.get(k, base[k]) for k in half}) <= TOL


def test_diffusers_drops_the_attention_of_its_own_mixed_spelling_and_the_oracle_says_so(made, tmp_path):
    """convert_state_dict_to_diffusers (what the SD dreambooth scripts save) spells UNet attention `to_q.lora.down`
    and every other module `lora_A`; load_lora_weights converts the UNet's keys only when the first lacks "lora_A"
    (diffusers/loaders/peft.py:238-241), so the attention LoRA is dropped without a word. fused_reference refuses
    such a file; kohya_lora reads it to the same kohya file."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(made["diffusers"]), framework="pt") as f:
        header = f.metadata()
    mixed = convert_state_dict_to_diffusers(load_file(made["diffusers"]))
    assert any(".to_q.lora.down.weight" in k for k in mixed) and any(".conv1.lora_A.weight" in k for k in mixed)
    assert any(".q_proj.lora_linear_layer.down.weight" in k for k in mixed)
    save_file(mixed, tmp_path / "mixed.safetensors", metadata=header)
    with pytest.raises(AssertionError, match="diffusers loaded"):
        fused_reference(made["pipeline"], tmp_path / "mixed.safetensors", made["family"])
    again = load_file(kohya_lora(tmp_path / "mixed.safetensors", tmp_path / "k.safetensors", made["family"]))
    kohya = load_file(made["kohya"])
    assert again.keys() == kohya.keys() and all(torch.equal(again[k], kohya[k]) for k in kohya)
