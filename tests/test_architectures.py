"""The architecture matrix: tiny models built by transformers from configs × adapters written by PEFT ×
checks against PEFT's adapter model (its forward is the truth; merge_and_unload is wrong on tied heads).

Checks per cell: merge (the merged model's outputs are the adapter model's), augmented (loads strictly
into PEFT's model, same outputs), convert (augmented -> merged is the direct merge, bit for bit), and
unmerge (the base back within rounding) where the adapter can be unmerged. A cell that lorasurgeon
refuses must be in REFUSED, with the phrase its one-line refusal carries. The default run takes a
representative subset; ``pytest -m slow`` runs every cell.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from architectures import ARCHS, Arch, build, outputs
from reference import read_folder
from safetensors.torch import load_file

import lorasurgeon as ls
from lorasurgeon.names import model_names

ATOL = 1e-3  # float32 models, sums in another order: far below any real difference
EXTRACT_ATOL = 2e-3  # a full-rank SVD in float32 reproduces the change to ~1e-6 per element


def _modules(model: Any) -> dict[str, Any]:
    return dict(model.named_modules())


def _is_linear(module: Any) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def _linear_leaves(model: Any, head: str | None) -> list[str]:
    skip = head.rpartition(".")[0].rpartition(".")[2] if head else None
    leaves = {n.rpartition(".")[2] for n, m in model.named_modules() if _is_linear(m) and n}
    return sorted(leaves - {skip})


def _final_norm(model: Any) -> str | None:
    """The last norm module with parameters (None: OLMo's LayerNorms have none)."""
    norms = [n for n, m in model.named_modules() if "norm" in type(m).__name__.lower() and n and list(m.parameters())]
    return norms[-1] if norms else None


def _with_bias(model: Any, head: str | None) -> list[str]:
    return [
        leaf
        for leaf in _linear_leaves(model, head)
        if all(
            getattr(m, "bias", None) is not None
            for n, m in model.named_modules()
            if n.rpartition(".")[2] == leaf and _is_linear(m)
        )
    ]


def lora_config(kind: str, model: Any, names: Any) -> dict[str, Any] | None:
    """The PEFT LoraConfig of one matrix column for this model (None: the column does not apply)."""
    linear = _linear_leaves(model, names.head)
    embedding = names.embedding.removesuffix(".weight") if names.embedding else None
    head = names.head.removesuffix(".weight") if names.head else None
    if kind == "all-linear":
        return dict(target_modules="all-linear")
    if kind == "embeddings":
        extra = [m for m in (embedding, head) if m and m in _modules(model)]
        return dict(target_modules=linear[:2] + extra) if extra else None
    if kind == "patterns":
        return dict(target_modules=linear, use_rslora=True, rank_pattern={linear[0]: 2}, alpha_pattern={linear[-1]: 3})
    if kind == "dora":
        return dict(target_modules=linear[:3], use_dora=True)
    if kind == "mts-norm":
        norm = _final_norm(model)
        return dict(target_modules=linear[:2], modules_to_save=[norm]) if norm else None
    if kind == "mts-head":
        return dict(target_modules=linear[:2], modules_to_save=[head]) if head else None
    if kind == "bias-all":  # a model without biases has nothing for bias="all" to train: a plain adapter
        has_bias = any(n.endswith(".bias") for n, _ in model.named_parameters())
        return dict(target_modules=linear[:2], bias="all") if has_bias else None
    if kind == "lora_bias":
        biased = _with_bias(model, names.head)
        return dict(target_modules=biased[:2], lora_bias=True) if biased else None
    if kind == "tokens":
        leaf = embedding.rpartition(".")[2] if embedding else None
        return dict(target_modules=linear[:1], trainable_token_indices={leaf: [3, 7]}) if leaf else None
    if kind == "layers":
        return dict(target_modules=linear, layers_to_transform=[1])
    stacked = sorted({n.rpartition(".")[2] for n, p in model.named_parameters() if p.dim() == 3 and ".experts." in n})
    if kind == "experts":  # PEFT's target_parameters on stacked MoE experts, with a LoRA layer beside them
        return dict(target_modules=linear[:1], target_parameters=[f"experts.{p}" for p in stacked]) if stacked else None
    if kind == "experts-patterns":
        if not stacked:
            return None
        return dict(
            target_modules=[],
            target_parameters=stacked,
            use_rslora=True,
            rank_pattern={stacked[0]: 2},
            alpha_pattern={stacked[-1]: 5},
        )
    raise ValueError(kind)


KINDS = [
    "all-linear",
    "embeddings",
    "patterns",
    "dora",
    "mts-norm",
    "mts-head",
    "bias-all",
    "lora_bias",
    "tokens",
    "layers",
    "experts",
    "experts-patterns",
]
# What lorasurgeon refuses, by design, and the phrase that says so. (arch or "*", kind, check) -> phrase
REFUSED = {
    ("*", "dora", "unmerge"): "DoRA cannot be unmerged",
    ("*", "mts-norm", "unmerge"): "cannot unmerge",
    ("*", "mts-head", "unmerge"): "cannot unmerge",
    ("*", "bias-all", "unmerge"): "cannot unmerge",
    ("*", "tokens", "unmerge"): "cannot unmerge",
}


# Cells where PEFT's adapter model computes something other than the adapter it wrote: merge is judged
# by PEFT's merge_and_unload() there, augmented (which PEFT itself runs) by the adapter model.
def peft_merge_wrong(tied: bool | None, kind: str) -> bool:
    """Where PEFT's merge_and_unload() is not its adapter model: LoRA on both a tied embedding and head
    merges both deltas into the one shared tensor (off by hundreds in logits). Judged by the forward."""
    return bool(tied) and kind == "embeddings"


def peft_forward_wrong(model: Any, names: Any, tied: bool | None, kind: str) -> str | None:
    """Why PEFT's adapter model computes something other than the adapter it wrote (None: it does not)."""
    head = dict(model.named_modules()).get(names.head.removesuffix(".weight")) if names.head else None
    if kind == "tokens" and tied and getattr(head, "bias", None) is not None:
        return (
            "PEFT's TrainableTokensLayer on a tied head with a bias (BERT's decoder, Phi's and GPT-J's lm_head) "
            "calls F.linear without the bias; merge_and_unload keeps it"
        )
    return None


FAST = {
    ("llama", False),
    ("llama", True),
    ("gpt2", True),
    ("gpt_neox", False),
    ("bloom", True),
    ("t5", True),
    ("whisper", True),
    ("vit", None),
    ("bert", True),
    ("qwen2_moe", False),
    ("gemma", True),
    ("phi", True),
    ("t5", False),
    ("mixtral", False),
    ("gpt_oss", False),
}


@dataclass
class Cell:
    root: Path
    arch: Arch
    tied: bool | None
    kind: str
    base: Path
    adapter: Path
    reference: torch.Tensor  # the adapter model's outputs
    merged_reference: torch.Tensor  # what the merged model must compute
    peft_merged: torch.Tensor  # PEFT's merge_and_unload() outputs


def _refusal(arch: str, kind: str, check: str) -> str | None:
    return REFUSED.get((arch, kind, check)) or REFUSED.get(("*", kind, check))


def make_cell(tmp_path: Path, arch_name: str, tied: bool | None, kind: str) -> Cell:
    import transformers
    from peft import LoraConfig, PeftModel, get_peft_model

    arch = ARCHS[arch_name]
    base = tmp_path / "base"
    build(arch, tied=tied).save_pretrained(base)
    names = model_names(sorted(load_file(base / "model.safetensors")), json.loads((base / "config.json").read_text()))
    model = build(arch, tied=tied)
    config = lora_config(kind, model, names)
    wrong = peft_forward_wrong(model, names, tied, kind)
    if config is None:
        pytest.skip(f"{kind} does not apply to {arch_name}")
    torch.manual_seed(1)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **config))
    with torch.no_grad():  # modules_to_save / bias copies start equal to the base: make them differ
        for name, p in peft.named_parameters():
            if p.requires_grad and "lora_" not in name:
                p.add_(torch.randn_like(p) * 0.05)
    peft.save_pretrained(tmp_path / "adapter")
    loaded = getattr(transformers, arch.auto).from_pretrained(base)
    adapter_model = PeftModel.from_pretrained(loaded, tmp_path / "adapter").eval()
    reference = outputs(adapter_model, arch)
    peft_merged = outputs(adapter_model.merge_and_unload(), arch)
    merged_reference = peft_merged if wrong else reference
    # Where PEFT is right its merge computes its forward; where it is not, the claim is checked too.
    agree = torch.allclose(peft_merged, reference, rtol=0, atol=ATOL)
    assert agree != bool(wrong or peft_merge_wrong(tied, kind)), (arch_name, tied, kind)
    return Cell(tmp_path, arch, tied, kind, base, tmp_path / "adapter", reference, merged_reference, peft_merged)


def load(path: Path, arch: Arch) -> Any:
    import transformers

    return getattr(transformers, arch.auto).from_pretrained(path).eval()


def check_merge(cell: Cell) -> None:
    ls.merge(cell.base, [cell.adapter], cell.root / "merged")
    got = outputs(load(cell.root / "merged", cell.arch), cell.arch)
    torch.testing.assert_close(got, cell.merged_reference, rtol=0, atol=ATOL)
    if not peft_merge_wrong(cell.tied, cell.kind):
        torch.testing.assert_close(got, cell.peft_merged, rtol=0, atol=ATOL)


def check_augmented(cell: Cell) -> None:
    from peft import LoraConfig, get_peft_model

    ls.merge(cell.base, [cell.adapter], cell.root / "aug", form="augmented")
    config = json.loads((cell.root / "aug" / "adapter_config.json").read_text())
    wrapped = get_peft_model(
        load(cell.base, cell.arch),
        LoraConfig(
            **{  # the model as a user loads it
                k: v for k, v in config.items() if k not in ("peft_type", "auto_mapping", "peft_version")
            }
        ),
    )
    state = read_folder(cell.root / "aug")
    inner = wrapped.base_model.model
    assert set(state) == set(inner.state_dict()), (
        sorted(set(inner.state_dict()) - set(state))[:4],
        sorted(set(state) - set(inner.state_dict()))[:4],
    )
    inner.load_state_dict(state, strict=True)
    torch.testing.assert_close(outputs(wrapped.eval(), cell.arch), cell.reference, rtol=0, atol=ATOL)
    ls.convert(cell.root / "aug", cell.root / "converted", to="merged")
    if not (cell.root / "merged").exists():
        ls.merge(cell.base, [cell.adapter], cell.root / "merged")
    direct, converted = read_folder(cell.root / "merged"), read_folder(cell.root / "converted")
    assert set(direct) == set(converted) and all(torch.equal(direct[k], converted[k]) for k in direct)


def check_unmerge(cell: Cell) -> None:
    if not (cell.root / "merged").exists():
        ls.merge(cell.base, [cell.adapter], cell.root / "merged")
    ls.unmerge(cell.root / "merged", [cell.adapter], cell.root / "back")
    original, back, merged = read_folder(cell.base), read_folder(cell.root / "back"), read_folder(cell.root / "merged")
    assert set(original) <= set(back)
    for name, w0 in original.items():
        scale = torch.maximum(w0.abs(), merged.get(name, w0).abs())
        assert ((back[name] - w0).abs() <= 1e-5 * scale + 1e-7).all(), name


def own_rank(cell: Cell) -> int:
    """The adapter's own rank, the largest its config gives a module: every change lorasurgeon's merge writes has
    at most that rank (a fused gate_up_proj 2r, as extract counts it too), so extract at it gives the fine-tune
    back. DoRA's change has no such rank (its magnitude rescales W0 whole), nor a head trained whole
    (modules_to_save): full rank there."""
    if cell.kind in ("dora", "mts-head"):
        return 256
    config = json.loads((cell.adapter / "adapter_config.json").read_text())
    return max([int(config["r"]), *map(int, (config.get("rank_pattern") or {}).values())])


def check_extract(cell: Cell) -> None:
    """The merged model as a fine-tune: extract at the adapter's own rank, load the adapter into the model's own
    class with PEFT, and compare outputs with the fine-tune's."""
    from peft import PeftModel

    if not (cell.root / "merged").exists():
        ls.merge(cell.base, [cell.adapter], cell.root / "merged")
    ls.extract(cell.base, cell.root / "merged", cell.root / "extracted", rank=own_rank(cell))
    finetune = outputs(load(cell.root / "merged", cell.arch), cell.arch)
    loaded = PeftModel.from_pretrained(load(cell.base, cell.arch), cell.root / "extracted").eval()
    torch.testing.assert_close(outputs(loaded, cell.arch), finetune, rtol=0, atol=EXTRACT_ATOL)


CHECKS = {"merge": check_merge, "augmented": check_augmented, "unmerge": check_unmerge, "extract": check_extract}


def _cells() -> list[Any]:
    params = []
    for name, arch in ARCHS.items():
        for tied in [False, True] if arch.can_tie else [None]:
            for kind in KINDS:
                marks = [] if (name, tied) in FAST else [pytest.mark.slow]
                label = f"{name}{'-tied' if tied else ''}-{kind}"
                params.append(pytest.param(name, tied, kind, id=label, marks=marks))
    return params


@pytest.mark.parametrize("arch_name,tied,kind", _cells())
def test_architecture_matrix(tmp_path, arch_name, tied, kind):
    cell = make_cell(tmp_path, arch_name, tied, kind)
    for check, run in CHECKS.items():
        expected = _refusal(arch_name, kind, check)
        if expected is None:
            run(cell)
            continue
        with pytest.raises(ls.LorasurgeonError, match=expected):
            run(cell)
