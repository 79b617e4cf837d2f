"""PEFT's tuners other than LoRA, end to end: PEFT writes the adapter (every parameter moved off its no-op init) on
a tiny transformers model saved from a config; `lorasurgeon merge` streams it into the saved base and must equal
PEFT's merge_and_unload (float32); unmerge gives the base back where PEFT has an unmerge; what cannot be folded
is refused by name. ops.tuners' math per tuner is tests/test_tuners_math.py's."""

from __future__ import annotations

import json

import make_fixtures as mf
import pytest
import torch
from helpers import one_line_error, run_cli
from reference import read_folder

import lorasurgeon as ls

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]
FAST = {
    "loha": lambda: peft.LoHaConfig(target_modules=TARGETS, r=4, alpha=8),
    "ia3": lambda: peft.IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"]),
    "oft": lambda: peft.OFTConfig(target_modules=TARGETS, r=0, oft_block_size=8),
    "vera": lambda: peft.VeraConfig(target_modules=TARGETS, r=8),
}
SLOW = {
    "lokr": lambda: peft.LoKrConfig(target_modules=TARGETS, r=4, alpha=8),
    "adalora": lambda: peft.AdaLoraConfig(target_modules=TARGETS, init_r=6, target_r=4, total_step=10),
    "boft": lambda: peft.BOFTConfig(target_modules=TARGETS, boft_block_size=8),
    "fourierft": lambda: peft.FourierFTConfig(target_modules=TARGETS, n_frequency=50),
    "hra": lambda: peft.HRAConfig(target_modules=TARGETS, r=4),
}


def _adapter(tmp_path, make_config):
    """The saved base, PEFT's adapter of it (perturbed off its init), and PEFT's merged state dict."""
    model = mf.build_model(mf.llama_config(tied=False), seed=0)
    mf.save_model(model, tmp_path / "base")
    wrapped = peft.get_peft_model(model, make_config())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if ".default" in name and ".ranknum." not in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    wrapped.save_pretrained(tmp_path / "adapter")
    return {k: v.float() for k, v in wrapped.merge_and_unload().state_dict().items()}


def _check_merge(tmp_path, make_config) -> float:
    expected = _adapter(tmp_path, make_config)
    done = run_cli("merge", tmp_path / "base", tmp_path / "adapter", "--dtype", "float32", "-o", tmp_path / "merged")
    assert done.exit_code == 0, done.output
    merged = read_folder(tmp_path / "merged")
    assert merged.keys() <= expected.keys()
    return max((merged[k] - expected[k]).abs().max().item() for k in merged)


@pytest.mark.parametrize("tuner", list(FAST))
def test_a_tuner_merges_as_peft_merge_and_unload(tmp_path, tuner):
    assert _check_merge(tmp_path, FAST[tuner]) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("tuner", list(SLOW))
def test_every_tuner_merges_as_peft_merge_and_unload(tmp_path, tuner):
    assert _check_merge(tmp_path, SLOW[tuner]) < 1e-5


def test_unmerge_gives_the_base_back_and_inspect_names_the_tuner(tmp_path):
    _adapter(tmp_path, FAST["loha"])
    ls.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    ls.unmerge(tmp_path / "merged", tmp_path / "adapter", tmp_path / "back")
    base, back = read_folder(tmp_path / "base"), read_folder(tmp_path / "back")
    assert max((back[k].float() - base[k].float()).abs().max().item() for k in base) < 1e-5
    shown = run_cli("inspect", tmp_path / "adapter")
    assert shown.exit_code == 0 and "LOHA" in shown.output
    plan = run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "x", "--dry-run")
    assert plan.exit_code == 0 and "loha" in plan.output


def test_what_cannot_be_folded_is_refused_by_name(tmp_path):
    _adapter(tmp_path, FAST["ia3"])
    # a multiplicative tuner has no weight to scale
    one_line_error(
        run_cli("merge", tmp_path / "base", tmp_path / "adapter", "--weight", "0.5", "-o", tmp_path / "x"),
        "merges with weight 1 only",
    )
    # not LoRA factors: resize and vLLM's check name the way out
    one_line_error(run_cli("resize", tmp_path / "adapter", "--rank", "2", "-o", tmp_path / "x"), "IA3", "--to lora")
    one_line_error(run_cli("convert", tmp_path / "adapter", "--to", "mlx", "-o", tmp_path / "x"), "IA3", "--to lora")
    checked = run_cli("check", tmp_path / "adapter", "--for", "vllm")
    assert checked.exit_code == 1 and "LoRA adapters only" in checked.output
    # a peft_type lorasurgeon has no math for
    raw = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(raw | {"peft_type": "POLY"}))
    one_line_error(run_cli("merge", tmp_path / "base", tmp_path / "adapter", "-o", tmp_path / "x"), "POLY")
    assert not (tmp_path / "x").exists()
