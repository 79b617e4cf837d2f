"""A llama.cpp GGUF *model* as a base (io.gguf_model): written as convert_hf_to_gguf.py writes a Llama (gguf's
GGUFWriter, TensorNameMap names, LlamaModel.permute on q/k rows, F32/F16/Q8_0), read in transformers' names and
layout -- the oracle is transformers' own ``from_pretrained(..., gguf_file=...)``; merged, diffed, inspected;
what is not a model refused in one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FIX_ADAPTER, FIX_BASE, one_line_error, run_cli
from safetensors.torch import load_file

from lorasurgeon.errors import UnsupportedError
from lorasurgeon.io.checkpoint import open_checkpoint
from lorasurgeon.io.gguf_model import gguf_config, open_gguf_model

gguf = pytest.importorskip("gguf")


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py, LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(
    base: Path, out: Path, qtype: str, arch: str = "llama", extra: str | None = None, encode=None
) -> Path:
    """``base`` as convert_hf_to_gguf.py writes a Llama: metadata, names, permuted q/k, 2-D weights in ``qtype``
    (Q8_0 falling back to F16 where a row is not whole blocks), 1-D tensors F32. ``encode(data, kind)``: the
    bytes of a 2-D weight, for a type gguf cannot encode (the K-quants)."""
    config = json.loads((base / "config.json").read_text())
    t = load_file(base / "model.safetensors")
    permuted = arch != "qwen2"  # convert_hf_to_gguf's LlamaModel permutes q/k rows; Qwen2Model does not
    model_arch = gguf.MODEL_ARCH.LLAMA if permuted else gguf.MODEL_ARCH.QWEN2
    tmap = gguf.get_tensor_name_map(model_arch, config["num_hidden_layers"])
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name("tiny")
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    w.add_vocab_size(config["vocab_size"])
    w.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    for name, tensor in t.items():
        data = tensor.float().numpy()
        if permuted and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            data = llama_permute(data, heads)
        kind = gguf.GGMLQuantizationType.F32 if data.ndim == 1 else getattr(gguf.GGMLQuantizationType, qtype)
        try:
            encoder = encode if encode is not None and data.ndim == 2 else gguf.quants.quantize
            raw = encoder(np.ascontiguousarray(data), kind)
        except gguf.QuantError:
            kind = gguf.GGMLQuantizationType.F16
            raw = gguf.quants.quantize(np.ascontiguousarray(data), kind)
        w.add_tensor(tmap.get_name(name, try_suffixes=(".weight", ".bias")), raw, raw_dtype=kind)
    if extra is not None:  # a tensor transformers' map has no place for (as MoE experts it stacks)
        w.add_tensor(extra, np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def hf_state(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
def test_tensors_are_transformers_own_reading(tmp_path, qtype):
    path = write_llama_gguf(FIX_BASE, tmp_path / "m.gguf", qtype)
    want = hf_state(path)
    ckpt = open_checkpoint(path)
    assert set(ckpt.names()) == set(want)
    worst = max((ckpt.read(n).float() - want[n]).abs().max().item() for n in ckpt.names())
    print(f"{qtype}: max |ours - transformers| = {worst}")
    assert worst == 0.0
    assert gguf_config(path)["num_key_value_heads"] == 2


def test_merge_is_peft_merge_of_the_transformers_loaded_gguf(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    path = write_llama_gguf(FIX_BASE, tmp_path / "m.gguf", "Q8_0")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lorasurgeon", "merge", str(path), str(FIX_ADAPTER), "-o", str(out)]
    subprocess.run([*cmd, "--dtype", "float32"], check=True, capture_output=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    want = PeftModel.from_pretrained(model, FIX_ADAPTER).merge_and_unload().state_dict()
    got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
    worst = max((got[n] - want[n]).abs().max().item() for n in want)
    print(f"merge: max |ours - PEFT| = {worst}")
    assert worst < 1e-5


def test_diff_and_inspect_read_it(tmp_path):
    path = write_llama_gguf(FIX_BASE, tmp_path / "m.gguf", "F16")
    r = subprocess.run([sys.executable, "-m", "lorasurgeon", "inspect", str(path)], capture_output=True, text=True)
    assert r.returncode == 0 and "model" in r.stdout and "tensors     21" in r.stdout, r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "lorasurgeon", "diff", str(path), str(FIX_BASE)], capture_output=True, text=True
    )
    assert r.returncode == 1 and "21 common tensors" in r.stdout and "0 only in A, 0 only in B" in r.stdout, r.stderr


def test_an_adapter_or_an_unknown_arch_is_refused_in_one_line(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "a.gguf"), "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((2, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedError, match="adapter") as e:
        open_gguf_model(tmp_path / "a.gguf")
    assert "\n" not in str(e.value)
    path = write_llama_gguf(FIX_BASE, tmp_path / "x.gguf", "F32", arch="nosucharch")
    with pytest.raises(UnsupportedError, match="not supported") as e:
        open_gguf_model(path)
    assert "\n" not in str(e.value)


def test_a_tensor_with_no_place_in_transformers_layout_refuses_the_model(tmp_path):
    """Never a model with a tensor left out: one transformers' map cannot place is refused by name."""
    path = write_llama_gguf(FIX_BASE, tmp_path / "m.gguf", "F32", extra="blk.0.ffn_gate_exps.weight")
    with pytest.raises(UnsupportedError, match="blk.0.ffn_gate_exps.weight.*refused rather than left out") as e:
        open_gguf_model(path)
    assert "\n" not in str(e.value)
    assert open_gguf_model(write_llama_gguf(FIX_BASE, tmp_path / "ok.gguf", "F32", extra="rope_freqs.weight"))


def test_quantize_keep_into_a_folder_names_the_gguf_result(tmp_path):
    path = write_llama_gguf(FIX_BASE, tmp_path / "m.gguf", "Q8_0")
    result = run_cli("merge", path, FIX_ADAPTER, "--quantize", "keep", "-o", tmp_path / "out")
    one_line_error(result, "keeps its types in a .gguf result", "-o NAME.gguf")
    assert not (tmp_path / "out").exists()
