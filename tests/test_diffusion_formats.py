"""Diffusion LoRAs (#26): kohya's and diffusers' files for tiny SD 1.5 and SDXL pipelines built by diffusers,
merged into a diffusers pipeline folder or a single-file checkpoint, converted between the two formats, and
refused by name where they cannot be read. The oracle is diffusers itself: ``load_lora_weights`` +
``fuse_lora`` on the same pipeline (tests/diffusion_models.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import listing, one_line_error, run_cli
from safetensors.torch import load_file, save_file

pytest.importorskip("diffusers")

from diffusion_models import (  # noqa: E402  (after the skip: it imports diffusers)
    FAMILIES,
    diffusers_lora,
    fused_reference,
    kohya_lora,
    read_pipeline,
    tiny_pipeline,
)

from lorasurgeon.names.ldm_unet import ldm_unet_keys  # noqa: E402

TOL = 1e-6  # float32: one rounding of the same sum


@pytest.fixture(scope="module", params=FAMILIES)
def made(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny pipeline of the family, its LoRA in diffusers' and kohya's keys, and diffusers' fused result."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    pipeline = tiny_pipeline(root, family)
    lora = diffusers_lora(pipeline, root / "diffusers-lora", rank=4, alpha=8.0)
    kohya = kohya_lora(lora, root / "kohya.safetensors", family)
    return {"family": Path(family), "root": root, "pipeline": pipeline, "diffusers": lora, "kohya": kohya}


@pytest.fixture(scope="module")
def reference(made: dict[str, Path]) -> dict[str, torch.Tensor]:
    return fused_reference(made["pipeline"], made["diffusers"], str(made["family"]))


def max_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:4]
    return max((got[k].float() - want[k].float()).abs().max().item() for k in want)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_merge_into_a_pipeline_is_diffusers_fuse_lora(made, reference, fmt, tmp_path):
    out = tmp_path / "merged"
    done = run_cli("merge", made["pipeline"], made[fmt], "-o", out)
    assert done.exit_code == 0, done.output
    got = read_pipeline(out)
    assert max_error({k: got[k] for k in reference}, reference) <= TOL
    base = read_pipeline(made["pipeline"])
    changed = {k for k in base if not torch.equal(base[k], got[k])}
    assert changed and all(k.endswith(".weight") for k in changed)
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} >= {
        p.relative_to(made["pipeline"]).as_posix() for p in made["pipeline"].rglob("*") if p.is_file()
    }  # the same layout: every file of the base, beside the card
    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card


def test_merged_pipeline_loads_in_diffusers(made, reference, tmp_path):
    import diffusers

    out = tmp_path / "merged"
    assert run_cli("merge", made["pipeline"], made["kohya"], "-o", out).exit_code == 0
    cls = diffusers.StableDiffusionXLPipeline if str(made["family"]) == "sdxl" else diffusers.StableDiffusionPipeline
    absent = {k: None for k in (*cls._optional_components, "tokenizer", "tokenizer_2") if not (out / k).is_dir()}
    pipe = cls.from_pretrained(out, local_files_only=True, **absent)
    loaded = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}
    assert (
        max_error(
            {k: loaded[k] for k in reference if k.startswith("unet.")},
            {k: v for k, v in reference.items() if k.startswith("unet.")},
        )
        <= TOL
    )


def test_unmerge_gives_the_base_back(made, tmp_path):
    merged, back = tmp_path / "merged", tmp_path / "back"
    assert run_cli("merge", made["pipeline"], made["kohya"], "-o", merged).exit_code == 0
    done = run_cli("unmerge", merged, made["kohya"], "-o", back)
    assert done.exit_code == 0, done.output
    assert max_error(read_pipeline(back), read_pipeline(made["pipeline"])) <= 1e-5


def test_two_loras_stacked_with_weights_in_one_pass(made, reference, tmp_path):
    out = tmp_path / "stacked"
    done = run_cli(
        "merge", made["pipeline"], made["diffusers"], made["kohya"], "--weight", "0.25", "--weight", "0.5", "-o", out
    )
    assert done.exit_code == 0, done.output
    base, got = read_pipeline(made["pipeline"]), read_pipeline(out)
    want = {k: base[k] + 0.75 * (reference[k] - base[k]) for k in reference}
    assert max_error({k: got[k] for k in want}, want) <= 1e-5


def test_kohya_and_diffusers_convert_both_ways_bit_for_bit(made, tmp_path):
    as_kohya = tmp_path / "k.safetensors"
    done = run_cli("convert", made["diffusers"], "--to", "kohya", "-o", as_kohya)
    assert done.exit_code == 0, done.output
    assert listing(tmp_path) == {"k.safetensors"}  # one file, nothing beside it
    back = tmp_path / "d"
    done = run_cli("convert", as_kohya, "--to", "diffusers", "--base", made["pipeline"], "-o", back)
    assert done.exit_code == 0, done.output
    again = tmp_path / "k2.safetensors"
    assert run_cli("convert", back, "--to", "kohya", "-o", again).exit_code == 0
    a, b = load_file(as_kohya), load_file(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    factors = {k: v for k, v in load_file(made["kohya"]).items() if not k.endswith(".alpha")}
    ours = {k: v for k, v in a.items() if not k.endswith(".alpha")}
    assert ours.keys() == factors.keys() and all(torch.equal(ours[k], factors[k]) for k in ours)


def test_what_we_write_diffusers_loads_to_the_same_fused_weights(made, reference, tmp_path):
    as_kohya, as_diffusers = tmp_path / "k.safetensors", tmp_path / "d"
    assert run_cli("convert", made["diffusers"], "--to", "kohya", "-o", as_kohya).exit_code == 0
    assert run_cli("convert", made["diffusers"], "--to", "diffusers", "-o", as_diffusers).exit_code == 0
    family = str(made["family"])
    for written in (as_kohya, as_diffusers / "pytorch_lora_weights.safetensors"):
        assert max_error(fused_reference(made["pipeline"], written, family), reference) <= TOL, written


CLIP_L = {"sd15": "cond_stage_model.transformer.text_model.", "sdxl": "conditioner.embedders.0.transformer.text_model."}
OPENCLIP = "conditioner.embedders.1.model.transformer.resblocks."  # SDXL's second text encoder's layers
OPENCLIP_NAMES = (("self_attn.", "attn."), ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
                  ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."))  # fmt: skip


def openclip(clip: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' CLIP layers (``encoder.layers.N...``, with or without ``text_model.``) as OpenCLIP holds them
    in a single file: q, k and v concatenated in in_proj_weight / in_proj_bias (what diffusers'
    convert_open_clip_checkpoint splits); the embeddings and projection left out."""
    out: dict[str, torch.Tensor] = {}
    for name, value in clip.items():
        layer = name.removeprefix("text_model.").removeprefix("encoder.layers.")
        if layer == name.removeprefix("text_model.") or ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        n, rest = layer.split(".", 1)
        if rest.startswith("self_attn.q_proj."):
            leaf = rest.rsplit(".", 1)[1]
            parts = [clip[name.replace(".q_proj.", f".{p}_proj.")] for p in "qkv"]
            out[f"{OPENCLIP}{n}.attn.in_proj_{leaf}"] = torch.cat(parts)
            continue
        for new, old in OPENCLIP_NAMES:
            rest = rest.replace(new, old)
        out[f"{OPENCLIP}{n}.{rest}"] = value
    return out


def as_single_file(tensors: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    """A pipeline's tensors (``read_pipeline``'s names) as one file in the original layout: the UNet's LDM/SGM
    names, CLIP-L under its prefix, SDXL's OpenCLIP with q/k/v fused."""
    unet = {k.removeprefix("unet."): v for k, v in tensors.items() if k.startswith("unet.")}
    names = ldm_unet_keys(unet)
    assert names is not None
    out = {names[k]: v for k, v in unet.items()}
    clip = {k.removeprefix("text_encoder."): v for k, v in tensors.items() if k.startswith("text_encoder.")}
    out |= {CLIP_L[family] + k.removeprefix("text_model."): v for k, v in clip.items()}
    if family == "sdxl":
        out |= openclip(
            {k.removeprefix("text_encoder_2."): v for k, v in tensors.items() if k.startswith("text_encoder_2.")}
        )
    return out


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_merge_into_a_single_file_checkpoint(made, reference, fmt, tmp_path):
    """The pipeline as ComfyUI's single file (SDXL's second text encoder OpenCLIP, q/k/v fused): the merge is the
    fused pipeline's weights in the file's own names, one file (a LoRA on q_proj changes its third of in_proj)."""
    family = str(made["family"])
    base = tmp_path / "base.safetensors"
    save_file(as_single_file(read_pipeline(made["pipeline"]), family), base)
    out = tmp_path / "merged.safetensors"
    done = run_cli("merge", base, made[fmt], "-o", out)
    assert done.exit_code == 0, done.output
    want = as_single_file(read_pipeline(made["pipeline"]) | reference, family)
    got = load_file(out)
    assert max_error(got, want) <= TOL
    if family == "sdxl":  # the text-encoder LoRA reached OpenCLIP's fused rows
        assert any(not torch.equal(got[k], v) for k, v in load_file(base).items() if k.endswith(".in_proj_weight"))


# --- what is refused, by name, before anything is written -------------------------------------------------------


def test_a_kohya_file_needs_its_base(made, tmp_path):
    done = run_cli("convert", made["kohya"], "--to", "diffusers", "-o", tmp_path / "d")
    one_line_error(done, "kohya LoRA is read against its base model", "--base BASE")
    assert listing(tmp_path) == set()


def test_text_encoder_modules_into_a_lone_unet_are_refused(made, tmp_path):
    done = run_cli("merge", made["pipeline"] / "unet", made["kohya"], "-o", tmp_path / "m")
    one_line_error(done, "text_encoder", "give the whole pipeline's folder")
    assert listing(tmp_path) == set()


def test_a_lora_for_another_model_is_refused_naming_its_modules(made, tmp_path):
    other = dict(load_file(made["kohya"]))
    down = next(k for k in other if k.startswith("lora_unet_") and k.endswith(".lora_down.weight"))
    stem = down.removesuffix(".lora_down.weight")
    for leaf in ("lora_down.weight", "lora_up.weight", "alpha"):
        other[f"lora_unet_no_such_block.{leaf}"] = other[f"{stem}.{leaf}"].clone()
    save_file(other, tmp_path / "other.safetensors")
    done = run_cli("merge", made["pipeline"], tmp_path / "other.safetensors", "-o", tmp_path / "m")
    one_line_error(done, "lora_unet_no_such_block", "a LoRA for another model?")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "leaf,what", [("dora_scale", "DoRA (dora_scale)"), ("lora_mid.weight", "Tucker"), ("w_norm", "norm")]
)
def test_leaves_of_other_trainers_are_refused_by_name(made, tmp_path, leaf, what):
    tensors = dict(load_file(made["kohya"]))
    module = next(k for k in tensors if k.endswith(".lora_down.weight")).removesuffix(".lora_down.weight")
    tensors[f"{module}.{leaf}"] = torch.ones(3)
    save_file(tensors, tmp_path / "x.safetensors")
    done = run_cli("merge", made["pipeline"], tmp_path / "x.safetensors", "-o", tmp_path / "m")
    one_line_error(done, module, what)
    assert not (tmp_path / "m").exists()


def test_the_augmented_form_of_a_pipeline_is_refused(made, tmp_path):
    done = run_cli("merge", made["pipeline"], made["diffusers"], "--form", "augmented", "-o", tmp_path / "m")
    one_line_error(done, "a diffusers pipeline has no augmented form")
    assert listing(tmp_path) == set()


def test_inspect_names_format_family_and_parts(made):
    family = {"sd15": "SD 1.x", "sdxl": "SDXL"}[str(made["family"])]
    kohya = run_cli("inspect", made["kohya"])
    assert kohya.exit_code == 0, kohya.output
    assert "adapter (kohya format)" in kohya.output and f"for {family}" in kohya.output
    assert "lora_unet (" in kohya.output and "touches" in kohya.output
    diffusers = run_cli("inspect", made["diffusers"], "--json")
    report = json.loads(diffusers.output)["adapter"]
    assert report["format"] == "diffusers" and report["family"] == family
    assert set(report["touches"]) >= {"unet", "text_encoder"}


def test_the_mixed_spelling_diffusers_scripts_save_merges_whole(made, reference, tmp_path):
    """diffusers' training scripts save convert_state_dict_to_diffusers(...): to_q.lora.down, q_proj.lora_linear_layer
    .down, lora_A elsewhere. diffusers' own loader drops the attention pairs of such a file (test_diffusion_oracles);
    lorasurgeon reads every pair: the merge is the fused weights of the same factors in PEFT's spelling."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers
    from safetensors import safe_open

    with safe_open(made["diffusers"], "pt") as f:
        header = f.metadata()
    mixed = convert_state_dict_to_diffusers(load_file(made["diffusers"]))
    assert any(".to_q.lora.down.weight" in k for k in mixed) and any(
        ".lora_linear_layer.down.weight" in k for k in mixed
    )
    save_file(mixed, tmp_path / "mixed.safetensors", metadata=header)
    out = tmp_path / "merged"
    done = run_cli("merge", made["pipeline"], tmp_path / "mixed.safetensors", "-o", out)
    assert done.exit_code == 0, done.output
    got = read_pipeline(out)
    assert max_error({k: got[k] for k in reference}, reference) <= TOL


def test_swapped_arguments_are_named(made, tmp_path):
    done = run_cli("merge", made["kohya"], made["pipeline"], "-o", tmp_path / "m")
    one_line_error(done, "the arguments look swapped")
    assert listing(tmp_path) == set()


def test_sharded_components_keep_their_names_and_indexes(made, reference, tmp_path):
    """--max-shard-size splits each component in its own folder, under its own stem and index; the sharded result
    is a base again, whose layout the next merge keeps."""
    out = tmp_path / "sharded"
    done = run_cli("merge", made["pipeline"], made["diffusers"], "--max-shard-size", "300KB", "-o", out)
    assert done.exit_code == 0, done.output
    unet = sorted(p.name for p in (out / "unet").iterdir())
    assert "diffusion_pytorch_model.safetensors.index.json" in unet and len(unet) > 3, unet
    index = json.loads((out / "unet" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert all(
        not k.startswith("unet.") and v.startswith("diffusion_pytorch_model-") for k, v in index["weight_map"].items()
    )
    got = read_pipeline(out)
    assert max_error({k: got[k] for k in reference}, reference) <= TOL
    import diffusers

    loaded = diffusers.UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    unet_got = {k: v for k, v in got.items() if k.startswith("unet.")}
    assert max_error({f"unet.{k}": v for k, v in loaded.items()}, unet_got) == 0.0  # diffusers reads the shards
    again = tmp_path / "again"
    assert run_cli("merge", out, made["kohya"], "--weight", "0", "-o", again).exit_code == 0
    assert sorted(p.name for p in (again / "unet").iterdir()) == unet


def sgm_kohya(kohya: Path, pipeline: Path, out: Path) -> Path:
    """The kohya file with its UNet modules under the original (SGM/LDM) names, as sd-scripts writes an SDXL
    LoRA (lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q): diffusers' names mapped by ldm_unet."""
    unet = load_file(pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    original = ldm_unet_keys(unet, prefix="")
    assert original is not None
    flat = {
        "lora_unet_" + name.removesuffix(".weight").replace(".", "_"): "lora_unet_"
        + key.removesuffix(".weight").replace(".", "_")
        for name, key in original.items()
        if name.endswith(".weight")
    }
    tensors = {}
    for name, value in load_file(kohya).items():
        module, _, leaf = name.partition(".")
        tensors[f"{flat.get(module, module)}.{leaf}"] = value
    assert any("input_blocks" in k for k in tensors) and not any("down_blocks" in k for k in tensors)
    save_file(tensors, out)
    return out


def test_kohya_original_unet_names_merge_into_pipeline_and_single_file(made, reference, tmp_path):
    """sd-scripts names an SDXL LoRA's UNet modules as the original layout does: read against a diffusers
    pipeline (ldm_unet's names mapped back) and against a single file (its own keys)."""
    family = str(made["family"])
    sgm = sgm_kohya(made["kohya"], made["pipeline"], tmp_path / "sgm.safetensors")
    done = run_cli("merge", made["pipeline"], sgm, "-o", tmp_path / "m")
    assert done.exit_code == 0, done.output
    got = read_pipeline(tmp_path / "m")
    assert max_error({k: got[k] for k in reference}, reference) <= TOL
    base = tmp_path / "base.safetensors"
    save_file(as_single_file(read_pipeline(made["pipeline"]), family), base)
    done = run_cli("merge", base, sgm, "-o", tmp_path / "m.safetensors")
    assert done.exit_code == 0, done.output
    want = as_single_file(read_pipeline(made["pipeline"]) | reference, family)
    assert max_error(load_file(tmp_path / "m.safetensors"), want) <= TOL


def test_a_diffusion_lora_into_an_llm_is_refused_as_for_another_model(made, tmp_path):
    from helpers import FIX_BASE

    done = run_cli("merge", FIX_BASE, made["kohya"], "-o", tmp_path / "m")
    one_line_error(done, "none of its", "a LoRA for another model?")
    assert listing(tmp_path) == set()


def test_a_pipeline_into_one_file_is_refused_before_writing(made, tmp_path):
    done = run_cli("merge", made["pipeline"], made["kohya"], "-o", tmp_path / "m.safetensors")
    one_line_error(done, "a one-file result", "give a folder")
    assert listing(tmp_path) == set()


@pytest.mark.parametrize("to", ["kohya", "diffusers"])
def test_extract_writes_the_lora_in_kohya_or_diffusers_keys(made, reference, to, tmp_path):
    """extract --to kohya|diffusers: the full-rank LoRA of the merged pipeline's change, in that format, merges
    back to the merged pipeline (3×3 convs included)."""
    merged = tmp_path / "merged"
    assert run_cli("merge", made["pipeline"], made["kohya"], "-o", merged).exit_code == 0
    out = tmp_path / ("x.safetensors" if to == "kohya" else "x")
    done = run_cli("extract", made["pipeline"], merged, "--rank", "8", "--to", to, "-o", out)
    assert done.exit_code == 0, done.output
    assert f"adapter ({to} format)" in run_cli("inspect", out).output
    again = tmp_path / "again"
    assert run_cli("merge", made["pipeline"], out, "-o", again).exit_code == 0
    got = read_pipeline(again)
    assert max_error({k: got[k] for k in reference}, reference) <= 1e-5
