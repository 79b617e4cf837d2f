"""Where a result may go: --overwrite replaces only an earlier result, protected folders are never
replaced, signals remove the unfinished result, and every output-side OSError is one line, exit 2."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import FIX_ADAPTER, FIX_BASE, listing, one_line_error, run_cli
from safetensors.torch import save_file


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def no_scratch(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if "lorasurgeon-" in p.name]


# --- what --overwrite may replace -----------------------------------------------------------


def test_overwrite_never_replaces_a_folder_of_the_users_files(tmp_path):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("three years of work")
    (thesis / "figures").mkdir()
    (thesis / "figures" / "plot.png").write_bytes(b"\x89PNG")
    merged = tmp_path / "merged"
    assert run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", merged).exit_code == 0
    before = snapshot(thesis)
    for command in (
        ["merge", FIX_BASE, FIX_ADAPTER],
        ["extract", FIX_BASE, merged, "--rank", "2"],
        ["unmerge", merged, FIX_ADAPTER],
    ):
        line = one_line_error(run_cli(*command, "-o", thesis, "--overwrite"), "not replaced", "thesis")
        assert "--overwrite replaces only an earlier lorasurgeon result" in line
    assert snapshot(thesis) == before and no_scratch(tmp_path)


def test_overwrite_never_replaces_a_model_it_did_not_write(tmp_path):
    """A user's own model folder (transformers' save_pretrained: weights + config, no card of ours)."""
    theirs = shutil.copytree(FIX_BASE, tmp_path / "my-finetune")
    before = snapshot(theirs)
    one_line_error(
        run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", theirs, "--overwrite"),
        "not replaced",
        "no lorasurgeon model card",
    )
    assert snapshot(theirs) == before and no_scratch(tmp_path)


@pytest.mark.parametrize("extra", ["notes.txt", "sub/", ".hidden"])
def test_overwrite_refuses_a_result_holding_something_we_did_not_write(tmp_path, extra):
    out = tmp_path / "merged"
    assert run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", out).exit_code == 0
    if extra.endswith("/"):
        (out / extra).mkdir()
    else:
        (out / extra).write_text("mine")
    before = snapshot(out)
    one_line_error(run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", out, "--overwrite"), "not replaced", extra.rstrip("/"))
    assert snapshot(out) == before and no_scratch(tmp_path)


def test_overwrite_replaces_an_earlier_result_and_an_empty_folder(tmp_path):
    out = tmp_path / "merged"
    assert run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", out).exit_code == 0
    (out / "tokenizer.json").write_text("{}")  # a sidecar a result may carry, edited since
    assert run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", out, "--overwrite", "--weight", "0.5").exit_code == 0
    assert "--weight=0.5" in (out / "README.md").read_text()
    assert (out / "tokenizer.json").read_text() == (FIX_BASE / "tokenizer.json").read_text()  # the new result's
    lora = tmp_path / "lora"
    assert run_cli("extract", FIX_BASE, out, "--rank", "2", "-o", lora).exit_code == 0
    assert run_cli("extract", FIX_BASE, out, "--rank", "3", "-o", lora, "--overwrite").exit_code == 0
    assert json.loads((lora / "adapter_config.json").read_text())["r"] == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", empty, "--overwrite").exit_code == 0
    assert (empty / "model.safetensors").is_file() and no_scratch(tmp_path)


def test_a_file_is_never_replaced(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"not ours")
    one_line_error(run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", target, "--overwrite"), "not a safetensors file")
    assert target.read_bytes() == b"not ours"
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    one_line_error(run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", folder, "--overwrite"), "notes.txt")
    assert (folder / "notes.txt").read_text() == "keep me"


def test_a_safetensors_path_is_a_one_file_result_replaced_only_by_overwrite(tmp_path):
    """-o NAME.safetensors: the merged tensors alone, in one file renamed into place; an earlier one replaced with
    --overwrite only, and no hidden debris left beside it."""
    target = tmp_path / "merged.safetensors"
    done = run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", target)
    assert done.exit_code == 0, done.output
    assert target.is_file() and listing(tmp_path) == {"merged.safetensors"}
    first = target.read_bytes()
    one_line_error(run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", target), "already exists")
    again = run_cli("merge", FIX_BASE, FIX_ADAPTER, "--weight", "0.5", "-o", target, "--overwrite")
    assert again.exit_code == 0, again.output
    assert target.read_bytes() != first and listing(tmp_path) == {"merged.safetensors"}


@pytest.mark.parametrize("spelling", [".", "$PWD", "..", "$HOME", "/"])
def test_protected_folders_are_never_the_output(tmp_path, monkeypatch, spelling):
    home = tmp_path / "home"
    work = home / "project"
    work.mkdir(parents=True)
    (work / "notes.txt").write_text("keep me")
    (home / "photo.jpg").write_bytes(b"keep me too")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    out = {"$PWD": str(work), "$HOME": str(home)}.get(spelling, spelling)
    before = snapshot(home)
    for overwrite in ([], ["--overwrite"]):
        line = one_line_error(run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", out, *overwrite))
        assert any(w in line for w in ("current folder", "home folder", "root folder")), line
    assert snapshot(home) == before
    assert not [p for p in home.rglob("*") if "lorasurgeon" in p.name]  # no ..PID.*-old debris


def test_the_dry_run_refuses_what_the_run_would_refuse(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", ".", "--dry-run"), "current folder")


# --- signals ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_pair(tmp_path_factory):
    """A 256 MiB float32 base and an adapter for all of it: long enough to be stopped mid-write."""
    root = tmp_path_factory.mktemp("slow")
    (root / "base").mkdir()
    (root / "adapter").mkdir()
    save_file(
        {f"layers.{i}.proj.weight": torch.zeros(1024, 1024) for i in range(64)}, root / "base" / "model.safetensors"
    )
    lora = {}
    for i in range(64):
        lora[f"base_model.model.layers.{i}.proj.lora_A.weight"] = torch.ones(4, 1024)
        lora[f"base_model.model.layers.{i}.proj.lora_B.weight"] = torch.ones(1024, 4)
    save_file(lora, root / "adapter" / "adapter_model.safetensors")
    (root / "adapter" / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["proj"]})
    )
    return root


def signal_midway(args: list[str], cwd: Path, sig: int, scratch: str) -> subprocess.CompletedProcess:
    """Run the real CLI; once its hidden ``scratch`` folder exists, freeze it, signal it, let it go on."""
    child = subprocess.Popen(
        [sys.executable, "-m", "lorasurgeon", *args], cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    while not any(p.name.endswith(f".lorasurgeon-{scratch}") for p in cwd.iterdir()):
        assert child.poll() is None, "the run ended before it could be signalled: " + child.stderr.read()
        time.sleep(0.001)
    child.send_signal(signal.SIGSTOP)  # so the signal lands while the result is unfinished
    child.send_signal(sig)
    child.send_signal(signal.SIGCONT)
    out, err = child.communicate(timeout=120)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_removes_the_unfinished_merge(slow_pair, tmp_path, sig):
    work = tmp_path / "work"
    work.mkdir()
    done = signal_midway(
        ["merge", str(slow_pair / "base"), str(slow_pair / "adapter"), "-o", "out", "-q"], work, sig, "partial"
    )
    assert done.returncode == 128 + sig, done.stderr
    assert done.stderr.strip() == f"error: stopped by {signal.Signals(sig).name}; no unfinished result is left behind"
    assert listing(work) == set()


def test_a_signal_removes_the_unfinished_extract(slow_pair, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    tuned = work.parent / "tuned"
    tuned.mkdir()
    save_file({f"layers.{i}.proj.weight": torch.randn(1024, 1024) for i in range(64)}, tuned / "model.safetensors")
    done = signal_midway(
        ["extract", str(slow_pair / "base"), str(tuned), "--rank", "4", "-o", "lora", "-q"],
        work,
        signal.SIGTERM,
        "spool",
    )
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "SIGTERM" in done.stderr
    assert listing(work) == set()


# --- the output side's OSErrors -----------------------------------------------------------------


@pytest.fixture
def read_only(tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.parametrize("where", ["ro/out", "ro/sub/out"])
def test_a_read_only_location_is_one_line_exit_2(read_only, tmp_path, where):
    out = tmp_path / where
    one_line_error(run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", out), "Read-only file system")
    tuned = shutil.copytree(FIX_BASE, tmp_path / "tuned")
    tensors = {"model.norm.weight": torch.ones(64, dtype=torch.bfloat16)}
    from safetensors.torch import load_file

    save_file(
        {**load_file(tuned / "model.safetensors"), **tensors}, tuned / "model.safetensors", metadata={"format": "pt"}
    )
    one_line_error(run_cli("extract", FIX_BASE, tuned, "--rank", "2", "-o", out), "Read-only file system")
    assert listing(read_only) == set()


def test_an_unwritable_folder_is_one_line_exit_2(tmp_path):
    """Permissions, as a user meets them. Root ignores them through CAP_DAC_OVERRIDE, so as root the
    command runs without that capability (setpriv), and meets them too."""
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o555)
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: permissions cannot be met")
        caps = "-dac_override,-dac_read_search"
        prefix = [setpriv, "--bounding-set", caps, "--inh-caps", caps]
    done = subprocess.run(
        [
            *prefix,
            sys.executable,
            "-m",
            "lorasurgeon",
            "merge",
            str(FIX_BASE),
            str(FIX_ADAPTER),
            "-o",
            str(locked / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: {locked / 'out'}: cannot write the result here (Permission denied)"
    ]
    assert listing(locked) == set()


@pytest.mark.parametrize(
    "args",
    [
        ["convert", FIX_ADAPTER, "--to", "peft"],
        ["convert", FIX_ADAPTER, "--to", "mlx"],
        ["resize", FIX_ADAPTER, "--rank", "2"],
    ],
    ids=["peft", "mlx", "resize"],
)
def test_an_adapter_with_its_config_beside_it_is_never_one_file(tmp_path, args):
    """-o NAME.safetensors is a one-file result: PEFT's and MLX-LM's adapters need their config beside the
    weights, so they are refused, not written without it."""
    done = run_cli(*args, "-o", tmp_path / "a.safetensors")
    one_line_error(done, "is a folder", "--to kohya")
    assert listing(tmp_path) == set()


def test_a_folder_of_one_shard_is_not_taken_for_a_whole_checkpoint(tmp_path):
    """A folder holding one .safetensors is opened as that file (a LoRA's own folder), but never one shard of
    several whose index is missing: that would merge half a model without a word."""
    folder = tmp_path / "half"
    folder.mkdir()
    (folder / "model-00001-of-00002.safetensors").write_bytes((FIX_BASE / "model.safetensors").read_bytes())
    one_line_error(run_cli("merge", folder, FIX_ADAPTER, "-o", tmp_path / "m"), "no checkpoint found")
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "weights.safetensors").write_bytes((FIX_BASE / "model.safetensors").read_bytes())
    assert run_cli("inspect", alone).exit_code == 0
