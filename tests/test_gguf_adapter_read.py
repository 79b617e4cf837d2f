"""A llama.cpp GGUF LoRA adapter read back (adapter.formats.gguf, convert.from_gguf) against its base model:
PEFT adapter -> ``convert --to gguf`` -> the reader -> a PEFT folder gives the same ΔW per module as the original
(A bit for bit, B the original's times the fold the writer applied), and merges the same; a GGUF written as
llama.cpp's convert_lora_to_gguf.py writes one (F16, Q8_0 with its F16 fallback, a passed-through norm, no scale
folded) reads as llama.cpp computes it; what cannot be read is refused in one line, by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FIX_ADAPTER, FIX_BASE
from reference import peft_model, read_folder
from safetensors.torch import load_file

import lorasurgeon as ls
from lorasurgeon.adapter.formats import gguf as gguf_format
from lorasurgeon.adapter.formats.registry import Probe
from lorasurgeon.adapter.weights import load_adapter
from lorasurgeon.commands._inputs import Output
from lorasurgeon.commands.convert.from_gguf import from_gguf
from lorasurgeon.commands.convert.gguf_adapter import to_gguf
from lorasurgeon.consumers.llama_cpp import LLAMA_CPP
from lorasurgeon.errors import IncompatibleError, InputNotFoundError, LorasurgeonError, UnsupportedError

gguf = pytest.importorskip("gguf")


def peft_deltas(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """Every module's ΔW as PEFT computes it from a saved adapter folder (float64)."""
    model, (name,) = peft_model(base, [adapter])
    out = {}
    for key, module in model.named_modules():
        if hasattr(module, "get_delta_weight") and (
            name in getattr(module, "lora_A", {}) or name in getattr(module, "lora_embedding_A", {})
        ):
            out[key.removeprefix("base_model.model.")] = module.get_delta_weight(name).detach().double()
    return out


def llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # convert_hf_to_gguf.py, LlamaModel.permute (HF rotate-half -> llama.cpp's interleaved RoPE rows)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tiny(tmp_path: Path, arch: str, seed: int = 1, **lora: object) -> tuple[Path, Path]:
    """A tiny base of ``arch`` and a PEFT adapter of it (random A and B)."""
    from architectures import ARCHS, build
    from peft import LoraConfig, get_peft_model

    build(ARCHS[arch]).save_pretrained(tmp_path / "base")
    torch.manual_seed(seed)
    config = LoraConfig(init_lora_weights=False, **lora)  # type: ignore[arg-type]
    get_peft_model(build(ARCHS[arch]), config).save_pretrained(tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


def round_trip(tmp_path: Path, base: Path, adapter: Path) -> Path:
    to_gguf(adapter, tmp_path / "a.gguf", base=base)
    report = from_gguf(tmp_path / "a.gguf", base, Output(tmp_path / "back"))
    assert report.output == str(tmp_path / "back") and "PEFT adapter" in report.summary()
    return tmp_path / "back"


def relative(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest difference relative to the largest |want|."""
    return float((got - want).abs().max() / want.abs().max())


def assert_same_deltas(base: Path, want_adapter: Path, got_adapter: Path, rtol: float = 1e-6) -> float:
    """PEFT's ΔW of both folders, module by module; returns the largest difference relative to the largest |ΔW|."""
    want, got = peft_deltas(base, want_adapter), peft_deltas(base, got_adapter)
    assert set(got) == set(want) and want
    worst = 0.0
    for name, d in want.items():
        err = relative(got[name], d)
        assert err <= rtol, (name, err)
        worst = max(worst, err)
    return worst


@pytest.mark.parametrize("edit", [{}, {"use_rslora": True, "alpha_pattern": {"down_proj": 4}}])
def test_the_fixture_round_trip_keeps_a_and_b_and_every_delta(tmp_path, edit):
    adapter = shutil.copytree(FIX_ADAPTER, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text()) | edit
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    back = round_trip(tmp_path, FIX_BASE, adapter)
    orig, got = load_file(adapter / "adapter_model.safetensors"), load_file(back / "adapter_model.safetensors")
    assert set(got) == set(orig)
    loaded = load_adapter(adapter)
    alpha = float(config["lora_alpha"])
    for module in loaded.modules.values():
        a, b = (f"base_model.model.{module.name}.lora_{x}.weight" for x in "AB")
        assert torch.equal(got[a], orig[a].float()), a  # A: bit for bit (q/k's permutation was on B's rows)
        fold = LLAMA_CPP.fold(module.scale, module.rank, alpha)
        assert torch.equal(got[b], orig[b].float() * fold), b  # B: the writer's fold, bit for bit
        torch.testing.assert_close(got[b] / fold, orig[b].float(), rtol=2e-7, atol=0)
    loaded.close()
    back_config = json.loads((back / "adapter_config.json").read_text())
    assert back_config["lora_alpha"] == alpha and back_config["r"] == 8 and not back_config["use_rslora"]
    assert_same_deltas(FIX_BASE, adapter, back)


def test_merging_the_round_trip_is_merging_the_original(tmp_path):
    back = round_trip(tmp_path, FIX_BASE, FIX_ADAPTER)
    for dtype in ("auto", "float32"):
        ls.merge(FIX_BASE, FIX_ADAPTER, tmp_path / f"want-{dtype}", dtype=dtype)
        ls.merge(FIX_BASE, back, tmp_path / f"got-{dtype}", dtype=dtype)
        want, got = read_folder(tmp_path / f"want-{dtype}"), read_folder(tmp_path / f"got-{dtype}")
        assert set(want) == set(got)
        for name, w in want.items():
            diff = (got[name].double() - w.double()).abs().max().item()
            # float32: ΔW's last bits (B carries alpha / r folded in, then unfolded by PEFT's scale); bf16: one
            # rounding of those, at most one bf16 step where a value sits on a rounding boundary
            limit = 1e-6 if dtype == "float32" else 2.0**-7 * w.double().abs().max().item()
            assert diff <= limit, (dtype, name, diff)


@pytest.mark.parametrize(
    ("arch", "targets", "lora"),
    [
        ("llama", "all-linear", {"rank_pattern": {"down_proj": 2}}),  # q/k permuted; two ranks
        ("mistral", ["q_proj", "k_proj", "embed_tokens"], {}),  # permuted, the embedding's A transposed
        ("qwen2", ["q_proj", "v_proj", "embed_tokens", "lm_head"], {"use_rslora": True}),  # rows kept
        ("phi3", "all-linear", {}),  # fused qkv_proj / gate_up_proj: attn_qkv / ffn_up
        ("gpt2", "all-linear", {}),  # Conv1D (fan_in_fan_out)
    ],
)
def test_tiny_models_round_trip_with_peft_s_own_deltas(tmp_path, arch, targets, lora):
    base, adapter = tiny(tmp_path, arch, r=4, lora_alpha=8, target_modules=targets, **lora)
    back = round_trip(tmp_path, base, adapter)
    assert_same_deltas(base, adapter, back)
    config = json.loads((back / "adapter_config.json").read_text())
    if arch == "llama":
        assert config["r"] == 4 and set(config["rank_pattern"].values()) == {2}
        assert all(k.endswith("mlp.down_proj") for k in config["rank_pattern"])
    assert config["fan_in_fan_out"] == (arch == "gpt2")


def llama_cpp_gguf(adapter: Path, base: Path, out: Path, outtype: str, *, norm: bool = False) -> None:
    """A .gguf as llama.cpp's convert_lora_to_gguf.py writes one for a Llama base, restated with gguf's
    GGUFWriter: names by TensorNameMap, B's q/k rows by LlamaModel.permute, token_embd's A transposed, lora_alpha
    as the file's alpha and nothing folded into B (rsLoRA and patterns are ignored by it), each tensor in
    --outtype (convert_hf_to_gguf.py prepare_tensors: Q8_0 falls back to F16 on a row not a whole block),
    general.name and general.file_type as its metadata; mergekit's norms passed through in F32."""
    t = load_file(adapter / "adapter_model.safetensors")
    lora_alpha = json.loads((adapter / "adapter_config.json").read_text())["lora_alpha"]
    config = json.loads((base / "config.json").read_text())
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    qtype = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[outtype]
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora_alpha))
    writer.add_name("imitation of convert_lora_to_gguf.py")
    writer.add_file_type({"f32": 0, "f16": 1, "q8_0": 7}[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key in sorted(k for k in t if ".lora_A." in k or ".lora_embedding_A" in k):
        hf = key.removeprefix("base_model.model.").split(".lora_")[0]
        a, b = t[key].float(), t[key.replace("_A", "_B")].float()
        if hf.endswith(("q_proj", "k_proj")):
            b = llama_permute(b, config["num_attention_heads" if hf.endswith("q_proj") else "num_key_value_heads"])
        name = tmap.get_name(f"{hf}.weight", try_suffixes=(".weight",))
        if name.startswith("token_embd"):
            a = a.t()
        for suffix, data in ((".lora_a", a), (".lora_b", b)):
            kind = getattr(gguf.GGMLQuantizationType, qtype)
            try:
                raw = gguf.quants.quantize(data.contiguous().numpy(), kind)
            except gguf.QuantError:
                kind = gguf.GGMLQuantizationType.F16
                raw = gguf.quants.quantize(data.contiguous().numpy(), kind)
            writer.add_tensor(name + suffix, raw, raw_dtype=kind)
    if norm:
        writer.add_tensor("blk.0.attn_norm.weight", np.ones(config["hidden_size"], np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def file_deltas(path: Path, config: dict) -> dict[str, torch.Tensor]:
    """What llama.cpp computes from the file (alpha / rank(B) · B·A; alpha 0: B·A), each tensor dequantized by
    gguf's reader and gguf.quants, then put in HF's layout (q/k rows back, token_embd's transposed)."""
    reader = gguf.GGUFReader(str(path))
    alpha = float(reader.fields["adapter.lora.alpha"].parts[-1][0])
    tensors = {
        t.name: torch.from_numpy(
            gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist()))).copy()
        ).double()
        for t in reader.tensors
    }
    out = {}
    for name in [n for n in tensors if n.endswith(".lora_a")]:
        target = name.removesuffix(".lora_a")
        a, b = tensors[name], tensors[f"{target}.lora_b"]
        if target.startswith("token_embd"):
            a = a.t()
        d = (alpha / b.shape[1] if alpha else 1.0) * (b @ a)
        for proj, heads in (("attn_q", "num_attention_heads"), ("attn_k", "num_key_value_heads")):
            if f".{proj}." in target:
                n = config[heads]
                d = d.reshape(n, d.shape[0] // n // 2, 2, -1).swapaxes(1, 2).reshape(d.shape)
        out[target] = d.t() if target.startswith("token_embd") else d
    return out


GGUF_OF = {"model.embed_tokens": "token_embd.weight", "lm_head": "output.weight"}


def gguf_name_of(module: str) -> str:
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    return GGUF_OF.get(module) or tmap.get_name(f"{module}.weight", try_suffixes=(".weight",))


@pytest.mark.parametrize(("outtype", "rtol"), [("f32", 1e-6), ("f16", 2e-3), ("q8_0", 2e-2)])
def test_a_file_as_llama_cpp_s_converter_writes_it_reads_as_llama_cpp_computes(tmp_path, outtype, rtol):
    base, adapter = tiny(
        tmp_path, "llama", r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "down_proj", "embed_tokens"]
    )
    llama_cpp_gguf(adapter, base, tmp_path / "l.gguf", outtype, norm=True)
    report = from_gguf(tmp_path / "l.gguf", base, Output(tmp_path / "back"))
    assert report.modules == 7 and report.alpha == 16
    got = peft_deltas(base, tmp_path / "back")
    truth = file_deltas(tmp_path / "l.gguf", json.loads((base / "config.json").read_text()))
    assert {gguf_name_of(m) for m in got} == set(truth)
    for module, d in got.items():  # llama.cpp's own ΔW of the file (float64): PEFT's float32 rounding only
        assert relative(d, truth[gguf_name_of(module)]) <= 1e-6, module
    want = peft_deltas(base, adapter)  # and PEFT's of the original: within the file's own rounding
    for module, d in want.items():
        assert relative(got[module], d) <= rtol, module
    q8 = gguf.GGUFReader(str(tmp_path / "l.gguf"))
    types = {t.name: t.tensor_type.name for t in q8.tensors}
    if outtype == "q8_0":  # A rows of 64 are whole Q8_0 blocks; B's rows of r=8 and token_embd's A are not: F16
        assert types["blk.0.attn_q.weight.lora_a"] == "Q8_0" and types["blk.0.attn_q.weight.lora_b"] == "F16"


def test_quantized_and_plain_tensors_are_views_of_the_file_read_only_when_asked(tmp_path):
    base, adapter = tiny(tmp_path, "llama", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    llama_cpp_gguf(adapter, base, tmp_path / "l.gguf", "q8_0")
    read = gguf_format.read_gguf_adapter(tmp_path / "l.gguf", base)
    try:
        assert read.format == "gguf" and len(read.modules) == 4 and read.checkpoint.format == "gguf"
        infos = {k: read.checkpoint.info(k) for k in read.checkpoint}
        v_a = infos["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"]
        v_b = infos["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]
        q_b = infos["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
        assert v_a.decoded is not None and v_a.dtype_name == "F32"  # Q8_0: dequantized when read
        assert v_b.decoded is None and v_b.offset is not None and v_b.dtype_name == "F16"  # read where it lies
        assert q_b.decoded is not None and q_b.dtype_name == "F16"  # rows put back when read, dtype kept
        reader = gguf.GGUFReader(str(tmp_path / "l.gguf"))
        raw = {t.name: t for t in reader.tensors}
        t = raw["blk.0.attn_v.weight.lora_a"]
        want = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        assert torch.equal(read.checkpoint.read(v_a.name), want)  # gguf's own dequantization
        assert torch.equal(
            read.checkpoint.read(v_b.name), torch.from_numpy(raw["blk.0.attn_v.weight.lora_b"].data.copy())
        )
    finally:
        read.close()


def test_an_alpha_of_zero_is_b_times_a_as_llama_cpp_reads_it(tmp_path):
    base, adapter = tiny(tmp_path, "qwen2", r=4, lora_alpha=8, target_modules=["q_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text()) | {"lora_alpha": 0}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    t = load_file(adapter / "adapter_model.safetensors")
    writer = gguf.GGUFWriter(str(tmp_path / "z.gguf"), "qwen2")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)
    key = "base_model.model.model.layers.1.self_attn.q_proj"
    writer.add_tensor("blk.1.attn_q.weight.lora_a", t[f"{key}.lora_A.weight"].numpy())
    writer.add_tensor("blk.1.attn_q.weight.lora_b", t[f"{key}.lora_B.weight"].numpy())
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        step()
    from_gguf(tmp_path / "z.gguf", base, Output(tmp_path / "back"))
    got = peft_deltas(base, tmp_path / "back")
    want = t[f"{key}.lora_B.weight"].double() @ t[f"{key}.lora_A.weight"].double()
    assert list(got) == ["model.layers.1.self_attn.q_proj"]
    assert relative(got["model.layers.1.self_attn.q_proj"], want) <= 1e-6
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] == 4 and config["target_modules"] == ["model.layers.1.self_attn.q_proj"]


def one_line(exc: pytest.ExceptionInfo[LorasurgeonError], *phrases: str) -> None:
    """One line naming every phrase, as the CLI will print it (its flags: --base, not Python's base=)."""
    message = exc.value.args[0]
    assert "\n" not in str(exc.value) and "\n" not in message, message
    for phrase in phrases:
        assert phrase in message, message


def plain_gguf(path: Path, kind: str | None, tensors: dict[str, np.ndarray], **kv: str) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    if kind is not None:
        writer.add_string("general.type", kind)
    for key, value in kv.items():
        writer.add_string(key.replace("_", "."), value)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 16.0)
    for name, data in tensors.items():
        writer.add_tensor(name, data)
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        step()
    return path


def test_what_cannot_be_read_is_refused_in_one_line_by_name(tmp_path):
    pair = {
        "blk.0.attn_v.weight.lora_a": np.zeros((8, 64), np.float32),
        "blk.0.attn_v.weight.lora_b": np.zeros((32, 8), np.float32),
    }
    model = plain_gguf(tmp_path / "model.gguf", "model", {"blk.0.attn_v.weight": np.zeros((32, 64), np.float32)})
    with pytest.raises(UnsupportedError) as e:
        from_gguf(model, FIX_BASE, Output(tmp_path / "out"))
    one_line(e, "model.gguf", "not a LoRA adapter")
    cv = plain_gguf(tmp_path / "cv.gguf", "adapter", {}, adapter_type="control_vector")
    with pytest.raises(UnsupportedError) as e:
        gguf_format.read_gguf_adapter(cv, FIX_BASE)
    one_line(e, "control_vector adapter")
    half = plain_gguf(tmp_path / "half.gguf", "adapter", dict(list(pair.items())[:1]), adapter_type="lora")
    with pytest.raises(LorasurgeonError) as e:
        gguf_format.read_gguf_adapter(half, FIX_BASE)
    one_line(e, "blk.0.attn_v.weight", "without its other half")
    odd = plain_gguf(
        tmp_path / "odd.gguf",
        "adapter",
        pair | {"blk.0.attn_v.weight.lora_c": np.zeros(3, np.float32)},
        adapter_type="lora",
    )
    with pytest.raises(UnsupportedError) as e:
        gguf_format.read_gguf_adapter(odd, FIX_BASE)
    one_line(e, "lora_c")
    wrong = {
        k: np.zeros((v.shape[0], v.shape[1] * 2) if k.endswith("_a") else v.shape, np.float32) for k, v in pair.items()
    }
    bad = plain_gguf(tmp_path / "bad.gguf", "adapter", wrong, adapter_type="lora")
    with pytest.raises(IncompatibleError) as e:
        gguf_format.read_gguf_adapter(bad, FIX_BASE)
    one_line(e, "blk.0.attn_v.weight", "do not fit", "[32, 64]")
    stray = plain_gguf(
        tmp_path / "stray.gguf",
        "adapter",
        {k.replace("blk.0", "blk.7"): v for k, v in pair.items()},
        adapter_type="lora",
    )
    with pytest.raises(IncompatibleError) as e:
        gguf_format.read_gguf_adapter(stray, FIX_BASE)
    one_line(e, "blk.7.attn_v.weight", "no weight of the base")
    assert not (tmp_path / "out").exists()


def test_a_base_of_another_architecture_or_none_is_refused_in_one_line(tmp_path):
    to_gguf(FIX_ADAPTER, tmp_path / "a.gguf", base=FIX_BASE)
    other, _ = tiny(tmp_path, "qwen2", r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(IncompatibleError) as e:
        from_gguf(tmp_path / "a.gguf", other, Output(tmp_path / "out"))
    one_line(e, "'llama'", "Qwen2ForCausalLM", "--base")
    with pytest.raises(InputNotFoundError) as e:
        from_gguf(tmp_path / "a.gguf", tmp_path / "nowhere", Output(tmp_path / "out"))
    one_line(e, "nowhere")
    weights_only = tmp_path / "weights"
    weights_only.mkdir()
    shutil.copy(FIX_BASE / "model.safetensors", weights_only)
    with pytest.raises(InputNotFoundError) as e:
        from_gguf(tmp_path / "a.gguf", weights_only, Output(tmp_path / "out"))
    one_line(e, "weights", "config.json", "--base BASE")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputNotFoundError) as e:
        gguf_format.read_gguf_adapter(tmp_path / "a.gguf", tmp_path / "empty")
    one_line(e, "config.json", "--base BASE")
    with pytest.raises(UnsupportedError) as e:
        gguf_format.FORMAT.read(tmp_path / "a.gguf")
    one_line(e, "a.gguf", "--base BASE")
    bloom = tmp_path / "bloom"
    shutil.copytree(FIX_BASE, bloom)
    (bloom / "config.json").write_text(
        json.dumps(json.loads((FIX_BASE / "config.json").read_text()) | {"architectures": ["BloomForCausalLM"]})
    )
    with pytest.raises(UnsupportedError) as e:
        gguf_format.read_gguf_adapter(tmp_path / "a.gguf", bloom)
    one_line(e, "BloomForCausalLM")
    assert not (tmp_path / "out").exists()


def test_claims_a_gguf_lora_adapter_by_its_headers_only(tmp_path):
    import subprocess
    import sys

    to_gguf(FIX_ADAPTER, tmp_path / "a.gguf", base=FIX_BASE)
    plain_gguf(tmp_path / "m.gguf", "model", {"x.weight": np.zeros((2, 2), np.float32)})
    (tmp_path / "junk.gguf").write_bytes(b"GGUF\0\0")
    assert gguf_format.claims(Probe(tmp_path / "a.gguf"))
    assert not gguf_format.claims(Probe(tmp_path / "m.gguf"))
    assert not gguf_format.claims(Probe(tmp_path / "junk.gguf"))
    assert not gguf_format.claims(Probe(FIX_ADAPTER)) and not gguf_format.claims(Probe(FIX_BASE))
    code = (
        "import sys; from pathlib import Path; from lorasurgeon.adapter.formats import gguf as g; "
        "from lorasurgeon.adapter.formats.registry import Probe; "
        f"assert g.claims(Probe(Path({str(tmp_path / 'a.gguf')!r}))); assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_dry_run_writes_nothing_and_an_earlier_result_is_kept_without_overwrite(tmp_path):
    from lorasurgeon.errors import OutputExistsError

    to_gguf(FIX_ADAPTER, tmp_path / "a.gguf", base=FIX_BASE)
    report = from_gguf(tmp_path / "a.gguf", FIX_BASE, Output(None, dry_run=True))
    assert report.dry_run and report.summary().startswith("Would write 14 modules (r=8, alpha 16)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf"]
    from_gguf(tmp_path / "a.gguf", FIX_BASE, Output(tmp_path / "back"))
    with pytest.raises(OutputExistsError) as e:
        from_gguf(tmp_path / "a.gguf", FIX_BASE, Output(tmp_path / "back"))
    one_line(e, "--overwrite")
    again = from_gguf(tmp_path / "a.gguf", FIX_BASE, Output(tmp_path / "back", overwrite=True))
    assert again.tensors == 28 and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
