"""merge / unmerge / convert from the command line: reports, layouts, and every refusal (exit 2, nothing written)."""

from __future__ import annotations

import json
import re
import shutil
import time

import make_fixtures as mf
import pytest
import torch
from helpers import FIX_ADAPTER, FIX_BASE, listing, one_line_error, run_cli
from reference import read_folder
from safetensors.torch import load_file


def test_quick_start_on_committed_fixtures(tmp_path):
    result = run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "merged")
    assert result.exit_code == 0, result.stderr
    assert "21 tensors (14 merged, 7 copied)" in result.stdout
    assert re.search(r", \d+ KiB in \d+\.\d\d s( \(\d[\d.]* (KiB|MiB)/s\))?\.$", result.stdout.strip()), result.stdout
    assert " 0 MiB/s" not in result.stdout and "0.2 MiB" not in result.stdout
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",  # the base's tokenizer, carried as it is
        "tokenizer_config.json",
    ]
    card = (tmp_path / "merged" / "README.md").read_text()
    assert f"base_model: {FIX_BASE}" in card and "base_model_relation: merge" in card and "- lorasurgeon" in card
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in merged.values())
    assert (FIX_BASE / "config.json").read_text() == (tmp_path / "merged" / "config.json").read_text() or json.loads(
        (FIX_BASE / "config.json").read_text()
    ) == json.loads((tmp_path / "merged" / "config.json").read_text())


def test_the_time_reported_is_the_whole_call(tmp_path):
    """Imports, names, planning and writing: not only the streaming part (a newcomer saw 0.02 s for 4.9 s)."""
    from lorasurgeon import convert, merge

    for call in (
        lambda: merge(FIX_BASE, FIX_ADAPTER, tmp_path / "m"),  # one adapter alone is a list of one
        lambda: merge(FIX_BASE, [FIX_ADAPTER], tmp_path / "aug", form="augmented"),
        lambda: convert(tmp_path / "aug", tmp_path / "back", to="adapter"),
    ):
        began = time.perf_counter()
        report = call()
        took = time.perf_counter() - began
        assert report.seconds <= report.wall <= took and report.wall > 0.9 * took, (report.wall, took)
        assert len(repr(report)) < 300 and f"wall={report.wall:.3f}" in repr(report)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    result = run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "merged", "--dry-run")
    assert result.exit_code == 0
    assert "14 merge" in result.stdout and "7 copy" in result.stdout
    assert "model.layers.0.self_attn.q_proj.weight" in result.stdout and "+ 2" in result.stdout
    assert listing(tmp_path) == set()


def test_quiet_prints_nothing(tmp_path):
    result = run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "m", "--quiet")
    assert result.exit_code == 0 and result.stdout == "" and result.stderr == ""


def test_overwrite(tmp_path):
    assert run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "m").exit_code == 0
    again = run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "m")
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    assert (
        run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "m", "--overwrite", "--weight", "0.5").exit_code == 0
    )
    assert listing(tmp_path) == {
        "m",
        *(f"m/{n}" for n in ("README.md", "config.json", "generation_config.json", "model.safetensors")),
        *(f"m/{n}" for n in ("tokenizer.json", "tokenizer_config.json")),
    }


def test_sharded_base_keeps_its_layout_unless_asked(llama_sharded_dir, adapter_dir, tmp_path):
    assert run_cli("merge", llama_sharded_dir, adapter_dir, "-o", tmp_path / "same").exit_code == 0
    shards = sorted(p.name for p in llama_sharded_dir.glob("*.safetensors"))
    assert sorted(p.name for p in (tmp_path / "same").glob("*.safetensors")) == shards
    ours = json.loads((tmp_path / "same" / "model.safetensors.index.json").read_text())["weight_map"]
    assert ours == json.loads((llama_sharded_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert (
        run_cli("merge", llama_sharded_dir, adapter_dir, "-o", tmp_path / "one", "--max-shard-size", "10GB").exit_code
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == [
        "README.md",
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    a, b = read_folder(tmp_path / "same"), read_folder(tmp_path / "one")
    assert all(torch.equal(a[k], b[k]) for k in a) and set(a) == set(b)


def test_legacy_bin_base_gives_safetensors(llama_dir, adapter_dir, tmp_path):
    base = tmp_path / "bin_base"
    base.mkdir()
    shutil.copy(llama_dir / "config.json", base)
    torch.save(load_file(llama_dir / "model.safetensors"), base / "pytorch_model.bin")
    assert run_cli("merge", base, adapter_dir, "-o", tmp_path / "a").exit_code == 0
    assert run_cli("merge", llama_dir, adapter_dir, "-o", tmp_path / "b").exit_code == 0
    a, b = read_folder(tmp_path / "a"), read_folder(tmp_path / "b")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def with_config(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg.update(changes)
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


UNSUPPORTED = {
    "pissa": dict(init_lora_weights="pissa_niter_4"),
    "olora": dict(init_lora_weights="olora"),
    "corda": dict(init_lora_weights="corda"),
    "loftq": dict(init_lora_weights="loftq"),
    "aLoRA": dict(alora_invocation_tokens=[1, 2]),
    "arrow": dict(arrow_config={"top_k": 2}),
    "QA-LoRA": dict(use_qalora=True),
    "KaSA": dict(kasa_config={"x": 1}),
    "BD-LoRA": dict(use_bdlora={"x": 1}),
    "layer replication": dict(layer_replication=[[0, 2], [1, 2]]),
    "peft_type POLY": dict(peft_type="POLY"),  # a tuner with no math here (ops.tuners)
    "IA3 config over LoRA tensors": dict(peft_type="IA3"),  # a tuner lorasurgeon folds, but not its tensors
}


def assert_refused(result, tmp_path, *phrases):
    """One line, exit 2, and nothing written: no output, no hidden scratch folder."""
    one_line_error(result, *phrases)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("variant", list(UNSUPPORTED))
def test_variants_that_are_not_plain_lora_are_refused_by_name(tmp_path, variant):
    adapter = with_config(FIX_ADAPTER, tmp_path / "adapter", **UNSUPPORTED[variant])
    result = run_cli("merge", FIX_BASE, adapter, "-o", tmp_path / "out")
    assert_refused(result, tmp_path, variant.split()[0])


def test_dora_unmerge_is_refused_with_the_reason(tmp_path):
    config = mf.llama_config()
    adapter = mf.make_adapter(mf.build_model(config), tmp_path / "dora", use_dora=True, target_modules=["q_proj"])
    base = mf.save_model(mf.build_model(config), tmp_path / "base")
    assert run_cli("merge", base, adapter, "-o", tmp_path / "merged").exit_code == 0
    result = run_cli("unmerge", tmp_path / "merged", adapter, "-o", tmp_path / "out")
    assert_refused(result, tmp_path, "DoRA cannot be unmerged", "norm")


def test_unmerge_of_replaced_tensors_is_refused(tmp_path):
    config = mf.llama_config()
    adapter = mf.make_adapter(
        mf.build_model(config), tmp_path / "mts", modules_to_save=["lm_head"], target_modules=["q_proj"]
    )
    result = run_cli("unmerge", FIX_BASE, adapter, "-o", tmp_path / "out")
    assert_refused(result, tmp_path, "cannot unmerge", "modules_to_save")


def test_adapter_for_another_model_is_refused(tmp_path):
    small = mf.llama_config(hidden=32)
    adapter = mf.make_adapter(mf.build_model(small), tmp_path / "small_adapter", target_modules=["q_proj"])
    assert_refused(
        run_cli("merge", FIX_BASE, adapter, "-o", tmp_path / "out"),
        tmp_path,
        "model.layers.0.self_attn.q_proj",
        "another model",
    )
    gpt2 = mf.make_adapter(mf.build_model(mf.gpt2_config()), tmp_path / "gpt2_adapter", target_modules=["c_attn"])
    assert_refused(run_cli("merge", FIX_BASE, gpt2, "-o", tmp_path / "out"), tmp_path, "c_attn", "does not have")


@pytest.mark.parametrize("where", ["base", "inside base", "adapter", "parent of base"])
def test_output_overlapping_an_input_is_refused(tmp_path, where):
    base = shutil.copytree(FIX_BASE, tmp_path / "work" / "base")
    out = {"base": base, "inside base": base / "merged", "adapter": FIX_ADAPTER, "parent of base": tmp_path / "work"}[
        where
    ]
    before = {p: p.stat().st_mtime_ns for p in base.rglob("*")}
    result = run_cli("merge", base, FIX_ADAPTER, "-o", out, "--overwrite")
    assert result.exit_code == 2 and "overlaps the input" in result.stderr
    assert {p: p.stat().st_mtime_ns for p in base.rglob("*")} == before


def test_option_errors_exit_2(tmp_path):
    r = run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "out", "--weight", "1", "--weight", "2")
    assert_refused(r, tmp_path, "2 weights for 1 adapter:")
    r = run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "out", "--max-shard-size", "lots")
    assert_refused(r, tmp_path, "invalid size")
    if not torch.cuda.is_available():
        r = run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "out", "--device", "cuda")
        assert_refused(r, tmp_path, "no CUDA GPU")
    r = run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "out", "--device", "tpu")
    assert_refused(r, tmp_path, "device")


@pytest.mark.parametrize("weight", ["nan", "inf", "-inf", "1e40"])
def test_weights_must_be_finite_numbers_float32_can_hold(tmp_path, weight):
    assert_refused(
        run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "out", "--weight", weight),
        tmp_path,
        f"--weight {float(weight)!r}",
        "finite",
    )
    assert_refused(
        run_cli("unmerge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "out", "--weight", weight), tmp_path, "finite"
    )
    from lorasurgeon import InvalidOptionError, merge

    with pytest.raises(InvalidOptionError, match="finite"):
        merge(FIX_BASE, [FIX_ADAPTER], tmp_path / "out", weights=[float(weight)])
    assert listing(tmp_path) == set()


def test_a_scale_beyond_float32_is_refused_by_module(tmp_path):
    adapter = with_config(FIX_ADAPTER, tmp_path / "adapter", lora_alpha=1e40)
    assert_refused(
        run_cli("merge", FIX_BASE, adapter, "-o", tmp_path / "out"),
        tmp_path,
        "module 'model.layers.",
        "does not fit float32",
    )


def test_unmerge_and_convert_commands(tmp_path):
    assert run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "m", "--dtype", "float32").exit_code == 0
    r = run_cli("unmerge", tmp_path / "m", FIX_ADAPTER, "-o", tmp_path / "u", "--dtype", "bfloat16")
    assert r.exit_code == 0, r.stderr
    back, base = read_folder(tmp_path / "u"), read_folder(FIX_BASE)
    # fp32 merge, fp32 subtraction, one rounding back to bf16: the base, bit for bit except
    # where |ΔW| is ~10^5 × |W0| (fp32's rounding of the merged value reaches W0's last bf16 bit)
    same = sum((back[k] == base[k]).sum().item() for k in base)
    assert same / sum(t.numel() for t in base.values()) >= 0.9999
    assert all(torch.allclose(back[k].float(), base[k].float(), rtol=0, atol=1e-6) for k in base)
    assert run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "aug", "--form", "augmented").exit_code == 0
    assert run_cli("convert", tmp_path / "aug", "--to", "adapter", "-o", tmp_path / "ad").exit_code == 0
    a, b = (
        load_file(tmp_path / "ad" / "adapter_model.safetensors"),
        load_file(FIX_ADAPTER / "adapter_model.safetensors"),
    )
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    r = run_cli("convert", FIX_BASE, "--to", "merged", "-o", tmp_path / "out")
    assert_refused(r, tmp_path, "is a model", "give one (an augmented checkpoint takes --to merged|adapter)")
    r = run_cli("convert", FIX_BASE, "--to", "adapter", "-o", tmp_path / "out")
    assert_refused(r, tmp_path, "INPUT is a model, not an augmented checkpoint", "merge --form augmented")
    r = run_cli("convert", tmp_path / "aug", "-o", tmp_path / "out")
    assert_refused(r, tmp_path, "is an augmented checkpoint: give --to merged or --to adapter")


def test_nonfinite_result_stops_the_merge_unless_allowed(tmp_path):
    from safetensors.torch import save_file

    adapter = shutil.copytree(FIX_ADAPTER, tmp_path / "adapter")
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    tensors[key][0, 0] = float("inf")
    save_file(tensors, path)
    assert_refused(
        run_cli("merge", FIX_BASE, adapter, "-o", tmp_path / "out"),
        tmp_path,
        "model.layers.1.mlp.up_proj.weight",
        "NaN or Inf",
    )
    ok = run_cli("merge", FIX_BASE, adapter, "-o", tmp_path / "out", "--allow-nonfinite")
    assert ok.exit_code == 0
    assert not torch.isfinite(
        load_file(tmp_path / "out" / "model.safetensors")["model.layers.1.mlp.up_proj.weight"]
    ).all()


def test_augmented_and_convert_keep_a_sharded_layout(llama_sharded_dir, adapter_dir, tmp_path):
    shards = sorted(p.name for p in llama_sharded_dir.glob("*.safetensors"))
    assert (
        run_cli("merge", llama_sharded_dir, adapter_dir, "-o", tmp_path / "aug", "--form", "augmented").exit_code == 0
    )
    assert sorted(p.name for p in (tmp_path / "aug").glob("*.safetensors")) == shards
    assert run_cli("convert", tmp_path / "aug", "--to", "merged", "-o", tmp_path / "back").exit_code == 0
    assert run_cli("merge", llama_sharded_dir, adapter_dir, "-o", tmp_path / "direct").exit_code == 0
    for name in shards:
        assert (tmp_path / "back" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes()


def test_replacements_of_the_wrong_shape_are_refused(tmp_path):
    from safetensors.torch import save_file

    config = mf.llama_config()
    adapter = mf.make_adapter(
        mf.build_model(config),
        tmp_path / "mts",
        modules_to_save=["lm_head"],
        target_modules=["q_proj"],
        trainable_token_indices={"embed_tokens": [1, 2]},
    )
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    good = dict(tensors)
    tensors["base_model.model.lm_head.weight"] = torch.zeros(260, config.hidden_size)  # a resized vocabulary
    save_file(tensors, path)
    assert_refused(run_cli("merge", FIX_BASE, adapter, "-o", tmp_path / "out"), tmp_path, "lm_head", "resized")
    key = next(k for k in good if "trainable_tokens_delta" in k)
    save_file({**good, key: torch.zeros(3, config.hidden_size)}, path)
    assert_refused(run_cli("merge", FIX_BASE, adapter, "-o", tmp_path / "out"), tmp_path, "trainable tokens")


@pytest.fixture(scope="module")
def augmented(tmp_path_factory):
    out = tmp_path_factory.mktemp("aug") / "aug"
    assert run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", out, "--form", "augmented").exit_code == 0
    return out


WRONG_KIND = {  # arguments -> what the one line must say
    "merge swapped": (
        ["merge", "{adapter}", "{base}"],
        ["BASE is an adapter, not a model", "look swapped", "takes BASE first, then ADAPTER"],
    ),
    "unmerge swapped": (["unmerge", "{adapter}", "{base}"], ["MERGED is an adapter", "MERGED first, then ADAPTER"]),
    "augmented as adapter": (
        ["merge", "{base}", "{aug}"],
        ["ADAPTER is an augmented checkpoint", "lorasurgeon convert {aug} --to adapter -o OUT"],
    ),
    "augmented as base": (
        ["merge", "{aug}", "{adapter}"],
        ["BASE is an augmented checkpoint", "lorasurgeon convert {aug} --to merged -o OUT"],
    ),
    "model as adapter": (
        ["merge", "{base}", "{base}"],
        ["ADAPTER is a model, not an adapter", "adapter_config.json and adapter_model.safetensors"],
    ),
    "adapter to extract": (
        ["extract", "{base}", "{adapter}", "--rank", "2"],
        ["FINETUNED is an adapter, not a model", "lorasurgeon merge BASE {adapter} -o OUT"],
    ),
    "extract swapped": (["extract", "{adapter}", "{base}", "--rank", "2"], ["look swapped", "BASE, then FINETUNED"]),
    "augmented to extract": (
        ["extract", "{base}", "{aug}", "--rank", "2"],
        ["FINETUNED is an augmented checkpoint", "--to merged"],
    ),
    "adapter to convert": (
        ["convert", "{adapter}", "--to", "merged"],
        ["INPUT is an adapter", "to merge it into its base model: `lorasurgeon merge BASE "],
    ),
}


@pytest.mark.parametrize("case", list(WRONG_KIND))
def test_an_argument_of_the_wrong_kind_is_named_with_what_to_do(tmp_path, augmented, case):
    args, phrases = WRONG_KIND[case]
    paths = {"base": FIX_BASE, "adapter": FIX_ADAPTER, "aug": augmented}
    result = run_cli(*[a.format(**paths) for a in args], "-o", tmp_path / "out")
    assert_refused(result, tmp_path, *[p.format(**paths) for p in phrases])
