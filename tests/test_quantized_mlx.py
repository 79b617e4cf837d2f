"""MLX affine quantization (formats/mlx.py): read exactly as mx.dequantize decodes it, merged keeping the format
(changed groups re-quantized as mx.quantize would, the rest byte for byte), and what is not read refused by name.

The oracles are MLX's own: mx.quantize / mx.dequantize for the arithmetic, and mlx-lm for the files (its
quantize_model, save_model and save_config write the checkpoints; its load_model reads them back, config.json's
per-module quantization included). The base is the committed fixture, loaded by mlx-lm; the adapter the committed
PEFT adapter of that fixture.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from helpers import FIX_ADAPTER, FIX_BASE, listing, one_line_error, run_cli
from reference import read_folder
from safetensors.torch import load_file
from test_quantized import adapter_delta, zero_rows

import lorasurgeon as ls
from lorasurgeon.commands._inputs import plain_weights
from lorasurgeon.formats.layout import dequantized, find_layout
from lorasurgeon.formats.mlx import MLXAffine, pack, unpack
from lorasurgeon.formats.registry import claiming
from lorasurgeon.io.checkpoint import open_checkpoint
from lorasurgeon.io.sidecar import read_config

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")
mlx_lm_utils = pytest.importorskip("mlx_lm.utils")

Q = "model.layers.0.self_attn.q_proj"
BITS = (1, 2, 3, 4, 5, 6, 8)
GROUPS = (32, 64, 128)
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def to_torch(a) -> torch.Tensor:
    """An mx array as a torch tensor, bit for bit (bfloat16 through its exact float32 upcast)."""
    import numpy as np

    if a.dtype == mx.bfloat16:
        return torch.from_numpy(np.array(a.astype(mx.float32))).to(torch.bfloat16)
    return torch.from_numpy(np.array(a))


def to_mx(t: torch.Tensor):
    """A float torch tensor as an mx array of the same dtype (through its exact float32 upcast)."""
    return mx.array(t.float().numpy()).astype(DTYPES[str(t.dtype).removeprefix("torch.")])


def mlx_folder(dst: Path, group_size: int, bits: int, dtype=None, predicate=None) -> Path:
    """The committed base loaded by mlx-lm, quantized by its quantize_model and saved as mlx-lm saves a model
    (save_model: safetensors + index; save_config: quantization and quantization_config)."""
    model, config = mlx_lm_utils.load_model(FIX_BASE)
    if dtype is not None:
        model.set_dtype(dtype)
    model, qconfig = mlx_lm_utils.quantize_model(model, config, group_size, bits, quant_predicate=predicate)
    mlx_lm_utils.save_model(dst, model)
    mlx_lm_utils.save_config(qconfig, config_path=dst / "config.json")
    return dst


def _mixed(path: str, _module) -> bool | dict:
    """A per-module recipe: lm_head left unquantized, down_proj 8-bit in groups of 128, the rest the default."""
    if path == "lm_head":
        return False
    return {"group_size": 128, "bits": 8, "mode": "affine"} if path.endswith("down_proj") else True


FOLDERS = {  # name: (group_size, bits, weights' dtype, quant_predicate)
    "4bit-g64-bf16": (64, 4, None, None),
    "3bit-g32-bf16": (32, 3, None, None),
    "8bit-g32-f32": (32, 8, mx.float32, None),
    "6bit-g64-f16": (64, 6, mx.float16, None),
    "mixed-5bit-g32": (32, 5, None, _mixed),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mlx")
    return {name: mlx_folder(root / name, *spec) for name, spec in FOLDERS.items()}


def mx_dequantized(folder: Path) -> dict[str, torch.Tensor]:
    """Every quantized weight of a folder as mlx-lm loads it (load_model: config.json's quantization read by
    mlx-lm itself), decoded by mx.dequantize into float32."""
    model, _ = mlx_lm_utils.load_model(folder)
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear | nn.QuantizedEmbedding):
            w = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits, m.mode, dtype=mx.float32)
            out[f"{name}.weight"] = to_torch(w)
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def groups_of(parts: dict[str, torch.Tensor], codec: MLXAffine) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [groups, g], scales [groups], biases [groups]) of one stored weight."""
    n = parts["scales"].shape[-1] * codec.group_size
    codes = unpack(parts["weight"].reshape(-1, parts["weight"].shape[-1]), codec.bits, n)
    return codes.reshape(-1, codec.group_size), parts["scales"].reshape(-1), parts["biases"].reshape(-1)


# --- the arithmetic, on random weights ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("bits", BITS)
def test_random_weights_read_as_mx_dequantize_and_re_quantize_as_mx_quantize(tmp_path, bits, group_size, dtype):
    """mx.quantize writes a stacked [E, out, in] weight and a 2-D one; find_layout + dequantized read them as
    mx.dequantize does, bit for bit in float32; pack is unpack's inverse on mx's words; and re-quantizing keeps
    every untouched group's bytes while each group given new parameters is mx.quantize's own, bit for bit."""
    mdt = DTYPES[dtype]
    g = torch.Generator().manual_seed(bits * 1000 + group_size)
    weights = {
        "experts.weight": torch.randn(3, 8, 256, generator=g) * 0.05,
        "proj.weight": torch.randn(16, 128, generator=g),
    }
    stored = {}
    for name, w in weights.items():
        q, s, b = mx.quantize(mx.array(w.numpy()).astype(mdt), group_size, bits)
        module = name.removesuffix(".weight")
        stored |= {f"{module}.weight": q, f"{module}.scales": s, f"{module}.biases": b}
    mx.save_safetensors(str(tmp_path / "model.safetensors"), stored, metadata={"format": "mlx"})
    qblock = {"group_size": group_size, "bits": bits, "mode": "affine"}
    config = {"quantization": qblock, "quantization_config": qblock}
    (tmp_path / "config.json").write_text(json.dumps(config))
    ckpt = open_checkpoint(tmp_path)
    layout = find_layout(ckpt, config)
    assert layout is not None and set(layout.tensors) == set(weights)
    assert layout.methods == [f"MLX affine {bits}-bit (group {group_size})"]
    view = dequantized(ckpt, layout)
    for name, qt in layout.tensors.items():
        module = name.removesuffix(".weight")
        want = mx.dequantize(*(stored[f"{module}.{k}"] for k in ("weight", "scales", "biases")), group_size, bits)
        got = view.read(name)
        assert got.dtype == torch.float32 and got.shape == weights[name].shape
        assert torch.equal(got, to_torch(want.astype(mx.float32))), name
        words = to_torch(stored[f"{module}.weight"])
        flat = words.reshape(-1, words.shape[-1])
        assert torch.equal(pack(unpack(flat, bits, qt.shape[-1]), bits), flat)
        _re_quantized_as_mx(qt, {k: to_torch(stored[f"{module}.{k}"]) for k in ("weight", "scales", "biases")}, got, g)


def _re_quantized_as_mx(qt, parts: dict[str, torch.Tensor], w0: torch.Tensor, g: torch.Generator) -> None:
    codec = qt.codec
    size = codec.group_size
    new = w0.clone().reshape(-1, size)
    moved = torch.arange(len(new)) % 3 == 0  # every third group changed a lot, the rest untouched
    new[moved] = new[moved] * 4 + torch.randn(int(moved.sum()), size, generator=g) * new[moved].std()
    before = [t.clone() for t in groups_of(parts, codec)]
    kept = {k: v.clone() for k, v in parts.items()}
    out, done = codec.requantize(qt, parts, w0, new.reshape(qt.shape))
    assert all(same_bytes(parts[k], kept[k]) for k in parts)  # the stored parts themselves left as they were
    assert {k: (v.dtype, v.shape) for k, v in out.items()} == {k: (v.dtype, v.shape) for k, v in parts.items()}
    assert done.blocks == len(new) and done.touched == int(moved.sum())
    after = groups_of(out, codec)
    for a, b in zip(before, after, strict=True):  # untouched groups: their codes, scale and bias as they were
        assert same_bytes(a[~moved], b[~moved])
    ref = [to_torch(t) for t in mx.quantize(to_mx(new.reshape(qt.shape).to(parts["scales"].dtype)), size, codec.bits)]
    theirs = groups_of(dict(zip(("weight", "scales", "biases"), ref, strict=True)), codec)
    fresh = (after[1] != before[1]) | (after[2] != before[2])  # groups given new parameters
    assert int(fresh.sum()) == done.rescaled > 0
    for ours, mine in zip(after, theirs, strict=True):
        assert same_bytes(ours[fresh], mine[fresh])  # codes, scales, biases: mx.quantize's own


# --- a model mlx-lm quantized ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FOLDERS))
def test_read_equals_mx_dequantize_of_mlx_lm_to_the_bit(folders, name):
    lib = mx_dequantized(folders[name])
    view, layout = plain_weights(open_checkpoint(folders[name]), read_config(folders[name]), role="base")
    assert layout is not None and set(layout.tensors) == set(lib)
    assert len(lib) == (15 if name.startswith("mixed") else 16)  # 14 linears, the embedding, lm_head unless left out
    assert sorted(view.names()) == sorted(open_checkpoint(FIX_BASE).names())  # the parts hidden, plain names
    for key, want in lib.items():
        got = view.read(key)
        assert got.dtype == torch.float32 and torch.equal(got, want), key


def test_inspect_names_the_format(folders):
    r = run_cli("inspect", folders["mixed-5bit-g32"])
    assert r.exit_code == 0, r.output
    assert "15 weights in MLX affine 5-bit (group 32), MLX affine 8-bit (group 128), read dequantized" in r.stdout
    doc = json.loads(run_cli("inspect", folders["4bit-g64-bf16"], "--json").stdout)
    assert doc["quantized"] == {"methods": ["MLX affine 4-bit (group 64)"], "weights": 16, "unsupported": None}


@pytest.mark.parametrize("name", ["4bit-g64-bf16", "8bit-g32-f32"])
def test_convert_to_float32_is_mx_dequantize(folders, name, tmp_path):
    r = run_cli("convert", folders[name], "--dtype", "float32", "-o", tmp_path / "f32")
    assert r.exit_code == 0, r.output
    got, lib = read_folder(tmp_path / "f32"), mx_dequantized(folders[name])
    assert set(got) == set(read_folder(FIX_BASE)) and all(torch.equal(got[k], v) for k, v in lib.items())
    assert "quantization_config" not in json.loads((tmp_path / "f32" / "config.json").read_text())


def test_merge_with_a_dtype_is_the_merge_of_the_dequantized_base(folders, tmp_path):
    from test_quantized import plain_folder

    q = folders["mixed-5bit-g32"]
    plain = plain_folder(q, tmp_path / "plain", mx_dequantized(q))  # float32 weights, mx.dequantize's values
    ls.merge(plain, [FIX_ADAPTER], tmp_path / "want", dtype="bfloat16")
    report = ls.merge(q, [FIX_ADAPTER], tmp_path / "got", dtype="bfloat16")
    want, got = read_folder(tmp_path / "want"), read_folder(tmp_path / "got")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert not report.requantized and "quantization_config" not in json.loads(
        (tmp_path / "got" / "config.json").read_text()
    )


def test_a_dequantized_result_loads_in_mlx_lm(folders, tmp_path):
    assert run_cli("convert", folders["mixed-5bit-g32"], "--dtype", "bfloat16", "-o", tmp_path / "bf16").exit_code == 0
    mlx_lm_utils.load_model(tmp_path / "bf16")


def _fresh_error(exact: torch.Tensor, dtype: torch.dtype, group_size: int, bits: int) -> float:
    """‖mx.quantize's own quantization of ``exact`` (in the model's dtype) − exact‖ / ‖exact‖."""
    back = mx.dequantize(*mx.quantize(to_mx(exact.to(dtype)), group_size, bits), group_size, bits, dtype=mx.float32)
    return float((to_torch(back) - exact).norm() / exact.norm())


@pytest.mark.parametrize(
    "name,weight", [("4bit-g64-bf16", 1.0), ("4bit-g64-bf16", 40.0), ("8bit-g32-f32", 1.0), ("mixed-5bit-g32", 10.0)]
)
def test_merge_keeps_the_format_and_mlx_lm_loads_it(folders, name, weight, tmp_path):
    q = folders[name]
    r = run_cli("merge", q, FIX_ADAPTER, "-o", tmp_path / "m", "--quantize", "keep", "--weight", weight)
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "m" / "requantization.json").read_text())["weights"]
    before, after = read_folder(q), read_folder(tmp_path / "m")
    assert {k: (v.dtype, v.shape) for k, v in after.items()} == {k: (v.dtype, v.shape) for k, v in before.items()}
    for k in before:  # what the adapter does not touch: byte for byte
        if "layernorm" in k or "embed" in k or "lm_head" in k or k == "model.norm.weight":
            assert torch.equal(before[k].view(torch.uint8), after[k].view(torch.uint8)), k
    base, stored = mx_dequantized(q), mx_dequantized(tmp_path / "m")  # mlx-lm's loader reads our result
    view, _ = plain_weights(open_checkpoint(tmp_path / "m"), read_config(tmp_path / "m"), role="merged")
    delta = adapter_delta(FIX_ADAPTER, weight)
    _, layout = plain_weights(open_checkpoint(q), read_config(q), role="base")
    assert layout is not None and {w["name"] for w in report} == set(delta)
    for w in report:
        key, qt = w["name"], layout.tensors[w["name"]]
        assert torch.equal(view.read(key), stored[key])
        exact = base[key] + delta[key]
        err = float((stored[key] - exact).norm() / exact.norm())
        assert math.isclose(w["error"], err, rel_tol=1e-3, abs_tol=1e-6), key
        # never further from the exact merge than the base was, and no worse than mx.quantize of the exact values
        assert float((stored[key] - exact).norm()) <= float(delta[key].norm()) * (1 + 1e-5), key
        dtype = before[f"{key.removesuffix('.weight')}.scales"].dtype
        assert err <= _fresh_error(exact, dtype, qt.codec.group_size, qt.codec.bits) * 1.02 + 1e-7, key
        if weight > 1:  # a change the format can hold: groups re-scaled, each as mx.quantize would
            assert w["blocks_rescaled"] > 0 and w["change_kept"] > 0.5, w
    model, _ = mlx_lm_utils.load_model(tmp_path / "m")  # strict: every tensor of every quantized module is there
    assert bool(mx.all(mx.isfinite(model(mx.array([[1, 2, 3, 4]])))))


def test_untouched_groups_keep_their_bytes(folders, tmp_path):
    """An adapter whose lora_B leaves rows 0-31 alone: those rows' codes, scales and biases stay as they were,
    k_proj and v_proj (32 rows) entirely; the groups that changed are mx.quantize's own or kept their scale."""
    adapter = zero_rows(FIX_ADAPTER, tmp_path / "adapter", 32)
    q = folders["4bit-g64-bf16"]
    ls.merge(q, [adapter], tmp_path / "m", weights=[40.0], quantize="keep")
    before, after = read_folder(q), read_folder(tmp_path / "m")
    delta = adapter_delta(adapter, 40.0)
    base = mx_dequantized(q)
    agree = rescaled = 0
    codec = MLXAffine(4, 64)
    for key in delta:
        module = key.removesuffix(".weight")
        parts = {k: before[f"{module}.{k}"] for k in ("weight", "scales", "biases")}
        out = {k: after[f"{module}.{k}"] for k in ("weight", "scales", "biases")}
        for k in parts:
            assert torch.equal(parts[k][:32].view(torch.uint8), out[k][:32].view(torch.uint8)), (key, k)
        exact = (base[key] + delta[key]).to(torch.bfloat16)
        ref = dict(
            zip(("weight", "scales", "biases"), (to_torch(t) for t in mx.quantize(to_mx(exact), 64, 4)), strict=True)
        )
        ours, theirs, old = groups_of(out, codec), groups_of(ref, codec), groups_of(parts, codec)
        new = (old[1] != ours[1]) | (old[2] != ours[2])  # groups given new parameters
        same = (ours[0] == theirs[0]).all(dim=1) & (ours[1] == theirs[1]) & (ours[2] == theirs[2])
        rescaled, agree = rescaled + int(new.sum()), agree + int(same[new].sum())
    assert rescaled > 0 and agree == rescaled  # every group given new parameters is mx.quantize's, bit for bit


# --- what is not read, refused by name ---------------------------------------------------------------------------
def _edited(src: Path, dst: Path, tensors=None, config=None) -> Path:
    """A copy of an MLX folder with some tensors changed (``tensors(dict of mx arrays)``, in place) or its
    config.json edited (``config(dict)``, in place)."""
    out = shutil.copytree(src, dst)
    if tensors is not None:
        t = mx.load(str(out / "model.safetensors"))
        tensors(t)
        mx.save_safetensors(str(out / "model.safetensors"), t, metadata={"format": "mlx"})
        index = json.loads((out / "model.safetensors.index.json").read_text())
        index["weight_map"] = {k: "model.safetensors" for k in t}
        (out / "model.safetensors.index.json").write_text(json.dumps(index))
    if config is not None:
        doc = json.loads((out / "config.json").read_text())
        config(doc)
        (out / "config.json").write_text(json.dumps(doc))
    return out


def _drop(d: dict, key: str) -> None:
    del d[key]


def _block(edit):
    """A config.json edit giving both copies of the quantization block (as mlx-lm writes them) ``edit(block)``."""

    def apply(doc: dict) -> None:
        doc["quantization"] = doc["quantization_config"] = edit(doc["quantization"])

    return apply


UNREAD = {
    # case: (tensors edit, config.json edit, phrases of the refusal)
    "scales of another shape": (
        lambda t: t.update({f"{Q}.scales": t[f"{Q}.scales"][:, :0]}),
        None,
        [Q, "do not fit together", "bits=4, group_size=64"],
    ),
    "biases missing": (lambda t: _drop(t, f"{Q}.biases"), None, [Q, "without biases"]),
    "an mxfp4 module": (
        None,
        _block(lambda b: {**b, Q: {"group_size": 32, "bits": 4, "mode": "mxfp4"}}),
        [Q, "MLX mxfp4 quantization", "not read"],
    ),
    "bits not a number": (None, _block(lambda b: {**b, Q: {"bits": "four"}}), [Q, "is not {group_size, bits, mode}"]),
    "bits 7": (None, _block(lambda b: {**b, Q: {"group_size": 64, "bits": 7}}), [Q, "bits=7", "not read"]),
    "bits that do not fit": (
        None,
        _block(lambda b: {**b, "bits": 8}),
        ["do not fit together", "bits=8, group_size=64"],
    ),
    "no bits in config.json": (
        None,
        _block(lambda b: {"mode": "affine"}),
        ["quantization block has no {bits, group_size}"],
    ),
    "a module config.json says is not quantized": (
        None,
        _block(lambda b: {**b, Q: False}),
        [Q, "config.json's quantization says it is not"],
    ),
}


def test_the_older_quantization_block_alone_is_read_as_well(folders, tmp_path):
    """mlx-lm before it copied its block to quantization_config ("support hf model tree #957"): config.json holds
    only ``quantization``, read the same (formats.detect.quant_config), and dropped from a plain result."""
    q = _edited(folders["mixed-5bit-g32"], tmp_path / "q", None, lambda doc: _drop(doc, "quantization_config"))
    for folder, out in ((folders["mixed-5bit-g32"], "new"), (q, "old")):
        assert run_cli("convert", folder, "--dtype", "float32", "-o", tmp_path / out).exit_code == 0
    new, old = read_folder(tmp_path / "new"), read_folder(tmp_path / "old")
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in new)
    assert "quantization" not in json.loads((tmp_path / "old" / "config.json").read_text())
    assert "mlx" in run_cli("inspect", q).stdout


@pytest.mark.parametrize("case", list(UNREAD))
def test_what_is_not_read_is_refused_in_one_line(folders, tmp_path, case):
    tensors, config, phrases = UNREAD[case]
    q = _edited(folders["4bit-g64-bf16"], tmp_path / "q", tensors, config)
    work = tmp_path / "out"
    work.mkdir()
    for args in (
        ["merge", q, FIX_ADAPTER, "-o", work / "m", "--quantize", "keep"],
        ["convert", q, "--dtype", "float32", "-o", work / "c"],
        ["diff", FIX_BASE, q],
    ):
        one_line_error(run_cli(*args), *phrases)
    assert listing(work) == set()
    text = run_cli("inspect", q)
    assert text.exit_code == 0 and "not readable" in text.stdout


def test_the_other_mlx_modes_are_not_claimed(tmp_path):
    """mxfp4/mxfp8/nvfp4 store no biases: nothing marks them as MLX, and config.json names no quant_method, so they
    meet the general refusal (and a module in such a mode inside an affine checkpoint is refused by name, above)."""
    model, config = mlx_lm_utils.load_model(FIX_BASE)
    model, qconfig = mlx_lm_utils.quantize_model(model, config, None, None, mode="mxfp4")
    mlx_lm_utils.save_model(tmp_path / "mxfp4", model)
    mlx_lm_utils.save_config(qconfig, config_path=tmp_path / "mxfp4" / "config.json")
    q = tmp_path / "mxfp4"
    assert not any(k.endswith(".biases") for k in load_file(q / "model.safetensors"))
    one_line_error(
        run_cli("convert", q, "--dtype", "float32", "-o", tmp_path / "c"), "does not read", "MLX affine (mlx-lm)"
    )


def test_the_registry_claims_mlx_by_its_biases():
    def name(qconfig, names):
        found = claiming(qconfig, names)
        return found and found.name

    assert name({"group_size": 64, "bits": 4}, ["x.weight", "x.scales", "x.biases"]) == "mlx"
    assert name({}, ["x.qweight", "x.qzeros", "x.scales"]) is None  # GPTQ's scales are not MLX's
