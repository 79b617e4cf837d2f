"""ModelNames against transformers itself: what it loads is what the names say, for every architecture."""

from __future__ import annotations

import json

import pytest
from architectures import ARCHS, build
from safetensors.torch import load_file

from lorasurgeon.names import model_names
from lorasurgeon.names.builtin import TIED_BY_DEFAULT, builtin


def saved(arch_name: str, tmp_path, tied: bool | None = None):
    arch = ARCHS[arch_name]
    model = build(arch, tied=tied)
    model.save_pretrained(tmp_path / arch_name)
    folder = tmp_path / arch_name
    keys = sorted(load_file(folder / "model.safetensors"))
    return arch, model, keys, json.loads((folder / "config.json").read_text())


def test_the_builtin_tie_defaults_follow_the_installed_transformers():
    """The one table kept by hand (for machines without transformers) is checked here against the
    installed transformers, for every architecture the matrix runs."""
    import transformers

    for arch in ARCHS.values():
        config = arch.make_config()
        model_type = config.model_type
        default = getattr(transformers.CONFIG_MAPPING[model_type](), "tie_word_embeddings", False)
        assert (model_type in TIED_BY_DEFAULT) == bool(default), model_type


@pytest.mark.parametrize("arch_name", sorted(ARCHS))
def test_the_names_are_what_transformers_loads(arch_name, tmp_path):
    """Every file tensor's in-memory name, every fused parameter and tied tensor, is a tensor of the
    model transformers builds; together they are all of it."""
    arch, model, keys, config = saved(arch_name, tmp_path)
    names = model_names(keys, config)
    assert names.source.startswith("transformers"), names.source
    loaded = set(model.state_dict())
    covered = set(names.file_of) | set(names.fused) | set(names.tied)
    assert set(names.file_of) <= loaded and set(names.fused) <= loaded, sorted(set(names.file_of) - loaded)[:5]
    assert loaded <= covered | {k for k in loaded if k.endswith(("position_ids", "num_batches_tracked"))}, sorted(
        loaded - covered
    )[:5]
    assert set(names.file_of.values()) | {k for f in names.fused.values() for part in f.parts for k in part} == set(
        keys
    )


def test_renamed_heads_fused_experts_and_tied_biases(tmp_path):
    _, _, keys, config = saved("vit", tmp_path)
    vit = model_names(keys, config)
    assert vit.file_key("vit.layers.0.attention.k_proj.weight") == "vit.encoder.layer.0.attention.attention.key.weight"
    assert (
        vit.file_name_for("vit.layers.0.attention.k_proj.weight")
        == "vit.encoder.layer.0.attention.attention.key.weight"
    )
    _, _, keys, config = saved("gpt_neox", tmp_path, tied=False)
    neox = model_names(keys, config)
    assert (neox.head, neox.file_key("lm_head.weight"), neox.task_type) == (
        "lm_head.weight",
        "embed_out.weight",
        "CAUSAL_LM",
    )
    _, _, keys, config = saved("mixtral", tmp_path)
    experts = model_names(keys, config).fused["model.layers.0.mlp.experts.gate_up_proj"]
    assert experts.experts == 4 and experts.parts[0][1] == "model.layers.0.block_sparse_moe.experts.1.w1.weight"
    assert experts.parts[1][1] == "model.layers.0.block_sparse_moe.experts.1.w3.weight"  # gate rows, then up rows
    _, _, keys, config = saved("bert", tmp_path, tied=True)
    bert = model_names(keys, config)
    assert bert.tied == {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }
    assert bert.tied_absent(set(keys)) == bert.tied  # neither is in the files: both are views


@pytest.mark.parametrize(
    "arch_name,task",
    [
        ("llama", "CAUSAL_LM"),
        ("t5", "SEQ_2_SEQ_LM"),
        ("vit", None),
        ("bert", None),
        ("clip_text", None),
        ("whisper", None),
    ],
)
def test_task_types(arch_name, task, tmp_path):
    _, _, keys, config = saved(arch_name, tmp_path)
    assert model_names(keys, config).task_type == task


def test_without_transformers_the_builtin_table_answers():
    keys = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight"]
    names = builtin(
        keys, {"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, "transformers is not installed"
    )
    assert names.tied == {"lm_head.weight": "model.embed_tokens.weight"} and names.task_type == "CAUSAL_LM"
    assert names.source == "built-in table (transformers is not installed)"
    untied = builtin(keys, {"model_type": "llama"}, "why")  # llama's class default: untied
    assert untied.tied == {} and untied.file_key("model.layers.0.self_attn.q_proj.weight") == keys[1]
    assert model_names(keys, {}).source == "built-in table (config.json names no model_type)"


@pytest.mark.parametrize("arch_name", ["gpt2", "llama", "bert", "mixtral"])
def test_the_builtin_layer_kinds_are_what_transformers_says(arch_name, tmp_path):
    """Without transformers, the names alone give each weight's layer kind (GPT-2's Conv1D by model type, the
    embeddings by leaf name, the head a Linear): the same answer as transformers' own modules."""
    _, model, keys, config = saved(arch_name, tmp_path)
    told, fallback = model_names(keys, config), builtin(keys, config, "why")
    assert fallback.model_type == told.model_type == config["model_type"]
    shapes = {name: p.dim() for name, p in model.state_dict().items()}
    for name in fallback.file_of:
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and shapes.get(name) in (2, 4) and module in told.layers:
            assert fallback.layer_of(module, shapes[name]) == told.layer_of(module, shapes[name]), name


def test_one_vocabulary_of_layer_kinds():
    """ModelNames.layers, the adapter's module kinds and the ops' LayerKinds use one set of names."""
    from typing import get_args

    from lorasurgeon.adapter.weights import AdapterLayer
    from lorasurgeon.ops.lora import LAYER_KINDS, LayerName

    assert set(LAYER_KINDS) | {"experts"} == set(get_args(LayerName))
    assert set(get_args(AdapterLayer)) <= set(get_args(LayerName))
    names = builtin(["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight"], {"model_type": "gpt2"}, "why")
    assert dict(names.layers) == {
        "transformer.wte": "embedding",
        "transformer.h.0.attn.c_attn": "conv1d",
        "lm_head": "linear",
    }
    assert names.layer_of("transformer.h.0.attn.c_attn", 4) == "conv" and names.task_type == "CAUSAL_LM"
