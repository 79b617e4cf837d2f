"""Extract at the adapter's own rank gives the fine-tune back: a PEFT LoRA merged into a tiny model (PEFT's
merge_and_unload, saved with save_pretrained) and extracted again loads with PEFT into the base with the
fine-tune's logits. Checked with transformers 5.25.0 and PEFT 0.21.2.

What "the adapter's own rank" is depends on PEFT: with ``target_modules="all-linear"`` on Mixtral and Qwen3-MoE,
PEFT 0.21 (under transformers 5) targets the router and the stacked experts through ``target_parameters`` and gives
``gate_up_proj`` rank 2r and alpha 2α (``rank_pattern``: the gate and up matrices it fuses, r each), so each
expert's gate_up change has rank 8 at r=4. And on T5, whose embeddings and head share one tensor, merge_and_unload
adds the LoRA of every tied module (encoder and decoder ``embed_tokens``, ``lm_head``) into that tensor: rank 12.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from architectures import ARCHS, Arch, build, outputs
from safetensors.torch import load_file

import lorasurgeon as ls
from lorasurgeon.names import model_names

R, ALPHA = 4, 8
ATOL = 1e-3  # float32 models: an exact extraction is ~1e-6 off
T5_LINEAR = ["q", "k", "v", "o", "wi", "wo"]


@dataclass(frozen=True)
class FineTune:
    arch: Arch
    base: Path
    tuned: Path
    logits: torch.Tensor  # the fine-tune's, as transformers loads it


def _load(arch: Arch, path: Path) -> Any:
    import transformers

    return getattr(transformers, arch.auto).from_pretrained(path).eval()


def _peft_finetune(root: Path, arch_name: str, **lora: Any) -> FineTune:
    """The base, and a LoRA (lora_B non-zero) merged by PEFT's merge_and_unload and saved: the fine-tune."""
    from peft import LoraConfig, get_peft_model

    arch = ARCHS[arch_name]
    build(arch).save_pretrained(root / "base")
    torch.manual_seed(1)
    model = get_peft_model(build(arch), LoraConfig(r=R, lora_alpha=ALPHA, init_lora_weights=False, **lora))
    model.merge_and_unload().save_pretrained(root / "tuned")
    return FineTune(arch, root / "base", root / "tuned", outputs(_load(arch, root / "tuned"), arch))


def _extracted_logits(ft: FineTune, adapter: Path) -> torch.Tensor:
    from peft import PeftModel

    return outputs(PeftModel.from_pretrained(_load(ft.arch, ft.base), adapter).eval(), ft.arch)


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def moe(request, tmp_path_factory) -> tuple[FineTune, Path, ls.ExtractReport]:
    """An all-linear LoRA (router and experts through target_parameters) merged by PEFT, extracted at r."""
    root = tmp_path_factory.mktemp(request.param)
    ft = _peft_finetune(root, request.param, target_modules="all-linear")
    report = ls.extract(ft.base, ft.tuned, root / "extracted", rank=R)
    return ft, root / "extracted", report


def test_moe_gate_up_change_has_twice_the_adapters_rank(moe):
    """Why r alone cannot give the fine-tune back: each expert's gate_up change has rank 2r, down_proj's r."""
    ft = moe[0]
    base, tuned = _load(ft.arch, ft.base).state_dict(), _load(ft.arch, ft.tuned).state_dict()
    for name, rank in (("gate_up_proj", 2 * R), ("down_proj", R)):
        delta = tuned[f"model.layers.0.mlp.experts.{name}"] - base[f"model.layers.0.mlp.experts.{name}"]
        assert torch.linalg.matrix_rank(delta).tolist() == [rank] * delta.shape[0], name


def test_moe_all_linear_comes_back_at_the_adapters_rank(moe):
    ft, adapter, report = moe
    ranks = {m.name.rpartition(".")[2]: m.rank for m in report.modules if m.kind == "experts"}
    assert ranks == {"gate_up_proj": 2 * R, "down_proj": R}  # PEFT's own ranks for them
    assert report.totals.kept == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(_extracted_logits(ft, adapter), ft.logits, rtol=0, atol=ATOL)


def test_moe_report_accounts_for_every_stacked_parameter(moe):
    """Each stacked parameter is one line of the report, so the modules and the whole tensors together account
    for the total kept: nothing lost out of sight."""
    ft, _, report = moe
    experts = {m.name: m for m in report.modules if m.kind == "experts"}
    assert set(experts) == {f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")}
    gate_up = next(m for name, m in experts.items() if name.endswith("gate_up_proj"))
    assert gate_up.shape[0] == 4 and len(gate_up.shape) == 3  # (E, 2I, H), as the model holds it
    base, tuned = load_file(ft.base / "model.safetensors"), load_file(ft.tuned / "model.safetensors")
    names = model_names(sorted(tuned), json.loads((ft.tuned / "config.json").read_text()))
    full = [names.file_key(f.name) or f.name for f in report.full]  # the routers, stored whole
    full_energy = sum(float(((tuned[k] - base[k]).double() ** 2).sum()) for k in full)
    kept = sum(m.energy * m.kept for m in report.modules) + full_energy
    assert kept == pytest.approx(report.totals.kept * report.totals.change_energy, rel=1e-6)


@pytest.fixture(scope="module")
def t5_tied(tmp_path_factory) -> FineTune:
    """T5 (its embeddings and head one tensor) with LoRA on every linear layer, embed_tokens and lm_head."""
    root = tmp_path_factory.mktemp("t5")
    return _peft_finetune(root, "t5", target_modules=[*T5_LINEAR, "embed_tokens", "lm_head"])


def test_t5_shared_tensor_holds_every_tied_modules_change(t5_tied, tmp_path):
    """merge_and_unload adds the three tied modules' rank-r changes into shared.weight: rank 3r, which extract at
    that rank gives back exactly (at r it keeps the best rank-r part, Eckart–Young, and cannot do better)."""
    base, tuned = load_file(t5_tied.base / "model.safetensors"), load_file(t5_tied.tuned / "model.safetensors")
    assert int(torch.linalg.matrix_rank(tuned["shared.weight"] - base["shared.weight"])) == 3 * R
    report = ls.extract(t5_tied.base, t5_tied.tuned, tmp_path / "extracted", rank=3 * R)
    assert report.totals.kept == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(_extracted_logits(t5_tied, tmp_path / "extracted"), t5_tied.logits, rtol=0, atol=ATOL)


def test_t5_merged_by_lorasurgeon_comes_back_at_the_adapters_rank(tmp_path):
    """lorasurgeon's merge writes each tied tensor with its own change (rank r): extract at r is exact."""
    from peft import LoraConfig, get_peft_model

    arch = ARCHS["t5"]
    build(arch).save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    config = LoraConfig(
        r=R, lora_alpha=ALPHA, init_lora_weights=False, target_modules=[*T5_LINEAR, "embed_tokens", "lm_head"]
    )
    get_peft_model(build(arch), config).save_pretrained(tmp_path / "adapter")
    ls.merge(tmp_path / "base", [tmp_path / "adapter"], tmp_path / "tuned")
    ft = FineTune(arch, tmp_path / "base", tmp_path / "tuned", outputs(_load(arch, tmp_path / "tuned"), arch))
    report = ls.extract(ft.base, ft.tuned, tmp_path / "extracted", rank=R)
    assert report.totals.kept == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(_extracted_logits(ft, tmp_path / "extracted"), ft.logits, rtol=0, atol=ATOL)
