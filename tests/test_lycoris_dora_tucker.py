"""LyCORIS LoCon's DoRA (``dora_scale``) and Tucker core (``lora_mid.weight``) in kohya files, merged into a lone
diffusers UNet folder, a pipeline and a Flux transformer (a fused module split), inspected, converted to PEFT
and refused by name where PEFT has no form of them; checked against LyCORIS's own LoConModule (lycoris-lora).

Each variant builds ``LoConModule`` on a copy of one module of a tiny seeded ``UNet2DConditionModel``, randomizes
every parameter (dora_scale included: a reader that ignored it, or took it on the wrong axis, would fail), and writes
the module's own state_dict leaves under the module's kohya name.

The oracle is the weight LoConModule's forward applies at multiplier 1 (lycoris/modules/locon.py:333-348):
``W' = weight_decompose(W0 + make_weight() · scale)`` with DoRA, ``W0 + make_weight() · scale`` without; each
variant checks that the forward is the base layer's op with W'. LyCORIS adds float32's eps to DoRA's norm
(lycoris/functional/general.py:126), PEFT (our merge's oracle) does not: the merged weight differs from LyCORIS's
by eps / ‖row‖ relatively, measured below 1e-6 on these weights (printed by the test).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import listing, one_line_error, run_cli
from lycoris_models import WEIGHTS, kohya, lone_unet, randomize, tiny_unet
from safetensors.torch import load_file, save_file

pytest.importorskip("lycoris")
pytest.importorskip("diffusers")

from lycoris.modules.locon import LoConModule  # noqa: E402  (after the skips)
from lycoris.modules.loha import LohaModule  # noqa: E402
from lycoris.modules.lokr import LokrModule  # noqa: E402

TOL = 1e-6  # relative to the module's largest weight, float32
FORWARD_TOL = 1e-5  # LyCORIS's forward against the base op with W' (a conv's sums in another order)

TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # Linear 32 -> 32
FF_OUT = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"  # Linear 128 -> 32
CONV1 = "down_blocks.0.resnets.0.conv1"  # Conv2d 32 -> 32, 3x3
CONV2 = "down_blocks.0.resnets.0.conv2"  # Conv2d 32 -> 32, 3x3
UP_CONV1 = "up_blocks.0.resnets.0.conv1"  # Conv2d 128 -> 64, 3x3
SHORTCUT = "up_blocks.0.resnets.0.conv_shortcut"  # Conv2d 128 -> 64, 1x1

PAIR = frozenset({"lora_down.weight", "lora_up.weight", "alpha"})
DORA, MID = frozenset({"dora_scale"}), frozenset({"lora_mid.weight"})


@dataclass(frozen=True)
class Variant:
    module: str  # the UNet's module path
    kwargs: dict = field(default_factory=dict)  # LoConModule's __init__ arguments
    leaves: frozenset = PAIR  # the leaves the module must write (the variant's shape)


VARIANTS = {
    "dora-linear": Variant(TO_Q, {"lora_dim": 4, "alpha": 2.0, "weight_decompose": True}, PAIR | DORA),
    "dora-linear-rs_lora": Variant(
        FF_OUT, {"lora_dim": 4, "alpha": 3.0, "weight_decompose": True, "rs_lora": True}, PAIR | DORA
    ),
    "dora-conv3x3": Variant(CONV1, {"lora_dim": 4, "alpha": 3.0, "weight_decompose": True}, PAIR | DORA),
    "dora-conv1x1": Variant(SHORTCUT, {"lora_dim": 2, "alpha": 1.0, "weight_decompose": True}, PAIR | DORA),
    "tucker-conv3x3": Variant(UP_CONV1, {"lora_dim": 4, "alpha": 1.5, "use_tucker": True}, PAIR | MID),
    "tucker-dora-conv3x3": Variant(
        CONV2, {"lora_dim": 3, "alpha": 2.0, "use_tucker": True, "weight_decompose": True}, PAIR | MID | DORA
    ),
}


@pytest.fixture(scope="module")
def unet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, dict[str, torch.Tensor]]:
    """A lone UNet folder (kohya's lora_unet_ modules map onto it), the model, and its saved tensors."""
    return lone_unet(tmp_path_factory.mktemp("locon"))


def base_op(org: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if isinstance(org, torch.nn.Linear):
        return F.linear(x, weight, org.bias)
    return F.conv2d(x, weight, org.bias, org.stride, org.padding, org.dilation, org.groups)


def an_input(org: torch.nn.Module, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if isinstance(org, torch.nn.Linear):
        return torch.randn(3, org.in_features, generator=g)
    return torch.randn(2, org.in_channels, 8, 8, generator=g)


def locon(org: torch.nn.Module, name: str, kwargs: dict, seed: int, algo: type = LoConModule):
    lyco = algo(name, copy.deepcopy(org), multiplier=1.0, **kwargs)
    randomize(lyco, seed)
    return lyco.eval()


def lycoris_weight(lyco, org: torch.nn.Module) -> torch.Tensor:
    """W' of LoConModule's forward at multiplier 1 (locon.py:337-344), checked to be what the forward applies."""
    with torch.no_grad():
        w0 = org.weight.detach()
        delta = lyco.make_weight() * lyco.scale
        want = lyco.apply_weight_decompose(w0 + delta, 1.0) if lyco.wd else w0 + delta
        x = an_input(org, 7)
        assert (lyco(x) - base_op(org, x, want)).abs().max().item() <= FORWARD_TOL, "not what LyCORIS's forward applies"
        if lyco.wd:  # a reader that dropped dora_scale could not pass
            assert (want - (w0 + delta)).abs().max().item() > 100 * TOL * want.abs().max().item()
        if lyco.tucker:  # nor one that contracted the core the other way round
            sd = lyco.state_dict()
            wrong = torch.einsum("ji...,jq->iq...", sd["lora_mid.weight"], sd["lora_down.weight"].flatten(1))
            wrong = torch.einsum("or,rikl->oikl", sd["lora_up.weight"].flatten(1), wrong) * lyco.scale
            assert (wrong - delta).abs().max().item() > 100 * TOL * delta.abs().max().item()
    return want


def leaves_of(lyco, module: str, leaves: frozenset) -> dict[str, torch.Tensor]:
    """The module's own state_dict leaves under its kohya name; the variant is the shape it says."""
    sd = {k: v.detach().clone().contiguous().float() for k, v in lyco.state_dict().items()}
    assert set(sd) == set(leaves), sorted(sd)
    if "dora_scale" in sd:  # locon.py:119-126: one value per output row
        out = sd["lora_up.weight"].shape[0]
        assert sd["dora_scale"].shape == (out, *[1] * (sd["lora_down.weight"].dim() - 1))
    return {f"{kohya(module)}.{k}": v for k, v in sd.items()}


def variant_file(model: torch.nn.Module, variant_name: str, path: Path) -> tuple[Path, torch.Tensor]:
    """The variant's kohya file and LyCORIS's W' for its module."""
    variant = VARIANTS[variant_name]
    org = model.get_submodule(variant.module)
    lyco = locon(org, kohya(variant.module), variant.kwargs, sorted(VARIANTS).index(variant_name) + 20)
    want = lycoris_weight(lyco, org)
    save_file(leaves_of(lyco, variant.module, variant.leaves), path)
    return path, want


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def check_merged(got: dict[str, torch.Tensor], w0: dict[str, torch.Tensor], wants: dict[str, torch.Tensor]) -> float:
    """Every tensor but the changed ones bit-equal; the largest relative error of those."""
    assert set(got) == set(w0)
    assert all(torch.equal(got[k], w0[k]) for k in w0 if k not in wants)
    return max(relative_error(got[k], want) for k, want in wants.items())


@pytest.mark.parametrize("variant_name", list(VARIANTS))
def test_merge_is_lycoris_forward(variant_name, unet, tmp_path):
    folder, model, w0 = unet
    path, want = variant_file(model, variant_name, tmp_path / "locon.safetensors")
    done = run_cli("merge", folder, path, "--dtype", "float32", "-o", tmp_path / "merged")
    assert done.exit_code == 0, done.output
    key = f"{VARIANTS[variant_name].module}.weight"
    error = check_merged(load_file(tmp_path / "merged" / WEIGHTS), w0, {key: want})
    print(f"{variant_name}: max |merged - W'| / max |W'| = {error:.3g}")
    assert error <= TOL, f"{variant_name}: {error}"


def test_merge_into_a_pipeline(tmp_path_factory):
    """A file of two DoRA modules (one a Tucker conv) into an SD 1.5 pipeline folder: its UNet changed there."""
    from diffusers import UNet2DConditionModel
    from diffusion_models import read_pipeline, tiny_pipeline

    root = tmp_path_factory.mktemp("pipeline")
    pipeline = tiny_pipeline(root, "sd15")
    model = UNet2DConditionModel.from_pretrained(pipeline / "unet").eval()
    tensors, wants = {}, {}
    for seed, name in enumerate(("dora-linear", "tucker-dora-conv3x3")):
        variant = VARIANTS[name]
        org = model.get_submodule(variant.module)
        lyco = locon(org, kohya(variant.module), variant.kwargs, seed + 40)
        wants[f"unet.{variant.module}.weight"] = lycoris_weight(lyco, org)
        tensors |= leaves_of(lyco, variant.module, variant.leaves)
    save_file(tensors, root / "two.safetensors")
    done = run_cli("merge", pipeline, root / "two.safetensors", "--dtype", "float32", "-o", root / "merged")
    assert done.exit_code == 0, done.output
    error = check_merged(read_pipeline(root / "merged"), read_pipeline(pipeline), wants)
    print(f"pipeline: max relative error {error:.3g}")
    assert error <= TOL


def test_dora_on_a_fused_flux_module_is_split_by_rows(tmp_path):
    """DoRA's norm is per output row, so a kohya Flux ``img_attn.qkv`` with DoRA splits exactly onto diffusers'
    to_q, to_k and to_v: lora_down shared, lora_up's rows and dora_scale's rows each part's."""
    from flux_models import read_transformer, tiny_flux

    transformer = tiny_flux(tmp_path)
    w0 = read_transformer(transformer)
    parts = [f"transformer_blocks.0.attn.to_{p}" for p in "qkv"]
    fused = torch.nn.Linear(16, 48)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([w0[f"{p}.weight"] for p in parts]))
        fused.bias.copy_(torch.cat([w0[f"{p}.bias"] for p in parts]))
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    lyco = locon(fused, name, {"lora_dim": 4, "alpha": 2.0, "weight_decompose": True}, 50)
    want = lycoris_weight(lyco, fused)
    tensors = {f"{name}.{k}": v.detach().contiguous() for k, v in lyco.state_dict().items()}
    save_file(tensors, tmp_path / "f.safetensors")
    done = run_cli("merge", transformer, tmp_path / "f.safetensors", "--dtype", "float32", "-o", tmp_path / "m")
    assert done.exit_code == 0, done.output
    wants = {f"{p}.weight": rows for p, rows in zip(parts, want.chunk(3), strict=True)}
    error = check_merged(read_transformer(tmp_path / "m"), w0, wants)
    print(f"flux fused qkv: max relative error {error:.3g}")
    assert error <= TOL


def features_of(output: str) -> str:
    return next(line for line in output.splitlines() if line.strip().startswith("features")).split(None, 1)[1]


def test_inspect_names_dora_and_the_tucker_conv(unet, tmp_path):
    model = unet[1]
    path, _ = variant_file(model, "tucker-dora-conv3x3", tmp_path / "td.safetensors")
    done = run_cli("inspect", path)
    assert done.exit_code == 0, done.output
    assert features_of(done.output) == "dora, conv", done.output
    assert f"{kohya(CONV2)}  conv         3" in done.output, done.output  # the core's rank
    plain, _ = variant_file(model, "tucker-conv3x3", tmp_path / "t.safetensors")
    done = run_cli("inspect", plain)
    assert done.exit_code == 0 and features_of(done.output) == "conv", done.output


def peft_loaded(folder: Path):
    """A fresh UNet with the PEFT adapter folder loaded by PEFT itself (its own LoraConfig and state-dict load)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    cfg = json.loads((folder / "adapter_config.json").read_text())
    keys = ("r", "lora_alpha", "target_modules", "use_dora", "use_rslora", "rank_pattern", "alpha_pattern")
    model = tiny_unet()
    inject_adapter_in_model(LoraConfig(**{k: cfg[k] for k in keys}), model)
    saved = load_file(folder / "adapter_model.safetensors")
    loaded = set_peft_model_state_dict(model, {k.removeprefix("base_model.model."): v for k, v in saved.items()})
    assert not loaded.unexpected_keys, loaded.unexpected_keys  # every tensor in PEFT's own shape, or load raises
    return model, saved


@pytest.mark.parametrize("variant_name", ["dora-linear", "dora-conv3x3", "tucker-conv3x3", "tucker-dora-conv3x3"])
def test_convert_to_peft_is_what_peft_loads(variant_name, unet, tmp_path):
    """``convert --to peft``: PEFT's DoRA / conv LoRA of the file, loaded by PEFT, merges to LyCORIS's W'."""
    folder, model, _ = unet
    variant = VARIANTS[variant_name]
    path, want = variant_file(model, variant_name, tmp_path / "locon.safetensors")
    done = run_cli("convert", path, "--to", "peft", "--base", folder, "-o", tmp_path / "peft")
    assert done.exit_code == 0, done.output
    peft_model, saved = peft_loaded(tmp_path / "peft")
    assert any(k.endswith("lora_magnitude_vector") for k in saved) == ("dora_scale" in variant.leaves)
    layer = peft_model.get_submodule(variant.module)
    x = an_input(layer.base_layer, 8)
    with torch.no_grad():
        assert (layer(x) - base_op(layer.base_layer, x, want)).abs().max().item() <= FORWARD_TOL
        layer.merge()
    error = relative_error(layer.base_layer.weight.detach(), want)
    print(f"{variant_name}: PEFT's merge of the converted adapter, relative error {error:.3g}")
    assert error <= TOL


def test_a_tucker_conv_converts_to_kohya_as_a_plain_conv_lora(unet, tmp_path):
    folder, model, w0 = unet
    path, want = variant_file(model, "tucker-conv3x3", tmp_path / "t.safetensors")
    done = run_cli("convert", path, "--to", "kohya", "--base", folder, "-o", tmp_path / "k")
    assert done.exit_code == 0, done.output
    (written,) = (tmp_path / "k").glob("*.safetensors")
    assert not any(k.endswith("lora_mid.weight") for k in load_file(written))
    done = run_cli("merge", folder, written, "--dtype", "float32", "-o", tmp_path / "m")
    assert done.exit_code == 0, done.output
    assert check_merged(load_file(tmp_path / "m" / WEIGHTS), w0, {f"{UP_CONV1}.weight": want}) <= TOL


@pytest.mark.parametrize("to", ["kohya", "diffusers"])
def test_dora_converted_to_a_format_of_pairs_only_is_refused(to, unet, tmp_path):
    """kohya's and diffusers' writers hold LoRA pairs: DoRA's magnitudes are refused by name, never dropped."""
    folder, model, _ = unet
    path, _ = variant_file(model, "dora-conv3x3", tmp_path / "d.safetensors")
    for dry in ([], ["--dry-run"]):  # refused from the headers, before any tensor is read: a dry run says so too
        done = run_cli("convert", path, "--to", to, "--base", folder, "-o", tmp_path / "out", *dry)
        one_line_error(done, "holds plain LoRA pairs, not dora", f"the {to} format cannot hold it")
        assert listing(tmp_path) == {"d.safetensors"}


@pytest.mark.parametrize("module", [TO_Q, CONV1])
def test_dora_over_the_input_axis_is_refused(module, unet, tmp_path):
    """``wd_on_out=False`` normalises each input column ([1, in, ...], locon.py:127-136): no PEFT DoRA holds it."""
    folder, model, _ = unet
    kwargs = {"lora_dim": 4, "alpha": 2.0, "weight_decompose": True, "wd_on_out": False}
    lyco = locon(model.get_submodule(module), kohya(module), kwargs, 60)
    tensors = {f"{kohya(module)}.{k}": v.detach().contiguous() for k, v in lyco.state_dict().items()}
    assert tensors[f"{kohya(module)}.dora_scale"].shape[:2] == (1, model.get_submodule(module).weight.shape[1])
    save_file(tensors, tmp_path / "in.safetensors")
    done = run_cli("merge", folder, tmp_path / "in.safetensors", "-o", tmp_path / "m")
    one_line_error(done, kohya(module), "DoRA (dora_scale)", "input axis", "wd_on_out=False")
    assert listing(tmp_path) == {"in.safetensors"}


@pytest.mark.parametrize("algo,kwargs,label", [(LohaModule, {}, "LoHa"), (LokrModule, {"factor": 4}, "LoKr")])
def test_dora_on_loha_or_lokr_is_refused(algo, kwargs, label, unet, tmp_path):
    """LyCORIS applies DoRA to LoHa's and LoKr's ΔW too (loha.py:103-125, lokr.py:176-198); PEFT's LoHa and LoKr,
    which lorasurgeon merges them as, have no DoRA."""
    folder, model, _ = unet
    lyco = locon(model.get_submodule(TO_Q), kohya(TO_Q), {"lora_dim": 2, "weight_decompose": True, **kwargs}, 70, algo)
    tensors = {f"{kohya(TO_Q)}.{k}": v.detach().contiguous() for k, v in lyco.state_dict().items()}
    assert f"{kohya(TO_Q)}.dora_scale" in tensors
    save_file(tensors, tmp_path / "x.safetensors")
    done = run_cli("merge", folder, tmp_path / "x.safetensors", "-o", tmp_path / "m")
    one_line_error(done, kohya(TO_Q), "DoRA (dora_scale)", f"LyCORIS {label} module")
    assert listing(tmp_path) == {"x.safetensors"}


def test_dora_on_some_modules_only_is_refused(unet, tmp_path):
    """PEFT's use_dora is the whole adapter's: a file of DoRA and plain modules would convert to a wrong PEFT one."""
    folder, model, _ = unet
    dora, _ = variant_file(model, "dora-linear", tmp_path / "d.safetensors")
    plain, _ = variant_file(model, "tucker-conv3x3", tmp_path / "t.safetensors")
    save_file(load_file(dora) | load_file(plain), tmp_path / "mixed.safetensors")
    done = run_cli("merge", folder, tmp_path / "mixed.safetensors", "-o", tmp_path / "m")
    one_line_error(done, "DoRA on 1 of its 2 modules", kohya(UP_CONV1))
    assert not (tmp_path / "m").exists()
