"""vLLM's own adapter validation run on what we write and on what `check --for vllm` judges: its PEFTHelper
(from_local_dir, validate_legal against a LoRAConfig with the --max-lora-rank check reports) and its
get_rank_and_scaling, which is how vLLM scales each module's B·A.

vLLM does not install on a CPU machine as a package (its wheel pins a CUDA torch), but its PEFTHelper
imports without the GPU parts: `pip install --no-deps --target DIR vllm cbor2 pyzmq aiohttp multidict attrs
yarl propcache aiohappyeyeballs aiosignal frozenlist openai-harmony openai sniffio` and PYTHONPATH=DIR.
Where that is not done (CI), these tests skip and tests/test_check.py's restated rules stand alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import FIX_ADAPTER, FIX_BASE, run_cli
from safetensors.torch import load_file
from test_check import CASES, edited
from test_extract_budget import finetune  # noqa: F401 (a fixture)
from test_resize import deltas

import lorasurgeon as ls

peft_helper = pytest.importorskip("vllm.lora.peft_helper")
vllm_lora = pytest.importorskip("vllm.config.lora")


def vllm_accepts(adapter: Path, max_lora_rank: int) -> str | None:
    """None when vLLM's PEFTHelper takes the adapter with this --max-lora-rank, else its message."""
    try:
        helper = peft_helper.PEFTHelper.from_local_dir(str(adapter), None)
        helper.validate_legal(vllm_lora.LoRAConfig(max_lora_rank=max_lora_rank))
    except ValueError as exc:
        return str(exc)
    return None


def vllm_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """Each module's change as vLLM computes it: its own rank and scaling for the module, times B @ A."""
    helper = peft_helper.PEFTHelper.from_local_dir(str(adapter), None)
    t = load_file(adapter / "adapter_model.safetensors")
    out = {}
    for key in [k for k in t if k.endswith(".lora_A.weight")]:
        name = key.removesuffix(".lora_A.weight").removeprefix("base_model.model.")
        _, scaling = helper.get_rank_and_scaling(name)
        b = t[key.replace("lora_A", "lora_B")].double()
        out[name] = scaling * (b @ t[key].double())
    return out


# the rules vLLM's PEFTHelper decides from the config (the others are about tensors, read by lora_model.py)
CONFIG_RULES = ["dora", "lora_bias", "modules_to_save", "pissa", "rank", "patterns", "alora"]


@pytest.mark.parametrize("case", CONFIG_RULES)
def test_check_and_vllm_agree_on_what_loads(tmp_path, case):
    _, edit, _, _ = CASES[case]
    adapter = edited(tmp_path, case, **edit)
    report = ls.check(adapter, consumer="vllm")
    refused = vllm_accepts(adapter, report.max_lora_rank or 512)
    assert (report.exit_code == 1) == (refused is not None), (report.summary(), refused)


def test_a_plain_adapter_loads_in_vllm_at_the_rank_check_names(tmp_path):
    report = ls.check(FIX_ADAPTER, consumer="vllm")
    assert report.max_lora_rank == 8
    assert vllm_accepts(FIX_ADAPTER, 8) is None
    eva = edited(tmp_path, "eva", init_lora_weights="eva")
    assert ls.check(eva, consumer="vllm").exit_code == 0 and vllm_accepts(eva, 8) is None


def test_what_we_write_for_vllm_passes_its_validation_and_it_computes_peft_s_change(tmp_path, finetune):  # noqa: F811
    scaled = edited(tmp_path, "scaled", use_rslora=True, alpha_pattern={"q_proj": 32, "down_proj": 4})
    ls.resize(scaled, tmp_path / "resized", budget="40KB", for_="vllm")
    ls.combine([FIX_ADAPTER, scaled], tmp_path / "combined", weights=[1, 0.5], rank=6, for_="vllm")
    assert run_cli("convert", scaled, "--for", "vllm", "-o", tmp_path / "converted").exit_code == 0
    ls.extract(FIX_BASE, finetune, tmp_path / "extracted", energy=0.5, extras="skip", for_="vllm")
    for out in ("resized", "combined", "converted", "extracted"):
        report = ls.check(tmp_path / out, consumer="vllm")
        assert report.exit_code == 0, report.summary()
        assert vllm_accepts(tmp_path / out, report.max_lora_rank) is None, out
        want, got = deltas(tmp_path / out), vllm_deltas(tmp_path / out)
        assert set(got) == set(want)
        for name, d in want.items():
            assert float((got[name] - d).norm() / d.norm()) < 1e-6, (out, name)
    # and the conversion changed nothing PEFT computes from the adapter it came from
    before, after = deltas(scaled), deltas(tmp_path / "converted")
    for name, d in before.items():
        assert float((after[name] - d).norm() / d.norm()) < 1e-5, name
    config = json.loads((tmp_path / "converted" / "adapter_config.json").read_text())
    assert not config.get("use_rslora") and not config.get("alpha_pattern")
