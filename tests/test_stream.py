"""iter_merged: the merged model's tensors streamed to a program instead of written to a folder."""

from __future__ import annotations

import threading

import make_fixtures as mf
import pytest
import torch
from helpers import FIX_ADAPTER, FIX_BASE
from reference import load_model, logits, read_folder

import lorasurgeon as ls


def test_the_same_tensors_merge_writes_in_the_base_order(tmp_path):
    ls.merge(FIX_BASE, [FIX_ADAPTER], tmp_path / "merged", weights=[0.5])
    written = read_folder(tmp_path / "merged")
    streamed = list(ls.iter_merged(FIX_BASE, [FIX_ADAPTER], weights=[0.5]))
    names = [name for name, _ in streamed]
    with ls.open_checkpoint(FIX_BASE) as base:
        assert names == base.names()
    assert all(torch.equal(t, written[name]) and t.dtype == written[name].dtype for name, t in streamed)


def test_a_program_loads_them_into_a_model(tmp_path):
    """What the entry point is for: a model in memory gets the merged weights, no folder in between."""
    ls.merge(FIX_BASE, [FIX_ADAPTER], tmp_path / "merged")
    model = load_model(FIX_BASE)
    model.load_state_dict(dict(ls.iter_merged(FIX_BASE, [FIX_ADAPTER])), strict=True)
    torch.testing.assert_close(logits(model), logits(load_model(tmp_path / "merged")), rtol=0, atol=0)


def test_an_untied_head_comes_last(tmp_path):
    config = mf.llama_config(tied=True)
    base = mf.save_model(mf.build_model(config, seed=0), tmp_path / "base")
    adapter = mf.make_adapter(
        mf.build_model(mf.llama_config(tied=True), seed=0), tmp_path / "adapter", target_modules=["embed_tokens"], r=2
    )
    streamed = list(ls.iter_merged(base, [adapter]))
    ls.merge(base, [adapter], tmp_path / "merged")
    written = read_folder(tmp_path / "merged")
    assert streamed[-1][0] == "lm_head.weight" and {n for n, _ in streamed} == set(written)
    assert all(torch.equal(t, written[n]) for n, t in streamed)


def test_bad_input_fails_at_the_call_not_at_the_first_tensor():
    with pytest.raises(ls.IncompatibleError, match="look swapped"):
        ls.iter_merged(FIX_ADAPTER, [FIX_BASE])
    with pytest.raises(ls.InvalidOptionError, match="finite"):
        ls.iter_merged(FIX_BASE, [FIX_ADAPTER], weights=[float("nan")])


def test_closing_early_stops_the_reader():
    tensors = ls.iter_merged(FIX_BASE, [FIX_ADAPTER])
    name, tensor = next(tensors)
    assert isinstance(tensor, torch.Tensor)
    assert any(t.name == "lorasurgeon-read" for t in threading.enumerate())
    tensors.close()
    assert not any(t.name == "lorasurgeon-read" for t in threading.enumerate())
