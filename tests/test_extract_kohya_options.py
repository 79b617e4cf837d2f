"""extract --conv-rank: k×k convolutions (a UNet's resnets) at their own fixed rank, as kohya's
extract_lora_from_models.py ``--conv_dim`` does; 0 leaves them out, reported as skipped.

The fine-tune is the committed SD pipeline with the committed kohya LoRA merged in (rank 4 everywhere, its 3×3
convs LoCon); each extracted conv is checked against the Eckart–Young optimum of its dense change at that rank.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import FIX_SD_LORA, FIX_SD_PIPELINE, listing, run_cli
from safetensors.torch import load_file

UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def merged(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("conv") / "merged"
    done = run_cli("merge", FIX_SD_PIPELINE, FIX_SD_LORA, "-o", out)
    assert done.exit_code == 0, done.output
    return out


def convs_kxk(path: Path) -> dict[str, torch.Tensor]:
    """The UNet's k×k convolution weights changed by the LoRA: name -> ΔW (float64)."""
    base, tuned = load_file(FIX_SD_PIPELINE / UNET), load_file(path / UNET)  # named as the pipeline's modules
    return {
        f"unet.{k}": (tuned[k].double() - base[k].double())
        for k in base
        if base[k].ndim == 4 and base[k].shape[2] * base[k].shape[3] > 1 and not torch.equal(base[k], tuned[k])
    }


def optimum(delta: torch.Tensor, rank: int) -> float:
    """Eckart–Young: the least relative error of a rank-``rank`` approximation of ΔW (as out × in·kh·kw)."""
    s = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))
    return math.sqrt(float((s[rank:] ** 2).sum() / (s**2).sum()))


def report_modules(out: Path) -> dict[str, dict]:
    report = json.loads((out / "extract_report.json").read_text())
    return {m["name"]: m for m in report["modules"]}, report


def test_conv_rank_fixes_the_kxk_convs_and_leaves_the_rest_to_rank(merged, tmp_path):
    out = tmp_path / "x"
    done = run_cli("extract", FIX_SD_PIPELINE, merged, "--rank", "3", "--conv-rank", "2", "-o", out)
    assert done.exit_code == 0, done.output
    modules, report = report_modules(out)
    assert report["method"]["conv_rank"] == 2
    changed = convs_kxk(merged)
    assert changed  # the fixture's LoRA is LoCon: its 3×3 convs changed
    for weight, delta in changed.items():
        got = modules[weight.removesuffix(".weight")]
        assert got["rank"] == 2
        assert got["rel_error"] == pytest.approx(optimum(delta, 2), abs=1e-5)
    others = [m for name, m in modules.items() if f"{name}.weight" not in changed and m["rank"] is not None]
    assert others and {m["rank"] for m in others} == {3}  # linear and 1×1: --rank's
    config = json.loads((out / "adapter_config.json").read_text())
    factors = load_file(out / "adapter_model.safetensors")
    conv_a = [k for k in factors if k.endswith("lora_A.weight") and factors[k].ndim == 4 and factors[k].shape[2] > 1]
    assert conv_a and all(factors[k].shape[0] == 2 for k in conv_a)
    assert config["r"] == 3 and set(config["rank_pattern"].values()) == {2}


def test_conv_rank_zero_leaves_the_convs_out_and_says_so(merged, tmp_path):
    out = tmp_path / "x"
    done = run_cli("extract", FIX_SD_PIPELINE, merged, "--rank", "4", "--conv-rank", "0", "-o", out)
    assert done.exit_code == 0, done.output
    assert "not stored: 16 changed tensors" in done.output
    modules, report = report_modules(out)
    changed = {k.removesuffix(".weight") for k in convs_kxk(merged)}
    assert changed.isdisjoint(modules)
    assert {f"{m}.weight" for m in changed} <= set(report["skipped"]["not_stored"])
    factors = load_file(out / "adapter_model.safetensors")
    assert not [k for k in factors if factors[k].ndim == 4 and factors[k].shape[2] > 1]


def test_conv_rank_under_a_budget_is_charged_whole(merged, tmp_path):
    """The convs keep --conv-rank; the budget's ranks are spent on the rest, the convs' factors charged first."""
    out = tmp_path / "x"
    budget = 6000
    done = run_cli("extract", FIX_SD_PIPELINE, merged, "--budget-params", str(budget), "--conv-rank", "1", "-o", out)
    assert done.exit_code == 0, done.output
    modules, _ = report_modules(out)
    for weight in convs_kxk(merged):
        assert modules[weight.removesuffix(".weight")]["rank"] == 1
    factors = load_file(out / "adapter_model.safetensors")
    assert sum(t.numel() for t in factors.values()) <= budget


def test_kohya_locon_file_holds_the_conv_rank(merged, tmp_path):
    """--to kohya: the convs are LoCon modules of rank --conv-rank; the file merges back within their error."""
    out = tmp_path / "locon.safetensors"
    done = run_cli("extract", FIX_SD_PIPELINE, merged, "--rank", "4", "--conv-rank", "4", "--to", "kohya", "-o", out)
    assert done.exit_code == 0, done.output
    lora = load_file(out)
    downs = {k: t for k, t in lora.items() if k.endswith("lora_down.weight") and t.ndim == 4 and t.shape[2] == 3}
    assert downs and all(t.shape[0] == 4 for t in downs.values())
    again = tmp_path / "again"
    assert run_cli("merge", FIX_SD_PIPELINE, out, "-o", again).exit_code == 0
    want, got = load_file(merged / UNET), load_file(again / UNET)
    assert max(float((got[k].double() - want[k].double()).abs().max()) for k in want) <= 1e-5


def test_conv_rank_must_be_a_whole_number_from_python(tmp_path):
    from lorasurgeon import extract
    from lorasurgeon.errors import InvalidOptionError

    with pytest.raises(InvalidOptionError, match="conv_rank"):
        extract(FIX_SD_PIPELINE, FIX_SD_PIPELINE, tmp_path / "x", rank=4, conv_rank=-1)
    assert listing(tmp_path) == set()


def test_negative_conv_rank_is_a_usage_error(tmp_path):
    done = run_cli(
        "extract", FIX_SD_PIPELINE, FIX_SD_PIPELINE, "--rank", "4", "--conv-rank", "-1", "-o", tmp_path / "x"
    )
    assert done.exit_code == 2 and "--conv-rank" in done.output
    assert listing(tmp_path) == set()


def index_sv_fro(s: torch.Tensor, target: float) -> int:
    """kohya-ss sd-scripts networks/resize_lora.py's rank for ``--dynamic_method sv_fro --dynamic_param target``,
    as it is written there (the smallest rank keeping target² of Σσ², capped at len(S) - 1)."""
    s_squared = s.pow(2)
    sum_s_squared = torch.cumsum(s_squared, dim=0) / float(torch.sum(s_squared))
    index = int(torch.searchsorted(sum_s_squared, target**2)) + 1
    return max(1, min(index, len(s) - 1))


@pytest.mark.parametrize("target", [0.5, 0.8, 0.95])
def test_kohya_sv_fro_is_energy_squared(merged, target, tmp_path):
    """sv_fro X keeps X² of each module's Σσ²: --energy X² picks kohya's rank for every module (below its cap)."""
    out = tmp_path / "x"
    done = run_cli("extract", FIX_SD_PIPELINE, merged, "--energy", str(target**2), "--solver", "exact", "-o", out)
    assert done.exit_code == 0, done.output
    modules, _ = report_modules(out)
    compared = 0
    for module in modules.values():
        s = torch.tensor(module["sigma"], dtype=torch.float64)
        want = index_sv_fro(s, target)
        if want < len(s) - 1:  # kohya's cap at len(S) - 1 is its own
            assert module["rank"] == want, module["name"]
            compared += 1
    assert compared > 20


def test_the_capped_rank_note_names_the_option_that_asked(merged, tmp_path):
    """--conv-rank's convs are not 'capped by --rank'; a --conv-rank above a conv's own rank is noted as its."""
    done = run_cli("extract", FIX_SD_PIPELINE, merged, "--rank", "4", "--conv-rank", "2", "-o", tmp_path / "a")
    assert done.exit_code == 0, done.output
    assert "is more than" not in done.output  # every linear holds rank 4, every conv was asked for 2
    done = run_cli("extract", FIX_SD_PIPELINE, merged, "--rank", "2", "--conv-rank", "40", "-o", tmp_path / "b")
    assert done.exit_code == 0, done.output
    assert "note: --conv-rank 40 is more than 16 modules' matrices allow" in done.output
    assert "--rank 2 is more than" not in done.output
