"""convert ADAPTER --to lora --base BASE: the best LoRA of the change an adapter of any PEFT tuner makes. The
oracles: PEFT's merge_and_unload (the change, formed densely here) and the Eckart–Young optimum of that change
(its truncated SVD), module by module."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli
from reference import read_folder
from test_tuners_merge import FAST, _adapter

import lorasurgeon as ls

peft = pytest.importorskip("peft")


def _deltas(tmp_path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The change PEFT's merge makes, by module (dense, float32)."""
    base = read_folder(tmp_path / "base")
    return {
        k[: -len(".weight")]: expected[k] - base[k].float()
        for k in base
        if not torch.equal(expected[k], base[k].float())
    }


def _lora_delta(folder, module: str) -> torch.Tensor:
    tensors, config = read_folder(folder), json.loads((folder / "adapter_config.json").read_text())
    a, b = tensors[f"base_model.model.{module}.lora_A.weight"], tensors[f"base_model.model.{module}.lora_B.weight"]
    r = a.shape[0]
    pattern = {k: v for k, v in (config.get("alpha_pattern") or {}).items() if module.endswith(k.split("\\.")[-1])}
    alpha = next(iter(pattern.values()), config["lora_alpha"])
    return (alpha / r) * (b.float() @ a.float())


CASES = {**FAST, "ln_tuning": lambda: peft.LNTuningConfig(target_modules=["input_layernorm", "norm"])}


@pytest.mark.parametrize("tuner", ["loha", "ia3", "ln_tuning"])  # additive, multiplicative, whole tensors
def test_at_full_rank_the_lora_merges_as_the_tuner_does(tmp_path, tuner):
    expected = _adapter(tmp_path, CASES[tuner])
    done = run_cli(
        "convert",
        tmp_path / "adapter",
        "--to",
        "lora",
        "--base",
        tmp_path / "base",
        "--energy",
        "1",
        "-o",
        tmp_path / "lora",
    )
    assert done.exit_code == 0, done.output
    ls.merge(tmp_path / "base", tmp_path / "lora", tmp_path / "merged", dtype="float32")
    merged = read_folder(tmp_path / "merged")
    worst = max((merged[k] - expected[k]).abs().max().item() for k in merged)
    assert worst < 1e-4, worst
    card = (tmp_path / "lora" / "README.md").read_text()
    assert "lorasurgeon convert" in card and "--to=lora" in card


def test_at_a_lower_rank_each_module_is_the_eckart_young_optimum(tmp_path):
    expected = _adapter(tmp_path, FAST["loha"])
    done = run_cli(
        "convert",
        tmp_path / "adapter",
        "--to",
        "lora",
        "--base",
        tmp_path / "base",
        "--rank",
        "3",
        "-o",
        tmp_path / "lora",
    )
    assert done.exit_code == 0, done.output
    for module, delta in _deltas(tmp_path, expected).items():
        sigma = torch.linalg.svdvals(delta.double())
        best = sigma[3:].square().sum().sqrt().item()  # the error of the best rank-3 approximation
        got = (delta.double() - _lora_delta(tmp_path / "lora", module).double()).norm().item()
        assert got <= best * (1 + 1e-4) + 1e-6, (module, got, best)


def test_mistakes_are_refused_before_any_work(tmp_path):
    _adapter(tmp_path, FAST["loha"])
    no_base = run_cli("convert", tmp_path / "adapter", "--to", "lora", "--rank", "2", "-o", tmp_path / "x")
    assert no_base.exit_code == 2 and "--to lora needs --base" in no_base.output
    sized = run_cli("convert", tmp_path / "adapter", "--to", "peft", "--rank", "2", "-o", tmp_path / "x")
    assert sized.exit_code == 2 and "go with --to lora" in sized.output
    unsized = run_cli(
        "convert", tmp_path / "adapter", "--to", "lora", "--base", tmp_path / "base", "-o", tmp_path / "x"
    )
    assert unsized.exit_code == 2 and "--rank" in unsized.output
    swapped = run_cli(
        "convert",
        tmp_path / "base",
        "--to",
        "lora",
        "--base",
        tmp_path / "adapter",
        "--rank",
        "2",
        "-o",
        tmp_path / "x",
    )
    assert swapped.exit_code == 2 and "swapped" in swapped.output
    assert not (tmp_path / "x").exists()
