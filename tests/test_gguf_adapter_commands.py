"""resize, combine and check take a llama.cpp .gguf adapter with --base BASE, the model it is read against: the
result of resize and combine is the PEFT adapter that resizing or combining the PEFT adapter the .gguf was made
from gives, tensor for tensor; check says what llama.cpp's loader requires of its own file, and that vLLM reads
PEFT's. A .gguf adapter without --base, a --base no .gguf adapter needs, a --base that is not a model and a base
the pairs do not fit are refused in one line, before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import FIX_ADAPTER, FIX_BASE, one_line_error, run_cli
from safetensors.torch import load_file

import lorasurgeon as ls
from lorasurgeon.errors import IncompatibleError, InvalidOptionError

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def gguf_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fixtures/adapter as llama.cpp's GGUF adapter of fixtures/base (convert --to gguf)."""
    path = tmp_path_factory.mktemp("gguf") / "a.gguf"
    ls.to_gguf(FIX_ADAPTER, path, base=FIX_BASE)
    return path


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def assert_same_tensors(got: Path, want: Path) -> None:
    """Every tensor of both adapter folders equal, bit for bit, under the same names."""
    a, b = tensors(got), tensors(want)
    assert set(a) == set(b) and a
    for name, t in b.items():
        assert a[name].dtype == t.dtype and torch.equal(a[name], t), name


# --- resize and combine: what the PEFT adapter it came from gives --------------------------------------------


@pytest.mark.parametrize("sizing", [["--rank", "2"], ["--energy", "0.9"], ["--budget-params", "6000"]])
def test_resize_of_a_gguf_adapter_is_resize_of_its_peft_adapter(tmp_path, gguf_adapter, sizing):
    got = run_cli("resize", gguf_adapter, "--base", FIX_BASE, *sizing, "-o", tmp_path / "g")
    assert got.exit_code == 0, got.output
    want = run_cli("resize", FIX_ADAPTER, *sizing, "-o", tmp_path / "p")
    assert want.exit_code == 0, want.output
    assert_same_tensors(tmp_path / "g", tmp_path / "p")
    config = json.loads((tmp_path / "g" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"]
    card = (tmp_path / "g" / "README.md").read_text()
    assert f"--base={FIX_BASE}" in card  # the card's command runs again as it is


def test_resize_keyword_function_takes_base(tmp_path, gguf_adapter):
    report = ls.resize(gguf_adapter, tmp_path / "g", rank=3, base=FIX_BASE)
    assert report.inputs == [str(gguf_adapter)] and {m.rank for m in report.modules} == {3}
    ls.resize(FIX_ADAPTER, tmp_path / "p", rank=3)
    assert_same_tensors(tmp_path / "g", tmp_path / "p")


def test_resize_dry_run_of_a_gguf_adapter(tmp_path, gguf_adapter):
    got = run_cli("resize", gguf_adapter, "--base", FIX_BASE, "--rank", "2", "--dry-run", "-o", tmp_path / "g")
    assert got.exit_code == 0, got.output
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("sizing", [[], ["--rank", "4"]])
def test_combine_with_a_gguf_adapter_is_combine_of_its_peft_adapter(tmp_path, gguf_adapter, sizing):
    weights = ["--weight", "1", "--weight", "0.5"]
    got = run_cli("combine", gguf_adapter, FIX_ADAPTER, "--base", FIX_BASE, *weights, *sizing, "-o", tmp_path / "g")
    assert got.exit_code == 0, got.output
    want = run_cli("combine", FIX_ADAPTER, FIX_ADAPTER, *weights, *sizing, "-o", tmp_path / "p")
    assert want.exit_code == 0, want.output
    assert_same_tensors(tmp_path / "g", tmp_path / "p")


def test_combine_of_two_gguf_adapters_reads_both_against_the_one_base(tmp_path, gguf_adapter):
    report = ls.combine([gguf_adapter, gguf_adapter], tmp_path / "g", rank=5, base=FIX_BASE)
    assert report.inputs == [str(gguf_adapter)] * 2
    ls.combine([FIX_ADAPTER, FIX_ADAPTER], tmp_path / "p", rank=5)
    assert_same_tensors(tmp_path / "g", tmp_path / "p")


# --- refusals ------------------------------------------------------------------------------------------------

NO_BASE = "give --base BASE, the model it was made for"
UNUSED = "only a llama.cpp .gguf adapter is read against a base model, and no ADAPTER given is one: leave --base out"


@pytest.mark.parametrize(
    "command",
    [["resize", "{g}", "--rank", "2"], ["combine", "{g}", "{p}"], ["combine", "{p}", "{g}", "--rank", "2"]],
)
def test_a_gguf_adapter_without_base_is_refused(tmp_path, gguf_adapter, command):
    args = [str(a).format(g=gguf_adapter, p=FIX_ADAPTER) for a in command]
    one_line_error(run_cli(*args, "-o", tmp_path / "out"), f"{gguf_adapter}: a llama.cpp .gguf adapter", NO_BASE)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("consumer", ["vllm", "llama.cpp"])
def test_check_of_a_gguf_adapter_without_base_is_refused(gguf_adapter, consumer):
    one_line_error(run_cli("check", gguf_adapter, "--for", consumer), NO_BASE)


@pytest.mark.parametrize(
    "command",
    [["resize", "--rank", "2", "-o", "{out}"], ["combine", "{p}", "-o", "{out}"], ["check", "--for", "vllm"]],
)
def test_base_without_a_gguf_adapter_is_refused(tmp_path, command):
    args = [command[0], FIX_ADAPTER, *(str(a).format(p=FIX_ADAPTER, out=tmp_path / "out") for a in command[1:])]
    one_line_error(run_cli(*args, "--base", FIX_BASE), f"--base {FIX_BASE}: {UNUSED}")
    assert not (tmp_path / "out").exists()


def test_keyword_functions_refuse_an_unused_base(tmp_path):
    with pytest.raises(InvalidOptionError, match="leave base out"):
        ls.resize(FIX_ADAPTER, tmp_path / "r", rank=2, base=FIX_BASE)
    with pytest.raises(InvalidOptionError, match="leave base out"):
        ls.combine([FIX_ADAPTER, FIX_ADAPTER], tmp_path / "c", base=FIX_BASE)
    with pytest.raises(InvalidOptionError, match="leave base out"):
        ls.check(FIX_ADAPTER, consumer="vllm", base=FIX_BASE)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("command", [["resize", "--rank", "2", "-o", "{out}"], ["check", "--for", "llama.cpp"]])
def test_a_base_that_is_an_adapter_is_refused_by_kind(tmp_path, gguf_adapter, command):
    args = [command[0], gguf_adapter, *(str(a).format(out=tmp_path / "out") for a in command[1:])]
    one_line_error(run_cli(*args, "--base", FIX_ADAPTER), f"{FIX_ADAPTER}: --base is an adapter, not a model")
    assert not (tmp_path / "out").exists()


def test_a_base_that_does_not_exist_is_refused(tmp_path, gguf_adapter):
    got = run_cli("resize", gguf_adapter, "--base", tmp_path / "nope", "--rank", "2", "-o", tmp_path / "out")
    one_line_error(got, f"{tmp_path / 'nope'}: no such file or folder")


@pytest.fixture(scope="module")
def other_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama base like fixtures/base but narrower: the adapter's pairs do not fit its weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((FIX_BASE / "config.json").read_text())
    config.update(hidden_size=32, intermediate_size=96)
    folder = tmp_path_factory.mktemp("narrow") / "base"
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "command", [["resize", "--rank", "2", "-o", "{out}"], ["combine", "{g}", "-o", "{out}"], ["check", "--for", "vllm"]]
)
def test_a_base_of_other_shapes_is_refused(tmp_path, gguf_adapter, other_shapes, command):
    args = [command[0], gguf_adapter, *(str(a).format(g=gguf_adapter, out=tmp_path / "out") for a in command[1:])]
    one_line_error(run_cli(*args, "--base", other_shapes), "do not fit the base's weight")
    assert not (tmp_path / "out").exists()
    with pytest.raises(IncompatibleError, match="do not fit the base's weight"):
        ls.check(gguf_adapter, consumer="llama.cpp", base=other_shapes)


def test_a_base_of_another_architecture_is_refused(tmp_path, gguf_adapter):
    from architectures import ARCHS, build

    build(ARCHS["qwen2"]).save_pretrained(tmp_path / "qwen2")
    got = run_cli("resize", gguf_adapter, "--base", tmp_path / "qwen2", "--rank", "2", "-o", tmp_path / "out")
    one_line_error(got, "an adapter for llama.cpp's 'llama'", "give --base the model it was made for")
    assert not (tmp_path / "out").exists()


# --- check: the verdicts -------------------------------------------------------------------------------------


def test_check_for_llama_cpp_of_its_own_gguf_file_passes_its_loaders_rules(gguf_adapter):
    got = run_cli("check", gguf_adapter, "--base", FIX_BASE, "--for", "llama.cpp", "--json")
    assert got.exit_code == 0, got.output
    report = json.loads(got.stdout)
    assert report["ok"] and [p["rule"] for p in report["problems"]] == ["gguf"]
    (note,) = report["problems"]
    assert note["severity"] == "note" and "14 .lora_a/.lora_b pairs" in note["message"]
    assert "general.type adapter, adapter.type lora, adapter.lora.alpha" in note["message"]
    text = run_cli("check", gguf_adapter, "--base", FIX_BASE, "--for", "llama.cpp")
    assert text.exit_code == 0 and text.stdout.startswith(f"{gguf_adapter} for llama.cpp: loads")


def test_check_for_llama_cpp_of_a_peft_adapter_has_no_gguf_note():
    report = ls.check(FIX_ADAPTER, consumer="llama.cpp")
    assert report.exit_code == 0 and [p.rule for p in report.problems] == []


def test_check_for_vllm_of_a_gguf_adapter_says_to_convert_it_with_its_base(gguf_adapter):
    got = run_cli("check", gguf_adapter, "--base", FIX_BASE, "--for", "vllm", "--json")
    assert got.exit_code == 1, got.output  # a verdict, not an error
    report = json.loads(got.stdout)
    assert not report["ok"] and report["max_lora_rank"] is None
    (problem,) = report["problems"]
    assert problem["rule"] == "format" and problem["severity"] == "error"
    assert problem["message"].startswith("an adapter in gguf's format: it reads PEFT's")
    assert "`lorasurgeon convert ADAPTER --to peft --base BASE -o PEFT_ADAPTER`" in problem["message"]


def test_check_for_vllm_of_the_gguf_adapter_converted_back_loads(tmp_path, gguf_adapter):
    """The command the verdict names gives what vLLM loads."""
    converted = run_cli("convert", gguf_adapter, "--to", "peft", "--base", FIX_BASE, "-o", tmp_path / "peft")
    assert converted.exit_code == 0, converted.output
    got = run_cli("check", tmp_path / "peft", "--for", "vllm")
    assert got.exit_code == 0, got.output


def test_check_for_vllm_of_an_mlx_adapter_names_no_base(tmp_path):
    converted = run_cli("convert", FIX_ADAPTER, "--to", "mlx", "-o", tmp_path / "m")
    assert converted.exit_code == 0, converted.output
    got = run_cli("check", tmp_path / "m", "--for", "vllm")
    assert got.exit_code == 1
    assert "`lorasurgeon convert ADAPTER --to peft -o PEFT_ADAPTER` rewrites it, exactly" in got.stdout


def test_help_names_base():
    for command in ("resize", "combine", "check"):
        got = run_cli(command, "--help")
        assert got.exit_code == 0 and "--base BASE" in got.stdout and ".gguf adapter" in got.stdout


def test_keyword_functions_refuse_a_gguf_adapter_without_base(tmp_path, gguf_adapter):
    with pytest.raises(InvalidOptionError, match="give base=BASE, the model it was made for"):
        ls.resize(gguf_adapter, tmp_path / "r", rank=2)
    with pytest.raises(InvalidOptionError, match="give base=BASE, the model it was made for"):
        ls.check(gguf_adapter, consumer="llama.cpp")
    assert not list(tmp_path.iterdir())


def alpha_zero_gguf(path: Path) -> Path:
    """A .gguf of fixtures/base with adapter.lora.alpha 0 (llama.cpp: B·A unscaled) and two ranks, 2 and 3."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)
    g = torch.Generator().manual_seed(0)
    for name, rank, (out, into) in (("blk.0.attn_v.weight", 2, (32, 64)), ("blk.1.attn_output.weight", 3, (64, 64))):
        writer.add_tensor(f"{name}.lora_a", torch.randn(rank, into, generator=g).numpy())
        writer.add_tensor(f"{name}.lora_b", torch.randn(out, rank, generator=g).numpy())
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        step()
    return path


def test_check_for_llama_cpp_of_a_gguf_with_alpha_zero_and_two_ranks_asks_no_fix(tmp_path):
    """Its modules' scales differ as read (B·A each), which for a PEFT adapter would need one alpha folded in: the
    file already is what llama.cpp computes, so no alpha fix is asked."""
    report = ls.check(alpha_zero_gguf(tmp_path / "z.gguf"), consumer="llama.cpp", base=FIX_BASE)
    assert report.exit_code == 0 and [p.rule for p in report.problems] == ["gguf"]
    assert "2 .lora_a/.lora_b pairs" in report.problems[0].message


# --- convert: --to lora and --to mlx read it against --base, as --to peft does ------------------------------------


def test_convert_to_lora_of_a_gguf_adapter_is_that_of_its_peft_adapter(tmp_path, gguf_adapter):
    got = run_cli("convert", gguf_adapter, "--to", "lora", "--base", FIX_BASE, "--rank", "4", "-o", tmp_path / "g")
    assert got.exit_code == 0, got.output
    want = run_cli("convert", FIX_ADAPTER, "--to", "lora", "--base", FIX_BASE, "--rank", "4", "-o", tmp_path / "p")
    assert want.exit_code == 0, want.output
    a, b = tensors(tmp_path / "g"), tensors(tmp_path / "p")
    assert set(a) == set(b) and a
    for name, t in b.items():  # the same change, factored again: equal up to float32 rounding
        assert torch.allclose(a[name].float(), t.float(), atol=1e-5), name


def test_convert_to_mlx_of_a_gguf_adapter_is_that_of_its_peft_adapter(tmp_path, gguf_adapter):
    got = run_cli("convert", gguf_adapter, "--to", "mlx", "--base", FIX_BASE, "-o", tmp_path / "g")
    assert got.exit_code == 0, got.output
    back = run_cli("convert", FIX_ADAPTER, "--to", "peft", "-o", tmp_path / "peft")  # PEFT's, as the .gguf holds it
    assert back.exit_code == 0, back.output
    from_gguf = run_cli("convert", gguf_adapter, "--to", "peft", "--base", FIX_BASE, "-o", tmp_path / "gp")
    assert from_gguf.exit_code == 0, from_gguf.output
    want = run_cli("convert", tmp_path / "gp", "--to", "mlx", "-o", tmp_path / "p")
    assert want.exit_code == 0, want.output
    assert_same_tensors_named(tmp_path / "g" / "adapters.safetensors", tmp_path / "p" / "adapters.safetensors")


def assert_same_tensors_named(got: Path, want: Path) -> None:
    a, b = load_file(got), load_file(want)
    assert set(a) == set(b) and a
    for name, t in b.items():
        assert torch.equal(a[name], t), name


@pytest.mark.parametrize("to", ["mlx", "peft", "lora"])
def test_convert_of_a_gguf_adapter_without_base_names_base(tmp_path, gguf_adapter, to):
    sizing = ["--rank", "2"] if to == "lora" else []
    got = run_cli("convert", gguf_adapter, "--to", to, *sizing, "-o", tmp_path / "o")
    assert got.exit_code == 2 and "needs --base BASE" in got.stderr, got.output  # click's usage error
    assert "Traceback" not in got.stderr and not (tmp_path / "o").exists()


def test_convert_of_a_gguf_adapter_to_gguf_is_refused(tmp_path, gguf_adapter):
    got = run_cli("convert", gguf_adapter, "--to", "gguf", "--base", FIX_BASE, "-o", tmp_path / "b.gguf")
    assert one_line_error(got, "a llama.cpp GGUF adapter already") and not (tmp_path / "b.gguf").exists()
