"""One rounding: bf16 merges no worse than PEFT's, and unmerge gives the base back."""

from __future__ import annotations

import make_fixtures as mf
import pytest
import torch
from reference import peft_merged_state, read_folder
from safetensors.torch import load_file, save_file

from lorasurgeon import merge, unmerge

TARGETS = ["q_proj", "v_proj", "down_proj"]


def ulp_bf16(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |x| (8 significant bits)."""
    x = x.float().abs().clamp_min(2.0**-126)
    return torch.exp2(torch.floor(torch.log2(x)) - 7)


def make(root, dtype, b_scale=1.0):
    """A base in ``dtype`` and an fp32 adapter; ``b_scale`` < 1 gives the small deltas training gives."""
    cfg = mf.llama_config(hidden=128)
    base = mf.save_model(mf.build_model(cfg, seed=0, dtype=dtype), root / "base")
    adapter = mf.make_adapter(
        mf.build_model(cfg, seed=0), root / "adapter", r=16, lora_alpha=32, target_modules=TARGETS
    )
    path = adapter / "adapter_model.safetensors"
    save_file({k: v * b_scale if "lora_B" in k else v for k, v in load_file(path).items()}, path)
    return base, adapter


def exact_merge(base_t: dict, adapter_t: dict, name: str, scale: float) -> torch.Tensor:
    module = name.removesuffix(".weight")
    a = adapter_t[f"base_model.model.{module}.lora_A.weight"].double()
    b = adapter_t[f"base_model.model.{module}.lora_B.weight"].double()
    return base_t[name].double() + scale * (b @ a)


def test_bf16_merge_error_never_exceeds_peft(tmp_path):
    base, adapter = make(tmp_path, torch.bfloat16)
    merge(base, [adapter], tmp_path / "merged")
    ours, base_t = read_folder(tmp_path / "merged"), read_folder(base)
    theirs = peft_merged_state(base, [adapter], dtype=torch.bfloat16)
    adapter_t = load_file(adapter / "adapter_model.safetensors")
    checked = 0
    for name in ours:
        if not any(t in name for t in TARGETS):
            assert torch.equal(ours[name], base_t[name])
            continue
        assert ours[name].dtype == torch.bfloat16
        exact = exact_merge(base_t, adapter_t, name, 32 / 16)
        err_ours = (ours[name].double() - exact).abs()
        err_peft = (theirs[name].double() - exact).abs()
        assert (err_ours <= err_peft).all(), name
        # and it is the fp32 sum rounded once: within half a bf16 ulp of the exact sum, give or
        # take fp32's own error, relative to the operands (W0 + ΔW can cancel)
        operands = base_t[name].double().abs() + (exact - base_t[name].double()).abs()
        assert (err_ours <= ulp_bf16(exact) / 2 + 1e-6 * operands).all(), name
        checked += 1
    assert checked == 6


def test_bf16_unmerge_gives_the_base_back(tmp_path):
    base, adapter = make(tmp_path, torch.bfloat16, b_scale=0.01)
    merge(base, [adapter], tmp_path / "merged")
    unmerge(tmp_path / "merged", [adapter], tmp_path / "back")
    base_t, merged_t, back_t = read_folder(base), read_folder(tmp_path / "merged"), read_folder(tmp_path / "back")
    same = total = 0
    for name, w0 in base_t.items():
        got = back_t[name]
        assert got.dtype == w0.dtype
        same += (got.view(torch.int16) == w0.view(torch.int16)).sum().item()
        total += w0.numel()
        # Off by at most one bf16 unit of the merged value: where |ΔW| ≫ |W0| the merged weight
        # has no bits left for W0, so W0's own last place cannot be promised there.
        bound = ulp_bf16(torch.maximum(w0.float().abs(), merged_t[name].float().abs()))
        assert ((got.float() - w0.float()).abs() <= bound).all(), name
    assert same / total >= 0.99, f"only {same / total:.4%} bit for bit"


def test_fp32_round_trip(tmp_path):
    base, adapter = make(tmp_path, torch.float32)
    merge(base, [adapter], tmp_path / "merged")
    unmerge(tmp_path / "merged", [adapter], tmp_path / "back")
    for name, w0 in read_folder(base).items():
        torch.testing.assert_close(read_folder(tmp_path / "back")[name], w0, rtol=1e-6, atol=1e-6)


def test_dtype_option_rounds_once(tmp_path):
    base, adapter = make(tmp_path, torch.float32)
    merge(base, [adapter], tmp_path / "merged", dtype="bfloat16")
    ours, base_t = read_folder(tmp_path / "merged"), read_folder(base)
    adapter_t = load_file(adapter / "adapter_model.safetensors")
    name = "model.layers.1.self_attn.q_proj.weight"
    module = name.removesuffix(".weight")
    a = adapter_t[f"base_model.model.{module}.lora_A.weight"]
    b = adapter_t[f"base_model.model.{module}.lora_B.weight"]
    fp32_sum = base_t[name] + (b @ a) * 2.0
    assert torch.equal(ours[name], fp32_sum.to(torch.bfloat16))  # not bf16(W0) + bf16(ΔW)
    assert all(t.dtype == torch.bfloat16 for t in ours.values())
    import json

    assert json.loads((tmp_path / "merged" / "config.json").read_text())["dtype"] == "bfloat16"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_merge_matches_peft_logits(tmp_path, dtype):
    from reference import load_model, logits, peft_model

    base, adapter = make(tmp_path, dtype, b_scale=0.1)
    merge(base, [adapter], tmp_path / "merged")
    model, _ = peft_model(base, [adapter], dtype=torch.float32)
    ours = logits(load_model(tmp_path / "merged", torch.float32))
    torch.testing.assert_close(ours, logits(model), rtol=0.05, atol=0.05)


@pytest.fixture(scope="module")
def embedding_pair(tmp_path_factory):
    """A bf16 base and an adapter trained on its float32 original, targeting the embedding: PEFT saves the
    float32 W0 (base_layer.weight) with it. B is scaled so ‖ΔW‖ is 2% of ‖W0‖, as trained adapters are.
    Each model gets its own config: save_pretrained records dtype=bfloat16 on the config object."""
    root = tmp_path_factory.mktemp("emb")
    base = mf.save_model(mf.build_model(mf.llama_config(), seed=0, dtype=torch.bfloat16), root / "base")
    adapter = mf.make_adapter(
        mf.build_model(mf.llama_config(), seed=0),
        root / "adapter",
        target_modules=["embed_tokens", "q_proj"],
        r=4,
        lora_alpha=8,
    )
    path, key = adapter / "adapter_model.safetensors", "base_model.model.model.embed_tokens."
    t = load_file(path)
    assert t[key + "base_layer.weight"].dtype == torch.float32
    w0 = t[key + "base_layer.weight"]
    assert not torch.equal(w0, w0.bfloat16().float()), "the saved W0 must carry more than bf16 precision"
    delta = (t[key + "lora_embedding_B"] @ t[key + "lora_embedding_A"]).T * 2.0
    t[key + "lora_embedding_B"] *= 0.02 * w0.norm() / delta.norm()
    save_file(t, path)
    return base, adapter


def test_a_saved_float32_w0_is_taken_at_the_base_dtype(embedding_pair, tmp_path):
    """The adapter model holds W0 in the base's bf16: merged = round(W0_bf16 + ΔW), bit for bit (was 74%)."""
    from peft import PeftModel
    from reference import load_model

    base, adapter = embedding_pair
    layer = PeftModel.from_pretrained(load_model(base), adapter).base_model.model.model.embed_tokens
    w0 = layer.base_layer.weight.detach()
    assert w0.dtype == torch.bfloat16
    expected = (w0.float() + layer.get_delta_weight("default").float()).to(torch.bfloat16)
    merge(base, [adapter], tmp_path / "merged")
    assert torch.equal(read_folder(tmp_path / "merged")["model.embed_tokens.weight"], expected)
    merge(base, [adapter], tmp_path / "aug", form="augmented")  # PEFT's state dict holds the bf16 W0 too
    assert torch.equal(read_folder(tmp_path / "aug")["model.embed_tokens.base_layer.weight"], w0)


def test_unmerge_restores_a_saved_w0_exactly(embedding_pair, tmp_path):
    base, adapter = embedding_pair
    merge(base, [adapter], tmp_path / "merged")
    report = unmerge(tmp_path / "merged", [adapter], tmp_path / "back")
    assert report.counts["restore"] == 1 and "1 restored exactly from the adapter's saved W0" in report.summary()
    original, back = read_folder(base), read_folder(tmp_path / "back")
    assert torch.equal(back["model.embed_tokens.weight"], original["model.embed_tokens.weight"])  # was 74%
    dry = unmerge(tmp_path / "merged", [adapter], None, dry_run=True).summary()
    assert "restore  model.embed_tokens.weight" in dry


def test_the_readme_round_trip_claim_on_the_committed_fixtures(tmp_path):
    """README, "One rounding": measured on the quick start's own files. The fixture adapter is realistic
    (‖ΔW‖ = 2% of ‖W0‖ in every module); unmerge gives back ≥ 97.7% of the merged tensors' elements bit for
    bit, every other element within half a bf16 unit of the merged value."""
    from helpers import ROOT

    from lorasurgeon import diff

    base, adapter = ROOT / "fixtures" / "base", ROOT / "fixtures" / "adapter"
    merge(base, [adapter], tmp_path / "merged")
    unmerge(tmp_path / "merged", [adapter], tmp_path / "base-again")
    changed = [t for t in diff(base, tmp_path / "merged").tensors if t.status == "changed"]
    assert len(changed) == 14 and all(0.01 <= t.rel_change <= 0.03 for t in changed)
    original, back, merged = read_folder(base), read_folder(tmp_path / "base-again"), read_folder(tmp_path / "merged")
    report = {t.name: t.identical_fraction for t in diff(base, tmp_path / "base-again").tensors}
    names = [t.name for t in changed]
    share = sum(report[n] * original[n].numel() for n in names) / sum(original[n].numel() for n in names)
    assert share >= 0.977, share
    for n in names:
        exact = (back[n] == original[n]).double().mean().item()
        assert report[n] == pytest.approx(exact, abs=1e-12)  # diff's figure is the element count
        assert ((back[n].float() - original[n].float()).abs() <= ulp_bf16(merged[n]) / 2).all(), n
