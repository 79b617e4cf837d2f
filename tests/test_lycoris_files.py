"""LyCORIS's LoHa and LoKr leaves in kohya files (``lora_unet_<module>.hada_*`` / ``.lokr_*`` / ``.alpha``),
merged into a lone diffusers UNet folder, checked against LyCORIS's own modules (lycoris-lora).

Each variant builds LyCORIS's ``LohaModule`` / ``LokrModule`` on a copy of one module of a tiny seeded
``UNet2DConditionModel``, randomizes every parameter, and writes the module's own state_dict leaves (the
hada_* / lokr_* tensors and alpha, nothing else) under the module's kohya name.

The oracle, ΔW, is what the module's forward applies at multiplier 1 (no DoRA, no dropout, not bypass):
``get_weight(self.shape) * self.scalar`` -- lycoris/modules/loha.py:317 and lycoris/modules/lokr.py:563, with
``get_weight`` scaling by ``self.scale`` = alpha / lora_dim (loha.py:138, :197-218; lokr.py:218, :359-369; for
LoKr with both Kronecker factors whole alpha is forced to lora_dim, a scale of 1: lokr.py:210-212). It is NOT
the modules' merge path: ``get_merged_weight`` takes ``get_diff_weight``, which multiplies ``get_weight`` (already
scaled) by ``self.scale`` again (loha.py:230-238, lokr.py:381-389) -- alpha/r applied twice, which disagrees
with forward whenever alpha != r. Each variant also checks that the module's forward is the base layer's op
with W0 + ΔW, so the oracle is forward's, not a reading of it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import one_line_error, run_cli
from lycoris_models import WEIGHTS, kohya, lone_unet, randomize
from safetensors.torch import load_file, save_file

pytest.importorskip("lycoris")
pytest.importorskip("diffusers")

from lycoris.modules.loha import LohaModule  # noqa: E402  (after the skips)
from lycoris.modules.lokr import LokrModule  # noqa: E402

TOL = 1e-6

TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"  # Linear 32 -> 32
TO_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
TO_V = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"
TO_OUT = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
Q2 = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
FF_IN = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"  # Linear 32 -> 256 (GEGLU)
FF_OUT = "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"  # Linear 128 -> 32
PROJ_IN = "down_blocks.0.attentions.0.proj_in"  # Conv2d 32 -> 32, 1x1 (SD1-style attention)
CONV1 = "down_blocks.0.resnets.0.conv1"  # Conv2d 32 -> 32, 3x3
CONV2 = "down_blocks.0.resnets.0.conv2"  # Conv2d 32 -> 32, 3x3
UP_CONV1 = "up_blocks.0.resnets.0.conv1"  # Conv2d 128 -> 64, 3x3
UP_CONV2 = "up_blocks.0.resnets.0.conv2"  # Conv2d 64 -> 64, 3x3
SHORTCUT = "up_blocks.0.resnets.0.conv_shortcut"  # Conv2d 128 -> 64, 1x1


@dataclass(frozen=True)
class Variant:
    algo: type  # LohaModule or LokrModule
    module: str  # the UNet's module path
    kwargs: dict = field(default_factory=dict)  # the LyCORIS module's __init__ arguments
    leaves: frozenset = frozenset()  # the hada_* / lokr_* leaves the module must hold (the variant's shape)
    file_alpha: float | None = None  # write this alpha in place of the module's (its scale stays LyCORIS's)
    drop_alpha: bool = False  # leave .alpha out of the file


LOHA = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})
LOHA_T = LOHA | {"hada_t1", "hada_t2"}
W1, W1AB = frozenset({"lokr_w1"}), frozenset({"lokr_w1_a", "lokr_w1_b"})
W2, W2AB = frozenset({"lokr_w2"}), frozenset({"lokr_w2_a", "lokr_w2_b"})

VARIANTS = {
    "loha-linear": Variant(LohaModule, TO_Q, {"lora_dim": 4, "alpha": 2.0}, LOHA),
    "loha-conv3x3": Variant(LohaModule, CONV1, {"lora_dim": 4, "alpha": 3.0}, LOHA),
    "loha-conv3x3-tucker": Variant(LohaModule, UP_CONV1, {"lora_dim": 4, "alpha": 1.5, "use_tucker": True}, LOHA_T),
    # a 1x1 kernel: LyCORIS takes no Tucker core there even when asked (loha.py:74); alpha above the rank
    "loha-proj_in-1x1": Variant(LohaModule, PROJ_IN, {"lora_dim": 2, "alpha": 8.0, "use_tucker": True}, LOHA),
    # rs_lora: scale alpha/sqrt(r), saved as alpha·sqrt(r) (loha.py:134-140): the file's alpha/r is the scale still
    "loha-rs_lora": Variant(LohaModule, TO_K, {"lora_dim": 4, "alpha": 2.0, "rs_lora": True}, LOHA),
    "loha-no-alpha": Variant(LohaModule, Q2, {"lora_dim": 4, "alpha": None}, LOHA, drop_alpha=True),
    # 128 -> 32: w1 [4, 8] whole, w2 [8, 16] as w2_a @ w2_b of rank 2
    "lokr-linear-w2-factored": Variant(LokrModule, FF_OUT, {"lora_dim": 2, "alpha": 1.0}, W1 | W2AB),
    # 32 -> 256: w1 [16, 4] and w2 [16, 8] both factored (rank 2 < 16/2)
    "lokr-linear-both-factored": Variant(
        LokrModule, FF_IN, {"lora_dim": 2, "alpha": 4.0, "decompose_both": True}, W1AB | W2AB
    ),
    # both whole (full_matrix): LyCORIS scales by 1 whatever alpha says (lokr.py:210-212); the file's alpha is
    # set to 7 (not the rank, not 1) so a reader that took alpha/r would fail
    "lokr-linear-both-whole": Variant(
        LokrModule, TO_V, {"lora_dim": 4, "alpha": 2.0, "full_matrix": True}, W1 | W2, file_alpha=7.0
    ),
    # both whole because the rank is large (8 >= max(4, 8)/2: lokr.py:165-174), alpha as LyCORIS saves it (= 8)
    "lokr-linear-rank-large": Variant(LokrModule, TO_OUT, {"lora_dim": 8, "alpha": 2.0}, W1 | W2),
    # w1 factored, w2 whole: 32 -> 256 at factor 4, unbalanced: w1 [64, 4] at rank 4, w2 [4, 8] whole
    "lokr-linear-w1-factored-only": Variant(
        LokrModule,
        FF_IN,
        {"lora_dim": 4, "alpha": 2.0, "decompose_both": True, "factor": 4, "unbalanced_factorization": True},
        W1AB | W2,
    ),
    # 3x3: w2_b is flattened [r, d·3·3] (lokr.py:130-137)
    "lokr-conv3x3": Variant(LokrModule, CONV2, {"lora_dim": 2, "alpha": 1.0}, W1 | W2AB),
    "lokr-conv3x3-tucker": Variant(
        LokrModule, UP_CONV2, {"lora_dim": 2, "alpha": 3.0, "use_tucker": True}, W1 | W2AB | {"lokr_t2"}
    ),
    "lokr-conv_shortcut-1x1": Variant(
        LokrModule, SHORTCUT, {"lora_dim": 2, "alpha": 0.5, "decompose_both": True}, W1AB | W2AB
    ),
    "lokr-no-alpha": Variant(LokrModule, CONV1, {"lora_dim": 2, "alpha": None}, W1 | W2AB, drop_alpha=True),
}


# LyCORIS's own loader (lycoris/modules/__init__.py:34-47, make_module_from_state_dict) rebuilt from the file gives
# the same ΔW wherever it loads; it cannot load these: no alpha (float(None): loha.py:167, lokr.py:322), LoKr
# with w1 factored and w2 whole (it passes decompose_both only when both are factored: lokr.py:324, :332), LoKr Tucker
# (its rank read off lokr_w2_a.size(1), which is Tucker's out factor there: lokr.py:267)
LOADER_FAILS = {"loha-no-alpha", "lokr-no-alpha", "lokr-linear-w1-factored-only", "lokr-conv3x3-tucker"}


@pytest.fixture(scope="module")
def unet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module, dict[str, torch.Tensor]]:
    """A lone UNet folder (kohya's lora_unet_ modules map onto it), the model, and its saved tensors."""
    return lone_unet(tmp_path_factory.mktemp("lycoris"))


def lycoris_module(model: torch.nn.Module, variant: Variant, seed: int):
    """LyCORIS's module on a copy of the UNet's module, randomized, and ΔW, checked to be what its forward adds."""
    org = copy.deepcopy(model.get_submodule(variant.module))
    lyco = variant.algo(kohya(variant.module), org, multiplier=1.0, **variant.kwargs)
    randomize(lyco, seed)
    lyco.eval()
    with torch.no_grad():
        delta = lyco.get_weight(lyco.shape) * lyco.scalar  # loha.py:317 / lokr.py:563: forward's ΔW at x1
        g = torch.Generator().manual_seed(seed + 1)
        if isinstance(org, torch.nn.Linear):
            x = torch.randn(3, org.in_features, generator=g)
            want = F.linear(x, org.weight + delta, org.bias)
        else:
            x = torch.randn(2, org.in_channels, 8, 8, generator=g)
            want = F.conv2d(x, org.weight + delta, org.bias, org.stride, org.padding, org.dilation, org.groups)
        assert (lyco(x) - want).abs().max().item() <= 1e-5, "the oracle is not what LyCORIS's forward applies"
    assert delta.abs().max().item() > 100 * TOL  # a ΔW a wrong scale or factor could not hide in
    return lyco, delta


def lycoris_leaves(lyco, variant: Variant) -> dict[str, torch.Tensor]:
    """The module's own state_dict leaves (hada_* / lokr_* and alpha), as the variant writes them."""
    sd = {k: v.detach().clone().contiguous().float() for k, v in lyco.state_dict().items()}
    assert set(sd) - {"alpha"} == set(variant.leaves), sorted(sd)  # the variant is the shape it says
    if variant.drop_alpha:
        del sd["alpha"]
    elif variant.file_alpha is not None:
        sd["alpha"] = torch.tensor(variant.file_alpha)
    return sd


def lycoris_file(lyco, variant: Variant, path: Path) -> Path:
    """The leaves under the module's kohya name, one .safetensors."""
    name = kohya(variant.module)
    save_file({f"{name}.{leaf}": t for leaf, t in lycoris_leaves(lyco, variant).items()}, path)
    return path


def loaded_by_lycoris(model: torch.nn.Module, variant: Variant, path: Path) -> torch.Tensor:
    """ΔW of LyCORIS's own loader's module, rebuilt from the file (lycoris/modules/__init__.py:34-47)."""
    from lycoris.modules import get_module, make_module

    name = kohya(variant.module)
    algo, params = get_module(load_file(path), name)
    lyco = make_module(algo, params, name, copy.deepcopy(model.get_submodule(variant.module)))
    with torch.no_grad():
        return lyco.get_weight(lyco.shape) * lyco.scalar


def merged_of(base: Path, adapter: Path, out: Path) -> dict[str, torch.Tensor]:
    done = run_cli("merge", base, adapter, "--dtype", "float32", "-o", out)
    assert done.exit_code == 0, done.output
    return load_file(out / WEIGHTS)


def max_error_of(variant_name: str, unet, tmp_path: Path) -> float:
    """Merge the variant's file into the UNet folder: every other tensor bit-equal, and the module's error."""
    folder, model, w0 = unet
    variant = VARIANTS[variant_name]
    seed = sorted(VARIANTS).index(variant_name) + 10
    lyco, delta = lycoris_module(model, variant, seed)
    path = lycoris_file(lyco, variant, tmp_path / f"{variant_name}.safetensors")
    if variant.algo is LokrModule and variant.leaves >= W1 | W2:
        assert lyco.scale == 1.0  # lokr.py:210-212: both factors whole, scale 1 whatever alpha was given
    if variant_name not in LOADER_FAILS:
        assert torch.equal(loaded_by_lycoris(model, variant, path), delta)
    got = merged_of(folder, path, tmp_path / "merged")
    key = f"{variant.module}.weight"
    assert set(got) == set(w0)
    for k in w0:
        if k != key:
            assert torch.equal(got[k], w0[k]), k
    return (got[key] - (w0[key] + delta)).abs().max().item()


@pytest.mark.parametrize("variant_name", list(VARIANTS))
def test_merge_is_lycoris_forward(variant_name, unet, tmp_path):
    error = max_error_of(variant_name, unet, tmp_path)
    print(f"{variant_name}: max |merged - (W0 + ΔW)| = {error:.3g}")
    assert error <= TOL, f"{variant_name}: {error}"


def loha_file(model: torch.nn.Module, path: Path) -> Path:
    lyco, _ = lycoris_module(model, VARIANTS["loha-linear"], 1)
    return lycoris_file(lyco, VARIANTS["loha-linear"], path)


def test_loha_file_inspects(unet, tmp_path):
    done = run_cli("inspect", loha_file(unet[1], tmp_path / "loha.safetensors"))
    print(done.output)
    assert done.exit_code == 0, done.output


def test_loha_file_inspects_as_an_adapter(unet, tmp_path):
    done = run_cli("inspect", loha_file(unet[1], tmp_path / "loha.safetensors"))
    print(done.output)
    assert done.exit_code == 0, done.output
    assert "adapter (kohya format)" in done.output and f"{kohya(TO_Q)}  loha" in done.output


def test_loha_and_lora_in_one_file_refused(unet, tmp_path):
    folder, model, _ = unet
    lyco, _ = lycoris_module(model, VARIANTS["loha-linear"], 2)
    tensors = {f"{kohya(TO_Q)}.{k}": v for k, v in lycoris_leaves(lyco, VARIANTS["loha-linear"]).items()}
    g = torch.Generator().manual_seed(3)
    tensors |= {
        f"{kohya(TO_K)}.lora_down.weight": torch.randn(4, 32, generator=g) * 0.1,
        f"{kohya(TO_K)}.lora_up.weight": torch.randn(32, 4, generator=g) * 0.1,
        f"{kohya(TO_K)}.alpha": torch.tensor(4.0),
    }
    save_file(tensors, tmp_path / "mixed.safetensors")
    done = run_cli("merge", folder, tmp_path / "mixed.safetensors", "-o", tmp_path / "m")
    print(one_line_error(done, "loha", "lora"))
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("stray", ["lora_up.weight", "hada_w1_a", "lokr_t1"])
def test_lokr_stray_leaf_refused(stray, unet, tmp_path):
    """A LoKr module with a leaf that goes with no LoKr: kohya's lora_up, LoHa's hada_w1_a, or LyCORIS's
    lokr_t1 (in LokrModule.weight_list, never written by it) -- refused in one line naming the module."""
    folder, model, _ = unet
    variant = VARIANTS["lokr-linear-w2-factored"]
    lyco, _ = lycoris_module(model, variant, 4)
    path = lycoris_file(lyco, variant, tmp_path / "lokr.safetensors")
    tensors = load_file(path)
    tensors[f"{kohya(variant.module)}.{stray}"] = torch.full((32, 2), 0.1)
    save_file(tensors, path)
    done = run_cli("merge", folder, path, "-o", tmp_path / "m")
    print(one_line_error(done, kohya(variant.module)))
    assert not (tmp_path / "m").exists()


def test_merged_unet_folder_keeps_diffusers_file_name(unet, tmp_path):
    """A plain kohya LoRA (no LyCORIS) into the lone UNet folder: the result is a UNet folder diffusers loads."""
    from diffusers import UNet2DConditionModel

    folder, _, _ = unet
    g = torch.Generator().manual_seed(5)
    tensors = {
        f"{kohya(TO_Q)}.lora_down.weight": torch.randn(4, 32, generator=g) * 0.1,
        f"{kohya(TO_Q)}.lora_up.weight": torch.randn(32, 4, generator=g) * 0.1,
        f"{kohya(TO_Q)}.alpha": torch.tensor(4.0),
    }
    save_file(tensors, tmp_path / "lora.safetensors")
    assert run_cli("merge", folder, tmp_path / "lora.safetensors", "-o", tmp_path / "m").exit_code == 0
    assert (tmp_path / "m" / WEIGHTS).is_file(), sorted(p.name for p in (tmp_path / "m").iterdir())
    UNet2DConditionModel.from_pretrained(tmp_path / "m")
    assert "library_name: diffusers" in (tmp_path / "m" / "README.md").read_text()
