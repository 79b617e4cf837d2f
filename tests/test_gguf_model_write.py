"""merge / unmerge into a GGUF model, written as GGUF (-o NAME.gguf; commands/merge/gguf_result.py). The oracles:
transformers' own GGUF loader (from_pretrained(gguf_file=)) for what the file holds, PEFT's merge_and_unload() on
the transformers-loaded base for what it should hold, gguf's reader for the metadata and the bytes left as they
were, gguf's own quantizer for each encoded type."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FIX_ADAPTER, FIX_BASE, listing, one_line_error, run_cli
from test_gguf_model import llama_permute, write_llama_gguf

import lorasurgeon as ls

gguf = pytest.importorskip("gguf")


def loaded(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return {k: v.detach() for k, v in model.state_dict().items()}


def peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base.parent, gguf_file=base.name, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: (t.tensor_type.name, bytes(np.asarray(t.data).view(np.uint8))) for t in reader.tensors}


def fields(path: Path) -> dict[str, object]:
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def encoded_like(want: torch.Tensor, ggml: str, heads: int | None) -> torch.Tensor:
    """PEFT's merged weight as gguf's own quantizer stores it in ``ggml`` (q/k rows permuted as llama.cpp holds
    them, and back), read back in float32."""
    data = want.numpy()
    if heads:
        data = llama_permute(data, heads)
    kind = gguf.GGMLQuantizationType[ggml]
    back = gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(data), kind), kind).reshape(data.shape)
    if heads:
        n = heads
        back = back.reshape(n, data.shape[0] // n // 2, 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)
    return torch.from_numpy(np.ascontiguousarray(back, dtype=np.float32))


def heads_of(name: str, config: dict) -> int | None:
    if "q_proj" in name:
        return config["num_attention_heads"]
    return config["num_key_value_heads"] if "k_proj" in name else None


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0"])
def test_merged_gguf_holds_peft_merge_encoded_in_the_base_types(tmp_path, qtype):
    base = write_llama_gguf(FIX_BASE, tmp_path / "base.gguf", qtype)
    out = tmp_path / "merged.gguf"
    result = run_cli("merge", base, FIX_ADAPTER, "-o", out)
    assert result.exit_code == 0, result.output
    config = json.loads((FIX_BASE / "config.json").read_text())
    want, got, before = peft_merged(base, FIX_ADAPTER), loaded(out), loaded(base)
    changed = [n for n in want if not torch.equal(want[n], before[n])]
    assert len(changed) == 14  # the fixture's adapter: q, k, v, o, gate, up, down of 2 layers
    for name in want:
        if name not in changed:
            assert torch.equal(got[name], before[name]), name
            continue
        if qtype in ("F32", "F16"):
            expect = want[name].to(getattr(torch, {"F32": "float32", "F16": "float16"}[qtype])).float()
            assert torch.allclose(got[name], expect, atol=1e-6, rtol=0), name
        else:  # gguf's quantizer of PEFT's merge; a value on a rounding tie may land one step away
            expect = encoded_like(want[name], qtype, heads_of(name, config))
            same = (got[name] == expect).float().mean().item()
            assert same > 0.999, (name, same)
    old, new = tensors(base), tensors(out)
    assert list(old) == list(new)  # the base's tensors, in its order
    kept = [k for k in old if k.endswith("_norm.weight") or k.startswith(("token_embd.", "output."))]
    assert len(kept) == 7 and all(new[k] == old[k] for k in kept)  # unchanged: byte for byte
    assert all(new[k][0] == old[k][0] for k in old)  # each in the base's type
    assert fields(out) == fields(base)  # every metadata field, tokenizer included


def test_unmerge_of_a_merged_gguf_gives_back_the_base(tmp_path):
    base = write_llama_gguf(FIX_BASE, tmp_path / "base.gguf", "F32")
    ls.merge(base, [FIX_ADAPTER], tmp_path / "merged.gguf")
    ls.unmerge(tmp_path / "merged.gguf", [FIX_ADAPTER], tmp_path / "back.gguf")
    before, back = loaded(base), loaded(tmp_path / "back.gguf")
    assert max((back[n] - before[n]).abs().max().item() for n in before) < 1e-6


def random_q4_k(data: np.ndarray, kind) -> np.ndarray:
    """Q4_K bytes (which gguf cannot encode) of a weight's shape: random codes, sane f16 scales (d, dmin)."""
    assert kind == gguf.GGMLQuantizationType.Q4_K
    rows, cols = data.shape
    rng = np.random.default_rng(rows * cols)
    blocks = rng.integers(0, 256, size=(rows, cols // 256, 144), dtype=np.uint8)
    blocks[..., 0:2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
    blocks[..., 2:4] = np.frombuffer(np.float16(0.001).tobytes(), np.uint8)
    return blocks.reshape(rows, -1)


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """A tiny Llama whose rows are whole 256-value blocks (K-quants), with a PEFT adapter on q and v."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        num_hidden_layers=1, vocab_size=256, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(root / "base")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(LlamaForCausalLM(config), lora).save_pretrained(root / "adapter")
    return root


def test_a_type_gguf_cannot_encode_falls_back_to_q8_0_and_says_so(wide, tmp_path):
    base = write_llama_gguf(wide / "base", tmp_path / "base.gguf", "Q4_K", encode=random_q4_k)
    out = tmp_path / "merged.gguf"
    result = run_cli("merge", base, wide / "adapter", "-o", out)
    assert result.exit_code == 0, result.output
    assert "GGUF Q4_K as Q8_0" in result.output
    old, new = tensors(base), tensors(out)
    changed = {k for k in old if ".attn_q." in k or ".attn_v." in k}
    assert len(changed) == 2 and all(new[k][0] == "Q8_0" for k in changed)
    assert all(new[k] == old[k] for k in old if k not in changed)  # the rest byte for byte, in Q4_K
    want, got = peft_merged(base, wide / "adapter"), loaded(out)
    config = json.loads((wide / "base" / "config.json").read_text())
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"):
        expect = encoded_like(want[name], "Q8_0", heads_of(name, config))
        assert (got[name] == expect).float().mean().item() > 0.999, name


def test_options_a_gguf_result_cannot_honour_are_refused_by_name(tmp_path):
    base = write_llama_gguf(FIX_BASE, tmp_path / "base.gguf", "Q8_0")
    out = tmp_path / "m.gguf"
    for extra, phrase in (
        (["--dtype", "bfloat16"], "--dtype: a .gguf result"),
        (["--max-shard-size", "1MB"], "--max-shard-size: a .gguf result"),
        (["--form", "augmented"], "--form augmented: a .gguf result"),
    ):
        one_line_error(run_cli("merge", base, FIX_ADAPTER, "-o", out, *extra), phrase, "-o FOLDER")
    one_line_error(run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", out), "not a GGUF model", "-o FOLDER")
    one_line_error(run_cli("merge", base, FIX_ADAPTER, "-o", base), "base.gguf")  # the input itself
    assert listing(tmp_path) == {"base.gguf"}


def test_an_existing_gguf_is_replaced_only_with_overwrite(tmp_path):
    base = write_llama_gguf(FIX_BASE, tmp_path / "base.gguf", "Q8_0")
    out = tmp_path / "m.gguf"
    out.write_bytes(b"GGUF earlier")
    one_line_error(run_cli("merge", base, FIX_ADAPTER, "-o", out), "already exists", "--overwrite")
    assert out.read_bytes() == b"GGUF earlier"
    assert run_cli("merge", base, FIX_ADAPTER, "-o", out, "--overwrite").exit_code == 0
    assert len(tensors(out)) == 21
    (tmp_path / "notes.gguf").write_text("my notes")  # not an earlier GGUF: never replaced
    one_line_error(run_cli("merge", base, FIX_ADAPTER, "-o", tmp_path / "notes.gguf", "--overwrite"), "notes.gguf")
    assert (tmp_path / "notes.gguf").read_text() == "my notes"
    (tmp_path / "dir.gguf").mkdir()
    one_line_error(run_cli("merge", base, FIX_ADAPTER, "-o", tmp_path / "dir.gguf"), "a folder", "one file")


def test_a_failed_merge_leaves_nothing(tmp_path):
    from safetensors.torch import load_file, save_file

    base = write_llama_gguf(FIX_BASE, tmp_path / "base.gguf", "Q8_0")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((FIX_ADAPTER / "adapter_config.json").read_text())
    weights = load_file(FIX_ADAPTER / "adapter_model.safetensors")
    key = sorted(k for k in weights if "lora_B" in k)[-1]
    weights[key][0, 0] = float("inf")
    save_file(weights, bad / "adapter_model.safetensors")
    result = run_cli("merge", base, bad, "-o", tmp_path / "m.gguf")
    assert result.exit_code != 0 and "Traceback" not in result.stderr
    assert listing(tmp_path) == {"base.gguf", "bad", "bad/adapter_config.json", "bad/adapter_model.safetensors"}


def test_dry_run_writes_nothing(tmp_path):
    base = write_llama_gguf(FIX_BASE, tmp_path / "base.gguf", "Q4_0")
    result = run_cli("merge", base, FIX_ADAPTER, "-o", tmp_path / "m.gguf", "--dry-run")
    assert result.exit_code == 0, result.output
    assert listing(tmp_path) == {"base.gguf"}


def test_a_qwen2_gguf_unpermuted_with_biases_merges_and_writes_back(tmp_path):
    """Qwen2 (no q/k permutation in convert_hf_to_gguf, q/k/v biases): read through transformers' default
    processor, written back as it lay; the merged weights are PEFT's on the transformers-loaded base."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
        vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "hf")
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(Qwen2ForCausalLM(config), lora).save_pretrained(tmp_path / "adapter")
    base = write_llama_gguf(tmp_path / "hf", tmp_path / "base.gguf", "Q8_0", arch="qwen2")
    out = tmp_path / "merged.gguf"
    assert run_cli("merge", base, tmp_path / "adapter", "-o", out).exit_code == 0
    want, got, before = peft_merged(base, tmp_path / "adapter"), loaded(out), loaded(base)
    changed = [n for n in want if not torch.equal(want[n], before[n])]
    assert len(changed) == 6
    for name in want:
        if name in changed:
            same = (got[name] == encoded_like(want[name], "Q8_0", None)).float().mean().item()
            assert same > 0.999, (name, same)
        else:
            assert torch.equal(got[name], before[name]), name
