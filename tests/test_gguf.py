"""convert --to gguf, read back with the gguf package's own reader: names through its TensorNameMap, shapes,
alpha, and the change llama.cpp computes (alpha / rank · B·A per tensor, q/k rows in its RoPE order) against
PEFT's. llama.cpp's arithmetic and its converter's q/k permutation (convert_hf_to_gguf.py,
LlamaModel.permute) are restated in this file; tests/test_llama_cpp.py runs llama.cpp itself where its
Python bindings are installed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import FIX_ADAPTER, FIX_BASE, listing, one_line_error, run_cli
from safetensors.torch import load_file, save_file
from test_resize import deltas

gguf = pytest.importorskip("gguf")


def llama_cpp_deltas(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Per GGUF base tensor, the change llama.cpp applies: alpha / rank(B) · B @ A (token_embd's A stored
    transposed), and the file's key-values."""
    reader = gguf.GGUFReader(str(path))
    kv = {}
    for key, field in reader.fields.items():
        if field.data:
            value = field.parts[field.data[0]]
            kv[key] = bytes(value).decode() if value.dtype.kind == "u" and len(value) > 1 else value.tolist()
    tensors = {t.name: torch.from_numpy(t.data.copy()).double() for t in reader.tensors}
    alpha = float(kv["adapter.lora.alpha"][0])
    out = {}
    for name in [n for n in tensors if n.endswith(".lora_a")]:
        base = name.removesuffix(".lora_a")
        a, b = tensors[name], tensors[f"{base}.lora_b"]
        if base.startswith("token_embd"):
            a = a.t()
        out[base] = alpha / b.shape[1] * (b @ a)
    return out, kv


def llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # convert_hf_to_gguf.py, LlamaModel.permute (HF rotate-half -> llama.cpp's interleaved RoPE rows)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2).get_name(f"{hf}.weight", try_suffixes=(".weight",))


@pytest.mark.parametrize("edit", [{}, {"use_rslora": True, "alpha_pattern": {"down_proj": 4}}])
def test_a_llama_adapter_is_what_llama_cpp_computes_as_peft_does(tmp_path, edit):
    adapter = shutil.copytree(FIX_ADAPTER, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text()) | edit
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    r = run_cli("convert", adapter, "--to", "gguf", "--base", FIX_BASE, "-o", tmp_path / "a.gguf")
    assert r.exit_code == 0 and "28 tensors" in r.stdout, r.output
    got, kv = llama_cpp_deltas(tmp_path / "a.gguf")
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora" and kv["general.architecture"] == "llama"
    want = deltas(adapter)  # PEFT's own ΔW per module
    base = json.loads((FIX_BASE / "config.json").read_text())
    assert set(got) == {gguf_name(name) for name in want}
    for name, d in want.items():
        if name.endswith("q_proj"):
            d = llama_permute(d, base["num_attention_heads"])
        elif name.endswith("k_proj"):
            d = llama_permute(d, base["num_key_value_heads"])
        torch.testing.assert_close(got[gguf_name(name)], d, rtol=1e-5, atol=1e-7)
    assert listing(tmp_path) == {"a.gguf", "adapter", *(f"adapter/{n}" for n in listing(adapter))}


def test_a_qwen2_adapter_keeps_its_rows_and_the_embedding_a_is_transposed(tmp_path):
    from architectures import ARCHS, build
    from peft import LoraConfig, get_peft_model

    build(ARCHS["qwen2"]).save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "embed_tokens"])
    get_peft_model(build(ARCHS["qwen2"]), lora).save_pretrained(tmp_path / "adapter")
    r = run_cli("convert", tmp_path / "adapter", "--to", "gguf", "--base", tmp_path / "base", "-o", tmp_path / "q.gguf")
    assert r.exit_code == 0, r.output
    reader = gguf.GGUFReader(str(tmp_path / "q.gguf"))
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in reader.tensors}
    vocab = json.loads((tmp_path / "base" / "config.json").read_text())["vocab_size"]
    assert shapes["token_embd.weight.lora_a"] == (4, vocab)  # ggml {r, vocab}: A transposed
    got, kv = llama_cpp_deltas(tmp_path / "q.gguf")
    assert kv["general.architecture"] == "qwen2"
    t = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    want = 2.0 * t[f"{key}.lora_B.weight"].double() @ t[f"{key}.lora_A.weight"].double()  # no permutation
    torch.testing.assert_close(got["blk.0.attn_q.weight"], want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", ["gemma", "gemma2"])
def test_a_gemma_adapter_keeps_its_rows_and_its_tied_head_is_refused(tmp_path, arch):
    from architectures import ARCHS, build
    from peft import LoraConfig, get_peft_model

    build(ARCHS[arch]).save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "down_proj"])
    get_peft_model(build(ARCHS[arch]), lora).save_pretrained(tmp_path / "adapter")
    r = run_cli("convert", tmp_path / "adapter", "--to", "gguf", "--base", tmp_path / "base", "-o", tmp_path / "g.gguf")
    assert r.exit_code == 0, r.output
    got, kv = llama_cpp_deltas(tmp_path / "g.gguf")
    assert kv["general.architecture"] == arch
    t = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for hf, name in (("self_attn.q_proj", "attn_q"), ("mlp.down_proj", "ffn_down")):
        key = f"base_model.model.model.layers.0.{hf}"
        want = 2.0 * t[f"{key}.lora_B.weight"].double() @ t[f"{key}.lora_A.weight"].double()
        torch.testing.assert_close(got[f"blk.0.{name}.weight"], want, rtol=1e-5, atol=1e-7)
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["lm_head"])
    get_peft_model(build(ARCHS[arch]), lora).save_pretrained(tmp_path / "head")
    r = run_cli("convert", tmp_path / "head", "--to", "gguf", "--base", tmp_path / "base", "-o", tmp_path / "h.gguf")
    one_line_error(r, "lm_head", "9065")


def test_what_llama_cpp_cannot_take_is_refused_by_name(tmp_path):
    out = tmp_path / "x.gguf"
    mts = shutil.copytree(FIX_ADAPTER, tmp_path / "mts")
    t = load_file(mts / "adapter_model.safetensors") | {"base_model.model.lm_head.weight": torch.zeros(256, 64)}
    save_file(t, mts / "adapter_model.safetensors")
    one_line_error(run_cli("convert", mts, "--to", "gguf", "--base", FIX_BASE, "-o", out), "whole tensors", "11554")
    other = tmp_path / "bloom"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["BloomForCausalLM"]}))
    one_line_error(run_cli("convert", FIX_ADAPTER, "--to", "gguf", "--base", other, "-o", out), "BloomForCausalLM")
    hub = shutil.copytree(FIX_ADAPTER, tmp_path / "hub")
    config = json.loads((hub / "adapter_config.json").read_text()) | {"base_model_name_or_path": "org/base"}
    (hub / "adapter_config.json").write_text(json.dumps(config))
    one_line_error(run_cli("convert", hub, "--to", "gguf", "-o", out), "give --base BASE")
    one_line_error(run_cli("convert", FIX_ADAPTER, "--to", "gguf", "--base", FIX_BASE, "-o", tmp_path), "one file")
    assert not out.exists()
    assert run_cli("convert", FIX_ADAPTER, "--to", "gguf", "--base", FIX_BASE, "-o", out).exit_code == 0
    one_line_error(run_cli("convert", FIX_ADAPTER, "--to", "gguf", "--base", FIX_BASE, "-o", out), "--overwrite")
    assert run_cli("convert", FIX_ADAPTER, "--to", "gguf", "--base", FIX_BASE, "-o", out, "--overwrite").exit_code == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch left behind


def test_an_output_inside_an_input_is_refused_by_name_as_for_every_command(tmp_path):
    adapter, base = shutil.copytree(FIX_ADAPTER, tmp_path / "adapter"), shutil.copytree(FIX_BASE, tmp_path / "base")
    before = {p: listing(p) for p in (adapter, base)}
    for inside, given in ((adapter / "a.gguf", adapter), (base / "a.gguf", base)):
        r = run_cli("convert", adapter, "--to", "gguf", "--base", base, "-o", inside)
        one_line_error(r, f"{inside}: overlaps the input {given}")
        r = run_cli("convert", adapter, "--to", "gguf", "--base", base, "-o", inside, "--dry-run")
        one_line_error(r, "overlaps the input")
    assert {p: listing(p) for p in (adapter, base)} == before


# convert_hf_to_gguf's classes (llama.cpp conversion/*.py) that permute q/k rows: LlamaModel (Mistral, Mixtral)
# and OlmoModel
PERMUTED = {"mistral", "mixtral", "olmo"}
GGUF_ARCH = {
    "mistral": "LLAMA",
    "qwen2": "QWEN2",
    "qwen3": "QWEN3",
    "gemma": "GEMMA",
    "gemma2": "GEMMA2",
    "phi": "PHI2",
    "phi3": "PHI3",
    "gpt2": "GPT2",
    "stablelm": "STABLELM",
    "starcoder2": "STARCODER2",
    "olmo": "OLMO",
    "olmo2": "OLMO2",
    "mixtral": "LLAMA",
    "qwen2_moe": "QWEN2MOE",
    "qwen3_moe": "QWEN3MOE",
    "gemma3": "GEMMA3",
}


@pytest.mark.parametrize("arch", sorted(GGUF_ARCH))
def test_every_linear_layer_of_more_architectures_is_what_llama_cpp_computes(tmp_path, arch):
    from architectures import ARCHS, build
    from peft import LoraConfig, get_peft_model

    build(ARCHS[arch]).save_pretrained(tmp_path / "base")
    torch.manual_seed(1)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"] if arch in ("mixtral", "qwen3_moe") else "all-linear"
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets, use_rslora=True)
    model = get_peft_model(build(ARCHS[arch]), lora)
    model.save_pretrained(tmp_path / "adapter")
    r = run_cli("convert", tmp_path / "adapter", "--to", "gguf", "--base", tmp_path / "base", "-o", tmp_path / "a.gguf")
    assert r.exit_code == 0, r.output
    got, kv = llama_cpp_deltas(tmp_path / "a.gguf")
    model_arch = getattr(gguf.MODEL_ARCH, GGUF_ARCH[arch])
    assert kv["general.architecture"] == gguf.MODEL_ARCH_NAMES[model_arch]
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    names = gguf.get_tensor_name_map(model_arch, config.get("num_hidden_layers", config.get("n_layer")))
    want = {}
    for name, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            d = module.get_delta_weight("default").detach().double()
            hf = name.removeprefix("base_model.model.")
            if module.fan_in_fan_out:  # GPT-2's Conv1D: llama.cpp's converter stores the weight as (out, in)
                d = d.t()
            if arch in PERMUTED and hf.endswith(("q_proj", "k_proj")):
                heads = config["num_attention_heads" if hf.endswith("q_proj") else "num_key_value_heads"]
                d = llama_permute(d, heads)
            want[names.get_name(f"{hf}.weight", try_suffixes=(".weight",))] = d
    assert None not in want and len(want) >= 4 and set(got) == set(want)
    for name, d in want.items():
        torch.testing.assert_close(got[name], d, rtol=1e-5, atol=1e-7, msg=name)


def test_per_expert_loras_are_refused_by_name(tmp_path):
    experts = shutil.copytree(FIX_ADAPTER, tmp_path / "experts")
    t = load_file(experts / "adapter_model.safetensors")
    t = {k.replace("self_attn.v_proj", "mlp.experts.0.down_proj"): v for k, v in t.items()}
    save_file(t, experts / "adapter_model.safetensors")
    r = run_cli("convert", experts, "--to", "gguf", "--base", FIX_BASE, "-o", tmp_path / "x.gguf")
    one_line_error(r, "per-expert", "experts.0.down_proj")
    assert not (tmp_path / "x.gguf").exists()


def test_a_gemma3_embedding_lora_is_refused_by_name(tmp_path):
    from architectures import ARCHS, build
    from peft import LoraConfig, get_peft_model

    build(ARCHS["gemma3"]).save_pretrained(tmp_path / "base")
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "embed_tokens"])
    get_peft_model(build(ARCHS["gemma3"]), lora).save_pretrained(tmp_path / "adapter")
    r = run_cli("convert", tmp_path / "adapter", "--to", "gguf", "--base", tmp_path / "base", "-o", tmp_path / "g.gguf")
    one_line_error(r, "embedding", "Gemma3ForCausalLM", "vocabulary")
    assert not (tmp_path / "g.gguf").exists()
