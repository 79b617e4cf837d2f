"""Tied embeddings: the merged model must compute what the adapter model computes.

PEFT's merge_and_unload() is wrong here (a merge into the shared tensor changes both the input
embedding and lm_head), so these tests compare logits with the adapter model, not tensors with
PEFT's merge.
"""

from __future__ import annotations

import json

import make_fixtures as mf
import pytest
import torch
from reference import load_model, logits, peft_model, read_folder

from lorasurgeon import merge

CASES = {
    # lora kwargs, whether the result must be untied
    "q_proj only": (dict(target_modules=["q_proj"]), False),
    "embedding": (dict(target_modules=["embed_tokens", "q_proj"]), True),
    "lm_head": (dict(target_modules=["lm_head"]), True),
    "embedding+lm_head": (dict(target_modules=["embed_tokens", "lm_head"]), True),
    # PEFT ties the head's LoRA to the embedding's (and saves both): each tensor gets the one change
    "ensure_weight_tying": (dict(target_modules=["embed_tokens", "q_proj"], ensure_weight_tying=True), True),
    "trainable tokens": (dict(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [3, 9]}), False),
    "modules_to_save lm_head": (dict(target_modules=["q_proj"], modules_to_save=["lm_head"]), True),
}


@pytest.fixture(scope="module")
def tied_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("tied")
    return mf.save_model(mf.build_model(mf.llama_config(tied=True), seed=0), root / "base")


@pytest.mark.parametrize("case", list(CASES))
def test_tied_merge_computes_the_adapter_model(tied_base, tmp_path, case):
    lora, untie = CASES[case]
    adapter = mf.make_adapter(mf.build_model(mf.llama_config(tied=True), seed=0), tmp_path / "adapter", **lora)
    if "trainable_token_indices" in lora or "modules_to_save" in lora:
        from safetensors.torch import load_file, save_file

        t = load_file(adapter / "adapter_model.safetensors")
        g = torch.Generator().manual_seed(3)
        t = {k: v + 0.1 * torch.randn(v.shape, generator=g) if "lora" not in k else v for k, v in t.items()}
        save_file(t, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    report = merge(tied_base, [adapter], tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    tensors = read_folder(tmp_path / "merged")
    assert report.untied_embeddings is untie
    assert config["tie_word_embeddings"] is (not untie)
    assert ("lm_head.weight" in tensors) is untie
    model, _ = peft_model(tied_base, [adapter])
    torch.testing.assert_close(logits(load_model(tmp_path / "merged")), logits(model), rtol=1e-4, atol=1e-4)
