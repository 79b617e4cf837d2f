"""diff: every status, diff(1) exit codes, rank profiles, and layouts that differ but hold the same weights."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import run_cli, seeded
from safetensors.torch import load_file, save_file

from lorasurgeon import diff


def write(path, tensors):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path)
    return path


def test_every_status_and_key_set(tmp_path):
    a = {
        "same": seeded((4, 4)),
        "changed": seeded((8, 3), seed=1),
        "shape": seeded((3,)),
        "dtype": seeded((5,), seed=2),
        "only_a": torch.ones(1),
        "ints": torch.arange(6),
    }
    b = dict(
        a,
        changed=a["changed"] + 0.5,
        shape=seeded((4,)),
        dtype=a["dtype"].to(torch.bfloat16),
        only_b=torch.zeros(2),
        ints=torch.arange(6) * 2,
    )
    del b["only_a"]
    report = diff(write(tmp_path / "a.safetensors", a), write(tmp_path / "b.safetensors", b))
    status = {t.name: t.status for t in report.tensors}
    assert status == {
        "same": "identical",
        "changed": "changed",
        "shape": "shape_mismatch",
        "dtype": "dtype_mismatch",
        "ints": "changed",
    }
    assert report.only_in_a == ["only_a"] and report.only_in_b == ["only_b"]
    changed = next(t for t in report.tensors if t.name == "changed")
    delta = torch.full((8, 3), 0.5)
    assert changed.rel_change == pytest.approx(float(delta.norm() / a["changed"].norm()), rel=1e-6)
    assert changed.max_abs_diff == pytest.approx(0.5, rel=1e-6)
    flat_a, flat_b = a["changed"].reshape(-1).double(), b["changed"].reshape(-1).double()
    assert changed.cosine == pytest.approx(float(flat_a @ flat_b / flat_a.norm() / flat_b.norm()), rel=1e-9)
    ints = next(t for t in report.tensors if t.name == "ints")
    assert ints.max_abs_diff == 5.0
    assert report.exit_code == 1


def test_exit_codes_and_json(tmp_path):
    a = write(tmp_path / "a.safetensors", {"w": seeded((4, 4))})
    b = write(tmp_path / "b.safetensors", {"w": seeded((4, 4)) + 1e-3})
    same = run_cli("diff", a, a)
    assert same.exit_code == 0 and same.stdout.strip().splitlines()[-1].startswith("identical")
    different = run_cli("diff", a, b, "--json")
    assert different.exit_code == 1
    doc = json.loads(different.stdout)
    assert set(doc) >= {"only_in_a", "only_in_b", "tensors", "summary"}
    assert set(doc["tensors"][0]) == {
        "name",
        "status",
        "rel_change",
        "max_abs_diff",
        "cosine",
        "identical_fraction",
    } | {
        "nan_in_a",
        "nan_in_b",
        "inf_in_a",
        "inf_in_b",
    }
    assert run_cli("diff", a, b, "--atol", "1e-2").exit_code == 0
    assert run_cli("diff", a, b, "--atol", "1e-4").exit_code == 1
    missing = run_cli("diff", a, tmp_path / "nope")
    assert missing.exit_code == 2 and missing.stderr.startswith("error: ")


def test_known_low_rank_change_is_recovered(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(300, 200, generator=g)
    u = torch.linalg.qr(torch.randn(300, 12, generator=g)).Q
    v = torch.linalg.qr(torch.randn(200, 12, generator=g)).Q
    s = torch.tensor([10.0, 8, 6, 5, 4, 3, 2.5, 2, 1.5, 1, 0.5, 0.25])
    tuned = base + (u * s) @ v.T
    a = write(tmp_path / "a.safetensors", {"w": base, "norm": torch.ones(3)})
    b = write(tmp_path / "b.safetensors", {"w": tuned, "norm": torch.ones(3) * 2})
    report = diff(a, b, rank_profile=True)
    w = next(t for t in report.tensors if t.name == "w")
    exact = torch.cumsum(torch.linalg.svdvals((tuned - base).double()) ** 2, 0)
    expected = [int((exact >= f * exact[-1]).nonzero()[0]) + 1 for f in (0.5, 0.9, 0.99)]
    assert [w.rank_50, w.rank_90, w.rank_99] == expected == [2, 5, 9]
    norm = next(t for t in report.tensors if t.name == "norm")
    assert norm.rank_50 is None  # 1-D: no profile
    docs = {t["name"]: t for t in report.to_dict()["tensors"]}
    assert "rank_50" not in docs["norm"] and docs["w"]["rank_99"] == 9


def test_same_weights_in_other_layouts_are_identical(llama_dir, llama_sharded_dir, tmp_path):
    assert diff(llama_dir, llama_sharded_dir).exit_code == 0
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save(load_file(llama_dir / "model.safetensors"), folder / "pytorch_model.bin")
    report = diff(llama_sharded_dir, folder)
    assert report.identical and all(t.status == "identical" for t in report.tensors)


def test_bf16_against_fp32_of_the_same_weights(llama_dir, tmp_path):
    tensors = load_file(llama_dir / "model.safetensors")
    bf16 = write(tmp_path / "bf16" / "model.safetensors", {k: v.to(torch.bfloat16) for k, v in tensors.items()})
    report = diff(llama_dir, bf16.parent)
    assert {t.status for t in report.tensors} == {"dtype_mismatch"}
    assert all(t.rel_change < 2**-8 and t.cosine > 0.9999 for t in report.tensors)
    assert report.exit_code == 1
    assert diff(llama_dir, bf16.parent, atol=0.05).exit_code == 0


def test_include_exclude_and_table(llama_dir, tmp_path):
    tensors = load_file(llama_dir / "model.safetensors")
    changed = write(
        tmp_path / "c" / "model.safetensors", {k: (v + 0.1 if "q_proj" in k else v) for k, v in tensors.items()}
    )
    report = diff(llama_dir, changed.parent, include=r"layers\.0\.", exclude="mlp")
    assert all("layers.0." in t.name and "mlp" not in t.name for t in report.tensors)
    result = run_cli("diff", llama_dir, changed.parent, "--top", "1")
    assert result.exit_code == 1
    assert "q_proj" in result.stdout and "1 more changed tensor" in result.stdout
    assert "2 changed" in result.stdout


def test_identical_fraction_counts_elements(tmp_path):
    w = seeded((50, 20))
    b = w.clone()
    b.view(-1)[:300] += 1.0  # 300 of 1000 elements changed
    report = diff(
        write(tmp_path / "a.safetensors", {"w": w, "same": w.clone(), "half": w.half()}),
        write(tmp_path / "b.safetensors", {"w": b, "same": w.clone(), "half": w.clone()}),
    )
    got = {t.name: t.identical_fraction for t in report.tensors}
    exact_in_half = float((w.half().float() == w).double().mean())  # dtypes differ: equal in value
    assert got == {"w": pytest.approx(0.7), "same": 1.0, "half": pytest.approx(exact_in_half)}
    table = run_cli("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors").stdout
    assert "identical" in table.splitlines()[0] and "70.00%" in table


def test_atol_separates_what_it_forgives_from_what_differs(tmp_path):
    w = seeded((4, 4))
    a = write(tmp_path / "a.safetensors", {"small": w, "big": w.clone(), "same": w.clone()})
    b = write(tmp_path / "b.safetensors", {"small": w + 1e-3, "big": w + 1.0, "same": w.clone()})
    result = run_cli("diff", a, b, "--atol", "1e-2")
    assert result.exit_code == 1
    assert "big" in result.stdout and "small" not in result.stdout
    assert (
        result.stdout.strip()
        .splitlines()[-1]
        .startswith("different (within --atol 0.01): 3 common tensors — 1 identical, 1 within --atol, 1 changed")
    )
    doc = json.loads(run_cli("diff", a, b, "--atol", "1e-2", "--json").stdout)
    assert {t["name"]: t["within_atol"] for t in doc["tensors"]} == {"small": True, "big": False, "same": False}
    assert doc["summary"]["within_atol"] == 1
    forgiving = run_cli("diff", a, b, "--atol", "2")
    assert forgiving.exit_code == 0 and "changed  " not in forgiving.stdout
    assert forgiving.stdout.strip().splitlines() == [
        "identical (within --atol 2): 3 common tensors — 1 identical, 2 within --atol, 0 changed, "
        "0 dtype mismatches, 0 shape mismatches; 0 only in A, 0 only in B"
    ]


def test_top_must_not_be_negative_and_zero_shows_only_the_count(tmp_path):
    w = seeded((4, 4))
    a, b = (
        write(tmp_path / "a.safetensors", {"x": w, "y": w.clone()}),
        write(tmp_path / "b.safetensors", {"x": w + 1, "y": w + 2}),
    )
    bad = run_cli("diff", a, b, "--top", "-1")
    assert bad.exit_code == 2 and "-1" in bad.stderr
    zero = run_cli("diff", a, b, "--top", "0")
    assert zero.exit_code == 1 and "... 2 more changed tensors" in zero.stdout


def test_a_filter_that_matches_nothing_is_an_error(tmp_path):
    w = seeded((4, 4))
    a, b = write(tmp_path / "a.safetensors", {"x.weight": w}), write(tmp_path / "b.safetensors", {"x.weight": w + 1})
    result = run_cli("diff", a, b, "--include", "q_proj")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip() == (
        "error: --include 'q_proj' leaves none of the 1 + 1 tensors of A and B to compare (names look like 'x.weight')"
    )


def test_nan_and_inf_are_counted_and_leave_no_similarity(tmp_path):
    w = seeded((4, 4))
    with_nan, with_inf = w.clone(), w.clone()
    with_nan[0, 0] = float("nan")
    with_inf[1, 1], with_inf[2, 2] = float("inf"), float("-inf")
    a = write(tmp_path / "a.safetensors", {"nan": w, "inf": w.clone(), "ok": w.clone()})
    b = write(tmp_path / "b.safetensors", {"nan": with_nan, "inf": with_inf, "ok": w + 0.1})
    result = run_cli("diff", a, b, "--json")
    assert result.exit_code == 1
    doc = {t["name"]: t for t in json.loads(result.stdout)["tensors"]}
    assert doc["nan"]["cosine"] is None and doc["inf"]["cosine"] is None  # not -1.0
    assert (doc["nan"]["nan_in_a"], doc["nan"]["nan_in_b"], doc["nan"]["inf_in_b"]) == (0, 1, 0)
    assert (doc["inf"]["nan_in_b"], doc["inf"]["inf_in_a"], doc["inf"]["inf_in_b"]) == (0, 0, 2)
    assert doc["ok"]["cosine"] == pytest.approx(1.0, abs=1e-2) and doc["ok"]["nan_in_b"] == doc["ok"]["inf_in_b"] == 0
    lines = run_cli("diff", a, b).stdout.splitlines()
    rows = {line.split()[0]: line for line in lines[1:4]}
    assert list(rows)[:2] == ["nan", "inf"] or list(rows)[:2] == ["inf", "nan"]  # the most alarming first
    assert "—" in rows["nan"] and "-1.0" not in rows["nan"]
    assert "nan: 1 NaN in B" in lines and "inf: 2 Inf in B" in lines


def test_cosine_of_a_tensor_with_nan_is_nan_not_minus_one():
    from lorasurgeon.ops.compare import change

    a, b = seeded((3, 3)), seeded((3, 3), seed=1)
    b[0, 0] = float("nan")
    assert math.isnan(change(a, b).cosine)


def test_long_lists_say_how_many_more_and_shape_mismatches_follow_top(tmp_path):
    common = {f"s{i}": seeded((2,)) for i in range(5)}
    a = write(tmp_path / "a.safetensors", common | {f"only_a{i:02}": torch.ones(1) for i in range(28)})
    b = write(
        tmp_path / "b.safetensors",
        {k: seeded((3,)) for k in common} | {f"only_b{i:02}": torch.ones(1) for i in range(21)},
    )
    out = run_cli("diff", a, b).stdout.splitlines()
    assert sum(line.startswith("only in A: ") for line in out) == 20 and "... 8 more only in A" in out
    assert sum(line.startswith("only in B: ") for line in out) == 20 and "... 1 more only in B" in out
    out = run_cli("diff", a, b, "--top", "2").stdout.splitlines()
    assert [line for line in out if "shapes differ" in line] == ["s0: shapes differ", "s1: shapes differ"]
    assert "... 3 more with shapes that differ" in out
    assert "... 26 more only in A" in out and "... 19 more only in B" in out


def test_plot_says_where_it_wrote(tmp_path):
    w = seeded((4, 4))
    a = write(tmp_path / "a.safetensors", {"model.layers.0.q.weight": w})
    b = write(tmp_path / "b.safetensors", {"model.layers.0.q.weight": w + 1})
    picture = tmp_path / "x.png"
    result = run_cli("diff", a, b, "--plot", picture, "-q")
    assert result.exit_code == 1 and picture.exists()
    assert result.stdout.strip().splitlines()[-1] == f"Wrote {picture}"
    doc = json.loads(run_cli("diff", a, b, "--plot", picture, "--overwrite", "--json", "-q").stdout)
    assert doc["plot"] == str(picture)
    assert "plot" not in json.loads(run_cli("diff", a, b, "--json").stdout)
