"""extract: the adapter loads in PEFT, keeps the Eckart–Young optimum, and reproduces the fine-tune."""

from __future__ import annotations

import json
import shutil

import make_fixtures as mf
import pytest
import torch
from helpers import listing, one_line_error, run_cli
from reference import load_model, logits, read_folder
from safetensors.torch import load_file

from lorasurgeon import extract, merge


def fine_tune(model, *, rank=4, noise=0.0, norms=True, seed=5, biases=False, embeddings=True):
    """A 'fine-tune': a rank-``rank`` change to every matrix, optional full-rank noise, changed norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not embeddings and (p is model.get_input_embeddings().weight or "wpe" in name):
                continue
            if p.dim() == 2:
                m, n = p.shape
                p.add_(0.03 * torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) / rank**0.5)
                p.add_(noise * torch.randn(p.shape, generator=g))
            elif norms and ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.add_(0.02 * torch.randn(p.shape, generator=g))
            elif biases and name.endswith("bias"):
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def build_pair(root, config, **kwargs):
    base = mf.save_model(mf.build_model(config, seed=0), root / "base")
    tuned = mf.save_model(fine_tune(mf.build_model(config, seed=0), **kwargs), root / "tuned")
    return base, tuned


def peft_load(base, adapter, resize=None):
    """PeftModel over the base, after checking that the file holds exactly the keys PEFT expects."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    model = load_model(base)
    if resize:
        model.resize_token_embeddings(resize)
    peft = PeftModel.from_pretrained(model, adapter)
    expected = set(get_peft_model_state_dict(peft, save_embedding_layers=False))
    stored = set(load_file(adapter / "adapter_model.safetensors"))
    assert stored == expected, (sorted(expected - stored)[:5], sorted(stored - expected)[:5])
    return peft.eval()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_pair(tmp_path_factory.mktemp("llama"), mf.llama_config(), noise=2e-3)


@pytest.mark.parametrize("rank", [2, 4, 8])
def test_fixed_rank_keeps_the_optimum_and_loads_in_peft(llama, tmp_path, rank):
    base, tuned = llama
    report = extract(base, tuned, tmp_path / "lora", rank=rank, solver="randomized")
    b, t = read_folder(base), read_folder(tuned)
    assert len(report.modules) == 2 * 7 + 2  # every projection, the embedding and lm_head
    for m in report.modules:
        delta = t[m.name + ".weight"].double() - b[m.name + ".weight"].double()
        delta = delta.T if m.kind == "embedding" else delta
        s = torch.linalg.svdvals(delta)
        optimum = float((s[:rank] ** 2).sum() / (s**2).sum())
        assert m.rank == rank and m.kept >= 0.995 * optimum, (m.name, m.kept, optimum)
        assert m.rel_error == pytest.approx((1 - m.kept) ** 0.5, rel=1e-3, abs=1e-5)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == rank and config["lora_alpha"] == rank and not config["rank_pattern"]
    assert sorted(config["modules_to_save"]) == sorted({n.rpartition(".")[0] for n in t if "norm" in n})
    peft_load(base, tmp_path / "lora")
    on_disk = json.loads((tmp_path / "lora" / "extract_report.json").read_text())
    assert {"modules", "totals", "full", "skipped"} <= set(on_disk)


def test_rank_that_suffices_reproduces_the_fine_tune(tmp_path):
    base, tuned = build_pair(tmp_path, mf.llama_config(), noise=0.0)  # exactly rank 4 + norms
    report = extract(base, tuned, tmp_path / "lora", rank=4)
    assert all(m.rel_error < 1e-4 for m in report.modules)
    target = logits(load_model(tuned))
    adapter_model = peft_load(base, tmp_path / "lora")
    torch.testing.assert_close(logits(adapter_model), target, rtol=1e-4, atol=1e-4)
    merged = adapter_model.merge_and_unload()  # untied: PEFT's merge is right here
    torch.testing.assert_close(logits(merged), target, rtol=1e-4, atol=1e-4)
    merge(base, [tmp_path / "lora"], tmp_path / "ours")  # and so is ours
    torch.testing.assert_close(logits(load_model(tmp_path / "ours")), target, rtol=1e-4, atol=1e-4)


def test_full_rank_gives_back_the_delta(llama, tmp_path):
    base, tuned = llama
    report = extract(base, tuned, tmp_path / "lora", rank=10_000)
    assert all(m.rel_error < 1e-5 and m.kept == pytest.approx(1.0, abs=1e-6) for m in report.modules)
    assert all(m.rank == min(m.shape) for m in report.modules)
    torch.testing.assert_close(
        logits(peft_load(base, tmp_path / "lora")), logits(load_model(tuned)), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("fraction", [0.5, 0.95])
def test_energy_picks_per_module_ranks(llama, tmp_path, fraction):
    base, tuned = llama
    report = extract(base, tuned, tmp_path / "lora", energy=fraction, max_rank=48)
    b, t = read_folder(base), read_folder(tuned)
    for m in report.modules:
        delta = t[m.name + ".weight"].double() - b[m.name + ".weight"].double()
        s2 = torch.linalg.svdvals(delta) ** 2
        best = int((torch.cumsum(s2, 0) >= fraction * s2.sum()).nonzero()[0]) + 1
        assert m.kept >= fraction and best <= m.rank <= best + 1, (m.name, m.rank, best)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    ranks = {m.name: m.rank for m in report.modules}
    assert len(set(ranks.values())) == 1 or config["rank_pattern"]
    peft = peft_load(base, tmp_path / "lora")
    for name, module in peft.base_model.model.named_modules():
        if name in ranks:
            assert module.r["default"] == ranks[name] and module.scaling["default"] == pytest.approx(1.0)


def test_tied_fine_tune(tmp_path):
    """A tied model's embedding change acts on input and output: both get the factors.

    PEFT's merge_and_unload would add the delta twice to the one shared tensor, so the adapter
    model's logits are the reference here, not PEFT's merged weights.
    """
    base, tuned = build_pair(tmp_path, mf.llama_config(tied=True), noise=0.0)
    report = extract(base, tuned, tmp_path / "lora", rank=4)
    assert {"model.embed_tokens", "lm_head"} <= {m.name for m in report.modules}
    torch.testing.assert_close(
        logits(peft_load(base, tmp_path / "lora")), logits(load_model(tuned)), rtol=1e-4, atol=1e-4
    )


def test_resized_vocabulary_is_stored_in_full(tmp_path):
    config = mf.llama_config()
    base = mf.save_model(mf.build_model(config, seed=0), tmp_path / "base")
    model = fine_tune(mf.build_model(config, seed=0))
    model.resize_token_embeddings(260)
    with torch.no_grad():
        model.get_input_embeddings().weight[256:] = torch.randn(4, config.hidden_size)
    mf.save_model(model, tmp_path / "tuned")
    report = extract(base, tmp_path / "tuned", tmp_path / "lora", rank=4)
    full = {f.name: f.reason for f in report.full}
    assert "resize_token_embeddings(260)" in full["model.embed_tokens.weight"]
    assert "lm_head.weight" in full
    ids = torch.tensor([[1, 5, 257, 259, 100]])
    torch.testing.assert_close(
        logits(peft_load(base, tmp_path / "lora", resize=260), ids),
        logits(load_model(tmp_path / "tuned"), ids),
        rtol=1e-4,
        atol=1e-4,
    )


def test_gpt2_conv1d_and_bias_changes(tmp_path):
    base, tuned = build_pair(tmp_path, mf.gpt2_config(), noise=0.0, biases=True)
    report = extract(base, tuned, tmp_path / "lora", rank=4)
    kinds = {m.name: m.kind for m in report.modules}
    assert kinds["transformer.h.0.attn.c_attn"] == "conv1d" and kinds["transformer.wpe"] == "embedding"
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    # PEFT refuses lora_bias with LoRA on embeddings: biases go in whole (bias: lora_only)
    assert config["lora_bias"] is False and config["bias"] == "lora_only"
    assert "base_model.model.transformer.h.0.attn.c_attn.base_layer.bias" in load_file(
        tmp_path / "lora" / "adapter_model.safetensors"
    )
    torch.testing.assert_close(
        logits(peft_load(base, tmp_path / "lora")), logits(load_model(tuned)), rtol=1e-4, atol=1e-4
    )
    # when every LoRA module has a bias (no embedding change), bias deltas are lora_B.bias (lora_bias)
    base2, tuned2 = build_pair(tmp_path / "blocks", mf.gpt2_config(), biases=True, embeddings=False)
    report = extract(base2, tuned2, tmp_path / "lora2", rank=4)
    assert "lm_head" not in {m.name for m in report.modules}
    config = json.loads((tmp_path / "lora2" / "adapter_config.json").read_text())
    assert config["lora_bias"] is True and config["bias"] == "none"
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_B.bias" in load_file(
        tmp_path / "lora2" / "adapter_model.safetensors"
    )
    torch.testing.assert_close(
        logits(peft_load(base2, tmp_path / "lora2")), logits(load_model(tuned2)), rtol=1e-4, atol=1e-4
    )
    merge(base2, [tmp_path / "lora2"], tmp_path / "merged2")  # and lorasurgeon merges it back
    torch.testing.assert_close(
        logits(load_model(tmp_path / "merged2")), logits(load_model(tuned2)), rtol=1e-4, atol=1e-4
    )


def test_skip_options_include_exclude_and_dtype(llama, tmp_path):
    base, tuned = llama
    report = extract(
        base, tuned, tmp_path / "lora", rank=2, embeddings="skip", extras="skip", exclude=r"mlp\.", dtype="bfloat16"
    )
    names = {m.name for m in report.modules}
    assert not any("mlp" in n or "embed" in n for n in names) and "lm_head" in names
    assert report.full == [] and report.skipped.excluded == 6
    assert (
        any("norm" in n for n in report.skipped.not_stored) and "model.embed_tokens.weight" in report.skipped.not_stored
    )
    tensors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    report = extract(base, tuned, tmp_path / "lora2", rank=2, include=r"q_proj", embeddings="full")
    assert {m.name for m in report.modules} == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}


def test_cli_extract_prints_a_summary(llama, tmp_path):
    base, tuned = llama
    result = run_cli("extract", base, tuned, "--rank", "4", "-o", tmp_path / "lora")
    assert result.exit_code == 0, result.stderr
    assert "model.layers.0.self_attn.q_proj" in result.stdout and "kept" in result.stdout
    assert "of the fine-tune's change" in result.stdout
    dry = run_cli("extract", base, tuned, "--rank", "4", "-o", tmp_path / "dry", "--dry-run")
    assert dry.exit_code == 0 and "tensors compared" in dry.stdout and not (tmp_path / "dry").exists()


def refused(result, tmp_path, phrase):
    one_line_error(result, phrase)
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_pairs_are_refused(llama, tmp_path):
    base, tuned = llama
    gpt2 = mf.save_model(mf.build_model(mf.gpt2_config()), tmp_path / "gpt2")
    refused(
        run_cli("extract", base, gpt2, "--rank", "4", "-o", tmp_path / "out"), tmp_path, "do not share an architecture"
    )
    wider = mf.save_model(mf.build_model(mf.llama_config(hidden=32)), tmp_path / "wider")
    refused(run_cli("extract", base, wider, "--rank", "4", "-o", tmp_path / "out"), tmp_path, "different architectures")
    refused(run_cli("extract", base, base, "--rank", "4", "-o", tmp_path / "out"), tmp_path, "same checkpoint")
    copy = shutil.copytree(base, tmp_path / "copy")
    refused(run_cli("extract", base, copy, "--rank", "4", "-o", tmp_path / "out"), tmp_path, "nothing to extract")
    refused(run_cli("extract", base, tuned, "-o", tmp_path / "out"), tmp_path, "give --rank N, --energy F or --budget")
    refused(run_cli("extract", base, tuned, "--energy", "1.5", "-o", tmp_path / "out"), tmp_path, "--energy")
    refused(
        run_cli("extract", base, tuned, "--rank", "2", "--include", "(", "-o", tmp_path / "out"),
        tmp_path,
        "--include '(' is not a valid regex",
    )
    assert set(listing(tmp_path)) == {p for p in listing(tmp_path) if not p.startswith(".")}


def test_embeddings_full_on_a_tied_model_stores_the_head_in_full_too(tmp_path):
    """--embeddings full: the tied head is the embedding's tensor, so it is stored whole as well (it was
    given a low-rank factor, and the adapter model's head was then not the fine-tune's)."""
    base, tuned = build_pair(tmp_path, mf.llama_config(tied=True), noise=0.0)
    report = extract(base, tuned, tmp_path / "lora", rank=4, embeddings="full")
    assert {f.name for f in report.full} >= {"model.embed_tokens.weight", "lm_head.weight"}
    assert not {"model.embed_tokens", "lm_head"} & {m.name for m in report.modules}
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert {"model.embed_tokens", "lm_head"} <= set(config["modules_to_save"])
    torch.testing.assert_close(
        logits(peft_load(base, tmp_path / "lora")), logits(load_model(tuned)), rtol=1e-4, atol=1e-4
    )
    report = extract(base, tuned, tmp_path / "skip", rank=4, embeddings="skip")
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(report.skipped.not_stored)


def test_rank_options_say_what_they_mean(llama, tmp_path):
    base, tuned = llama
    r = run_cli("extract", base, tuned, "--rank", "8", "--max-rank", "4", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "--max-rank caps the ranks --energy chooses; with --rank 8" in r.stderr, r.stderr
    r = run_cli("extract", base, tuned, "--energy", "0.9", "--max-rank", "0", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "--max-rank must be at least 1, got 0" in r.stderr
    report = extract(base, tuned, tmp_path / "big", rank=100)  # hidden 64: no matrix allows rank 100
    capped = [m for m in report.modules if m.rank < 100]
    assert capped and all(m.rank == min(m.shape) for m in capped)
    note = next(n for n in report.notes if n.startswith("--rank 100 is more than"))
    assert f"{len(capped)} modules' matrices allow" in note
    assert note in json.loads((tmp_path / "big" / "extract_report.json").read_text())["notes"]


def test_a_tensor_in_another_dtype_with_the_same_values_is_unchanged(tmp_path):
    """A float32 merge of a bf16 base: its norms hold the same values in float32; nothing to store
    (they were stored in full as 'changed')."""
    from helpers import ROOT

    fixtures = ROOT / "fixtures"
    merge(fixtures / "base", [fixtures / "adapter"], tmp_path / "fp32", dtype="float32")
    report = extract(fixtures / "base", tmp_path / "fp32", tmp_path / "lora", rank=8)
    assert report.full == [] and report.skipped.unchanged == 7 and len(report.modules) == 14
    assert not json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["modules_to_save"]
