"""The augmented form and round trips: merge -> unmerge, augmented -> convert -> merged / adapter."""

from __future__ import annotations

import json

import make_fixtures as mf
import pytest
import torch
from reference import load_model, logits, peft_model, read_folder
from safetensors.torch import load_file

from lorasurgeon import convert, merge, unmerge

CASES = {
    "llama": (lambda: mf.llama_config(), dict(target_modules=["q_proj", "v_proj", "embed_tokens"], r=4)),
    "llama-tied": (lambda: mf.llama_config(tied=True), dict(target_modules=["q_proj", "lm_head"], r=4)),
    "gpt2-lora_bias": (lambda: mf.gpt2_config(), dict(target_modules=["c_attn", "c_proj"], lora_bias=True)),
    "gpt2-bias": (lambda: mf.gpt2_config(), dict(target_modules=["c_attn", "c_proj"], bias="lora_only")),
    "gpt2-bias-all": (lambda: mf.gpt2_config(), dict(target_modules=["c_attn"], bias="all")),
    "dora+modules_to_save": (
        lambda: mf.llama_config(),
        dict(target_modules=["q_proj", "o_proj"], use_dora=True, modules_to_save=["lm_head"]),
    ),
    "tokens-tied": (
        lambda: mf.llama_config(tied=True),
        dict(target_modules=["k_proj"], trainable_token_indices={"embed_tokens": [4, 8]}),
    ),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    config_fn, lora = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param.replace("+", "_"))
    base = mf.save_model(mf.build_model(config_fn(), seed=0), root / "base")
    adapter = mf.make_adapter(mf.build_model(config_fn(), seed=0), root / "adapter", **lora)
    return root, base, adapter, config_fn, lora


def test_augmented_loads_strictly_into_the_peft_model(pair):
    from peft import LoraConfig, get_peft_model

    root, base, adapter, config_fn, _ = pair
    merge(base, [adapter], root / "aug", form="augmented")
    config = json.loads((root / "aug" / "adapter_config.json").read_text())
    wrapped = get_peft_model(
        mf.build_model(config_fn(), seed=123),
        LoraConfig(**{k: v for k, v in config.items() if k not in ("peft_type", "auto_mapping", "peft_version")}),
    )
    inner = wrapped.base_model.model
    state = read_folder(root / "aug")
    assert set(state) == set(inner.state_dict())
    inner.load_state_dict(state, strict=True)
    reference, _ = peft_model(base, [adapter])
    torch.testing.assert_close(logits(wrapped.eval()), logits(reference), rtol=1e-5, atol=1e-5)


def test_convert_augmented_to_merged_equals_merging(pair):
    root, base, adapter, _, _ = pair
    if not (root / "aug").exists():
        merge(base, [adapter], root / "aug", form="augmented")
    merge(base, [adapter], root / "direct")
    convert(root / "aug", root / "via_aug", to="merged")
    direct, via = read_folder(root / "direct"), read_folder(root / "via_aug")
    assert set(direct) == set(via)
    for name in direct:
        assert torch.equal(direct[name], via[name]), name
    assert json.loads((root / "direct" / "config.json").read_text()) == json.loads(
        (root / "via_aug" / "config.json").read_text()
    )


def test_convert_augmented_to_adapter_gives_the_adapter_back(pair):
    from peft import PeftModel

    root, base, adapter, _, _ = pair
    if not (root / "aug").exists():
        merge(base, [adapter], root / "aug", form="augmented")
    convert(root / "aug", root / "adapter_again", to="adapter")
    original = load_file(adapter / "adapter_model.safetensors")
    again = load_file(root / "adapter_again" / "adapter_model.safetensors")
    assert set(original) == set(again)
    for k in original:
        assert torch.equal(original[k], again[k]), k
    model = PeftModel.from_pretrained(load_model(base), root / "adapter_again")
    reference, _ = peft_model(base, [adapter])
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-6, atol=1e-6)


def test_unmerge_round_trip(pair):
    root, base, adapter, _, lora = pair
    if (
        lora.get("use_dora")
        or lora.get("modules_to_save")
        or lora.get("trainable_token_indices")
        or lora.get("bias", "none") != "none"
    ):
        pytest.skip("unmerge refuses these (tensors replaced outright): see test_merge_cli")
    if not (root / "direct").exists():
        merge(base, [adapter], root / "direct")
    unmerge(root / "direct", [adapter], root / "back")
    original, back, merged = read_folder(base), read_folder(root / "back"), read_folder(root / "direct")
    assert set(back) >= set(original)
    for name, w0 in original.items():
        # 1e-6 relative to the larger of the values involved (W0 + ΔW - ΔW can cancel)
        scale = torch.maximum(w0.abs(), merged.get(name, w0).abs())
        assert ((back[name] - w0).abs() <= 1e-6 * scale + 1e-12).all(), name
