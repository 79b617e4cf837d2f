"""Quantized checkpoints: read exactly as their producers dequantize them, merged into (a plain result, or
the base's own format with only changed blocks re-quantized), merged out again, converted, extracted
against; and what lorasurgeon does not read refused by name.

The oracles are the producers' own libraries (tests/quantize.py): transformers' FP8 dequantizer and
loader, compressed-tensors' dequantize and unpack, bitsandbytes' dequantize_4bit and int8 dequant,
transformers' MXFP4 decoder. ΔW is formed densely in the test from the adapter's own tensors.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import FIX_ADAPTER, FIX_BASE, listing, one_line_error, run_cli
from quantize import FORMATS, dequantize_with_library, fp8_reference, fp8_transformers, quantized_folder
from reference import read_folder
from safetensors.torch import load_file, save_file

import lorasurgeon as ls
from lorasurgeon.commands._inputs import plain_weights
from lorasurgeon.io.checkpoint import open_checkpoint
from lorasurgeon.io.sidecar import read_config

Q = "model.layers.0.self_attn.q_proj"  # a module the committed adapter targets
FAST = ["fp8", "fp8-partial-bf16", "ct-w4a16-asym-group", "ct-fp8-channel", "bnb-nf4-dq", "bnb-int8"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantized")
    return {fmt: quantized_folder(FIX_BASE, root / fmt, fmt) for fmt in FORMATS}


def adapter_delta(adapter: Path, weight: float = 1.0) -> dict[str, torch.Tensor]:
    """ΔW of every module of a plain LoRA adapter, formed densely: weight · α/r · B @ A, in float32."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    t = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for key, a in t.items():
        if key.endswith("lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = t[key.replace("lora_A", "lora_B")]
            out[f"{module}.weight"] = weight * config["lora_alpha"] / a.shape[0] * (b.float() @ a.float())
    return out


def plain_folder(src: Path, dst: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """``src`` (a quantized folder) as an unquantized model holding ``tensors`` for its quantized weights."""
    dst.mkdir()
    base = load_file(FIX_BASE / "model.safetensors")
    save_file({**base, **tensors}, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def library_fresh_error(fmt: str, exact: torch.Tensor) -> float:
    """The relative error of the producer's own fresh quantization of ``exact`` (what the format costs)."""
    folder_free = FORMATS[fmt][0](exact.to(torch.bfloat16 if not fmt.startswith("fp8") else torch.float32))
    tmp = {f"{Q}.{k}": v for k, v in folder_free.items()}
    from quantize import _library_one

    back = _library_one(tmp, Q, fmt).float()
    return float((back - exact).norm() / exact.norm())


# --- reading ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_read_equals_the_producers_dequantizer_to_the_bit(folders, fmt):
    lib = dequantize_with_library(folders[fmt], fmt)
    raw = open_checkpoint(folders[fmt])
    view, layout = plain_weights(raw, read_config(folders[fmt]), role="base")
    assert layout is not None and set(layout.tensors) == set(lib) and len(lib) == 14
    assert sorted(view.names()) == sorted(open_checkpoint(FIX_BASE).names())  # the parts hidden, plain names
    for name, want in lib.items():
        got = view.read(name)
        assert got.dtype == torch.float32
        assert torch.equal(got.to(want.dtype), want), name  # float32, or the library's own dtype (one rounding)


def test_activation_ordered_groups_are_read_by_g_idx_and_re_quantized_in_place(tmp_path):
    """g_idx (GPTQ's activation order, which compressed-tensors no longer writes): column j belongs to
    group g_idx[j]; W = (q − zp[:, g_idx]) · scale[:, g_idx]. Checked against that formula, written out."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    spec = {
        "num_bits": 4,
        "type": "int",
        "symmetric": False,
        "strategy": "group",
        "group_size": 16,
        "actorder": "group",
    }
    out = shutil.copytree(FIX_BASE, tmp_path / "gidx")
    t = load_file(out / "model.safetensors")
    want = {}
    g = torch.Generator().manual_seed(0)
    for name in [k for k in t if k.endswith("proj.weight")]:
        w = t.pop(name).float()
        rows, cols = w.shape
        g_idx = (torch.randperm(cols, generator=g) // 16).to(torch.int32)
        groups = cols // 16
        mn = torch.stack([w[:, g_idx == i].amin(1).clamp(max=0) for i in range(groups)], 1)
        mx = torch.stack([w[:, g_idx == i].amax(1).clamp(min=0) for i in range(groups)], 1)
        scale = ((mx - mn) / 15).to(torch.bfloat16)
        zp = torch.round(-8 - mn / scale.float()).clamp(-8, 7).to(torch.int8)
        q = torch.round(w / scale.float()[:, g_idx] + zp.float()[:, g_idx]).clamp(-8, 7).to(torch.int8)
        module = name.removesuffix(".weight")
        t[f"{module}.weight_packed"] = pack_to_int32(q, 4)
        t[f"{module}.weight_shape"] = torch.tensor([rows, cols], dtype=torch.int32)
        t[f"{module}.weight_scale"], t[f"{module}.weight_g_idx"] = scale, g_idx
        t[f"{module}.weight_zero_point"] = pack_to_int32(zp, 4, packed_dim=0)
        assert torch.equal(unpack_from_int32(t[f"{module}.weight_packed"], 4, torch.Size([rows, cols])), q)
        want[name] = (q.float() - zp.float()[:, g_idx]) * scale.float()[:, g_idx]
    save_file(t, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": spec}},
    }
    (out / "config.json").write_text(json.dumps(config))
    view, layout = plain_weights(open_checkpoint(out), read_config(out), role="base")
    assert layout is not None and all(torch.equal(view.read(k), v) for k, v in want.items())
    report = ls.merge(out, [FIX_ADAPTER], tmp_path / "m")
    merged = load_file(tmp_path / "m" / "model.safetensors")
    assert all(torch.equal(merged[k], t[k]) for k in t if k.endswith(("g_idx", "weight_shape")))  # the order stays
    delta = adapter_delta(FIX_ADAPTER)
    view, _ = plain_weights(open_checkpoint(tmp_path / "m"), read_config(tmp_path / "m"), role="merged")
    for name, w0 in want.items():  # never further from the exact merge than the base was
        assert float((view.read(name) - (w0 + delta[name])).norm()) <= float(delta[name].norm()) * (1 + 1e-5)
    assert len(report.requantized) == 14


def test_the_tests_fp8_reference_is_transformers_quantizer_on_whole_tiles():
    """amax/448 here, 1/(448/amax) in transformers: the same codes, scales within one float32 ulp."""
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(0)) * 0.05
    ours, theirs = fp8_reference(w, (32, 32), torch.float32), fp8_transformers(w, (32, 32))
    assert torch.equal(ours["weight"].view(torch.uint8), theirs["weight"].view(torch.uint8))
    ulp = torch.nextafter(theirs["weight_scale_inv"], torch.tensor(1.0)) - theirs["weight_scale_inv"]
    assert bool(((ours["weight_scale_inv"] - theirs["weight_scale_inv"]).abs() <= ulp).all())


# --- merge into a plain dtype ------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", FAST)
def test_merge_with_a_dtype_is_the_merge_of_the_dequantized_base(folders, fmt, tmp_path):
    lib = {k: v.float() for k, v in dequantize_with_library(folders[fmt], fmt).items()}
    plain = plain_folder(folders[fmt], tmp_path / "plain", lib)  # float32 weights, the library's values
    ls.merge(plain, [FIX_ADAPTER], tmp_path / "want", dtype="bfloat16")
    report = ls.merge(folders[fmt], [FIX_ADAPTER], tmp_path / "got", dtype="bfloat16")
    want, got = read_folder(tmp_path / "want"), read_folder(tmp_path / "got")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert "quantization_config" not in json.loads((tmp_path / "got" / "config.json").read_text())
    assert not report.requantized and not (tmp_path / "got" / "requantization.json").exists()


def test_transformers_loads_the_plain_merge_as_it_loads_the_fp8_base_merged(folders, tmp_path):
    """The FP8 base through transformers' own loader (dequantize=True), merged by PEFT, against ours."""
    import transformers
    from peft import PeftModel
    from reference import logits
    from transformers import FineGrainedFP8Config

    qc = FineGrainedFP8Config(dequantize=True, weight_block_size=(32, 32))
    base = transformers.AutoModelForCausalLM.from_pretrained(folders["fp8"], quantization_config=qc).float()
    peft = PeftModel.from_pretrained(base, FIX_ADAPTER).merge_and_unload().eval()
    ls.merge(folders["fp8"], [FIX_ADAPTER], tmp_path / "m", dtype="float32")
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    # transformers dequantizes to bf16 on load (one rounding of code × scale), ours stays float32
    torch.testing.assert_close(logits(ours), logits(peft), rtol=0, atol=2e-3)


# --- merge keeping the format --------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_merge_keeps_the_format_and_rounds_as_the_producer_would(folders, fmt, tmp_path):
    q = folders[fmt]
    report = ls.merge(q, [FIX_ADAPTER], tmp_path / "m")
    before, after = load_file(q / "model.safetensors"), load_file(tmp_path / "m" / "model.safetensors")
    assert {k: (v.dtype, v.shape) for k, v in after.items()} == {k: (v.dtype, v.shape) for k, v in before.items()}
    assert json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"] == FORMATS[fmt][1]
    for k in before:  # what the adapter does not touch: byte for byte
        if "layernorm" in k or "embed" in k or "lm_head" in k:
            assert torch.equal(before[k], after[k]), k
    base = dequantize_with_library(q, fmt)
    stored = dequantize_with_library(tmp_path / "m", fmt)  # the producer's own code reads our result
    delta = adapter_delta(FIX_ADAPTER)
    reports = {r.name: r for r in report.requantized}
    assert set(reports) == set(delta) == set(stored)
    doc = json.loads((tmp_path / "m" / "requantization.json").read_text())
    assert {w["name"] for w in doc["weights"]} == set(delta)
    for name, d in delta.items():
        exact = base[name].float() + d
        err = float((stored[name].float() - exact).norm() / exact.norm())
        fresh = library_fresh_error(fmt, exact) if name.startswith(Q) else None
        assert math.isclose(reports[name].error, err, rel_tol=1e-3, abs_tol=1e-6), name
        if fresh is not None:  # no worse than the producer quantizing the exact values itself
            assert err <= fresh * 1.02 + 1e-7, (name, err, fresh)
        # and never further from the exact merge than the base itself was: a change finer than the
        # format's steps leaves blocks as they were instead of adding fresh noise
        assert float((stored[name].float() - exact).norm()) <= float(d.norm()) * (1 + 1e-5), name
        assert reports[name].error <= reports[name].format_error * 1.02 + 1e-7


def zero_rows(adapter: Path, dst: Path, rows: int) -> Path:
    """The adapter with lora_B's first ``rows`` rows zeroed: ΔW leaves those rows of every weight alone."""
    shutil.copytree(adapter, dst)
    t = load_file(dst / "adapter_model.safetensors")
    for k, v in t.items():
        if "lora_B" in k:
            v[:rows] = 0
    save_file(t, dst / "adapter_model.safetensors")
    return dst


# formats whose scale blocks do not straddle row 32 of these weights (double-quantized bitsandbytes included:
# its nested scales, shared by 256 blocks, never change)
WHOLE_ROW_BLOCKS = [
    "fp8",
    "fp8-ue8m0-u8",
    "ct-w4a16-asym-group",
    "ct-w8a8-int-channel",
    "ct-fp8-block",
    "bnb-nf4",
    "bnb-nf4-dq",
    "bnb-fp4",
    "bnb-int8",
]


@pytest.mark.parametrize("fmt", WHOLE_ROW_BLOCKS)
def test_merge_then_unmerge_returns_every_untouched_block_byte_for_byte(folders, fmt, tmp_path):
    adapter = zero_rows(FIX_ADAPTER, tmp_path / "adapter", 32)
    q = folders[fmt]
    ls.merge(q, [adapter], tmp_path / "m")
    report = ls.unmerge(tmp_path / "m", [adapter], tmp_path / "u")
    base = dequantize_with_library(q, fmt)
    merged, back = dequantize_with_library(tmp_path / "m", fmt), dequantize_with_library(tmp_path / "u", fmt)
    raw_before, raw_back = load_file(q / "model.safetensors"), load_file(tmp_path / "u" / "model.safetensors")
    for name in base:
        assert torch.equal(merged[name][:32], base[name][:32]) and torch.equal(back[name][:32], base[name][:32])
        if base[name].shape[0] == 32:  # k_proj, v_proj: ΔW is zero, every stored byte copied
            module = name.removesuffix(".weight")
            assert all(torch.equal(raw_before[k], raw_back[k]) for k in raw_before if k.startswith(module + "."))
    # elsewhere the round trip costs the format's rounding, twice at most; it is reported
    for r in report.requantized:
        assert r.error <= 2.5 * r.format_error + 1e-7
        full = float((back[r.name].float() - base[r.name].float()).norm() / base[r.name].float().norm())
        assert full <= 3 * r.format_error + 1e-7


@pytest.mark.parametrize(
    "fmt", ["fp8-partial-bf16", "ct-fp8-block", "ct-w4a16-asym-group", "ct-fp8-tensor", "bnb-int8"]
)
def test_big_weights_are_re_quantized_slab_by_slab_to_the_same_bytes(folders, fmt, tmp_path, monkeypatch):
    """Memory: a weight is re-quantized a slab of block rows at a time; the bytes do not depend on it."""
    import lorasurgeon.formats.base as base

    ls.merge(folders[fmt], [FIX_ADAPTER], tmp_path / "whole")
    monkeypatch.setattr(base, "CHUNK", 64)  # a slab of one row of blocks, re-encoded a few blocks at a time
    assert base.slabs(128, 64, 48) == [slice(0, 48), slice(48, 96), slice(96, 128)]
    ls.merge(folders[fmt], [FIX_ADAPTER], tmp_path / "slabs")
    a, b = read_folder(tmp_path / "whole"), read_folder(tmp_path / "slabs")
    assert set(a) == set(b) and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


def test_static_activation_scales_are_kept_with_a_warning_or_left_out(folders, tmp_path):
    q = shutil.copytree(folders["fp8"], tmp_path / "static")
    t = load_file(q / "model.safetensors")
    t[f"{Q}.input_scale"] = torch.tensor([0.02])
    save_file(t, q / "model.safetensors", metadata={"format": "pt"})
    r = run_cli("merge", q, FIX_ADAPTER, "-o", tmp_path / "keep")
    assert r.exit_code == 0 and "1 static activation scales (input_scale, ...) copied as they are" in r.stdout
    assert torch.equal(load_file(tmp_path / "keep" / "model.safetensors")[f"{Q}.input_scale"], t[f"{Q}.input_scale"])
    r = run_cli("merge", q, FIX_ADAPTER, "-o", tmp_path / "plain", "--dtype", "bfloat16")
    assert r.exit_code == 0 and "left out" in r.stdout
    assert f"{Q}.input_scale" not in load_file(tmp_path / "plain" / "model.safetensors")


def test_dry_run_names_the_weights_to_re_quantize(folders, tmp_path):
    r = run_cli("merge", folders["fp8"], FIX_ADAPTER, "-o", tmp_path / "m", "--dry-run")
    assert r.exit_code == 0, r.stderr
    assert "14 weights re-quantized" in r.stdout
    assert (
        f"{Q}.weight  float32→quantized[64, 64]  + 2·[1] linear  -> re-quantized (block FP8): "
        f"{Q}.weight, {Q}.weight_scale_inv" in r.stdout
    )
    assert listing(tmp_path) == set()


def test_fp8_llama_merged_end_to_end_matches_the_bf16_merge_on_logits(folders, tmp_path):
    """Our FP8 result, loaded by transformers (dequantize=True), against the bf16 merge of the same base:
    as close as transformers' own FP8 quantization of that bf16 merge, and closer than the base was."""
    import transformers
    from reference import logits
    from transformers import FineGrainedFP8Config

    qc = FineGrainedFP8Config(dequantize=True, weight_block_size=(32, 32))

    def load(folder: Path, **kw):
        return transformers.AutoModelForCausalLM.from_pretrained(folder, **kw).float().eval()

    r = run_cli("merge", folders["fp8"], FIX_ADAPTER, "-o", tmp_path / "fp8")
    assert r.exit_code == 0 and "Re-quantized 14 weights (block FP8)" in r.stdout, r.output
    ls.merge(folders["fp8"], [FIX_ADAPTER], tmp_path / "bf16", dtype="bfloat16")
    fresh = quantized_folder(tmp_path / "bf16", tmp_path / "fresh", "fp8")  # the producer quantizes the merge
    want = logits(load(tmp_path / "bf16"))
    ours = (logits(load(tmp_path / "fp8", quantization_config=qc)) - want).norm()
    theirs = (logits(load(fresh, quantization_config=qc)) - want).norm()
    before = (logits(load(folders["fp8"], quantization_config=qc)) - want).norm()
    assert ours <= 1.05 * theirs and ours < before, (ours, theirs, before)


# --- convert, extract, diff ----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["fp8-partial-bf16", "ct-w4a16-group", "bnb-nf4"])
def test_convert_dequantizes_a_whole_checkpoint(folders, fmt, tmp_path):
    r = run_cli("convert", folders[fmt], "--dtype", "bfloat16", "-o", tmp_path / "bf16")
    assert r.exit_code == 0, r.output
    got = read_folder(tmp_path / "bf16")
    lib = dequantize_with_library(folders[fmt], fmt)
    assert set(got) == set(read_folder(FIX_BASE))
    assert all(torch.equal(got[k], v.float().to(torch.bfloat16)) for k, v in lib.items())  # one rounding
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())


def test_convert_of_a_model_needs_a_dtype(folders, tmp_path):
    one_line_error(run_cli("convert", folders["fp8"], "-o", tmp_path / "x"), "is quantized", "give one")
    one_line_error(run_cli("convert", FIX_BASE, "-o", tmp_path / "x"), "is a model", "--dtype")
    assert run_cli("convert", FIX_BASE, "--dtype", "float32", "-o", tmp_path / "f32").exit_code == 0
    assert all(torch.equal(v, read_folder(FIX_BASE)[k].float()) for k, v in read_folder(tmp_path / "f32").items())


@pytest.mark.parametrize("fmt", ["fp8", "bnb-nf4-dq"])
def test_extract_against_a_quantized_base_gives_the_change_from_its_values(folders, fmt, tmp_path):
    """QLoRA, then a full fine-tune: the fine-tune is bf16, the base quantized; the adapter is their difference."""
    lib = dequantize_with_library(folders[fmt], fmt)
    delta = adapter_delta(FIX_ADAPTER)
    tuned = plain_folder(
        folders[fmt], tmp_path / "tuned", {k: (v.float() + delta[k]).to(torch.bfloat16) for k, v in lib.items()}
    )
    report = ls.extract(folders[fmt], tuned, tmp_path / "x", rank=8)
    assert report.notes[0].startswith("the base is quantized (") and "read dequantized" in report.notes[0]
    plain = plain_folder(folders[fmt], tmp_path / "plain", {k: v.float() for k, v in lib.items()})
    ls.extract(plain, tuned, tmp_path / "from-plain", rank=8)  # the same base, dequantized by its library
    got, want = (
        load_file(tmp_path / "x" / "adapter_model.safetensors"),
        load_file(tmp_path / "from-plain" / "adapter_model.safetensors"),
    )
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    for name, d in adapter_delta(tmp_path / "x").items():  # the change, up to the fine-tune's bf16 rounding
        assert float((d - delta[name]).norm() / delta[name].norm()) < 0.08, (
            name,
            float((d - delta[name]).norm() / delta[name].norm()),
        )


def test_diff_compares_a_quantized_checkpoint_by_its_values(folders, tmp_path):
    run_cli("convert", folders["fp8"], "--dtype", "float32", "-o", tmp_path / "f32")
    doc = json.loads(run_cli("diff", folders["fp8"], tmp_path / "f32", "--json").stdout)
    linear = [t for t in doc["tensors"] if t["name"].endswith("proj.weight")]
    assert len(linear) == 14 and all(t["identical_fraction"] == 1.0 for t in linear)


# --- MXFP4 experts (gpt-oss) -------------------------------------------------------------------------------------
E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])


def mxfp4_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, in, out] (transformers' GPT-OSS layout) -> blocks [E, out, in/32, 16], scales [E, out, in/32]:
    scale 2^ceil(log2(amax/6)) per 32 inputs, nearest E2M1 value, even element in the low nibble."""
    rows = w.transpose(1, 2).float()
    e, out, k = rows.shape
    blocks = rows.reshape(e, out, k // 32, 32)
    amax = blocks.abs().amax(-1)
    exp = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6)), torch.full_like(amax, -127)).clamp(-127, 127)
    y = blocks / torch.exp2(exp)[..., None]
    idx = (y.abs()[..., None] - E2M1).abs().argmin(-1)
    codes = (idx + 8 * (y < 0)).to(torch.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous(), (exp + 127).to(torch.uint8)


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny GPT-OSS saved bf16, its experts in MXFP4, and a PEFT adapter on the experts and q_proj."""
    from architectures import ARCHS, build
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("gpt_oss")
    build(ARCHS["gpt_oss"], dtype=torch.bfloat16).save_pretrained(root / "bf16")
    t = load_file(root / "bf16" / "model.safetensors")
    out = {}
    for k, v in t.items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            out[f"{k}_blocks"], out[f"{k}_scales"] = mxfp4_reference(v)
        else:
            out[k] = v
    shutil.copytree(root / "bf16", root / "mxfp4")
    save_file(out, root / "mxfp4" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((root / "mxfp4" / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    (root / "mxfp4" / "config.json").write_text(json.dumps(config))
    torch.manual_seed(3)
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        target_modules=["q_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj"],
    )
    get_peft_model(build(ARCHS["gpt_oss"]), lora).save_pretrained(root / "adapter")
    return root / "mxfp4", root / "adapter", root


def test_mxfp4_experts_read_merge_and_keep_their_format(gpt_oss, tmp_path):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    q, adapter, root = gpt_oss
    stored = load_file(q / "model.safetensors")
    view, layout = plain_weights(open_checkpoint(q), read_config(q), role="base")
    assert layout is not None and len(layout.tensors) == 4  # gate_up and down of two layers
    decoded = {}
    for name in layout.tensors:
        want = convert_moe_packed_tensors(stored[f"{name}_blocks"], stored[f"{name}_scales"], dtype=torch.float32)
        decoded[name] = view.read(name)
        assert torch.equal(decoded[name], want), name
    # a plain merge is the merge of the dequantized model (MXFP4 values are exact in bf16)
    plain = root / "plain"
    shutil.copytree(root / "bf16", plain)
    bf16 = load_file(plain / "model.safetensors")
    save_file({**bf16, **{k: v.to(torch.bfloat16) for k, v in decoded.items()}}, plain / "model.safetensors")
    ls.merge(plain, [adapter], tmp_path / "want", dtype="float32")
    ls.merge(q, [adapter], tmp_path / "got", dtype="float32")
    want, got = read_folder(tmp_path / "want"), read_folder(tmp_path / "got")
    assert set(want) == set(got) and all(torch.equal(got[k], want[k]) for k in want)
    # keeping MXFP4: blocks and scales again, the experts within the format's rounding of the exact merge
    report = ls.merge(q, [adapter], tmp_path / "keep")
    kept = load_file(tmp_path / "keep" / "model.safetensors")
    assert {k: (v.dtype, v.shape) for k, v in kept.items()} == {k: (v.dtype, v.shape) for k, v in stored.items()}
    assert {r.name for r in report.requantized} == set(layout.tensors)
    for name in layout.tensors:
        back = convert_moe_packed_tensors(kept[f"{name}_blocks"], kept[f"{name}_scales"], dtype=torch.float32)
        exact = want[name]
        fresh = convert_moe_packed_tensors(*mxfp4_reference(exact), dtype=torch.float32)
        err = float((back - exact).norm() / exact.norm())
        assert err <= 1.02 * float((fresh - exact).norm() / exact.norm()) + 1e-7, name
    ls.unmerge(tmp_path / "keep", [adapter], tmp_path / "back")


# --- what is not read, refused by name ---------------------------------------------------------------------------
def replaced(root: Path, name: str, make, qconfig: dict | None) -> Path:
    """The committed base with Q's weight replaced by ``make(w)``'s tensors (and a quantization_config)."""
    out = shutil.copytree(FIX_BASE, root / name)
    tensors = load_file(out / "model.safetensors")
    w = tensors.pop(f"{Q}.weight")
    tensors.update({f"{Q}.{k}": v for k, v in make(w).items()})
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    if qconfig is not None:
        config = json.loads((out / "config.json").read_text())
        config["quantization_config"] = qconfig
        (out / "config.json").write_text(json.dumps(config))
    return out


def _ct(w: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "weight_packed": torch.zeros(w.shape[0], w.shape[1] // 8, dtype=torch.int32),
        "weight_scale": torch.ones(w.shape[0], w.shape[1] // 32, dtype=torch.bfloat16),
        "weight_shape": torch.tensor(list(w.shape), dtype=torch.int32),
    }


_W4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}
UNREAD = {
    # name: (tensors replacing Q's weight, quantization_config or None, phrases the refusal holds)
    "gptq": (
        lambda w: {
            "qweight": torch.zeros(w.shape[1] // 8, w.shape[0], dtype=torch.int32),
            "qzeros": torch.zeros(1, w.shape[0] // 8, dtype=torch.int32),
            "scales": torch.ones(1, w.shape[0], dtype=torch.float16),
        },
        None,
        ["GPTQ", "a format lorasurgeon does not read", "it reads block FP8"],
    ),
    "awq config": (lambda w: {"weight": w}, {"quant_method": "awq", "bits": 4}, ["awq", "does not read"]),
    "int8 weight without scales": (
        lambda w: {"weight": torch.zeros(w.shape, dtype=torch.int8)},
        None,
        ["integer weights"],
    ),
    # a float8 weight alone is read (formats.fp8_tensor: tests/test_fp8_tensor.py); a float8 bias is in no layout
    "float8 bias": (
        lambda w: {"weight": w, "bias": torch.zeros(w.shape[0], dtype=torch.float8_e5m2)},
        None,
        ["float8"],
    ),
    "compressed-tensors without config": (_ct, None, ["pack-quantized", "does not read"]),
    "compressed-tensors without a group for it": (
        _ct,
        {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {}},
        ["no config_groups entry covers", Q],
    ),
    "compressed-tensors rotated": (
        _ct,
        {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "transform_config": {"config_groups": {"u": {}}},
            "config_groups": {"g": {"targets": ["Linear"], "weights": _W4}},
        },
        ["transform_config", "rotations"],
    ),
    "compressed-tensors sparse": (
        _ct,
        {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "sparsity_config": {"format": "sparse-24-bitmask"},
            "config_groups": {"g": {"targets": ["Linear"], "weights": _W4}},
        },
        ["sparsity_config", "sparse-24-bitmask"],
    ),
    "compressed-tensors nvfp4": (
        _ct,
        {
            "quant_method": "compressed-tensors",
            "format": "nvfp4-pack-quantized",
            "config_groups": {"g": {"targets": ["Linear"], "weights": _W4}},
        },
        ["nvfp4-pack-quantized", "not supported"],
    ),
}


@pytest.mark.parametrize("case", list(UNREAD))
def test_what_is_not_read_is_refused_by_name_by_every_command(tmp_path, case):
    make, qconfig, phrases = UNREAD[case]
    q = replaced(tmp_path, case.replace(" ", "_"), make, qconfig)
    work = tmp_path / "out_parent"
    work.mkdir()
    for args in (
        ["merge", q, FIX_ADAPTER, "-o", work / "m"],
        ["merge", q, FIX_ADAPTER, "-o", work / "p", "--dtype", "bfloat16"],
        ["unmerge", q, FIX_ADAPTER, "-o", work / "u"],
        ["extract", q, FIX_BASE, "--rank", "2", "-o", work / "x"],
        ["extract", FIX_BASE, q, "--rank", "2", "-o", work / "y"],
        ["convert", q, "--dtype", "bfloat16", "-o", work / "c"],
        ["diff", FIX_BASE, q],
        ["merge", q, FIX_ADAPTER, "-o", work / "d", "--dry-run"],
    ):
        one_line_error(run_cli(*args), *phrases)
    assert listing(work) == set()
    text = run_cli("inspect", q)
    assert text.exit_code == 0 and "not readable" in text.stdout


def test_quantize_option_mistakes_are_named(folders, tmp_path):
    one_line_error(
        run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "m", "--quantize", "keep"),
        "is not quantized",
        "nothing to keep",
    )
    one_line_error(
        run_cli(
            "merge", folders["fp8"], FIX_ADAPTER, "-o", tmp_path / "m", "--quantize", "keep", "--dtype", "bfloat16"
        ),
        "--quantize keep and --dtype",
    )
    one_line_error(
        run_cli("merge", folders["fp8"], FIX_ADAPTER, "-o", tmp_path / "a", "--form", "augmented"),
        "is quantized",
        "give --dtype",
    )
    assert (
        run_cli(
            "merge", folders["fp8"], FIX_ADAPTER, "-o", tmp_path / "a", "--form", "augmented", "--dtype", "bfloat16"
        ).exit_code
        == 0
    )
    assert listing(tmp_path) == {"a", *(f"a/{n}" for n in listing(tmp_path / "a"))}


def test_inspect_describes_the_quantized_weights(folders):
    doc = json.loads(run_cli("inspect", folders["bnb-nf4-dq"], "--json").stdout)
    assert doc["quantization"]["method"] == "bitsandbytes"
    assert doc["quantized"] == {"methods": ["bitsandbytes nf4 (double quantized)"], "weights": 14, "unsupported": None}
    text = run_cli("inspect", folders["fp8"]).stdout
    assert "14 weights in block FP8, read dequantized by every command" in text
    assert json.loads(run_cli("inspect", FIX_BASE, "--json").stdout)["quantized"] is None


def test_every_format_module_is_in_the_registry_and_claims_its_checkpoints():
    """Each formats module's FORMAT is registered (a new format is its module plus one registry line), once;
    a quant_method names the format alone, without one the first format a tensor name marks reads it; config.json's
    quantization block is found in one place (text_config included) for detection and dispatch alike."""
    import importlib
    import pkgutil

    import lorasurgeon.formats as formats
    from lorasurgeon.formats.detect import detect, quant_config
    from lorasurgeon.formats.layout import READS
    from lorasurgeon.formats.registry import FORMATS, claiming

    modules = [importlib.import_module(f"lorasurgeon.formats.{m.name}") for m in pkgutil.iter_modules(formats.__path__)]
    declared = [m.FORMAT for m in modules if hasattr(m, "FORMAT")]
    assert sorted(f.name for f in FORMATS) == sorted(f.name for f in declared) == sorted({f.name for f in FORMATS})
    assert READS == ", ".join(f.reads for f in FORMATS)
    for f in FORMATS:
        assert f.codecs and all(callable(c.dequantize) and callable(c.requantize) for c in f.codecs)

    def name(qconfig, names):
        found = claiming(qconfig, names)
        return found and found.name

    assert name({"quant_method": "bitsandbytes"}, ["x.weight_scale_inv"]) == "bitsandbytes"
    assert name({}, ["x.weight", "x.SCB"]) == "bitsandbytes"
    assert name({}, ["e_blocks", "x.weight_scale_inv"]) == "fp8"  # asked in the registry's order
    assert name({"quant_method": "gptq"}, ["x.weight_scale_inv"]) is None
    assert name({}, ["x.weight_packed"]) is None  # compressed-tensors: by its quant_method only
    config = {"text_config": {"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}}}
    qc = quant_config(config)
    assert qc is not None and qc.block == config["text_config"]["quantization_config"]
    assert detect((), config).describe() == "fp8 (config.json text_config.quantization_config.quant_method = fp8)"


def test_integer_buffers_that_are_not_weights_are_not_quantization(tmp_path):
    """BatchNorm's num_batches_tracked and BERT's position_ids are int64 in unquantized models."""
    folder = tmp_path / "plain"
    folder.mkdir()
    save_file(
        {
            "bn.num_batches_tracked": torch.tensor(3),
            "embeddings.position_ids": torch.arange(8)[None],
            "fc.weight": torch.ones(2, 2),
        },
        folder / "model.safetensors",
    )
    assert json.loads(run_cli("inspect", folder, "--json").stdout)["quantization"] is None
    assert run_cli("diff", folder, folder).exit_code == 0


@pytest.mark.parametrize("dtype", ["F4", "F6_E2M3", "F6_E3M2"])
def test_sub_byte_dtypes_are_named_as_quantized(tmp_path, dtype):
    raw = json.dumps({"w": {"dtype": dtype, "shape": [2, 2], "data_offsets": [0, 2]}}).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0\0")
    result = run_cli("inspect", path)
    assert result.exit_code == 2 and f"dtype {dtype}, a quantized format" in result.stderr, result.stderr


def test_a_sharded_quantized_base_keeps_its_shards(folders, tmp_path):
    """Each stored part of a re-quantized weight goes back to the shard it came from; iter_merged streams them."""
    src = shutil.copytree(folders["fp8"], tmp_path / "sharded")
    t = load_file(src / "model.safetensors")
    (src / "model.safetensors").unlink()
    keys = sorted(t)
    shards = {"model-00001-of-00002.safetensors": keys[:17], "model-00002-of-00002.safetensors": keys[17:]}
    for file, names in shards.items():
        save_file({k: t[k] for k in names}, src / file, metadata={"format": "pt"})
    weight_map = {k: file for file, names in shards.items() for k in names}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    ls.merge(src, [FIX_ADAPTER], tmp_path / "m")
    got = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())["weight_map"]
    assert got == weight_map
    assert {name for name, _ in ls.iter_merged(src, [FIX_ADAPTER])} == set(keys)
