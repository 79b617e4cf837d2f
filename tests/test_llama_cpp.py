"""llama.cpp itself runs the adapter we write: a GGUF of the committed Llama base (written here with the
``gguf`` package as convert_hf_to_gguf.py writes a Llama: names from its map, q/k rows permuted), loaded by
llama.cpp's Python bindings with and without our ``convert --to gguf`` adapter, against transformers'
logits of the base and of PEFT's merge_and_unload(). The base comparison proves the base file; the adapter
comparison then proves names, orientation, the q/k permutation and the folded scales (rsLoRA, an alpha
pattern and an embedding LoRA included).

llama-cpp-python has no CPU wheel on PyPI (a source build of llama.cpp, ~12 minutes on two cores), so it
is not in the test extra: this slow test runs where it is installed (`pip install llama-cpp-python`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FIX_BASE, run_cli
from safetensors.torch import load_file

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

pytestmark = pytest.mark.slow
TOKENS = [1, 17, 99, 200, 45, 3, 250, 128, 7, 64]


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # convert_hf_to_gguf.py, LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_base_gguf(base: Path, out: Path) -> None:
    """The Llama base as an F32 GGUF: hyperparameters, a placeholder SentencePiece vocabulary (the test feeds
    token ids), and every weight under gguf's name map with q/k permuted as llama.cpp's converter does."""
    c = json.loads((base / "config.json").read_text())
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_block_count(c["num_hidden_layers"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_freq_base(c["rope_parameters"]["rope_theta"])
    w.add_rope_dimension_count(c["head_dim"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    n = c["vocab_size"]
    w.add_tokenizer_model("llama")
    w.add_token_list([b"<unk>", b"<s>", b"</s>"] + [f"t{i}".encode() for i in range(3, n)])
    w.add_token_scores([0.0] * n)
    w.add_token_types([2, 3, 3] + [1] * (n - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c["num_hidden_layers"])
    for key, t in load_file(base / "model.safetensors").items():
        t = t.float()
        if key.endswith("q_proj.weight"):
            t = permute(t, c["num_attention_heads"])
        elif key.endswith("k_proj.weight"):
            t = permute(t, c["num_key_value_heads"])
        w.add_tensor(names.get_name(key, try_suffixes=(".weight",)), t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_cpp_logits(model: Path, lora: Path | None) -> np.ndarray:
    extra = {"lora_path": str(lora)} if lora else {}
    llm = llama_cpp.Llama(str(model), n_ctx=64, logits_all=True, verbose=False, n_threads=2, seed=0, **extra)
    llm.eval(TOKENS)
    out = np.array(llm.scores[: len(TOKENS)], dtype=np.float64)
    llm.close()
    return out


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory) -> Path:
    """An adapter of the committed base written by PEFT with a change large enough to see: every linear layer
    and the embedding, rsLoRA and an alpha pattern (so each module has its own scale to fold)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("llama_cpp") / "adapter"
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_pretrained(FIX_BASE, dtype=torch.float32)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"],
        alpha_pattern={"down_proj": 4},
        use_rslora=True,
        init_lora_weights=False,
    )
    peft = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_" in name:
                p.mul_(0.5)
    peft.save_pretrained(out)
    return out


def test_llama_cpp_runs_our_gguf_adapter_as_peft_merges_it(tmp_path, peft_adapter):
    import transformers
    from peft import PeftModel

    write_base_gguf(FIX_BASE, tmp_path / "base.gguf")
    r = run_cli("convert", peft_adapter, "--to", "gguf", "--base", FIX_BASE, "-o", tmp_path / "a.gguf")
    assert r.exit_code == 0, r.output
    ids = torch.tensor([TOKENS])
    with torch.no_grad():
        model = transformers.AutoModelForCausalLM.from_pretrained(FIX_BASE, dtype=torch.float32)
        base = model(ids).logits[0].double().numpy()
        merged = PeftModel.from_pretrained(model, peft_adapter).merge_and_unload()(ids).logits[0].double().numpy()
    got_base = llama_cpp_logits(tmp_path / "base.gguf", None)
    got = llama_cpp_logits(tmp_path / "base.gguf", tmp_path / "a.gguf")
    change = np.abs(merged - base).max()
    assert np.abs(got_base - base).max() < 1e-3  # the base file is right ...
    assert change > 0.5  # ... the adapter changes the outputs visibly ...
    assert np.abs(got - merged).max() < 1e-3 * max(1.0, np.abs(merged).max())  # ... and llama.cpp applies it as PEFT


def test_a_wrong_scale_or_order_is_visible_in_llama_cpp(tmp_path, peft_adapter):
    """The comparison above can fail: the same adapter with its alpha pattern dropped (llama.cpp would see
    other scales) is far from PEFT's merge."""
    import transformers
    from peft import PeftModel

    write_base_gguf(FIX_BASE, tmp_path / "base.gguf")
    wrong = shutil.copytree(peft_adapter, tmp_path / "wrong")
    config = json.loads((wrong / "adapter_config.json").read_text()) | {"alpha_pattern": {}}
    (wrong / "adapter_config.json").write_text(json.dumps(config))
    assert run_cli("convert", wrong, "--to", "gguf", "--base", FIX_BASE, "-o", tmp_path / "w.gguf").exit_code == 0
    ids = torch.tensor([TOKENS])
    with torch.no_grad():
        model = transformers.AutoModelForCausalLM.from_pretrained(FIX_BASE, dtype=torch.float32)
        merged = PeftModel.from_pretrained(model, peft_adapter).merge_and_unload()(ids).logits[0].double().numpy()
    got = llama_cpp_logits(tmp_path / "base.gguf", tmp_path / "w.gguf")
    assert np.abs(got - merged).max() > 1e-2
