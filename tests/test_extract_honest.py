"""extract says what it made: a config that states the ranks stored, a filter that matched nothing named as
such, the option the user gave named in its error, and a 'fine-tune' that is only rounding noise called so."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers import FIX_ADAPTER, FIX_BASE, one_line_error, run_cli
from safetensors.torch import load_file, save_file
from test_resize import deltas


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> Path:
    """The committed base with the committed adapter merged in (bf16): a real, if small, change."""
    out = tmp_path_factory.mktemp("merged") / "merged"
    result = run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def fp16_roundtrip(tmp_path_factory) -> Path:
    """The committed base cast to fp16 and back to bf16: a change only at the level of the dtype's rounding."""
    out = Path(shutil.copytree(FIX_BASE, tmp_path_factory.mktemp("roundtrip") / "b16"))
    tensors = load_file(out / "model.safetensors")
    save_file(
        {k: t.to(torch.float16).to(torch.bfloat16) for k, t in tensors.items()},
        out / "model.safetensors",
        metadata={"format": "pt"},
    )
    return out


def config_rank(config: dict, module: str) -> int:
    """The rank PEFT gives ``module``: the first rank_pattern key matching the end of its name, else r."""
    for pattern, rank in config["rank_pattern"].items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            return int(rank)
    return int(config["r"])


@pytest.mark.parametrize("for_", [["--for", "vllm"], []], ids=["vllm", "plain"])
def test_a_rank_above_the_matrices_gives_a_config_stating_the_ranks_stored(merged, tmp_path, for_):
    out = tmp_path / "out"
    result = run_cli("extract", FIX_BASE, merged, "--rank", "100", *for_, "-o", out)
    assert result.exit_code == 0, result.output
    config = json.loads((out / "adapter_config.json").read_text())
    tensors = load_file(out / "adapter_model.safetensors")
    stored = {
        k.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): t.shape[0]
        for k, t in tensors.items()
        if k.endswith(".lora_A.weight")
    }
    assert stored and set(stored.values()) == {32, 64}  # k/v are 32 × 64; every other matrix allows 64
    assert {m: config_rank(config, m) for m in stored} == stored
    assert config["r"] in stored.values() and config["r"] == 64  # a rank stored (the most common), not 100
    assert config["lora_alpha"] == config["r"]
    check = run_cli("check", out, "--for", "vllm")
    assert check.exit_code == 0 and "needs --max-lora-rank 64 or more" in check.output, check.output
    assert config["r"] <= 64  # vLLM's PEFTHelper refuses an r above the --max-lora-rank check names
    # the scale is still exactly the change computed: PEFT's ΔW is the fine-tune's, every rank being full
    base, tuned = load_file(FIX_BASE / "model.safetensors"), load_file(merged / "model.safetensors")
    for module, delta in deltas(out).items():
        want = tuned[module + ".weight"].double() - base[module + ".weight"].double()
        assert float((delta - want).norm() / want.norm()) < 1e-5, module


def test_vllm_takes_a_rank_above_the_matrices_at_the_max_lora_rank_check_names(merged, tmp_path):
    from test_vllm import vllm_accepts, vllm_deltas  # skips where vLLM's PEFTHelper is not importable

    import lorasurgeon as ls

    out = tmp_path / "out"
    ls.extract(FIX_BASE, merged, out, rank=100, for_="vllm")
    report = ls.check(out, consumer="vllm")
    assert report.exit_code == 0 and report.max_lora_rank == 64, report.summary()
    assert vllm_accepts(out, report.max_lora_rank) is None
    want, got = deltas(out), vllm_deltas(out)
    assert set(got) == set(want)
    for name, d in want.items():
        assert float((got[name] - d).norm() / d.norm()) < 1e-6, name


def test_a_filter_that_matches_nothing_says_so(merged, tmp_path):
    line = one_line_error(
        run_cli("extract", FIX_BASE, merged, "--rank", "4", "--include", "nomatch", "-o", tmp_path / "out"),
        "--include 'nomatch'",
        "leaves none of the",
    )
    assert "differs" not in line
    one_line_error(
        run_cli("extract", FIX_BASE, merged, "--rank", "4", "--exclude", ".", "--dry-run", "-o", tmp_path / "o"),
        "--exclude '.'",
        "leaves none of the",
    )
    assert not (tmp_path / "out").exists()


def test_a_budget_error_names_the_option_given(merged, tmp_path):
    line = one_line_error(
        run_cli("extract", FIX_BASE, merged, "--budget-params", "0", "-o", tmp_path / "out"), "--budget-params"
    )
    assert "--budget " not in line
    line = one_line_error(run_cli("extract", FIX_BASE, merged, "--budget-params", "10", "-o", tmp_path / "out"))
    assert "--budget-params of 10 parameters" in line, line
    one_line_error(run_cli("extract", FIX_BASE, merged, "--budget", "1", "-o", tmp_path / "out"), "--budget must hold")


def test_rounding_units_measure_a_change_in_the_dtype_s_eps():
    from lorasurgeon.ops.compare import ROUNDING_NOISE, rounding_units

    eps = torch.finfo(torch.bfloat16).eps
    assert rounding_units(0.0, 4.0, torch.bfloat16) == 0.0
    assert rounding_units((eps / 2) ** 2 * 4.0, 4.0, torch.bfloat16) == pytest.approx(0.5)
    assert rounding_units(1.0, 0.0, torch.bfloat16) == float("inf")
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    rounded = w.to(torch.bfloat16).float()  # one rounding: at most half an ulp per element
    units = rounding_units(float((rounded - w).square().sum()), float(w.square().sum()), torch.bfloat16)
    assert 0 < units <= 0.5 < ROUNDING_NOISE


def test_a_dtype_round_trip_is_called_rounding_noise_and_a_merge_is_not(merged, fp16_roundtrip, tmp_path):
    result = run_cli("extract", FIX_BASE, fp16_roundtrip, "--rank", "4", "-o", tmp_path / "noise")
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1 and "rounding" in warned[0] and "BF16" in warned[0], result.stderr
    assert "warning" not in result.stdout  # on stderr, once
    doc = json.loads((tmp_path / "noise" / "extract_report.json").read_text())
    assert doc["warnings"] and "rounding" in doc["warnings"][0]
    result = run_cli("extract", FIX_BASE, merged, "--rank", "4", "-o", tmp_path / "real")
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output and "rounding" not in result.output, result.output
    assert json.loads((tmp_path / "real" / "extract_report.json").read_text())["warnings"] == []
