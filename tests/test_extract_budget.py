"""extract --budget on a real fine-tune: the committed base trained fully for a few steps here, its change
extracted within a size; against the uniform rank of the same size, in next-token KL to the fine-tune."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import FIX_BASE, one_line_error, run_cli
from reference import logits, peft_model
from safetensors.torch import load_file

import lorasurgeon as ls

IDS = torch.randint(3, 256, (4, 24), generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def finetune(tmp_path_factory) -> Path:
    """Every parameter trained (AdamW, 30 steps) to continue fixed token sequences: a full fine-tune."""
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(FIX_BASE, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(30):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path_factory.mktemp("finetune") / "tuned"
    model.save_pretrained(out)
    return out


def kl(adapter: Path, tuned: Path) -> float:
    import transformers

    want = logits(transformers.AutoModelForCausalLM.from_pretrained(tuned).eval(), IDS).log_softmax(-1)
    model, _ = peft_model(FIX_BASE, [adapter], dtype=torch.float32)
    got = logits(model, IDS).log_softmax(-1)
    return float((want.exp() * (want - got)).sum(-1).mean())


def parameters(adapter: Path) -> int:
    return sum(t.numel() for t in load_file(adapter / "adapter_model.safetensors").values())


def test_a_budgeted_adapter_beats_the_uniform_rank_of_the_same_size(finetune, tmp_path):
    uniform = ls.extract(FIX_BASE, finetune, tmp_path / "uniform", rank=4)
    size = parameters(tmp_path / "uniform")
    report = ls.extract(FIX_BASE, finetune, tmp_path / "budget", budget=size)
    assert parameters(tmp_path / "budget") <= size and len({m.rank for m in report.modules}) > 1
    assert report.totals.kept > uniform.totals.kept
    assert kl(tmp_path / "budget", finetune) < kl(tmp_path / "uniform", finetune)
    doc = json.loads((tmp_path / "budget" / "extract_report.json").read_text())
    assert doc["method"]["budget_params"] == size and any("--budget" in n for n in doc["notes"])


def test_the_budget_in_bytes_and_with_energy_floors(finetune, tmp_path):
    r = run_cli("extract", FIX_BASE, finetune, "--budget", "64KB", "--energy", "0.3", "-o", tmp_path / "b")
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "b" / "extract_report.json").read_text())
    assert sum(t.numel() for t in load_file(tmp_path / "b" / "adapter_model.safetensors").values()) * 4 <= 64_000
    assert all(m["kept"] >= 0.3 - 1e-6 for m in doc["modules"])
    one_line_error(run_cli("extract", FIX_BASE, finetune, "--budget", "1KB", "-o", tmp_path / "x"), "--budget of")
    one_line_error(
        run_cli("extract", FIX_BASE, finetune, "--rank", "2", "--budget", "1MB", "-o", tmp_path / "x"), "--rank"
    )
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("consumer", ["vllm", "llama.cpp"])
def test_extract_for_a_consumer_folds_the_scales_and_refuses_what_it_cannot_take(finetune, tmp_path, consumer):
    from test_resize import deltas

    r = run_cli(
        "extract", FIX_BASE, finetune, "--energy", "0.5", "--extras", "skip", "--for", consumer, "-o", tmp_path / "a"
    )
    assert r.exit_code == 0, r.output
    assert ls.check(tmp_path / "a", consumer=consumer).exit_code == 0
    ls.extract(FIX_BASE, finetune, tmp_path / "plain", energy=0.5, extras="skip")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert not config["alpha_pattern"] and config["rank_pattern"]  # ranks differ, one alpha
    got, want = deltas(tmp_path / "a"), deltas(tmp_path / "plain")
    assert set(got) == set(want) and all(torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-8) for k in want)
    r = run_cli("extract", FIX_BASE, finetune, "--rank", "2", "--for", consumer, "-o", tmp_path / "x")
    one_line_error(r, f"--for {consumer}", "whole tensors")  # the changed norms, stored whole by default
    assert not (tmp_path / "x").exists()
