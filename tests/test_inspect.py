"""inspect: headers-only reports, with per-module rank and scale checked against PEFT's own layers."""

from __future__ import annotations

import json

import make_fixtures as mf
import pytest
import torch
from helpers import ROOT, run_cli
from safetensors.torch import save_file

from lorasurgeon import inspect


def peft_scalings(base_config, adapter_dir, seed=0):
    """{module name: (r, scaling)} as PEFT computes them after loading the saved adapter."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(mf.build_model(base_config, seed=seed), adapter_dir)
    out = {}
    for name, module in model.base_model.model.named_modules():
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling:
            out[name] = (module.r["default"], module.scaling["default"])
    return out


ADAPTERS = {
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2, r"layers\.1\..*q_proj": 6},
        alpha_pattern={"q_proj": 3, "down_proj": 32},
    ),
    "rslora+dora": dict(r=8, lora_alpha=4, use_rslora=True, use_dora=True, target_modules=["q_proj", "o_proj"]),
    "embedding+modules_to_save": dict(
        r=2, lora_alpha=2, target_modules=["embed_tokens", "k_proj"], modules_to_save=["lm_head"]
    ),
}


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_adapter_ranks_and_scales_match_peft(tmp_path, kind):
    config = mf.llama_config(tied=False)
    out = mf.make_adapter(mf.build_model(config), tmp_path / "adapter", **ADAPTERS[kind])
    report = inspect(out)
    expected = peft_scalings(config, out)
    assert report.adapter is not None
    got = {m.name: (m.rank, m.scale) for m in report.adapter.modules}
    assert set(got) == set(expected)
    for name, (r, s) in expected.items():
        assert got[name][0] == r and got[name][1] == pytest.approx(s, rel=1e-12), name


def test_adapter_features_and_json_keys(tmp_path):
    config = mf.llama_config(tied=False)
    out = mf.make_adapter(mf.build_model(config), tmp_path / "adapter", **ADAPTERS["embedding+modules_to_save"])
    result = run_cli("inspect", out, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert {"format", "files", "tensors", "parameters", "bytes", "dtypes", "adapter"} <= set(doc)
    assert doc["format"] == "safetensors" and doc["files"] == ["adapter_model.safetensors"]
    assert set(doc["adapter"]["features"]) >= {"modules_to_save", "embedding"}
    assert doc["adapter"]["replaced_tensors"] == ["lm_head.weight"]
    kinds = {m["name"]: m["kind"] for m in doc["adapter"]["modules"]}
    assert kinds["model.embed_tokens"] == "embedding"
    assert doc["parameters"] == sum(v["parameters"] for v in doc["dtypes"].values())


def test_checkpoint_counts_are_exact(tmp_path):
    tensors = {"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.bfloat16), "c": torch.tensor(1)}
    save_file(tensors, tmp_path / "m.safetensors")
    report = inspect(tmp_path / "m.safetensors")
    assert (report.tensors, report.parameters, report.bytes) == (3, 18, 12 * 4 + 5 * 2 + 8)
    assert report.adapter is None
    assert {k: (v.tensors, v.parameters) for k, v in report.dtypes.items()} == {
        "F32": (1, 12),
        "BF16": (1, 5),
        "I64": (1, 1),
    }


def test_sharded_model_lists_index_and_shards(llama_sharded_dir):
    report = inspect(llama_sharded_dir)
    assert report.format == "safetensors-sharded"
    assert report.files[0] == "model.safetensors.index.json" and len(report.files) > 2


def test_table_output_on_committed_fixtures():
    result = run_cli("inspect", ROOT / "fixtures" / "adapter")
    assert result.exit_code == 0
    assert "model.layers.0.self_attn.q_proj" in result.stdout and "scale" in result.stdout
    result = run_cli("inspect", ROOT / "fixtures" / "base")
    assert "BF16" in result.stdout and "parameters" in result.stdout


def test_unsupported_variants_are_named(tmp_path):
    config = mf.llama_config(tied=False)
    out = mf.make_adapter(mf.build_model(config), tmp_path / "adapter", r=2)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = "pissa"
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    report = inspect(out)
    assert report.adapter and any("pissa" in u for u in report.adapter.unsupported)


def test_an_augmented_checkpoint_is_recognised_with_its_ranks(tmp_path):
    """It was listed as an adapter that 'replaces' every tensor."""
    fixtures = ROOT / "fixtures"
    assert (
        run_cli(
            "merge", fixtures / "base", fixtures / "adapter", "-o", tmp_path / "aug", "--form", "augmented"
        ).exit_code
        == 0
    )
    doc = json.loads(run_cli("inspect", tmp_path / "aug", "--json").stdout)
    original = json.loads(run_cli("inspect", fixtures / "adapter", "--json").stdout)
    assert (doc["form"], original["form"]) == ("augmented", "adapter")
    assert doc["adapter"]["modules"] == original["adapter"]["modules"] and doc["adapter"]["replaced_tensors"] == []
    table = run_cli("inspect", tmp_path / "aug").stdout
    assert f"lorasurgeon convert {tmp_path / 'aug'} --to adapter|merged" in table
    assert json.loads(run_cli("inspect", fixtures / "base", "--json").stdout)["form"] == "model"


def test_a_models_architecture_from_its_config():
    base = ROOT / "fixtures" / "base"
    doc = json.loads(run_cli("inspect", base, "--json").stdout)
    assert doc["architecture"] == {
        "model_type": "llama",
        "architecture": "LlamaForCausalLM",
        "layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "attention_heads": 4,
        "kv_heads": 2,
        "vocab_size": 256,
        "tied_embeddings": False,
        "dtype": "bfloat16",
        "quantization": None,
    }
    table = run_cli("inspect", base).stdout
    assert "  model       llama (LlamaForCausalLM), bfloat16\n" in table
    assert "  shape       2 layers, hidden 64, intermediate 128, 4 attention heads, 2 kv heads, vocab 256\n" in table
    assert "  embeddings  untied\n" in table
    assert json.loads(run_cli("inspect", ROOT / "fixtures" / "adapter", "--json").stdout)["architecture"] is None


def model_with_config(folder, config: dict):
    folder.mkdir()
    save_file({"model.embed_tokens.weight": torch.zeros(4, 2)}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


ARCH_CONFIGS = {  # config.json -> what inspect must say (the fields not named here: None)
    "gpt2 names, tied by default": (
        {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 3, "n_embd": 32, "n_head": 4},
        {"model_type": "gpt2", "architecture": "GPT2LMHeadModel", "layers": 3, "hidden_size": 32},
        {"attention_heads": 4, "tied_embeddings": True},
    ),
    "gemma says untied": (
        {"model_type": "gemma", "tie_word_embeddings": False, "torch_dtype": "float16", "vocab_size": 1000},
        {"model_type": "gemma", "tied_embeddings": False, "dtype": "float16", "vocab_size": 1000},
        {},
    ),
    "multimodal, numbers in text_config": (
        {
            "model_type": "llava",
            "architectures": ["LlavaForConditionalGeneration"],
            "text_config": {"num_hidden_layers": 4, "hidden_size": 16, "tie_word_embeddings": True},
        },
        {"model_type": "llava", "architecture": "LlavaForConditionalGeneration", "layers": 4, "hidden_size": 16},
        {"tied_embeddings": True},
    ),
    "quantized": (
        {"model_type": "qwen3", "quantization_config": {"quant_method": "fp8"}, "num_key_value_heads": 8},
        {"model_type": "qwen3", "quantization": "fp8", "kv_heads": 8, "tied_embeddings": False},
        {},
    ),
    "nothing known": ({"foo": 1}, {}, {}),
}


@pytest.mark.parametrize("case", list(ARCH_CONFIGS))
def test_architecture_keys_aliases_defaults_and_what_is_missing(tmp_path, case):
    config, want, more = ARCH_CONFIGS[case]
    report = inspect(model_with_config(tmp_path / "m", config))
    assert report.architecture is not None
    got = {k: v for k, v in report.architecture.__dict__.items() if v is not None}
    assert got == want | more
    table = run_cli("inspect", tmp_path / "m").stdout
    numbers = {"layers", "hidden_size", "intermediate_size", "attention_heads", "kv_heads", "vocab_size"}
    for label, shown in (("model ", {"model_type"}), ("shape ", numbers), ("embeddings", {"tied_embeddings"})):
        assert (f"  {label}" in table) == bool(shown & set(got)), (label, table)
    assert ("kv heads" in table) == ("kv_heads" in got) and ("intermediate" in table) == ("intermediate_size" in got)
    if "quantization" in got:
        assert "quantized: fp8" in table


def test_a_model_without_config_has_no_architecture(tmp_path):
    save_file({"a": torch.zeros(2)}, tmp_path / "m.safetensors")
    assert inspect(tmp_path / "m.safetensors").architecture is None
