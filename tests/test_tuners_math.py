"""lorasurgeon.ops.tuners against PEFT itself: a tiny model is wrapped with each non-LoRA tuner, every adapter
parameter is moved off PEFT's no-op initialization, the adapter is saved, and the merge computed from the
SAVED tensors and adapter_config.json must equal PEFT's merge_and_unload (and unmerge PEFT's unmerge_adapter)."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lorasurgeon.ops.tuners import TUNERS, Tuner  # noqa: E402

ATOL = 1e-5
PREFIX = "base_model.model."
MAX_ERR: dict[str, float] = {}  # the largest merge error measured per case (printed with -s)


def llama(bias: bool = True, tied: bool = False, hidden: int = 32, layers: int = 1) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        attention_bias=bias,
        mlp_bias=bias,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    return with_biases(transformers.LlamaForCausalLM(config).float().eval())


def gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    return with_biases(transformers.GPT2LMHeadModel(config).float().eval())


def with_biases(model: torch.nn.Module) -> torch.nn.Module:
    """Biases made non-zero (transformers initializes them to 0, which would hide a wrong bias merge)."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


class Convs(torch.nn.Module):
    """A model of Conv2d layers (3×3 and 1×1) and one Conv1d, for the conv variants."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(8, 16, 3)
        self.point = torch.nn.Conv2d(16, 8, 1)
        self.seq = torch.nn.Conv1d(8, 12, 3)
        self.lin = torch.nn.Linear(16, 24)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point(self.conv(x))


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Every adapter parameter += N(0, 0.1²): PEFT initializes most tuners to the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".default" in name and ".ranknum." not in name:  # AdaLoRA's ranknum is not saved: float(r)
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def saved_modules(tensors: dict[str, torch.Tensor], tuner: Tuner) -> dict[str, dict[str, torch.Tensor]]:
    """module name -> {suffix: tensor}, from the saved keys, plus the shared tensors in each."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith(PREFIX) or key.endswith(".base_layer.weight"):
            continue  # a targeted embedding's own weight, saved too (save_embedding_layers="auto")
        split = tuner.split_key(key[len(PREFIX) :])
        assert split is not None, key
        modules.setdefault(split[0], {})[split[1]] = value
    for module, parts in modules.items():
        parts.update({k: tensors[saved] for k, saved in tuner.shared_parts(module).items() if saved in tensors})
    return modules


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Plain parameter names (a tuner layer's base_layer.weight as weight) -> a copy."""
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in model.state_dict().items()}


def layer_of(model: torch.nn.Module, module: str) -> str:
    base = model.get_submodule(module)
    base = getattr(base, "base_layer", base)
    if isinstance(base, transformers.pytorch_utils.Conv1D):
        return "conv1d"
    if isinstance(base, torch.nn.Conv1d | torch.nn.Conv2d):
        return "conv"
    if isinstance(base, torch.nn.Embedding):
        return "embedding"
    return "linear" if isinstance(base, torch.nn.Linear) else "norm"


def check(name: str, make: Any, config: Any, tmp_path: Path, *, prepare: Any = None, seed: int = 1) -> float:
    """Merge (and unmerge) every adapted module from the saved adapter; compare with PEFT. Max abs error."""
    model = make()
    base = weights(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(model, config)
        perturb(wrapped, seed)
        if prepare is not None:
            prepare(wrapped)
        wrapped.save_pretrained(tmp_path)
        raw = json.loads((tmp_path / "adapter_config.json").read_text())
        tensors = load_file(tmp_path / "adapter_model.safetensors")
        merged = weights(copy.deepcopy(wrapped).merge_and_unload())
        wrapped.base_model.merge_adapter()
        peft_merged = weights(wrapped.base_model.model)
        try:
            wrapped.base_model.unmerge_adapter()
            peft_unmerged: dict[str, torch.Tensor] | None = weights(wrapped.base_model.model)
        except NotImplementedError:  # OSF
            peft_unmerged = None
    tuner = TUNERS[raw["peft_type"].lower()]
    modules = saved_modules(tensors, tuner)
    assert modules, "the adapter adapts nothing"
    worst = 0.0
    for module, parts in modules.items():
        shapes = {k: tuple(v.shape) for k, v in parts.items()}
        cfg = tuner.module_config(raw, module, shapes, layer=layer_of(model, module))
        w0, w_peft = base[f"{module}.weight"], merged[f"{module}.weight"]
        got = tuner.merge(w0, parts, cfg)
        assert got.dtype == torch.float32 and got.shape == w0.shape
        bias_key = f"{module}.bias"
        changed = not torch.equal(w_peft, w0) or (
            bias_key in base and not torch.equal(merged[bias_key], base[bias_key])
        )
        assert changed, f"{module}: the adapter is a no-op, the test proves nothing"
        worst = max(worst, (got - w_peft).abs().max().item())
        torch.testing.assert_close(got, w_peft, atol=ATOL, rtol=0)
        torch.testing.assert_close(tuner.delta(w0, parts, cfg), w_peft - w0, atol=ATOL, rtol=0)
        torch.testing.assert_close(peft_merged[f"{module}.weight"], w_peft, atol=ATOL, rtol=0)
        check_bias(tuner, module, parts, cfg, base, merged)
        back = tuner.unmerge(peft_merged[f"{module}.weight"], parts, cfg)
        assert (back is not None) == tuner.invertible
        if peft_unmerged is None:
            assert back is None, "PEFT cannot unmerge this tuner"
            continue
        if back is not None:
            torch.testing.assert_close(back, peft_unmerged[f"{module}.weight"], atol=ATOL, rtol=0)
        check_bias(tuner, module, parts, cfg, peft_unmerged, peft_merged, unmerge=True)
    MAX_ERR[name] = worst
    return worst


Weights = dict[str, torch.Tensor]


def check_bias(
    tuner: Tuner, module: str, parts: Weights, cfg: Any, before: Weights, after: Weights, *, unmerge: bool = False
) -> None:
    """The bias merged (``before`` unmerged, ``after`` merged by PEFT), or unmerged (the other way round)."""
    key = f"{module}.bias"
    if key not in before:
        return
    if unmerge:
        b = tuner.unmerge_bias(after[key], parts, cfg, w0=before[f"{module}.weight"])
        torch.testing.assert_close(b if b is not None else after[key], before[key], atol=ATOL, rtol=0)
    else:
        b = tuner.merge_bias(before[key], parts, cfg, w0=before[f"{module}.weight"])
        torch.testing.assert_close(b if b is not None else before[key], after[key], atol=ATOL, rtol=0)


LLAMA_TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]


def cases() -> dict[str, tuple[Any, Any]]:
    """name -> (model maker, PEFT config maker): the default matrix (Linear layers of a tiny Llama)."""
    t = LLAMA_TARGETS
    return {
        "loha": (llama, lambda: peft.LoHaConfig(target_modules=t, r=4, alpha=8)),
        "loha-patterns": (
            llama,
            lambda: peft.LoHaConfig(
                target_modules=t, r=4, alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.0\.mlp\..*": 3}
            ),
        ),
        "lokr": (llama, lambda: peft.LoKrConfig(target_modules=t, r=4, alpha=8)),
        "lokr-decomposed": (
            llama,
            lambda: peft.LoKrConfig(target_modules=t, r=2, alpha=5, decompose_both=True, decompose_factor=4),
        ),
        "ia3": (llama, lambda: peft.IA3Config(target_modules=t, feedforward_modules=["down_proj"])),
        "ia3-regex": (
            llama,
            lambda: peft.IA3Config(target_modules=r".*\.(q_proj|up_proj)", feedforward_modules=r".*up_proj"),
        ),
        "adalora": (llama, lambda: peft.AdaLoraConfig(target_modules=t, init_r=6, target_r=4, total_step=10)),
        "vera": (llama, lambda: peft.VeraConfig(target_modules=t, r=8)),
        "oft": (llama, lambda: peft.OFTConfig(target_modules=t, r=0, oft_block_size=8)),
        "oft-r": (llama, lambda: peft.OFTConfig(target_modules=t, r=2, oft_block_size=0, use_cayley_neumann=False)),
        "oft-embedding": (
            llama,
            lambda: peft.OFTConfig(target_modules=["embed_tokens", "q_proj"], r=0, oft_block_size=8),
        ),
        "oft-share-coft": (
            llama,
            lambda: peft.OFTConfig(target_modules=t, r=0, oft_block_size=4, block_share=True, coft=True, eps=1e-2),
        ),
        "boft": (llama, lambda: peft.BOFTConfig(target_modules=t, boft_block_size=8)),
        "fourierft": (
            llama,
            lambda: peft.FourierFTConfig(target_modules=t, n_frequency=50, n_frequency_pattern={"up_proj": 80}),
        ),
        "hra": (llama, lambda: peft.HRAConfig(target_modules=t, r=4)),
        "hra-gs": (llama, lambda: peft.HRAConfig(target_modules=t, r=3, apply_GS=True)),
        "road": (llama, lambda: peft.RoadConfig(target_modules=t, variant="road_1", group_size=8)),
        "road-2": (llama, lambda: peft.RoadConfig(target_modules=t, variant="road_2", group_size=4)),
        "road-4": (llama, lambda: peft.RoadConfig(target_modules=t, variant="road_4", group_size=16)),
        "miss": (llama, lambda: peft.MissConfig(target_modules=t, r=8)),
        "miss-remainder": (llama, lambda: peft.MissConfig(target_modules=t, r=12)),
        "miss-bat": (llama, lambda: peft.MissConfig(target_modules=t, r=8, init_weights="bat")),
        "miss-mini": (llama, lambda: peft.MissConfig(target_modules=t, r=8, init_weights="mini", mini_r=4)),
        "delora": (llama, lambda: peft.DeloraConfig(target_modules=t, r=4, rank_pattern={"up_proj": 2})),
        "c3a": (llama, lambda: peft.C3AConfig(target_modules=t, block_size=8)),
        "shira": (llama, lambda: peft.ShiraConfig(target_modules=t, r=2)),
        "gralora": (llama, lambda: peft.GraloraConfig(target_modules=t, r=8, gralora_k=2, alpha=16)),
        "gralora-hybrid": (
            llama,
            lambda: peft.GraloraConfig(target_modules=t, r=8, gralora_k=4, hybrid_r=2, alpha=12),
        ),
        "randlora": (llama, lambda: peft.RandLoraConfig(target_modules=t, r=8, randlora_alpha=16)),
        "randlora-uneven": (llama, lambda: peft.RandLoraConfig(target_modules=t, r=6, randlora_alpha=10)),
        "vblora": (llama, lambda: peft.VBLoRAConfig(target_modules=t, r=4, vector_length=8, num_vectors=16, topk=3)),
        "vblora-topk": (
            llama,
            lambda: peft.VBLoRAConfig(
                target_modules=t, r=4, vector_length=8, num_vectors=16, topk=2, save_only_topk_weights=True
            ),
        ),
        "beft": (llama, lambda: peft.BeftConfig(target_modules=t)),
        "hira": (llama, lambda: peft.HiraConfig(target_modules=t, r=4)),
        "supertuning": (llama, lambda: peft.SupertuningConfig(target_modules=t, sparsity=0.9)),
        "supertuning-supra": (
            llama,
            lambda: peft.SupertuningConfig(target_modules=t, sparsity=0.95, r=2, lora_alpha=6),
        ),
        "pvera": (llama, lambda: peft.PveraConfig(target_modules=t, r=8)),
        "glora": (llama, lambda: peft.GloraConfig(target_modules=t, r=4)),
        "glora-vectors": (
            llama,
            lambda: peft.GloraConfig(
                target_modules=t, r=4, config_A_B="vector", config_C="vector", config_D_E="vector"
            ),
        ),
        "glora-constant": (
            llama,
            lambda: peft.GloraConfig(target_modules=t, r=4, config_A_B="constant", config_C="none", config_D_E="none"),
        ),
        "peanut": (llama, lambda: peft.PeanutConfig(target_modules=t, r=4)),
        "peanut-deep": (llama, lambda: peft.PeanutConfig(target_modules=t, r=4, depth=2, act_fn="silu", scaling=0.5)),
        "osf": (llama, lambda: peft.OSFConfig(target_modules=t, effective_rank=8)),
        "deft": (llama, lambda: peft.DeftConfig(target_modules=t, r=4)),
        "deft-qr-alpha": (
            llama,
            lambda: peft.DeftConfig(target_modules=t, r=4, decomposition_method="qr", alpha=8),
        ),
        "deft-para": (llama, lambda: peft.DeftConfig(target_modules=t, r=4, para=True)),
        "frod": (llama, lambda: peft.FrodConfig(target_modules=t, progressbar=False)),
        "unilora": (llama, lambda: peft.UniLoraConfig(target_modules=t, r=4, theta_d_length=64, save_indices=True)),
        "trainable_tokens": (
            lambda: llama(tied=False),
            lambda: peft.TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[1, 5, 7]),
        ),
        "waveft-sparse": (
            llama,
            lambda: peft.WaveFTConfig(
                target_modules=t, n_frequency=100, use_idwt=False, n_frequency_pattern={"q_proj": 60}
            ),
        ),
        "ln_tuning": (llama, lambda: peft.LNTuningConfig(target_modules=["input_layernorm", "norm"])),
    }


@pytest.mark.parametrize("name", list(cases()))
def test_merge_matches_peft(name: str, tmp_path: Path) -> None:
    make, config = cases()[name]
    check(name, make, config(), tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 3])
@pytest.mark.parametrize("name", list(cases()))
def test_merge_matches_peft_bigger(name: str, seed: int, tmp_path: Path) -> None:
    """The default matrix again on a 2-layer model twice as wide, without biases, other perturbations."""
    make, config = cases()[name]
    if make is llama:
        bias = name == "beft"  # BEFT adapts only biases (PEFT refuses a layer without one)
        make = lambda: llama(bias=bias, hidden=64, layers=2)  # noqa: E731
    check(f"{name}-big-{seed}", make, config(), tmp_path, seed=seed)


def test_adalora_rank_pattern_pruned_save(tmp_path: Path) -> None:
    """A rank_pattern (AdaLoRA's budget) prunes the saved tensors; ranknum stays init_r (PEFT's load)."""
    masks = {"q_proj": [True, False, True, True, False, False], "down_proj": [False, True, False, False, True, True]}

    def prepare(wrapped: Any) -> None:
        pattern = {}
        for name, module in wrapped.base_model.model.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if leaf in masks and hasattr(module, "lora_E"):
                mask = masks[leaf]
                with torch.no_grad():  # as RankAllocator.mask_using_rank_pattern does in training
                    module.lora_E["default"].masked_fill_(~torch.tensor(mask).unsqueeze(-1), 0.0)
                pattern[f"{name}.lora_E"] = mask
        wrapped.peft_config["default"].rank_pattern = pattern

    config = peft.AdaLoraConfig(target_modules=LLAMA_TARGETS, init_r=6, target_r=3, total_step=10, lora_alpha=16)
    check("adalora-rank-pattern", llama, config, tmp_path, prepare=prepare)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A"].shape[0] == 3


def test_vera_regenerated_projections(tmp_path: Path) -> None:
    """save_projection=False: vera_A / vera_B rebuilt from projection_prng_key equal PEFT's."""
    from lorasurgeon.ops.tuners.vera import projections

    model = llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = peft.get_peft_model(model, peft.VeraConfig(target_modules=LLAMA_TARGETS, r=4, projection_prng_key=7))
    vera_a, vera_b = projections(4, (64, 64), 7)  # the largest (out, in) over q, v, up, down
    torch.testing.assert_close(vera_a, wrapped.base_model.vera_A["default"], atol=0, rtol=0)
    torch.testing.assert_close(vera_b, wrapped.base_model.vera_B["default"], atol=0, rtol=0)


def test_refusals() -> None:
    """What the math cannot reproduce is refused from the config and the headers, before any tensor is read."""
    from lorasurgeon.errors import AdapterConfigError, UnsupportedError

    refused = [
        ("waveft", {"peft_type": "WAVEFT", "use_idwt": True}, {"waveft_spectrum": (10,)}, "linear"),
        ("unilora", {"peft_type": "UNILORA"}, {"unilora_theta_d": (64,)}, "linear"),
        ("supertuning", {"peft_type": "SUPERTUNING"}, {"supertuning_values": (10,)}, "linear"),
        ("peanut", {"peft_type": "PEANUT", "act_fn": "xielu"}, {"peanut_A.weight": (4, 8)}, "linear"),
        ("road", {"peft_type": "ROAD"}, {"road_theta": (8,)}, "conv"),
    ]
    for name, raw, shapes, layer in refused:
        with pytest.raises(UnsupportedError):
            TUNERS[name].module_config(raw, "model.layers.0.mlp.up_proj", shapes, layer=layer)
    with pytest.raises(AdapterConfigError):
        TUNERS["ia3"].module_config({"peft_type": "IA3"}, "model.layers.0.mlp.up_proj", {"ia3_l": (1, 8)})


def test_patterns_as_peft_matches_them() -> None:
    """rank_pattern / alpha_pattern: PEFT's get_pattern_key (the first key, in file order, matching the end)."""
    raw = {"r": 8, "alpha": 16, "rank_pattern": {"q_proj": 2, r"layers\.0\..*": 4}, "alpha_pattern": {"proj": 3}}
    loha = TUNERS["loha"]
    assert loha.module_config(raw, "model.layers.0.self_attn.q_proj", {})["r"] == 2
    assert loha.module_config(raw, "model.layers.0.self_attn.k_proj", {})["r"] == 4
    assert loha.module_config(raw, "model.layers.1.self_attn.k_proj", {})["r"] == 8
    assert loha.module_config(raw, "model.layers.1.self_attn.k_proj", {})["alpha"] == 16  # "proj" != "k_proj"
    assert (
        TUNERS["frod"].shared_parts("model.layers.3.self_attn.q_proj")["frod_V"] == "base_model.frod_V.self_attn_q_proj"
    )


def test_registry_names_are_peft_types() -> None:
    types = {t.value.lower() for t in peft.PeftType}
    assert set(TUNERS) <= types
    for name, tuner in TUNERS.items():
        assert tuner.name == name and tuner.module_suffixes


GPT2_CASES: dict[str, Any] = {
    "ia3-conv1d": lambda: peft.IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"]),
    "adalora-conv1d": lambda: peft.AdaLoraConfig(target_modules=["c_attn", "c_fc"], init_r=4, total_step=10),
    "vera-conv1d": lambda: peft.VeraConfig(target_modules=["c_attn", "mlp.c_proj"], r=4),
    "fourierft-conv1d": lambda: peft.FourierFTConfig(target_modules=["c_attn", "c_fc"], n_frequency=40),
    "deft-conv1d": lambda: peft.DeftConfig(target_modules=["c_attn", "c_fc"], r=4, alpha=2),
    "vblora-conv1d": lambda: peft.VBLoRAConfig(target_modules=["c_attn", "c_fc"], r=2, vector_length=8, num_vectors=8),
    "hira-conv1d": lambda: peft.HiraConfig(target_modules=["c_attn", "c_fc"], r=2),
    "frod-conv1d": lambda: peft.FrodConfig(target_modules=["c_attn", "c_fc"], progressbar=False, sparse_rate=0.05),
    "waveft-conv1d": lambda: peft.WaveFTConfig(target_modules=["c_attn", "c_fc"], n_frequency=90, use_idwt=False),
    "pvera-conv1d": lambda: peft.PveraConfig(target_modules=["c_attn", "c_fc"], r=4),
}


@pytest.mark.parametrize("name", list(GPT2_CASES))
def test_conv1d_fan_in_fan_out(name: str, tmp_path: Path) -> None:
    check(name, gpt2, GPT2_CASES[name](), tmp_path)


CONV_CASES: dict[str, Any] = {
    "loha-conv": lambda: peft.LoHaConfig(target_modules=["conv", "point", "seq", "lin"], r=3, alpha=4),
    "loha-conv-effective": lambda: peft.LoHaConfig(
        target_modules=["conv", "point", "seq"], r=3, alpha=4, use_effective_conv2d=True
    ),
    "lokr-conv": lambda: peft.LoKrConfig(target_modules=["conv", "point", "seq", "lin"], r=2, alpha=4),
    "lokr-conv-effective": lambda: peft.LoKrConfig(
        target_modules=["conv"], r=1, alpha=4, use_effective_conv2d=True, decompose_both=True
    ),
    "ia3-conv": lambda: peft.IA3Config(target_modules=["conv", "point"], feedforward_modules=["point"]),
    "oft-conv": lambda: peft.OFTConfig(target_modules=["conv", "point"], r=0, oft_block_size=8),
    "hra-conv": lambda: peft.HRAConfig(target_modules=["conv", "point"], r=4),
    "boft-conv": lambda: peft.BOFTConfig(target_modules=["conv", "point"], boft_block_size=8),
    "adalora-conv": lambda: peft.AdaLoraConfig(target_modules=["conv", "lin"], init_r=4, total_step=10),
}


@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv_layers(name: str, tmp_path: Path) -> None:
    check(name, Convs, CONV_CASES[name](), tmp_path)


def test_report_errors() -> None:
    """Runs last in this file: the measured maximum errors (visible with -s)."""
    for name, err in sorted(MAX_ERR.items()):
        print(f"{name:24s} max |merge - PEFT| = {err:.3e}")
