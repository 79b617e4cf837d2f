"""MLX-LM adapters (lorasurgeon.adapter.formats.mlx) against mlx-lm itself: a PEFT LoRA written as MLX is loaded by
mlx-lm's load_adapters and fused by its LoRALinear / DoRALinear to PEFT's merge; an adapter saved as mlx_lm.lora
saves it is read and merged by lorasurgeon to mlx-lm's fuse; PEFT -> MLX -> PEFT gives the same tensors back."""

from __future__ import annotations

import json
from pathlib import Path

import make_fixtures as mf
import pytest
import torch
from helpers import one_line_error, run_cli
from reference import peft_merged_state, read_folder
from safetensors.torch import load_file, save_file

from lorasurgeon import merge
from lorasurgeon.adapter.formats import mlx as mlx_format
from lorasurgeon.adapter.formats import registry
from lorasurgeon.adapter.weights import load_adapter
from lorasurgeon.commands._inputs import Output
from lorasurgeon.commands.convert.adapter_format import to_format
from lorasurgeon.errors import AdapterConfigError, UnsupportedError

mx = pytest.importorskip("mlx.core")
llama = pytest.importorskip("mlx_lm.models.llama")
from mlx.utils import tree_flatten  # noqa: E402
from mlx_lm.tuner.dora import DoRALinear  # noqa: E402
from mlx_lm.tuner.lora import LoRALinear  # noqa: E402
from mlx_lm.tuner.utils import linear_to_lora_layers, load_adapters  # noqa: E402
from mlx_lm.utils import save_config  # noqa: E402

LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def as_torch(a) -> torch.Tensor:
    return torch.from_numpy(__import__("numpy").array(a.astype(mx.float32)))


def mlx_model(base: Path):
    """mlx-lm's own Llama, built from the base's config.json and loaded with its weights."""
    c = json.loads((base / "config.json").read_text())
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=c["hidden_size"],
        num_hidden_layers=c["num_hidden_layers"],
        intermediate_size=c["intermediate_size"],
        num_attention_heads=c["num_attention_heads"],
        num_key_value_heads=c["num_key_value_heads"],
        rms_norm_eps=c["rms_norm_eps"],
        vocab_size=c["vocab_size"],
        tie_word_embeddings=c["tie_word_embeddings"],
    )
    model = llama.Model(args)
    weights = {k: mx.array(v.numpy()) for k, v in load_file(base / "model.safetensors").items()}
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    return model


def mlx_fused(model) -> dict[str, torch.Tensor]:
    """mlx-lm's fuse (mlx_lm/fuse.py: every module with a fuse()), as torch tensors by weight name."""
    return {
        f"{name}.weight": as_torch(module.fuse().weight)
        for name, module in model.named_modules()
        if isinstance(module, (LoRALinear, DoRALinear))
    }


def mlx_trained(base: Path, out: Path, *, kind: str = "lora", num_layers: int = 2, **params) -> Path:
    """An adapter as mlx_lm.lora saves one (lora.py train_model, trainer.py train): LoRA layers by
    linear_to_lora_layers, lora_b (and DoRA's m) made non-zero as training would, the trainable parameters saved
    by mx.save_safetensors as adapters.safetensors, the arguments by save_config as adapter_config.json."""
    model = mlx_model(base)
    model.freeze()
    lora = {"rank": 4, "scale": 3.5, "dropout": 0.0, **params}
    linear_to_lora_layers(model, num_layers, lora, use_dora=kind == "dora")
    mx.random.seed(3)
    for _, module in model.named_modules():
        if isinstance(module, (LoRALinear, DoRALinear)):
            module.lora_b = 0.05 * mx.random.normal(module.lora_b.shape)
            if isinstance(module, DoRALinear):
                module.m = module.m * (1 + 0.1 * mx.random.normal(module.m.shape))
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
    args = {"fine_tune_type": kind, "num_layers": num_layers, "lora_parameters": lora, "model": str(base)}
    save_config(args, out / "adapter_config.json")
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlx")
    config = mf.llama_config(layers=3)
    base = mf.save_model(mf.build_model(config, seed=0), root / "base")
    peft = mf.make_adapter(mf.build_model(config, seed=0), root / "peft", target_modules=LLAMA_ALL, r=4, lora_alpha=8)
    dora = mf.make_adapter(
        mf.build_model(config, seed=0), root / "dora", target_modules=["q_proj", "down_proj"], r=2, use_dora=True
    )
    tensors = load_file(dora / "adapter_model.safetensors")  # magnitudes as training leaves them, not ||W||
    g = torch.Generator().manual_seed(7)
    tensors = {
        k: v * (1 + 0.1 * torch.randn(v.shape, generator=g)) if "magnitude" in k else v for k, v in tensors.items()
    }
    save_file(tensors, dora / "adapter_model.safetensors", metadata={"format": "pt"})
    return root, base, peft, dora


@pytest.mark.parametrize("which", ["peft", "dora"])
def test_peft_written_as_mlx_is_loaded_and_fused_by_mlx_lm_as_peft_merges(tiny, which):
    root, base, *adapters = tiny
    adapter = adapters[0] if which == "peft" else adapters[1]
    out = root / f"{which}-as-mlx"
    to_format(adapter, Output(out), target="mlx")
    assert {p.name for p in out.iterdir()} >= {"adapters.safetensors", "adapter_config.json"}
    model = mlx_model(base)
    load_adapters(model, str(out))  # mlx-lm's loader: refuses a name or a shape its model does not have
    ours, ref = mlx_fused(model), peft_merged_state(base, [adapter])
    adapted = {
        k.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]
        for k in load_file(adapter / "adapter_model.safetensors")
        if ".lora_A" in k
    }
    changed = [k for k in ours if k.removesuffix(".weight") in adapted]
    assert len(changed) == len(adapted) == (21 if which == "peft" else 6)
    worst = max((ours[k] - ref[k]).abs().max().item() for k in changed)
    print(f"\nMLX fuse of our {which} vs PEFT merge_and_unload: max |diff| {worst:.2e}")
    assert worst < 1e-6, worst
    for k in set(ours) - set(changed):  # num_layers -1: the modules the file has nothing for change nothing
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_an_adapter_saved_by_mlx_lm_is_read_and_merged_as_mlx_lm_fuses(tiny, tmp_path, kind):
    _, base, *_ = tiny
    adapter = mlx_trained(base, tmp_path / "mlx", kind=kind, num_layers=2, keys=["self_attn.q_proj", "mlp.up_proj"])
    read = load_adapter(adapter)
    assert read.format == "mlx" and read.config.r == 4 and read.config.use_dora == (kind == "dora")
    assert sorted(read.modules) == [
        f"model.layers.{i}.{m}" for i in (1, 2) for m in ("mlp.up_proj", "self_attn.q_proj")
    ]
    assert all(m.scale == pytest.approx(3.5, rel=1e-15) for m in read.modules.values())
    read.close()
    model = mlx_model(base)
    load_adapters(model, str(adapter))
    theirs = mlx_fused(model)
    merge(base, [adapter / "adapters.safetensors"], tmp_path / "merged")
    ours = read_folder(tmp_path / "merged")
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in theirs)
    print(f"\nour merge of mlx-lm's {kind} vs mlx-lm fuse: max |diff| {worst:.2e}")
    assert worst < 1e-6, worst
    untouched = load_file(base / "model.safetensors")
    assert torch.equal(
        ours["model.layers.0.self_attn.q_proj.weight"], untouched["model.layers.0.self_attn.q_proj.weight"]
    )


def test_peft_to_mlx_to_peft_gives_the_same_tensors(tiny):
    root, _, peft, dora = tiny
    for adapter in (peft, dora):
        there, back = root / f"{adapter.name}-there", root / f"{adapter.name}-back"
        to_format(adapter, Output(there), target="mlx")
        to_format(there / "adapters.safetensors", Output(back), target="peft")
        first, again = load_file(adapter / "adapter_model.safetensors"), load_file(back / "adapter_model.safetensors")
        assert set(first) == set(again)
        for k, v in first.items():
            assert again[k].dtype == v.dtype and torch.equal(again[k], v), k
        config = json.loads((back / "adapter_config.json").read_text())
        original = json.loads((adapter / "adapter_config.json").read_text())
        assert config["lora_alpha"] / config["r"] == original["lora_alpha"] / original["r"]
        assert config["use_dora"] == original["use_dora"]


def test_what_mlx_lm_does_not_hold_is_refused_by_name(tiny, tmp_path):
    _, base, peft, _ = tiny
    full = mlx_trained(base, tmp_path / "full")
    cfg = json.loads((full / "adapter_config.json").read_text())
    (full / "adapter_config.json").write_text(json.dumps({**cfg, "fine_tune_type": "full", "lora_parameters": None}))
    with pytest.raises(UnsupportedError, match=r'adapter_config.json: fine_tune_type "full"') as e:
        load_adapter(full)
    assert "\n" not in str(e.value)
    one_line_error(run_cli("inspect", full / "adapters.safetensors"), 'fine_tune_type "full"')

    odd = mlx_trained(base, tmp_path / "odd")
    tensors = load_file(odd / "adapters.safetensors")
    tensors["model.layers.2.self_attn.q_proj.lora_c"] = torch.zeros(2)
    save_file(tensors, odd / "adapters.safetensors")
    with pytest.raises(UnsupportedError, match=r"tensor model.layers.2.self_attn.q_proj.lora_c: not an MLX-LM LoRA"):
        load_adapter(odd)

    ranked = mlx_trained(base, tmp_path / "ranked")
    cfg = json.loads((ranked / "adapter_config.json").read_text())
    (ranked / "adapter_config.json").write_text(json.dumps({**cfg, "lora_parameters": {"rank": 8, "scale": 1.0}}))
    with pytest.raises(AdapterConfigError, match=r"is not of rank 8 \(lora_parameters.rank\)"):
        load_adapter(ranked)

    patterned = mf.make_adapter(
        mf.build_model(mf.llama_config(layers=3), seed=0), tmp_path / "patterned", r=4, rank_pattern={"v_proj": 2}
    )
    with pytest.raises(UnsupportedError, match="modules of different ranks .* one rank for every module") as e:
        to_format(patterned, Output(tmp_path / "patterned-mlx"), target="mlx")
    assert "\n" not in str(e.value) and not (tmp_path / "patterned-mlx").exists()
    with pytest.raises(UnsupportedError, match="whole tensor .* LoRA pairs"):
        saved = mf.make_adapter(
            mf.build_model(mf.llama_config(layers=3), seed=0), tmp_path / "saved", modules_to_save=["lm_head"]
        )
        to_format(saved, Output(tmp_path / "saved-mlx"), target="mlx")


def test_mlx_is_claimed_by_mlx_alone_and_inspect_and_merge_reach_it(tiny, tmp_path):
    _, base, *_ = tiny
    assert mlx_format.FORMAT.writer is not None and "mlx" in registry.writable()
    adapter = mlx_trained(base, tmp_path / "mlx")
    claimed = [f.name for f in registry.ADAPTER_FORMATS if f.claims(registry.Probe(adapter))]
    assert claimed == ["mlx"]  # PEFT's rule does not claim it, whatever the registry's order
    assert registry.adapter_format(adapter) is mlx_format.FORMAT
    assert registry.adapter_format(adapter / "adapters.safetensors") is mlx_format.FORMAT
    result = run_cli("inspect", adapter / "adapters.safetensors")
    assert result.exit_code == 0, result.output
    assert "mlx" in result.output
    result = run_cli("merge", base, adapter / "adapters.safetensors", "-o", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    model = mlx_model(base)
    load_adapters(model, str(adapter))
    ours = read_folder(tmp_path / "merged")
    assert max((ours[k] - v).abs().max().item() for k, v in mlx_fused(model).items()) < 1e-6


def test_a_command_takes_an_mlx_folder(tiny, tmp_path):
    _, base, *_ = tiny
    adapter = mlx_trained(base, tmp_path / "mlx")
    assert run_cli("inspect", adapter).exit_code == 0
