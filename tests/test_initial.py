"""PiSSA / OLoRA adapters saved as trained (their init changed the base): `convert ADAPTER --initial INITIAL`
makes the plain LoRA of the unchanged base. The oracle is PEFT's own conversion, save_pretrained(
path_initial_model_for_weight_conversion=...): the same tensors, bit for bit, and the same config; merged into
the original base it gives the weights the trained PEFT model computes with."""

from __future__ import annotations

import json

import make_fixtures as mf
import pytest
import torch
from helpers import FIX_ADAPTER, listing, one_line_error, run_cli
from reference import read_folder

import lorasurgeon as ls

peft = pytest.importorskip("peft")


def _trained(tmp_path, init: str, dtype: torch.dtype = torch.float32, **extra):
    """A tiny Llama (saved first: the unchanged base), a PEFT adapter initialised by ``init`` (which changes the
    base in memory), its initial adapter, the adapter 'trained' (every factor moved) and saved as it is, and
    PEFT's own conversion of it."""
    model = mf.build_model(mf.llama_config(tied=False), seed=0).to(dtype)
    mf.save_model(model, tmp_path / "base")
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=init, **extra
    )
    model = peft.get_peft_model(model, config)
    model.peft_config["default"].init_lora_weights = True
    model.save_pretrained(tmp_path / "init")
    model.peft_config["default"].init_lora_weights = init
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.dtype))
    model.save_pretrained(tmp_path / "trained")
    model.save_pretrained(tmp_path / "peft", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    return model


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_the_plain_lora_is_peft_s_conversion_bit_for_bit(tmp_path, init):
    model = _trained(tmp_path, init)
    done = run_cli("convert", tmp_path / "trained", "--initial", tmp_path / "init", "-o", tmp_path / "ours")
    assert done.exit_code == 0, done.output
    assert "plain LoRA of rank 8" in done.output
    ours, theirs = read_folder(tmp_path / "ours"), read_folder(tmp_path / "peft")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    mine = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert {k: mine[k] for k in ("r", "lora_alpha", "init_lora_weights")} == {
        "r": 8,
        "lora_alpha": 16,
        "init_lora_weights": True,
    }
    assert {k: peft_config[k] for k in ("r", "lora_alpha", "init_lora_weights")} == {
        k: mine[k] for k in ("r", "lora_alpha", "init_lora_weights")
    }
    # merged into the unchanged base, the weights the trained model computes with (W_res + s·B·A)
    ls.merge(tmp_path / "base", tmp_path / "ours", tmp_path / "merged")
    merged, expected = read_folder(tmp_path / "merged"), model.merge_and_unload().state_dict()
    worst = max((merged[k] - expected[k]).abs().max().item() for k in merged if "proj" in k)
    assert worst < 1e-5, worst


def test_a_bf16_base_from_python(tmp_path):
    """From Python (lorasurgeon.commands.convert.initial.from_initial): a bf16 base, whose adapter PEFT keeps in
    float32 -- the factors joined as they are, PEFT's bit for bit."""
    from lorasurgeon.commands.convert.initial import from_initial

    _trained(tmp_path, "pissa", torch.bfloat16)
    report = from_initial(tmp_path / "trained", tmp_path / "init", ls.Output(tmp_path / "ours"))
    assert report.rank == 8 and report.modules == 6 and report.output == str(tmp_path / "ours")
    ours, theirs = read_folder(tmp_path / "ours"), read_folder(tmp_path / "peft")
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in theirs)


def test_without_initial_the_refusal_names_the_option_and_mistakes_are_refused(tmp_path):
    _trained(tmp_path, "pissa")
    one_line_error(run_cli("merge", tmp_path / "base", tmp_path / "trained", "-o", tmp_path / "m"), "--initial")
    # swapped: the initial adapter's init is True, it needs no --initial
    one_line_error(
        run_cli("convert", tmp_path / "init", "--initial", tmp_path / "trained", "-o", tmp_path / "x"),
        "needs no --initial",
    )
    # another adapter as the initial one
    one_line_error(
        run_cli("convert", tmp_path / "trained", "--initial", FIX_ADAPTER, "-o", tmp_path / "x"),
        "not the initial adapter",
    )
    both = ("convert", tmp_path / "trained", "--initial", tmp_path / "init", "--to", "merged", "-o", tmp_path / "x")
    usage = run_cli(*both)
    assert usage.exit_code == 2 and "--initial makes a plain LoRA adapter" in usage.output
    assert not {"m", "x"} & listing(tmp_path)
    dry = run_cli("convert", tmp_path / "trained", "--initial", tmp_path / "init", "-o", tmp_path / "x", "--dry-run")
    assert dry.exit_code == 0 and "Would write 6 modules" in dry.output and "rank 8" in dry.output
    assert "x" not in listing(tmp_path)


def test_an_adapter_holding_more_than_factors_is_refused_by_name(tmp_path):
    _trained(tmp_path, "pissa")
    trained = tmp_path / "trained"
    tensors = read_folder(trained)
    tensors["base_model.model.model.norm.weight"] = torch.ones(64)
    from safetensors.torch import save_file

    save_file(tensors, trained / "adapter_model.safetensors")
    one_line_error(
        run_cli("convert", trained, "--initial", tmp_path / "init", "-o", tmp_path / "x"),
        "model.norm.weight",
        "refused",
    )
