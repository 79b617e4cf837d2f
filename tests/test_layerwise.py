"""calibration.layerwise: the moments of every module's inputs, gathered with one decoder layer in memory at a
time, equal those of a whole-model forward with hooks (the oracle: transformers' own model run whole)."""

from __future__ import annotations

import make_fixtures as mf
import pytest
import torch
from reference import input_moments, output_moments

from lorasurgeon.calibration import backward
from lorasurgeon.calibration.layerwise import TOKENS, gather
from lorasurgeon.errors import UnsupportedError
from lorasurgeon.io.checkpoint import open_checkpoint
from lorasurgeon.io.sidecar import read_config
from lorasurgeon.io.spool import SpoolWriter
from lorasurgeon.names import model_names

SAMPLES = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (7, 11, 5)]


@pytest.mark.parametrize("config", ["llama tied", "llama", "gpt2"])
def test_layer_by_layer_moments_equal_a_whole_model_forward_with_hooks(tmp_path, config):
    cfg = mf.gpt2_config() if config == "gpt2" else mf.llama_config(tied=config == "llama tied", layers=3)
    model = mf.build_model(cfg, seed=0).eval()
    mf.save_model(model, tmp_path / "m")
    want = {k: v.float() for k, v in input_moments(model, [torch.tensor([s]) for s in SAMPLES]).items()}
    ckpt = open_checkpoint(tmp_path / "m")
    spool = SpoolWriter(tmp_path / "out", prefix="moments")
    try:
        got = gather(ckpt, model_names(ckpt.names(), read_config(ckpt)), read_config(ckpt), SAMPLES, spool)
        assert set(got.moments) == set(want)  # every Linear (Conv1D) the model has, the head included
        for module, key in got.moments.items():
            assert torch.equal(spool.read(key), want[module]), module
        counts = spool.read(TOKENS)
        assert counts.shape == (256,) and float(counts.sum()) == sum(map(len, SAMPLES)) == got.tokens
        assert got.layers == (cfg.n_layer if config == "gpt2" else 3)
        # q, k and v read one tensor: its moment is spooled once
        assert len(set(got.moments.values())) < len(got.moments) or config == "gpt2"
    finally:
        spool.abort()
        ckpt.close()


def gemma2_config():
    from transformers import Gemma2Config

    return Gemma2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32,
    )  # fmt: skip


@pytest.mark.parametrize("config", ["llama tied", "gpt2", "gemma2"])
def test_layer_by_layer_output_gradients_equal_a_whole_model_backward_with_hooks(tmp_path, config):
    """fisher: the layers run back one at a time from the head give each module's E[g gᵀ] at its output, the
    embedding's and the head's Fisher diagonal, as the model run whole with autograd does. Gemma's embedding scales
    its rows by √hidden: a change of a row costs hidden times its output gradients' moment."""
    configs = {"gpt2": mf.gpt2_config, "gemma2": gemma2_config}
    cfg = configs.get(config, lambda: mf.llama_config(tied=True, layers=3))()
    model = mf.build_model(cfg, seed=0).eval()
    mf.save_model(model, tmp_path / "m")
    want, embedding, head = output_moments(model, [torch.tensor([s]) for s in SAMPLES], backward.SEED)
    if config == "gemma2":
        embedding = embedding * cfg.hidden_size  # (√hidden)²
    ckpt = open_checkpoint(tmp_path / "m")
    spool = SpoolWriter(tmp_path / "out", prefix="moments")
    try:
        got = gather(ckpt, model_names(ckpt.names(), read_config(ckpt)), read_config(ckpt), SAMPLES, spool, fisher=True)
        heads = {m for m, key in got.outputs.items() if key == backward.HEAD}  # the head's: its Fisher diagonal
        assert len(heads) == 1 and set(got.outputs) - heads == set(want)  # every Linear (Conv1D) of every layer
        for module, key in got.outputs.items():
            if module in heads:
                continue
            torch.testing.assert_close(spool.read(key).double(), want[module], rtol=1e-4, atol=1e-9, msg=module)
        torch.testing.assert_close(spool.read(backward.EMBEDDING).double(), embedding, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(spool.read(backward.HEAD).double(), head, rtol=1e-4, atol=1e-9)
        assert not [n for n in spool.names() if n.startswith("@inputs")]  # the kept inputs let go of
    finally:
        spool.abort()
        ckpt.close()


def test_a_model_transformers_converts_on_load_is_refused_by_name(tmp_path):
    """Weights the files hold under other names (fused MoE experts) cannot be loaded layer by layer as they are."""
    from transformers import Qwen2MoeConfig

    cfg = Qwen2MoeConfig(
        vocab_size=256, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        num_experts=2, num_experts_per_tok=1,
    )  # fmt: skip
    mf.save_model(mf.build_model(cfg, seed=0), tmp_path / "moe")
    ckpt = open_checkpoint(tmp_path / "moe")
    spool = SpoolWriter(tmp_path / "out", prefix="moments")
    try:
        with pytest.raises(UnsupportedError, match="calibrating it is not supported"):
            gather(ckpt, model_names(ckpt.names(), read_config(ckpt)), read_config(ckpt), SAMPLES, spool)
    finally:
        spool.abort()
        ckpt.close()
