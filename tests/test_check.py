"""check --for vllm|llama.cpp: each loader rule (docs/formats.md §7-8) one by one, on adapters PEFT wrote
and then edited to break exactly that rule; and where a fix is exact, the fixed adapter passes and PEFT
still computes the same change. vLLM's own PEFTHelper judges the same adapters in tests/test_vllm.py
where it imports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import FIX_ADAPTER, FIX_BASE, one_line_error, run_cli
from safetensors.torch import load_file, save_file
from test_resize import deltas

import lorasurgeon as ls

Q = "base_model.model.model.layers.0.self_attn.q_proj"


def edited(tmp_path: Path, name: str, tensors=None, drop=(), **config) -> Path:
    out = shutil.copytree(FIX_ADAPTER, tmp_path / name)
    raw = json.loads((out / "adapter_config.json").read_text()) | config
    (out / "adapter_config.json").write_text(json.dumps(raw))
    t = {k: v for k, v in load_file(out / "adapter_model.safetensors").items() if k not in drop}
    save_file(t | (tensors or {}), out / "adapter_model.safetensors")
    return out


CASES = {
    # name: (consumer, edit, rule, severity)
    "dora": ("vllm", dict(use_dora=True, tensors={f"{Q}.lora_magnitude_vector": torch.ones(64)}), "dora", "error"),
    "bias": ("llama.cpp", dict(bias="all"), "bias", "error"),
    "lora_bias": ("vllm", dict(lora_bias=True, tensors={f"{Q}.lora_B.bias": torch.zeros(64)}), "lora_bias", "error"),
    "modules_to_save": (
        "vllm",
        dict(modules_to_save=["lm_head"], tensors={"base_model.model.lm_head.weight": torch.zeros(256, 64)}),
        "modules_to_save",
        "error",
    ),
    "full tensors": (
        "llama.cpp",
        dict(modules_to_save=["lm_head"], tensors={"base_model.model.lm_head.weight": torch.zeros(256, 64)}),
        "full_tensors",
        "error",
    ),
    "pissa": ("vllm", dict(init_lora_weights="pissa"), "init_lora_weights", "error"),
    "alora": ("vllm", dict(alora_invocation_tokens=[5, 6]), "variant", "error"),
    "layer_replication": ("llama.cpp", dict(layer_replication=[[0, 2], [1, 2]]), "variant", "error"),
    "rank": (
        "vllm",
        dict(r=600, tensors={f"{Q}.lora_A.weight": torch.randn(600, 64), f"{Q}.lora_B.weight": torch.randn(64, 600)}),
        "rank",
        "fix",
    ),
    "rslora": ("llama.cpp", dict(use_rslora=True), "alpha", "fix"),
    "alpha_pattern": ("llama.cpp", dict(alpha_pattern={"q_proj": 32}), "alpha", "fix"),
    "patterns": ("vllm", dict(alpha_pattern={"q_proj": 32}), "patterns", "note"),
    "packed": (
        "vllm",
        dict(
            drop=(f"{Q}.lora_A.weight", f"{Q}.lora_B.weight"),
            tensors={
                Q.replace("q_proj", "qkv_proj") + ".lora_A.weight": torch.randn(8, 64),
                Q.replace("q_proj", "qkv_proj") + ".lora_B.weight": torch.randn(128, 8),
            },
        ),
        "packed_modules",
        "note",  # Phi-3 itself has qkv_proj; only the base tells whether vLLM splits it
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_rule_is_named_with_its_severity(tmp_path, case):
    consumer, edit, rule, severity = CASES[case]
    adapter = edited(tmp_path, case.replace(" ", "_"), **edit)
    r = run_cli("check", adapter, "--for", consumer, "--json")
    doc = json.loads(r.stdout)
    assert {(p["rule"], p["severity"]) for p in doc["problems"]} >= {(rule, severity)}, doc
    assert r.exit_code == (0 if severity == "note" else 1) and doc["ok"] == (severity == "note")


@pytest.mark.parametrize("consumer", ["vllm", "llama.cpp"])
def test_a_plain_adapter_passes(tmp_path, consumer):
    r = run_cli("check", FIX_ADAPTER, "--for", consumer)
    assert r.exit_code == 0 and "loads as PEFT computes it" in r.stdout, r.output
    if consumer == "vllm":
        assert "needs --max-lora-rank 8 or more" in r.stdout
    # EVA only chose the first A (from activations): what it saved is a plain LoRA on an unchanged base
    assert run_cli("check", edited(tmp_path, "eva", init_lora_weights="eva"), "--for", consumer).exit_code == 0


@pytest.mark.parametrize("edit", [dict(use_rslora=True), dict(alpha_pattern={"q_proj": 32, "down_proj": 4})])
def test_the_llama_cpp_fix_folds_the_scales_exactly(tmp_path, edit):
    adapter = edited(tmp_path, "scaled", **edit)
    report = ls.check(adapter, consumer="llama.cpp")
    (fix,) = [p for p in report.problems if p.rule == "alpha"]
    assert fix.fix.startswith(f"lorasurgeon convert {adapter} --for llama.cpp")
    r = run_cli("convert", adapter, "--for", "llama.cpp", "-o", tmp_path / "fixed")
    assert r.exit_code == 0, r.output
    assert ls.check(tmp_path / "fixed", consumer="llama.cpp").exit_code == 0
    want, got = deltas(adapter), deltas(tmp_path / "fixed")
    for name, d in want.items():
        assert float((got[name] - d).norm() / d.norm()) < 1e-5, name
    # what llama.cpp computes: one alpha for all, each tensor's rank from its shape
    config = json.loads((tmp_path / "fixed" / "adapter_config.json").read_text())
    t = load_file(tmp_path / "fixed" / "adapter_model.safetensors")
    for name, d in want.items():
        a, b = t[f"base_model.model.{name}.lora_A.weight"], t[f"base_model.model.{name}.lora_B.weight"]
        assert float((config["lora_alpha"] / a.shape[0] * (b.double() @ a.double()) - d).norm() / d.norm()) < 1e-5


def test_mistakes_are_named(tmp_path):
    r = run_cli("check", FIX_ADAPTER, "--for", "tgi")
    assert r.exit_code == 2 and "Invalid value for '--for'" in r.output
    one_line_error(run_cli("check", FIX_BASE, "--for", "vllm"), "is a model, not an adapter")
    one_line_error(run_cli("check", tmp_path / "nope", "--for", "vllm"), "no such file or folder")


def test_consumers_are_one_registry(tmp_path):
    """Every command reaches a consumer through lorasurgeon.consumers: an unknown name is refused by name,
    with the registry's choices, and the CLI's --for offers exactly the registry's consumers."""
    from lorasurgeon.cli.options import CONSUMERS as CHOICES
    from lorasurgeon.consumers import CONSUMERS, consumer

    assert list(CHOICES.choices) == list(CONSUMERS) == ["vllm", "llama.cpp"]
    assert all(consumer(name).name == name for name in CONSUMERS)
    with pytest.raises(ls.InvalidOptionError, match=r"unknown consumer 'tgi': choose vllm or llama.cpp"):
        ls.check(FIX_ADAPTER, consumer="tgi")
    with pytest.raises(ls.InvalidOptionError, match=r"unknown for_ 'tgi': choose vllm or llama.cpp"):
        ls.resize(FIX_ADAPTER, tmp_path / "x", rank=2, for_="tgi")
    assert not (tmp_path / "x").exists()


def test_the_profiles_make_what_the_consumer_loads_or_refuse_by_name(tmp_path):
    for consumer in ("vllm", "llama.cpp"):
        ls.resize(FIX_ADAPTER, tmp_path / f"r-{consumer}", budget="40KB", for_=consumer)
        ls.combine([FIX_ADAPTER, FIX_ADAPTER], tmp_path / f"c-{consumer}", weights=[1, 0.5], rank=6, for_=consumer)
        for out in (tmp_path / f"r-{consumer}", tmp_path / f"c-{consumer}"):
            assert ls.check(out, consumer=consumer).exit_code == 0, ls.check(out, consumer=consumer).summary()
    mts = edited(
        tmp_path, "mts", modules_to_save=["lm_head"], tensors={"base_model.model.lm_head.weight": torch.zeros(256, 64)}
    )
    one_line_error(run_cli("resize", mts, "--rank", "2", "--for", "llama.cpp", "-o", tmp_path / "x"), "whole tensors")
    one_line_error(run_cli("convert", mts, "--for", "vllm", "-o", tmp_path / "x"), "--for vllm", "lm_head")
    # a W0 PEFT saved beside an embedding LoRA (base_layer.weight) is left out, not refused: neither loads it
    w0 = "base_model.model.model.embed_tokens.base_layer.weight"
    saved = edited(tmp_path, "saved", tensors={w0: torch.zeros(256, 64)})
    ls.resize(saved, tmp_path / "kept", rank=2)
    ls.resize(saved, tmp_path / "dropped", rank=2, for_="llama.cpp")
    assert w0 in load_file(tmp_path / "kept" / "adapter_model.safetensors")
    assert w0 not in load_file(tmp_path / "dropped" / "adapter_model.safetensors")
    # the fixture's matrices are 64 wide, so a rank above vLLM's 512 cannot arise: lower the limit instead
    from lorasurgeon.consumers import consumer

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(consumer("vllm"), "max_rank", 4)
        with pytest.raises(ls.InvalidOptionError, match="largest max_lora_rank"):
            ls.resize(FIX_ADAPTER, tmp_path / "x", energy=1.0, for_="vllm")
        ls.resize(FIX_ADAPTER, tmp_path / "capped", energy=1.0, max_rank=4, for_="vllm")
    assert not (tmp_path / "x").exists()


def test_the_max_lora_rank_named_admits_the_config_s_ranks_too(tmp_path):
    """vLLM's validate_legal compares max(r, *rank_pattern.values()) from the config with --max-lora-rank: a config
    stating r=100 over rank-8 tensors needs 128, not 8."""
    adapter = shutil.copytree(FIX_ADAPTER, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["r"] = 100
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert ls.check(adapter, consumer="vllm").to_dict()["max_lora_rank"] == 128
    config["r"], config["rank_pattern"] = 8, {"q_proj": 40}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert ls.check(adapter, consumer="vllm").to_dict()["max_lora_rank"] == 64
