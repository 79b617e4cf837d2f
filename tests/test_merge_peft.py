"""merge against PEFT's merge_and_unload() (tensors) and the adapter model (logits), feature by feature."""

from __future__ import annotations

import json

import make_fixtures as mf
import pytest
import torch
from reference import load_model, logits, peft_merged_state, peft_model, read_folder

from lorasurgeon import merge

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# name -> (model config factory, LoRA kwargs)
CASES = {
    "linear": (lambda: mf.llama_config(), dict(target_modules=LLAMA_ALL, r=4, lora_alpha=8)),
    "embedding+lm_head": (lambda: mf.llama_config(), dict(target_modules=["embed_tokens", "lm_head", "q_proj"], r=4)),
    "gpt2-conv1d": (lambda: mf.gpt2_config(), dict(target_modules=["c_attn", "c_proj", "c_fc"], r=4, lora_alpha=16)),
    "gpt2-embedding": (lambda: mf.gpt2_config(), dict(target_modules=["wte", "c_attn"], r=2)),
    "rslora+patterns": (
        lambda: mf.llama_config(),
        dict(
            target_modules=["q_proj", "v_proj", "down_proj"],
            r=4,
            lora_alpha=8,
            use_rslora=True,
            rank_pattern={"v_proj": 2, r"layers\.1\..*q_proj": 6},
            alpha_pattern={"q_proj": 3, "down_proj": 32},
        ),
    ),
    "layers_to_transform": (
        lambda: mf.llama_config(layers=3),
        dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 2]),
    ),
    "dora": (lambda: mf.llama_config(), dict(target_modules=["q_proj", "down_proj", "embed_tokens"], use_dora=True)),
    "dora-gpt2": (lambda: mf.gpt2_config(), dict(target_modules=["c_attn", "c_proj"], use_dora=True)),
    "lora_bias": (lambda: mf.gpt2_config(), dict(target_modules=["c_attn", "c_fc"], lora_bias=True)),
    "bias-all": (lambda: mf.gpt2_config(), dict(target_modules=["c_attn"], bias="all")),
    "bias-lora_only": (lambda: mf.gpt2_config(), dict(target_modules=["c_attn", "c_proj"], bias="lora_only")),
    "modules_to_save": (lambda: mf.llama_config(), dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
    "trainable_tokens": (
        lambda: mf.llama_config(),
        dict(target_modules=["q_proj"], trainable_token_indices={"embed_tokens": [3, 5, 200]}),
    ),
    "conv2d": (lambda: mf.resnet_config(), dict(target_modules=["convolution"], r=2, lora_alpha=4)),
    "conv2d-dora": (lambda: mf.resnet_config(), dict(target_modules=["convolution"], r=2, use_dora=True)),
}


def train_noise(adapter_dir):
    """Make saved DoRA magnitudes / trained biases differ from their initial values, like training does."""
    from safetensors.torch import load_file, save_file

    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    g = torch.Generator().manual_seed(7)
    for k, v in tensors.items():
        if "magnitude" in k or k.endswith(".bias") or "trainable_tokens_delta" in k or "lm_head" in k:
            tensors[k] = v + 0.05 * torch.randn(v.shape, generator=g)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    cache = {}

    def make(case):
        if case not in cache:
            config_fn, lora = CASES[case]
            root = tmp_path_factory.mktemp(case.replace("+", "_"))
            config = config_fn()
            base = mf.save_model(mf.build_model(config, seed=0), root / "base")
            adapter = mf.make_adapter(mf.build_model(config, seed=0), root / "adapter", **lora)
            train_noise(adapter)
            cache[case] = (root, base, adapter)
        return cache[case]

    return make


@pytest.mark.parametrize("case", list(CASES))
def test_merge_matches_peft(built, case):
    root, base, adapter = built(case)
    out = root / "merged"
    if not out.exists():
        merge(base, [adapter], out)
    ours = read_folder(out)
    ref = peft_merged_state(base, [adapter])
    tied = json.loads((base / "config.json").read_text()).get("tie_word_embeddings", True) and "lm_head.weight" in ref
    for name, theirs in ref.items():
        if name == "lm_head.weight" and tied:
            # PEFT is wrong here: merging into a tied embedding also changes lm_head (one shared
            # tensor). The truth is the adapter model's logits, checked below.
            continue
        assert name in ours, name
        torch.testing.assert_close(ours[name], theirs, rtol=1e-6, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert set(ours) <= set(ref)
    if tied:
        untied = not json.loads((out / "config.json").read_text()).get("tie_word_embeddings", True)
        assert untied == ("lm_head.weight" in ours)
    # and transformers, loading our folder, computes what the adapter model computes
    adapter_model, _ = peft_model(base, [adapter])
    torch.testing.assert_close(logits(load_model(out)), logits(adapter_model), rtol=1e-4, atol=1e-4)


def test_saved_base_layer_weight_is_the_w0(built, tmp_path):
    """PEFT loads an embedding's saved base_layer.weight over the base: so must we."""
    _, base, adapter = built("embedding+lm_head")
    from safetensors.torch import load_file, save_file

    changed = tmp_path / "base"
    changed.mkdir()
    for f in base.iterdir():
        (changed / f.name).write_bytes(f.read_bytes())
    tensors = load_file(changed / "model.safetensors")
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"] + 1.0
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
    merge(changed, [adapter], tmp_path / "merged")
    ours = read_folder(tmp_path / "merged")
    ref = peft_merged_state(changed, [adapter])
    torch.testing.assert_close(
        ours["model.embed_tokens.weight"], ref["model.embed_tokens.weight"], rtol=1e-6, atol=1e-6
    )


def test_several_adapters_with_weights(built, tmp_path):
    _, base, a1 = built("linear")
    config_fn, lora = CASES["linear"]
    a2 = mf.make_adapter(
        mf.build_model(config_fn(), seed=0),
        tmp_path / "a2",
        seed=5,
        target_modules=["q_proj", "up_proj"],
        r=2,
        lora_alpha=4,
    )
    merge(base, [a1, a2], tmp_path / "merged", weights=[0.7, -1.5])
    ours = read_folder(tmp_path / "merged")
    ref = peft_merged_state(base, [a1, a2], weights=[0.7, -1.5])
    for name, theirs in ref.items():
        torch.testing.assert_close(ours[name], theirs, rtol=1e-6, atol=1e-6)
    model, _ = peft_model(base, [a1, a2], weights=[0.7, -1.5])
    torch.testing.assert_close(logits(load_model(tmp_path / "merged")), logits(model), rtol=1e-4, atol=1e-4)


def test_hand_computed_linear_merge(tmp_path):
    """W0 + (alpha/r)·B·A on numbers small enough to check by hand."""
    from safetensors.torch import save_file

    (tmp_path / "base").mkdir()
    (tmp_path / "adapter").mkdir()
    save_file(
        {"lin.weight": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "other": torch.tensor([5.0])},
        tmp_path / "base" / "model.safetensors",
    )
    save_file(
        {
            "base_model.model.lin.lora_A.weight": torch.tensor([[1.0, -1.0]]),
            "base_model.model.lin.lora_B.weight": torch.tensor([[2.0], [0.5]]),
        },
        tmp_path / "adapter" / "adapter_model.safetensors",
    )
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 3, "target_modules": ["lin"]})
    )
    merge(tmp_path / "base", [tmp_path / "adapter"], tmp_path / "out")
    out = read_folder(tmp_path / "out")
    # ΔW = 3 · [[2],[0.5]] @ [[1, -1]] = [[6, -6], [1.5, -1.5]]
    assert torch.equal(out["lin.weight"], torch.tensor([[7.0, -4.0], [4.5, 2.5]]))
    assert torch.equal(out["other"], torch.tensor([5.0]))


def test_several_dora_adapters_in_order(built, tmp_path):
    """Each DoRA adapter normalises by ‖W0 + ΔWᵢ‖ and scales the weight merged so far, as PEFT does."""
    _, base, a1 = built("dora")
    config_fn, _ = CASES["dora"]
    a2 = mf.make_adapter(
        mf.build_model(config_fn(), seed=0),
        tmp_path / "a2",
        seed=9,
        target_modules=["q_proj", "up_proj"],
        use_dora=True,
        r=2,
    )
    train_noise(a2)
    merge(base, [a1, a2], tmp_path / "merged")
    ours, ref = read_folder(tmp_path / "merged"), peft_merged_state(base, [a1, a2])
    for name, theirs in ref.items():
        torch.testing.assert_close(ours[name], theirs, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_config_tokenizer_and_generation_files_are_carried(built, tmp_path):
    _, base, adapter = built("linear")
    import shutil

    folder = shutil.copytree(base, tmp_path / "base")
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "tokenizer_config.json").write_text("{}")
    (folder / "README.md").write_text("# the base model's card")
    merge(folder, [adapter], tmp_path / "merged")
    names = sorted(p.name for p in (tmp_path / "merged").iterdir())
    assert names == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert "the base model's card" not in (tmp_path / "merged" / "README.md").read_text()
    assert (tmp_path / "merged" / "tokenizer.json").read_text() == '{"version": "1.0"}'
