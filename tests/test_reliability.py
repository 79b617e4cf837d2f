"""Killed, full disk, failed overwrite, untouched inputs, --verify: never a corrupt result, never a lost input."""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from helpers import FIX_ADAPTER, FIX_BASE, listing, run_cli
from reference import read_folder
from safetensors.torch import load_file, save_file

from lorasurgeon import merge
from lorasurgeon.errors import OutputError
from lorasurgeon.io.scratch import clean_stale

CHILD = """
import sys
from lorasurgeon import merge
class Tell:
    def start(self, total): print("start", flush=True)
    def advance(self, n): print("tensor", flush=True)
    def finish(self): print("finish", flush=True)
merge(sys.argv[1], [sys.argv[2]], sys.argv[3], progress=Tell(), overwrite=sys.argv[4] == "1", max_shard_size="3MB")
print("done", flush=True)
"""


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory):
    """A base of 48 one-MiB matrices in several shards, and an adapter for all of them."""
    root = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(0)
    (root / "base").mkdir()
    (root / "adapter").mkdir()
    base = {f"layers.{i}.proj.weight": torch.randn(512, 512, generator=g) for i in range(48)}
    save_file(base, root / "base" / "model.safetensors")
    lora = {}
    for i in range(48):
        lora[f"base_model.model.layers.{i}.proj.lora_A.weight"] = torch.randn(4, 512, generator=g)
        lora[f"base_model.model.layers.{i}.proj.lora_B.weight"] = torch.randn(512, 4, generator=g)
    save_file(lora, root / "adapter" / "adapter_model.safetensors")
    (root / "adapter" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["proj"]})
    )
    merge(root / "base", [root / "adapter"], root / "reference", max_shard_size="3MB")
    return root


def kill_after(root, out, lines: int, *, overwrite=False, extra_delay=0.0) -> None:
    """Run a merge in a child process and SIGKILL it after it has printed ``lines`` progress lines."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root / "base"), str(root / "adapter"), str(out), "1" if overwrite else "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    seen = 0
    for _ in child.stdout:
        seen += 1
        if seen >= lines:
            break
    if extra_delay:
        import time

        time.sleep(extra_delay)
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()


def assert_nothing_or_complete(out, reference) -> str:
    if not out.exists():
        return "nothing"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in reference.iterdir()), names
    ours, ref = read_folder(out), read_folder(reference)
    assert set(ours) == set(ref) and all(torch.equal(ours[k], ref[k]) for k in ref)
    return "complete"


@pytest.mark.parametrize("lines", [1, 2, 10, 30, 50, 51])  # start, first tensors, mid-way, finish, after
def test_killed_merge_leaves_nothing_or_the_whole_result(big_pair, tmp_path, lines):
    out = tmp_path / "out"
    kill_after(big_pair, out, lines)
    assert_nothing_or_complete(out, big_pair / "reference")
    merge(big_pair / "base", [big_pair / "adapter"], out, overwrite=True, max_shard_size="3MB")  # a rerun works
    assert assert_nothing_or_complete(out, big_pair / "reference") == "complete"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "debris of the killed run was left"


@pytest.mark.parametrize("lines", [2, 30, 50])
def test_killed_overwrite_keeps_the_old_result(big_pair, tmp_path, lines):
    out = tmp_path / "out"
    shutil.copytree(big_pair / "reference", out)
    with open(out / "README.md", "a") as card:  # to tell the old result from the new one
        card.write("\nold result\n")
    kill_after(big_pair, out, lines, overwrite=True)
    clean_stale(out)  # what the next run does first
    if "old result" in (out / "README.md").read_text():
        reference = {k: v for k, v in read_folder(big_pair / "reference").items()}
        assert all(torch.equal(v, reference[k]) for k, v in read_folder(out).items())
    else:
        assert assert_nothing_or_complete(out, big_pair / "reference") == "complete"


@pytest.mark.slow
def test_kill_at_random_moments(big_pair, tmp_path):
    rng = random.Random(1234)
    for attempt in range(20):
        out = tmp_path / f"out{attempt}"
        kill_after(big_pair, out, rng.randint(1, 51), extra_delay=rng.random() * 0.05)
        assert_nothing_or_complete(out, big_pair / "reference")


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_not_enough_space_is_known_before_writing(big_pair, small_disk):
    result = run_cli("merge", big_pair / "base", big_pair / "adapter", "-o", small_disk / "out")
    assert result.exit_code == 2 and "not enough free space" in result.stderr, result.stderr
    assert re.search(r"the result needs 48 MiB, 4 MiB are free; ", result.stderr), result.stderr
    assert listing(small_disk) == set()


def test_disk_filling_up_during_the_write(small_disk, tmp_path):
    g = torch.Generator().manual_seed(0)
    (tmp_path / "base").mkdir()
    save_file(
        {f"w{i}.weight": torch.randn(256, 256, generator=g) for i in range(8)}, tmp_path / "base" / "model.safetensors"
    )
    filler = small_disk / "filler"

    class FillDisk:  # another process filling the disk once the write has started
        def start(self, total):
            pass

        def advance(self, n):
            if not filler.exists():
                with open(filler, "wb") as fh:
                    try:
                        while True:
                            fh.write(b"\0" * 65536)
                            fh.flush()
                    except OSError:
                        pass

        def finish(self):
            pass

    with pytest.raises(OutputError, match="No space left"):
        _merge_with_trivial_adapter(tmp_path / "base", small_disk / "out", FillDisk())
    assert listing(small_disk) == {"filler"}


def _merge_with_trivial_adapter(base, out, progress):
    adapter = base.parent / "adapter"
    if not adapter.exists():
        adapter.mkdir()
        save_file(
            {
                "base_model.model.w0.lora_A.weight": torch.ones(1, 256),
                "base_model.model.w0.lora_B.weight": torch.ones(256, 1),
            },
            adapter / "adapter_model.safetensors",
        )
        (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1}))
    return merge(base, [adapter], out, progress=progress)


def digest(folder) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_inputs_are_never_modified(tmp_path):
    base, adapter = shutil.copytree(FIX_BASE, tmp_path / "base"), shutil.copytree(FIX_ADAPTER, tmp_path / "adapter")
    before = digest(base), digest(adapter)
    for args in (
        ["merge", base, adapter, "-o", tmp_path / "m"],
        ["unmerge", tmp_path / "m", adapter, "-o", tmp_path / "u"],
        ["merge", base, adapter, "-o", tmp_path / "a", "--form", "augmented"],
        ["convert", tmp_path / "a", "--to", "merged", "-o", tmp_path / "c"],
        ["extract", base, tmp_path / "m", "--rank", "2", "-o", tmp_path / "x"],
        ["diff", base, tmp_path / "m"],
        ["inspect", base, "--verify"],
    ):
        assert run_cli(*args).exit_code in (0, 1)
    assert (digest(base), digest(adapter)) == before


def test_failed_overwrite_keeps_the_previous_result(tmp_path):
    assert run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "out").exit_code == 0
    before = digest(tmp_path / "out")
    bad = shutil.copytree(FIX_ADAPTER, tmp_path / "bad")
    tensors = load_file(bad / "adapter_model.safetensors")
    tensors["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"][0, 0] = float("nan")
    save_file(tensors, bad / "adapter_model.safetensors")
    result = run_cli("merge", FIX_BASE, bad, "-o", tmp_path / "out", "--overwrite")
    assert result.exit_code == 2 and "NaN or Inf" in result.stderr
    assert digest(tmp_path / "out") == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_extract_stops_on_nonfinite_deltas(tmp_path):
    tuned = shutil.copytree(FIX_BASE, tmp_path / "tuned")
    tensors = load_file(tuned / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] + 1
    tensors["model.layers.0.mlp.up_proj.weight"][3, 3] = float("inf")
    save_file(tensors, tuned / "model.safetensors", metadata={"format": "pt"})
    result = run_cli("extract", FIX_BASE, tuned, "--rank", "2", "-o", tmp_path / "out")
    assert result.exit_code == 2 and "model.layers.0.mlp.up_proj.weight" in result.stderr
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_verify_reports_problems_per_tensor(tmp_path, llama_sharded_dir):
    good = run_cli("inspect", llama_sharded_dir, "--verify")
    assert good.exit_code == 0 and "no problems" in good.stdout
    broken = shutil.copytree(llama_sharded_dir, tmp_path / "broken")
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    index["metadata"]["total_size"] += 4
    name = "model.layers.0.self_attn.q_proj.weight"
    shard = broken / index["weight_map"].pop(name)  # a tensor the index no longer lists
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    tensors = load_file(shard)
    key = next(k for k in tensors if k != name and tensors[k].dim() == 2)
    tensors[key][0, :3] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    with open(shard, "ab") as fh:
        fh.write(b"trailing")
    result = run_cli("inspect", broken, "--verify", "--json")
    assert result.exit_code == 1
    problems = {(p["where"], p["what"]) for p in json.loads(result.stdout)["verify"]["problems"]}
    assert (key, f"3 NaN and 0 Inf of {tensors[key].numel()} values") in problems
    assert any("does not list" in what and name in what for _, what in problems)
    assert any("total_size" in what for _, what in problems)
    assert any(what == "8 bytes after the last tensor" for _, what in problems)
