"""resize and combine against the dense truth: ΔW formed in the test from the adapters' own tensors,
its SVD taken whole; PEFT loads every result, and its adapter model is the oracle for what it computes."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import FIX_ADAPTER, FIX_BASE, listing, one_line_error, run_cli
from reference import logits, peft_model
from safetensors.torch import load_file, save_file

import lorasurgeon as ls
from lorasurgeon.commands.resize import combine, resize
from lorasurgeon.ops.lowrank import allocate


def deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """Every module's ΔW as PEFT computes it (scale from the config: alpha, rank and alpha patterns, rsLoRA)."""
    model, _ = peft_model(FIX_BASE, [adapter])
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and "a0" in getattr(module, "lora_A", {}):
            key = name.removeprefix("base_model.model.")
            out[key] = module.get_delta_weight("a0").detach().double()
    return out


def best(m: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


@pytest.fixture(scope="module")
def second(tmp_path_factory) -> Path:
    """Another adapter of the committed base, written by PEFT: r=4, rsLoRA, attention only."""
    import transformers
    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("second") / "adapter"
    torch.manual_seed(5)
    model = transformers.AutoModelForCausalLM.from_pretrained(FIX_BASE)
    config = LoraConfig(
        r=4, lora_alpha=8, use_rslora=True, init_lora_weights=False, target_modules=["q_proj", "v_proj"]
    )
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.mark.parametrize("k", [1, 3, 8])
def test_resize_is_the_best_rank_k_of_each_modules_own_product(tmp_path, k):
    report = resize(FIX_ADAPTER, tmp_path / "r", rank=k)
    got, want = deltas(tmp_path / "r"), deltas(FIX_ADAPTER)  # PEFT loads it: ranks and scales as written
    assert set(got) == set(want) and {m.rank for m in report.modules} == {k}
    for name, d in want.items():
        assert float((got[name] - best(d, k)).norm() / best(d, k).norm()) < 1e-5, name


def test_resize_to_an_energy_keeps_the_smallest_rank_that_holds_it(tmp_path):
    report = resize(FIX_ADAPTER, tmp_path / "r", energy=0.8)
    want = deltas(FIX_ADAPTER)
    for m in report.modules:
        s2 = torch.linalg.svdvals(want[m.name]) ** 2
        share = torch.cumsum(s2, 0) / s2.sum()
        assert share[m.rank - 1] >= 0.8 - 1e-9 and (m.rank == 1 or share[m.rank - 2] < 0.8), m
        assert abs(m.kept - float(share[m.rank - 1])) < 1e-6


def test_the_budget_allocation_is_the_brute_force_optimum():
    """Three matrices with known spectra and different costs per component, every budget up to all of them."""
    spectra = [torch.tensor([9.0, 4.0, 2.0, 1.0]), torch.tensor([6.0, 5.0, 1.5]), torch.tensor([3.0, 2.9, 2.8, 0.5])]
    costs = [10, 7, 4]
    for budget in range(sum(costs), sum(c * len(s) for c, s in zip(costs, spectra, strict=True)) + 1):
        got = allocate(spectra, costs, budget, [1, 1, 1], [9, 9, 9])

        def lost(ranks) -> float:
            return sum(float((s[r:] ** 2).sum()) for s, r in zip(spectra, ranks, strict=True))

        options = [
            r
            for r in itertools.product(*(range(1, len(s) + 1) for s in spectra))
            if sum(c * k for c, k in zip(costs, r, strict=True)) <= budget
        ]
        assert lost(got) == pytest.approx(min(lost(r) for r in options)), (budget, got)
        assert sum(c * k for c, k in zip(costs, got, strict=True)) <= budget


def test_a_budget_too_fine_to_allocate_exactly_is_allocated_greedily_within_it(monkeypatch):
    import lorasurgeon.ops.lowrank as lowrank

    spectra = [torch.tensor([9.0, 4.0, 2.0, 1.0]), torch.tensor([6.0, 5.0, 1.5]), torch.tensor([3.0, 2.9, 2.8, 0.5])]
    exact = allocate(spectra, [10, 7, 4], 42, [1, 1, 1], [9, 9, 9])
    monkeypatch.setattr(lowrank, "DP_UNITS", 10)
    greedy = allocate(spectra, [10, 7, 4], 42, [1, 1, 1], [9, 9, 9])
    assert sum(c * k for c, k in zip([10, 7, 4], greedy, strict=True)) <= 42 and greedy == [1, 2, 4] != exact


def test_resize_to_a_budget_fits_it_and_spends_it_where_the_error_is(tmp_path):
    r = run_cli("resize", FIX_ADAPTER, "--budget", "40KB", "-o", tmp_path / "b")
    assert r.exit_code == 0, r.output
    size = (tmp_path / "b" / "adapter_model.safetensors").stat().st_size
    params = sum(t.numel() for t in load_file(tmp_path / "b" / "adapter_model.safetensors").values())
    assert params * 4 <= 40_000 < size + 2_000  # the factors fit; the header is a little extra
    doc = json.loads((tmp_path / "b" / "resize_report.json").read_text())
    assert doc["parameters"] == params and len({m["rank"] for m in doc["modules"]}) > 1
    # one alpha for every module, each tensor's rank from its shape (llama.cpp's rule): the same changes
    config = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] and not config.get("alpha_pattern") and not config["use_rslora"]
    t, peft = load_file(tmp_path / "b" / "adapter_model.safetensors"), deltas(tmp_path / "b")
    for name, d in peft.items():
        a, b = t[f"base_model.model.{name}.lora_A.weight"], t[f"base_model.model.{name}.lora_B.weight"]
        torch.testing.assert_close(config["lora_alpha"] / a.shape[0] * (b.double() @ a.double()), d)
    uniform = resize(FIX_ADAPTER, tmp_path / "u", rank=max(1, params // (16_384 // 8)))  # as many parameters
    assert uniform.parameters <= params and doc["kept"] > uniform.kept  # more of ‖ΔW‖² for the same size


def test_combine_at_full_rank_is_the_weighted_sum_of_the_adapter_models(tmp_path, second):
    report = combine([FIX_ADAPTER, second], tmp_path / "c", weights=[1.0, -0.5])
    assert {m.rank for m in report.modules if "q_proj" in m.name} == {12} and report.kept == pytest.approx(1.0)
    combined, _ = peft_model(FIX_BASE, [tmp_path / "c"])
    both, _ = peft_model(FIX_BASE, [FIX_ADAPTER, second], weights=[1.0, -0.5])  # PEFT, both active, scaled
    torch.testing.assert_close(logits(combined), logits(both), rtol=0, atol=1e-5)


def test_combine_truncated_is_the_best_rank_k_of_the_weighted_sum(tmp_path, second):
    combine([FIX_ADAPTER, second], tmp_path / "c", weights=[0.7, 2.0], rank=5)
    a, b, got = deltas(FIX_ADAPTER), deltas(second), deltas(tmp_path / "c")
    for name in a:
        want = best(0.7 * a[name] + (2.0 * b[name] if name in b else 0), 5)
        assert float((got[name] - want).norm() / want.norm()) < 1e-5, name


def test_a_result_is_replaced_only_with_overwrite(tmp_path):
    assert run_cli("resize", FIX_ADAPTER, "--rank", "2", "-o", tmp_path / "r").exit_code == 0
    one_line_error(run_cli("resize", FIX_ADAPTER, "--rank", "3", "-o", tmp_path / "r"), "--overwrite")
    assert run_cli("resize", FIX_ADAPTER, "--rank", "3", "-o", tmp_path / "r", "--overwrite").exit_code == 0
    assert json.loads((tmp_path / "r" / "adapter_config.json").read_text())["r"] == 3
    r = run_cli("resize", FIX_ADAPTER, "--rank", "3", "-o", tmp_path / "d", "--dry-run")
    assert r.exit_code == 0 and "Would write" in r.stdout and not (tmp_path / "d").exists()


def test_mistakes_are_named(tmp_path, second):
    one_line_error(run_cli("resize", FIX_ADAPTER, "-o", tmp_path / "x"), "give --rank N, --energy F or --budget")
    one_line_error(run_cli("resize", FIX_ADAPTER, "--rank", "2", "--energy", "0.5", "-o", tmp_path / "x"), "give one")
    one_line_error(run_cli("resize", FIX_ADAPTER, "--budget", "1KB", "-o", tmp_path / "x"), "less than rank 1")
    one_line_error(run_cli("resize", FIX_BASE, "--rank", "2", "-o", tmp_path / "x"), "is a model, not an adapter")
    one_line_error(run_cli("combine", FIX_ADAPTER, "-o", tmp_path / "x"), "two adapters or more")
    one_line_error(run_cli("combine", FIX_ADAPTER, second, "--weight", "1", "-o", tmp_path / "x"), "one --weight per")
    dora = shutil.copytree(FIX_ADAPTER, tmp_path / "dora")
    t = load_file(dora / "adapter_model.safetensors")
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)
    save_file(t, dora / "adapter_model.safetensors")
    one_line_error(run_cli("resize", dora, "--rank", "2", "-o", tmp_path / "x"), "DoRA")
    other = shutil.copytree(FIX_ADAPTER, tmp_path / "other")
    t = load_file(other / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    t[key] = torch.zeros(8, 32)
    save_file(t, other / "adapter_model.safetensors")
    one_line_error(run_cli("combine", FIX_ADAPTER, other, "-o", tmp_path / "x"), "not the same base model")
    assert listing(tmp_path) == {
        "dora",
        "other",
        *(f"{d}/{n}" for d in ("dora", "other") for n in listing(tmp_path / d)),
    }
    assert ls.merge is not None
