"""diff: every status, diff(1) exit codes, rank profiles, and layouts that differ but hold the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorasurgeon import diff

from conftest import run_cli, seeded


def write(path, tensors):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path)
    return path


def test_every_status_and_key_set(tmp_path):
    a = {"same": seeded((4, 4)), "changed": seeded((8, 3), seed=1), "shape": seeded((3,)),
         "dtype": seeded((5,), seed=2), "only_a": torch.ones(1), "ints": torch.arange(6)}
    b = dict(a, changed=a["changed"] + 0.5, shape=seeded((4,)), dtype=a["dtype"].to(torch.bfloat16),
             only_b=torch.zeros(2), ints=torch.arange(6) * 2)
    del b["only_a"]
    report = diff(write(tmp_path / "a.safetensors", a), write(tmp_path / "b.safetensors", b))
    status = {t.name: t.status for t in report.tensors}
    assert status == {"same": "identical", "changed": "changed", "shape": "shape_mismatch",
                      "dtype": "dtype_mismatch", "ints": "changed"}
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
    assert set(doc["tensors"][0]) == {"name", "status", "rel_change", "max_abs_diff", "cosine"}
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
    changed = write(tmp_path / "c" / "model.safetensors",
                    {k: (v + 0.1 if "q_proj" in k else v) for k, v in tensors.items()})
    report = diff(llama_dir, changed.parent, include=r"layers\.0\.", exclude="mlp")
    assert all("layers.0." in t.name and "mlp" not in t.name for t in report.tensors)
    result = run_cli("diff", llama_dir, changed.parent, "--top", "1")
    assert result.exit_code == 1
    assert "q_proj" in result.stdout and "1 more changed tensors" in result.stdout
    assert "2 changed" in result.stdout
