"""Other trainers' MoE LoRA layouts, each written the way that trainer writes it and checked against a dense ΔW
from that trainer's own formula (and PEFT's adapter model where PEFT reads the layout): Unsloth's fused
expert LoRA, grouped by expert before unsloth-zoo #1269 and recorded in adapter_config.json since #1232;
ms-swift/Megatron's per-expert export (mcore-bridge); vLLM's 3-D reading. What cannot be told apart is
refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from architectures import ARCHS, build, outputs
from helpers import one_line_error, run_cli
from safetensors.torch import load_file, save_file

import lorasurgeon as ls
from lorasurgeon.errors import IncompatibleError, UnsupportedError

MIXTRAL, GPT_OSS, QWEN3_MOE = ARCHS["mixtral"], ARCHS["gpt_oss"], ARCHS["qwen3_moe"]
E, R, ALPHA = 4, 4, 8  # the tiny MoEs' experts; rank and alpha of every adapter here (E, R > 1: the packings differ)
SCALE = ALPHA / R
KEY = "base_model.model.model.layers.{}.mlp.experts.{}lora_{}.weight"  # "" = down_proj, "base_layer." = gate_up
WRAPPERS = {"gate_up_proj": "base_layer.", "down_proj": ""}  # PEFT nests the second targeted parameter


def causal_lm(path: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def stacks(model) -> dict[tuple[int, str], torch.Tensor]:
    """Each layer's stacked expert parameters, as the model holds them in memory."""
    experts = [layer.mlp.experts for layer in model.model.layers]
    return {(i, p): getattr(x, p).detach().clone() for i, x in enumerate(experts) for p in WRAPPERS}


def stacked_adapter(arch, folder: Path, *, unsloth_tag: bool = False, seed: int = 3) -> Path:
    """What PEFT saves for target_parameters on both stacks (non-zero B). Unsloth trains through PEFT's
    ParamWrapper and saves with PEFT's save_pretrained, so the keys and shapes are the same; its loader tags the
    model "unsloth" (unsloth/models/loader.py:1009, add_model_tags), which PEFT copies into README.md."""
    from peft import LoraConfig, get_peft_model

    model = build(arch)
    if unsloth_tag:
        model.add_model_tags(["unsloth"])
    torch.manual_seed(seed)
    config = LoraConfig(r=R, lora_alpha=ALPHA, init_lora_weights=False, target_parameters=list(WRAPPERS))
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def with_config(src: Path, dst: Path, tensors: dict[str, torch.Tensor] | None = None, **config) -> Path:
    dst.mkdir(parents=True)
    raw = json.loads((src / "adapter_config.json").read_text())
    raw.update(config)
    (dst / "adapter_config.json").write_text(json.dumps(raw))
    save_file(tensors or load_file(src / "adapter_model.safetensors"), dst / "adapter_model.safetensors")
    if (src / "README.md").exists():
        (dst / "README.md").write_text((src / "README.md").read_text())
    return dst


def unsloth_marker(layout: str) -> dict:
    """adapter_config.json as unsloth-zoo (since #1232) writes it: the top-level layout and a per-parameter
    detail (its tests: test_layout_marker_is_written_to_adapter_config)."""
    parameters = {p: {"lora_B_layout": layout, "num_experts": E} for p in WRAPPERS}
    return {
        "lora_B_layout": layout,
        "unsloth_fused_expert_lora": {"lora_A_layout": "grouped_by_expert", "parameters": parameters},
    }


def unsloth_grouped_delta(a: torch.Tensor, b: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The change Unsloth's grouped-GEMM forward applied before unsloth-zoo #1269: its
    _canonical_lora_weights_for_grouped_mm (unsloth_zoo/temporary_patches/moe_utils.py:785-797 at ce232d6c)
    gives X ↦ X @ first[e] @ second[e]; returned as the parameter holds it ((E, in, out) when transposed)."""
    out, r = b.shape[0], a.shape[0] // E
    first = a.view(E, r, a.shape[1]).permute(0, 2, 1)  # (E, in, r)
    second = b.view(out, E, r).permute(1, 2, 0)  # (E, r, out): B's columns grouped by expert
    change = torch.bmm(first, second) * SCALE  # (E, in, out)
    return change if transposed else change.transpose(1, 2)


def vllm_delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """vLLM's reading of a 3-D expert LoRA (vllm/lora/model_manager.py, _stack_moe_lora_weights,
    is_3d_moe_weight): A (E, r, in), B reshape(out, r, E).permute(2, 0, 1) -> (E, out, r); ΔW[e] = B_e @ A_e."""
    a_e = a.reshape(E, -1, a.shape[-1])
    b_e = b.reshape(b.shape[0], -1, E).permute(2, 0, 1)
    return torch.bmm(b_e, a_e) * SCALE


def as_rank_major(b: torch.Tensor) -> torch.Tensor:
    """unsloth-zoo's migration of a grouped B to PEFT's packing: flat column e·r + j becomes j·E + e."""
    out, r = b.shape[0], b.shape[1] // E
    return b.view(out, E, r).permute(0, 2, 1).reshape(out, r * E).contiguous()


def merged_changes(base: Path, merged: Path) -> dict[tuple[int, str], torch.Tensor]:
    before, after = stacks(causal_lm(base)), stacks(causal_lm(merged))
    return {k: after[k] - before[k] for k in before}


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("mixtral") / "base"
    build(MIXTRAL).save_pretrained(base)  # per-expert files: experts.N.w1 / w3 / w2
    return base


@pytest.fixture(scope="module")
def unsloth_adapter(tmp_path_factory) -> Path:
    return stacked_adapter(MIXTRAL, tmp_path_factory.mktemp("unsloth") / "adapter", unsloth_tag=True)


@pytest.mark.parametrize("files", ["per-expert", "fused"])
def test_unsloth_grouped_by_expert_merges_as_unsloth_trained_it(mixtral, unsloth_adapter, tmp_path, files):
    base = mixtral
    if files == "fused":  # the stack whole in the files: StackedExperts' path rather than ExpertSlice's
        base = tmp_path / "fused"
        causal_lm(mixtral).save_pretrained(base, save_original_format=False)
    adapter = with_config(unsloth_adapter, tmp_path / "grouped", **unsloth_marker("grouped_by_expert"))
    ls.merge(base, [adapter], tmp_path / "merged")
    tensors = load_file(adapter / "adapter_model.safetensors")
    changes = merged_changes(base, tmp_path / "merged")
    for (layer, parameter), change in changes.items():
        a, b = (tensors[KEY.format(layer, WRAPPERS[parameter], x)] for x in "AB")
        torch.testing.assert_close(change, unsloth_grouped_delta(a, b, transposed=False), rtol=0, atol=1e-5)
        assert not torch.allclose(change, vllm_delta(a, b), atol=1e-3)  # PEFT's reading would differ
    # PEFT reads the same adapter once its B is repacked rank-major: the merged model is that model
    from peft import PeftModel

    repacked = {k: as_rank_major(v) if ".lora_B." in k else v for k, v in tensors.items()}
    peft_view = with_config(unsloth_adapter, tmp_path / "repacked", repacked)
    reference = outputs(PeftModel.from_pretrained(causal_lm(base), peft_view).eval(), MIXTRAL)
    torch.testing.assert_close(outputs(causal_lm(tmp_path / "merged"), MIXTRAL), reference, rtol=0, atol=1e-4)
    ls.unmerge(tmp_path / "merged", [adapter], tmp_path / "back")  # the same packing, taken away again
    assert max(d.abs().max().item() for d in merged_changes(base, tmp_path / "back").values()) < 1e-6


def test_unsloth_grouped_by_expert_on_an_in_out_stack(tmp_path):
    """GPT-OSS holds its experts (E, in, out) (is_transposed); Unsloth's grouped_mm_format reads A and B the
    same way round, so its formula gives the (E, in, out) change directly."""
    base = tmp_path / "base"
    build(GPT_OSS).save_pretrained(base)
    plain = stacked_adapter(GPT_OSS, tmp_path / "adapter", unsloth_tag=True)
    adapter = with_config(plain, tmp_path / "grouped", **unsloth_marker("grouped_by_expert"))
    ls.merge(base, [adapter], tmp_path / "merged")
    tensors = load_file(adapter / "adapter_model.safetensors")
    for (layer, parameter), change in merged_changes(base, tmp_path / "merged").items():
        a, b = (tensors[KEY.format(layer, WRAPPERS[parameter], x)] for x in "AB")
        torch.testing.assert_close(change, unsloth_grouped_delta(a, b, transposed=True), rtol=0, atol=1e-5)
        assert not torch.allclose(change, vllm_delta(a, b).transpose(1, 2), atol=1e-3)


def test_unsloth_marked_rank_major_is_pefts_packing(mixtral, unsloth_adapter, tmp_path):
    """Trained after unsloth-zoo #1269 (or a wrapper PEFT's forward owned): marked rank_major, read as PEFT does."""
    from peft import PeftModel

    adapter = with_config(unsloth_adapter, tmp_path / "marked", **unsloth_marker("rank_major"))
    ls.merge(mixtral, [adapter], tmp_path / "merged")
    reference = outputs(PeftModel.from_pretrained(causal_lm(mixtral), unsloth_adapter).eval(), MIXTRAL)
    torch.testing.assert_close(outputs(causal_lm(tmp_path / "merged"), MIXTRAL), reference, rtol=0, atol=1e-4)


def test_peft_adapter_merges_as_vllm_serves_it(mixtral, tmp_path):
    """No marker and no Unsloth tag: PEFT's own file, which vLLM's 3-D loader reads the same way."""
    adapter = stacked_adapter(MIXTRAL, tmp_path / "adapter")
    ls.merge(mixtral, [adapter], tmp_path / "merged")
    tensors = load_file(adapter / "adapter_model.safetensors")
    for (layer, parameter), change in merged_changes(mixtral, tmp_path / "merged").items():
        a, b = (tensors[KEY.format(layer, WRAPPERS[parameter], x)] for x in "AB")
        torch.testing.assert_close(change, vllm_delta(a, b), rtol=0, atol=1e-5)


def test_unsloth_adapter_without_a_layout_marker_is_refused(mixtral, unsloth_adapter, tmp_path):
    """Unsloth before unsloth-zoo #1232 recorded no packing, and trained grouped-by-expert until #1269 (unless
    PEFT's forward ran): the same shapes, so neither reading is safe."""
    assert "unsloth" in (unsloth_adapter / "README.md").read_text()
    result = run_cli("merge", mixtral, unsloth_adapter, "-o", tmp_path / "out")
    one_line_error(result, "Unsloth", "lora_B_layout", "grouped_by_expert", "rank_major", "same shapes")
    assert not (tmp_path / "out").exists()


def test_unsloth_adapter_without_a_marker_merges_where_the_packings_coincide(mixtral, tmp_path):
    """Rank 1 per expert: column e of B is expert e in either packing, so nothing is ambiguous."""
    from peft import LoraConfig, get_peft_model

    model = build(MIXTRAL)
    model.add_model_tags(["unsloth"])
    config = LoraConfig(r=1, lora_alpha=2, init_lora_weights=False, target_parameters=["gate_up_proj"])
    get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    ls.merge(mixtral, [tmp_path / "adapter"], tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("config", "error", "phrases"),
    [
        ({"lora_B_layout": "expert_major"}, UnsupportedError, ("'expert_major'", "rank_major", "grouped_by_expert")),
        (
            {"unsloth_fused_expert_lora": {"lora_A_layout": "rank_major", "parameters": {}}},
            UnsupportedError,
            ("lora_A_layout", "'rank_major'"),
        ),
        (
            {
                "unsloth_fused_expert_lora": {
                    "parameters": {"gate_up_proj": {"lora_B_layout": "rank_major", "num_experts": 8}}
                }
            },
            IncompatibleError,
            ("8 experts", "has 4"),
        ),
    ],
)
def test_unknown_or_inconsistent_layout_declarations_are_refused(
    mixtral, unsloth_adapter, tmp_path, config, error, phrases
):
    adapter = with_config(unsloth_adapter, tmp_path / "odd", **config)
    with pytest.raises(error) as raised:
        ls.merge(mixtral, [adapter], tmp_path / "out")
    assert all(p in str(raised.value) for p in phrases), str(raised.value)
    assert "\n" not in str(raised.value) and not (tmp_path / "out").exists()


def test_megatron_per_expert_export_merges_as_mcore_computed_it(tmp_path):
    """ms-swift's Megatron training exports expert LoRA per expert through mcore-bridge
    (mcore_bridge/bridge/gpt_bridge.py:966-975, 1178-1182 at f020e479): linear_fc1's LoRA (one A for the fused
    gate/up, B (2I, r)) is saved as experts.N.gate_proj / up_proj sharing lora_A, with lora_B.view(2, I, r) split
    gate then up; linear_fc2's as experts.N.down_proj. (Stacked HF experts it refuses: --merge_lora true.)"""
    base = tmp_path / "base"
    build(QWEN3_MOE).save_pretrained(base)  # per-expert files: mlp.experts.N.gate_proj / up_proj / down_proj
    hidden, inter = 64, 32
    g = torch.Generator().manual_seed(1)
    fc1, fc2, tensors = {}, {}, {}
    for layer in range(2):
        for e in range(E):
            fc1[layer, e] = (torch.randn(R, hidden, generator=g) * 0.1, torch.randn(2 * inter, R, generator=g) * 0.1)
            fc2[layer, e] = (torch.randn(R, inter, generator=g) * 0.1, torch.randn(hidden, R, generator=g) * 0.1)
            prefix = f"base_model.model.model.layers.{layer}.mlp.experts.{e}."
            a1, b1 = fc1[layer, e]
            gate_b, up_b = b1.view(2, -1, R)
            tensors |= {
                prefix + "gate_proj.lora_A.weight": a1.clone(),
                prefix + "up_proj.lora_A.weight": a1.clone(),
                prefix + "gate_proj.lora_B.weight": gate_b.clone(),
                prefix + "up_proj.lora_B.weight": up_b.clone(),
                prefix + "down_proj.lora_A.weight": fc2[layer, e][0],
                prefix + "down_proj.lora_B.weight": fc2[layer, e][1],
            }
    adapter = tmp_path / "swift"
    adapter.mkdir()
    save_file(tensors, adapter / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": R, "lora_alpha": ALPHA, "task_type": "CAUSAL_LM"}
    config["target_modules"] = ["down_proj", "gate_proj", "up_proj"]  # its _peft_target_modules, sorted
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    ls.merge(base, [adapter], tmp_path / "merged")
    before, after = load_file(base / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    for (layer, e), (a1, b1) in fc1.items():
        key = f"model.layers.{layer}.mlp.experts.{e}.{{}}.weight"
        fc1_delta = SCALE * b1 @ a1  # mcore's linear_fc1: [gate; up] rows
        torch.testing.assert_close(
            after[key.format("gate_proj")] - before[key.format("gate_proj")], fc1_delta[:inter], rtol=0, atol=1e-6
        )
        torch.testing.assert_close(
            after[key.format("up_proj")] - before[key.format("up_proj")], fc1_delta[inter:], rtol=0, atol=1e-6
        )
        a2, b2 = fc2[layer, e]
        torch.testing.assert_close(
            after[key.format("down_proj")] - before[key.format("down_proj")], SCALE * b2 @ a2, rtol=0, atol=1e-6
        )
    # the same adapter onto the base saved with its experts stacked (the fused layout): refused by name
    build(QWEN3_MOE).save_pretrained(tmp_path / "fused", save_original_format=False)
    result = run_cli("merge", tmp_path / "fused", adapter, "-o", tmp_path / "merged-fused")
    one_line_error(result, "a LoRA on one expert", "model.layers.0.mlp.experts", "stacked")
    assert not (tmp_path / "merged-fused").exists()


def test_augmented_form_and_mlx_refuse_a_packing_they_would_keep_as_it_is(mixtral, unsloth_adapter, tmp_path):
    """The augmented form keeps B as the file has it, which PEFT then reads rank-major: a grouped B (or one whose
    packing cannot be told) would load silently wrong, so it is refused; MLX-LM has no stacked-expert LoRA."""
    grouped = with_config(unsloth_adapter, tmp_path / "grouped", **unsloth_marker("grouped_by_expert"))
    result = run_cli("merge", mixtral, grouped, "--form", "augmented", "-o", tmp_path / "aug")
    one_line_error(result, "grouped_by_expert", "merge it instead")
    result = run_cli("merge", mixtral, unsloth_adapter, "--form", "augmented", "-o", tmp_path / "aug")
    one_line_error(result, "tags it 'unsloth'", "lora_B_layout")
    marked = with_config(unsloth_adapter, tmp_path / "marked", **unsloth_marker("rank_major"))
    assert run_cli("merge", mixtral, marked, "--form", "augmented", "-o", tmp_path / "aug").exit_code == 0
    result = run_cli("convert", marked, "--to", "mlx", "-o", tmp_path / "mlx")
    one_line_error(result, "target_parameters (a LoRA on stacked MoE experts)")
    assert not (tmp_path / "mlx").exists()


def test_unsloths_layout_keys_are_read_not_called_unexpected(unsloth_adapter, tmp_path):
    marked = with_config(unsloth_adapter, tmp_path / "marked", **unsloth_marker("rank_major"))
    from lorasurgeon.adapter.config import peft_warnings

    raw = json.loads((marked / "adapter_config.json").read_text())
    assert not [w for w in peft_warnings(raw) if "lora_B_layout" in w or "unsloth" in w]
    assert [w for w in peft_warnings({**raw, "lora_B_layuot": "x"}) if "lora_B_layuot" in w]  # a typo still is


def test_check_for_vllm_flags_a_packing_vllm_reads_otherwise(mixtral, unsloth_adapter, tmp_path):
    """vLLM reads a stacked-experts B rank-major (_stack_moe_lora_weights): a grouped one loads and computes
    another function, so check calls it an error; PEFT's own packing stays a note."""
    grouped = with_config(unsloth_adapter, tmp_path / "grouped", **unsloth_marker("grouped_by_expert"))
    result = run_cli("check", grouped, "--for", "vllm")
    assert result.exit_code == 1 and "lora_B_layout" in result.output and "grouped_by_expert" in result.output
    assert "tags it 'unsloth'" in run_cli("check", unsloth_adapter, "--for", "vllm").output
    marked = with_config(unsloth_adapter, tmp_path / "marked", **unsloth_marker("rank_major"))
    assert "lora_B_layout" not in run_cli("check", marked, "--for", "vllm").output
