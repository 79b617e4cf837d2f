"""LoRA on stacked MoE experts beyond the matrix: adapters of transformers 4 (per-expert modules), of
PEFT before 0.19.1 (3-D parameters taken the other way round), checkpoints saved in the fused layout,
and what is refused. PEFT's adapter model is the oracle throughout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from architectures import ARCHS, build, outputs
from helpers import one_line_error, run_cli
from safetensors.torch import load_file, save_file

import lorasurgeon as ls

MIXTRAL = ARCHS["mixtral"]
E, H, INTER, R = 4, 64, 128, 4  # the matrix's tiny Mixtral: experts, hidden, intermediate, rank


def causal_lm(path: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def peft_outputs(base: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel

    return outputs(PeftModel.from_pretrained(causal_lm(base), adapter).eval(), MIXTRAL)


def experts_adapter(model, folder: Path, **extra) -> Path:
    """A PEFT adapter with target_parameters on the experts (and q_proj), non-zero everywhere."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    config = LoraConfig(r=R, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj"], **extra)
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def edit_adapter(src: Path, dst: Path, tensors: dict[str, torch.Tensor] | None = None, **config) -> Path:
    dst.mkdir(parents=True)
    raw = json.loads((src / "adapter_config.json").read_text())
    raw.update(config)
    raw = {k: v for k, v in raw.items() if v is not None}
    (dst / "adapter_config.json").write_text(json.dumps(raw))
    save_file(tensors or load_file(src / "adapter_model.safetensors"), dst / "adapter_model.safetensors")
    return dst


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("mixtral") / "base"
    build(MIXTRAL).save_pretrained(base)
    return base


def test_transformers_4_adapter_with_per_expert_modules_merges_as_peft_loads_it(mixtral, tmp_path):
    """Trained under transformers 4, an adapter names each expert's w1/w2/w3; PEFT converts it on load
    under transformers 5. Its names are the files' own: they merge as they are."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(2):
        for e in range(E):
            for w, (out, inp) in {"w1": (INTER, H), "w3": (INTER, H), "w2": (H, INTER)}.items():
                prefix = f"base_model.model.model.layers.{layer}.block_sparse_moe.experts.{e}.{w}"
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(R, inp, generator=g) * 0.1
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, R, generator=g) * 0.1
    adapter = tmp_path / "v4"
    adapter.mkdir()
    save_file(tensors, adapter / "adapter_model.safetensors")
    config = dict(peft_type="LORA", r=R, lora_alpha=8, target_modules=["w1", "w2", "w3"], task_type="CAUSAL_LM")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    reference = peft_outputs(mixtral, adapter)
    ls.merge(mixtral, [adapter], tmp_path / "merged")
    merged = outputs(causal_lm(tmp_path / "merged"), MIXTRAL)
    assert not torch.allclose(outputs(causal_lm(mixtral), MIXTRAL), reference, atol=1e-2)  # the adapter matters
    torch.testing.assert_close(merged, reference, rtol=0, atol=1e-4)


def _old_orientation(a: torch.Tensor, b: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors PEFT < 0.19.1 would hold for the same ΔW on an (E, out, in) stack: it took (E, out, in)
    for (E, in, out), so its ΔW[e] = (B'_e A'_e)ᵀ; B'_e = A_eᵀ and A'_e = B_eᵀ give the same change."""
    r = a.shape[0] // experts
    a_old = torch.cat([b[:, e::experts].T for e in range(experts)])  # (E·r, out)
    b_old = torch.empty(a.shape[1], experts * r)
    for e in range(experts):
        b_old[:, e::experts] = a[e * r : (e + 1) * r].T  # (in, E·r), rank-major, expert fastest
    return a_old, b_old


def test_adapter_of_peft_before_0_19_1_is_read_the_other_way_round(mixtral, tmp_path):
    new = experts_adapter(build(MIXTRAL), tmp_path / "new", target_parameters=["experts.gate_up_proj"])
    reference = peft_outputs(mixtral, new)
    tensors = load_file(new / "adapter_model.safetensors")
    key = "base_model.model.model.layers.{}.mlp.experts.lora_{}.weight"
    for layer in range(2):
        a, b = tensors[key.format(layer, "A")], tensors[key.format(layer, "B")]
        tensors[key.format(layer, "A")], tensors[key.format(layer, "B")] = _old_orientation(a, b, E)
    old = edit_adapter(new, tmp_path / "old", tensors, peft_version="0.18.0")
    ls.merge(mixtral, [old], tmp_path / "merged")
    torch.testing.assert_close(outputs(causal_lm(tmp_path / "merged"), MIXTRAL), reference, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def square(tmp_path_factory) -> tuple[Path, Path]:
    """A Mixtral whose gate_up stack is square (H == 2I): only PEFT's version tells the orientation."""
    from architectures import _MOE, Arch, _cfg

    arch = Arch(
        "mixtral_square", _cfg("MixtralConfig", **dict(_MOE, intermediate_size=32)), MIXTRAL.auto, MIXTRAL.inputs
    )
    root = tmp_path_factory.mktemp("square")
    build(arch).save_pretrained(root / "base")
    return root / "base", experts_adapter(build(arch), root / "adapter", target_parameters=["experts.gate_up_proj"])


def test_square_stack_follows_the_peft_version(square, tmp_path):
    base, adapter = square
    ls.merge(base, [adapter], tmp_path / "merged")  # written by PEFT 0.21: B·A
    torch.testing.assert_close(
        outputs(causal_lm(tmp_path / "merged"), MIXTRAL), peft_outputs(base, adapter), rtol=0, atol=1e-4
    )


@pytest.mark.parametrize("version", ["0.18.0", None])
def test_square_stack_of_an_older_or_unknown_peft_is_refused(square, tmp_path, version):
    base, adapter = square
    old = edit_adapter(adapter, tmp_path / "old", peft_version=version)
    result = run_cli("merge", base, old, "-o", tmp_path / "out")
    one_line_error(result, "gate_up_proj", "square", "0.19.1")
    assert not (tmp_path / "out").exists()


def test_stack_held_whole_in_the_files(tmp_path):
    """save_pretrained(save_original_format=False) writes the fused layout: the change lands in the stack."""
    model = build(MIXTRAL)
    model.save_pretrained(tmp_path / "fused", save_original_format=False)
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(tmp_path / "fused" / "model.safetensors")
    adapter = experts_adapter(
        build(MIXTRAL), tmp_path / "adapter", target_parameters=["experts.gate_up_proj", "experts.down_proj"]
    )
    ls.merge(tmp_path / "fused", [adapter], tmp_path / "merged")
    reference = peft_outputs(tmp_path / "fused", adapter)
    torch.testing.assert_close(outputs(causal_lm(tmp_path / "merged"), MIXTRAL), reference, rtol=0, atol=1e-4)
    ls.unmerge(tmp_path / "merged", [adapter], tmp_path / "back")
    before, after = (
        load_file(tmp_path / "fused" / "model.safetensors"),
        load_file(tmp_path / "back" / "model.safetensors"),
    )
    assert max((before[k] - after[k]).abs().max().item() for k in before) < 1e-6


def test_factors_that_fit_no_expert_parameter_are_refused(mixtral, tmp_path):
    adapter = experts_adapter(build(MIXTRAL), tmp_path / "adapter", target_parameters=["experts.gate_up_proj"])
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.mlp.experts.lora_A.weight"
    tensors[key] = tensors[key][:, :48].contiguous()  # in = 48: no stack has it
    bad = edit_adapter(adapter, tmp_path / "bad", tensors)
    result = run_cli("merge", mixtral, bad, "-o", tmp_path / "out")
    one_line_error(result, "model.layers.0.mlp.experts", "fit none", "gate_up_proj")
    assert not (tmp_path / "out").exists()


def test_dry_run_reports_which_file_tensors_each_adapter_module_changes(mixtral, tmp_path):
    adapter = experts_adapter(
        build(MIXTRAL), tmp_path / "adapter", target_parameters=["experts.gate_up_proj", "experts.down_proj"]
    )
    result = run_cli("merge", mixtral, adapter, "-o", tmp_path / "out", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "names: transformers" in result.output and "MixtralForCausalLM" in result.output
    assert "adapter modules -> file tensors: 2 of 6 by the same name" in result.output  # q_proj x 2 layers
    gate_up = "model.layers.0.mlp.experts.base_layer -> model.layers.0.block_sparse_moe.experts.0.w1.weight, "
    assert gate_up + "model.layers.0.block_sparse_moe.experts.0.w3.weight" in result.output
    assert "(8 tensors)" in result.output and not (tmp_path / "out").exists()


def test_inspect_names_stacked_expert_wrappers_without_guessing_their_scale(tmp_path):
    from peft import LoraConfig, get_peft_model

    adapter = tmp_path / "adapter"
    get_peft_model(build(MIXTRAL), LoraConfig(r=R, target_modules="all-linear")).save_pretrained(adapter)
    report = json.loads(run_cli("inspect", adapter, "--json").output)["adapter"]
    modules = {m["name"]: m for m in report["modules"]}
    assert "gate_up_proj" in report["target_parameters"]
    for wrapper in ("model.layers.0.mlp.experts", "model.layers.0.mlp.experts.base_layer"):
        assert modules[wrapper]["kind"] == "experts" and modules[wrapper]["scale"] is None
        assert modules[wrapper]["rank"] % E == 0  # E·r rows
    router = modules["model.layers.0.mlp.gate"]  # a 2-D parameter: a Linear's LoRA
    assert router["kind"] == "linear" and router["rank"] == R and router["scale"] == 8 / R
    assert "(E·r)" in run_cli("inspect", adapter).output


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_augmented_stacks_the_experts_as_the_model_holds_them(mixtral, tmp_path, dtype):
    """Stacked byte for byte from the per-expert files (or, in another dtype, computed and rounded once)."""
    adapter = experts_adapter(build(MIXTRAL), tmp_path / "adapter", target_parameters=["experts.gate_up_proj"])
    ls.merge(mixtral, [adapter], tmp_path / "aug", form="augmented", dtype=dtype or "auto")
    stacked = load_file(tmp_path / "aug" / "model.safetensors")["model.layers.1.mlp.experts.base_layer.gate_up_proj"]
    files = load_file(mixtral / "model.safetensors")
    part = "model.layers.1.block_sparse_moe.experts.{}.{}.weight"
    want = torch.stack([torch.cat([files[part.format(e, "w1")], files[part.format(e, "w3")]]) for e in range(E)])
    assert stacked.dtype == (dtype or torch.float32)
    assert torch.equal(stacked, want.to(stacked.dtype))


def test_extract_filters_stacked_experts_by_their_in_memory_name(mixtral, tmp_path):
    """--exclude on the stacked parameter leaves its per-expert file tensors out too (they are not
    modules PEFT knows under transformers 5, so stored whole they would break loading)."""
    adapter = experts_adapter(
        build(MIXTRAL), tmp_path / "adapter", target_parameters=["experts.gate_up_proj", "experts.down_proj"]
    )
    ls.merge(mixtral, [adapter], tmp_path / "tuned")
    report = ls.extract(mixtral, tmp_path / "tuned", tmp_path / "out", rank=R, exclude="gate_up_proj")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["experts.down_proj"] and config["task_type"] == "CAUSAL_LM"
    keys = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert not [k for k in keys if "block_sparse_moe" in k]
    assert report.skipped.excluded == 2 * E * 2  # layers x experts x (w1, w3)
    peft_outputs(mixtral, tmp_path / "out")  # PEFT loads it
