"""Nothing of yours is ever replaced: what appears at the output path while a run works is kept, and so is
the run's finished result; --overwrite is checked again when replacing; a stop after publishing is a success;
a killed run's scratch folder is known by its lock, not its pid. Races are real processes held at a gate."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import FIX_ADAPTER, FIX_BASE, ROOT, run_cli
from reference import read_folder

from lorasurgeon.io.publish import ResultKept, publish
from lorasurgeon.io.scratch import clean_stale, make_scratch, release, rename_noreplace

# The real CLI in a child process, its progress replaced by a gate: at its first tensor it says it is
# waiting (a file in GATE) and goes on only once GATE/go exists.
GATED_CLI = r"""
import os, sys, time
from pathlib import Path
gate = Path(sys.argv[1])
class Gate:
    def start(self, total): pass
    def advance(self, n):
        while not (gate / "go").exists():
            (gate / f"waiting-{os.getpid()}").touch()
            time.sleep(0.005)
    def finish(self): pass
import lorasurgeon.cli.options as options
options.progress_bar = lambda quiet, dry_run=False: Gate()
from lorasurgeon.cli import main
sys.argv = ["lorasurgeon", *sys.argv[2:]]
main()
"""


def start_gated(gate: Path, *args: object) -> subprocess.Popen:
    gate.mkdir(exist_ok=True)
    return subprocess.Popen(
        [sys.executable, "-c", GATED_CLI, str(gate), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def wait_at_gate(gate: Path, *children: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while len(list(gate.glob("waiting-*"))) < len(children):
        for child in children:
            assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "the runs never reached the gate"
        time.sleep(0.01)


def finish(child: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = child.communicate(timeout=300)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = read_folder(a), read_folder(b)
    return ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref")
    for weight in ("1", "0.5"):
        assert run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", root / weight, "--weight", weight).exit_code == 0
    return root


def test_a_folder_made_while_the_merge_runs_is_kept_and_so_is_the_result(tmp_path, references):
    victim = tmp_path / "victim"
    child = start_gated(tmp_path / "gate", "merge", FIX_BASE, FIX_ADAPTER, "-o", victim)
    wait_at_gate(tmp_path / "gate", child)
    victim.mkdir()
    (victim / "notes.txt").write_text("notes")
    (tmp_path / "gate" / "go").touch()
    done = finish(child)
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line and "Traceback" not in done.stderr
    assert f"kept at {victim.with_name('victim.new')}" in line and "not touched" in line
    assert (victim / "notes.txt").read_text() == "notes" and [p.name for p in victim.iterdir()] == ["notes.txt"]
    assert same_tensors(tmp_path / "victim.new", references / "1")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_folder_made_while_extract_runs_is_kept_and_so_is_the_adapter(tmp_path, references):
    victim = tmp_path / "victim"
    child = start_gated(tmp_path / "gate", "extract", FIX_BASE, references / "1", "--rank", "4", "-o", victim)
    wait_at_gate(tmp_path / "gate", child)
    victim.mkdir()
    (victim / "notes.txt").write_text("notes")
    (tmp_path / "gate" / "go").touch()
    done = finish(child)
    assert done.returncode == 2 and "kept at" in done.stderr, done.stderr
    assert [p.name for p in victim.iterdir()] == ["notes.txt"]
    kept = tmp_path / "victim.new"
    assert (kept / "adapter_model.safetensors").is_file() and (kept / "adapter_config.json").is_file()


def test_two_merges_to_one_output_at_once_lose_neither_result(tmp_path, references):
    out = tmp_path / "out"
    gate = tmp_path / "gate"
    runs = {w: start_gated(gate, "merge", FIX_BASE, FIX_ADAPTER, "-o", out, "--weight", w) for w in ("1", "0.5")}
    wait_at_gate(gate, *runs.values())
    (gate / "go").touch()
    done = {w: finish(c) for w, c in runs.items()}
    assert sorted(d.returncode for d in done.values()) == [0, 2], [d.stderr for d in done.values()]
    won = next(w for w, d in done.items() if d.returncode == 0)
    lost = next(w for w, d in done.items() if d.returncode == 2)
    assert "Wrote" in done[won].stdout and "Wrote" not in done[lost].stdout
    assert f"kept at {out.with_name('out.new')}" in done[lost].stderr
    assert same_tensors(out, references / won) and same_tensors(tmp_path / "out.new", references / lost)


def test_overwrite_checks_again_when_replacing(tmp_path, references):
    out = shutil.copytree(references / "1", tmp_path / "out")
    child = start_gated(tmp_path / "gate", "merge", FIX_BASE, FIX_ADAPTER, "-o", out, "--overwrite", "--weight", "0.5")
    wait_at_gate(tmp_path / "gate", child)
    (out / "notes.txt").write_text("mine")  # the earlier result is no longer only ours
    (tmp_path / "gate" / "go").touch()
    done = finish(child)
    assert done.returncode == 2 and "notes.txt" in done.stderr and "kept at" in done.stderr, done.stderr
    assert (out / "notes.txt").read_text() == "mine" and same_tensors(out, references / "1")
    assert same_tensors(tmp_path / "out.new", references / "0.5")


def test_overwrite_still_replaces_an_earlier_result(tmp_path, references):
    out = shutil.copytree(references / "1", tmp_path / "out")
    child = start_gated(tmp_path / "gate", "merge", FIX_BASE, FIX_ADAPTER, "-o", out, "--overwrite", "--weight", "0.5")
    wait_at_gate(tmp_path / "gate", child)
    (tmp_path / "gate" / "go").touch()
    done = finish(child)
    assert done.returncode == 0, done.stderr
    assert same_tensors(out, references / "0.5") and sorted(p.name for p in tmp_path.iterdir()) == ["gate", "out"]


# --- a stop signal after the result is published ------------------------------------------------------

SIGNAL_AT_PUBLISH = r"""
import os, signal, sys
import lorasurgeon.io.writer as writer
real, when = writer.publish, sys.argv[1]
def publish(*args, **kwargs):
    if when == "before":
        os.kill(os.getpid(), signal.SIGINT)
    done = real(*args, **kwargs)
    if when == "after":
        os.kill(os.getpid(), signal.SIGINT)
    return done
writer.publish = publish
from lorasurgeon.cli import main
sys.argv = ["lorasurgeon", *sys.argv[2:]]
main()
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_stop_after_publishing_is_a_success(tmp_path, when):
    out = tmp_path / "merged"
    done = subprocess.run(
        [sys.executable, "-c", SIGNAL_AT_PUBLISH, when, "merge", FIX_BASE, FIX_ADAPTER, "-o", out],
        capture_output=True,
        text=True,
    )
    if when == "after":
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("Wrote") and (out / "model.safetensors").is_file()
        assert done.stderr.strip() == f"note: SIGINT came after {out} was complete; the run finished"
    else:
        assert done.returncode == 130, done.stderr
        assert "no unfinished result is left behind" in done.stderr and sorted(tmp_path.iterdir()) == []


# --- a killed run's scratch folder -----------------------------------------------------------------

HOLD_SCRATCH = r"""
import sys, time
from pathlib import Path
from lorasurgeon.io.scratch import make_scratch
print(make_scratch(Path(sys.argv[1]), "partial"), flush=True)
time.sleep(600)
"""


def test_a_killed_runs_folder_is_removed_even_while_it_is_a_zombie(tmp_path):
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", HOLD_SCRATCH, str(out)], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    scratch = Path(child.stdout.readline().strip())
    assert clean_stale(out) == [] and scratch.is_dir()  # alive: its folder is left alone
    os.kill(child.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        os.kill(child.pid, 0)  # a zombie still answers this: the pid alone cannot tell
        assert clean_stale(out) == [scratch] and not scratch.exists()
    finally:
        child.wait()
        child.stdout.close()


def test_a_folder_of_this_process_is_never_stale(tmp_path):
    scratch = make_scratch(tmp_path / "out", "spool")
    assert clean_stale(tmp_path / "out") == [] and scratch.is_dir()
    release(scratch)
    assert clean_stale(tmp_path / "out") == [scratch]


# --- the primitives ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", [True, False], ids=["renameat2", "fallback"])
@pytest.mark.parametrize("kind", ["file", "folder"])
def test_rename_noreplace_never_replaces(tmp_path, kernel, kind):
    src, dst = tmp_path / "src", tmp_path / "dst"
    if kind == "file":
        src.write_text("new")
        dst.write_text("theirs")
    else:
        src.mkdir()
        (src / "a").write_text("new")
        dst.mkdir()  # an empty folder is theirs too
    with pytest.raises(FileExistsError):
        rename_noreplace(src, dst, kernel=kernel)
    assert src.exists() and (dst.read_text() == "theirs" if kind == "file" else list(dst.iterdir()) == [])
    (dst.unlink if kind == "file" else dst.rmdir)()
    rename_noreplace(src, dst, kernel=kernel)
    assert not src.exists() and (dst.read_text() if kind == "file" else (dst / "a").read_text()) == "new"


def test_a_file_result_is_kept_beside_what_appeared(tmp_path):
    staged, out = tmp_path / ".staged", tmp_path / "adapter.gguf"
    staged.write_bytes(b"GGUF ours")
    out.write_bytes(b"theirs")
    (tmp_path / "adapter.new.gguf").write_bytes(b"theirs too")
    with pytest.raises(ResultKept) as kept:
        publish(staged, out, overwrite=False, not_replaceable=lambda p: None)
    assert kept.value.kept == tmp_path / "adapter.new-2.gguf" and kept.value.kept.read_bytes() == b"GGUF ours"
    assert out.read_bytes() == b"theirs" and (tmp_path / "adapter.new.gguf").read_bytes() == b"theirs too"


def test_gguf_overwrite_replaces_only_a_gguf_file(tmp_path):
    pytest.importorskip("gguf")
    notes = tmp_path / "notes.gguf"
    notes.write_text("my notes")
    args = ("convert", FIX_ADAPTER, "--to", "gguf", "--base", FIX_BASE, "-o")
    done = run_cli(*args, notes, "--overwrite")
    assert done.exit_code == 2 and "not a GGUF file" in done.stderr and notes.read_text() == "my notes"
    out = tmp_path / "a.gguf"
    assert run_cli(*args, out).exit_code == 0
    assert run_cli(*args, out).exit_code == 2
    assert run_cli(*args, out, "--overwrite").exit_code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "notes.gguf"]


def test_a_picture_is_replaced_only_with_overwrite_and_only_a_picture(tmp_path, references):
    pytest.importorskip("matplotlib")
    picture = tmp_path / "d.png"
    picture.write_text("not a picture")
    done = run_cli("diff", FIX_BASE, references / "1", "--plot", picture)
    assert done.exit_code == 2 and "already exists" in done.stderr
    done = run_cli("diff", FIX_BASE, references / "1", "--plot", picture, "--overwrite")
    assert done.exit_code == 2 and "not a PNG file" in done.stderr and picture.read_text() == "not a picture"
    picture.unlink()
    assert run_cli("diff", FIX_BASE, references / "1", "--plot", picture).exit_code == 1  # 1: they differ
    assert run_cli("diff", FIX_BASE, references / "1", "--plot", picture, "--overwrite").exit_code == 1
    assert picture.read_bytes().startswith(b"\x89PNG")


# --- a stop before anything is written ------------------------------------------------------------------

SLOW_START = r"""
import sys, time
import lorasurgeon.commands.merge as merge_module
real = merge_module.plan_run
def slow_plan(*args, **kwargs):  # a start-up stuck in C code (an import of seconds): no Python handler can run
    print("planning", flush=True)
    import ctypes
    ctypes.CDLL(None).sleep(30)
    return real(*args, **kwargs)
merge_module.plan_run = slow_plan
from lorasurgeon.cli import main
sys.argv = ["lorasurgeon", *sys.argv[1:]]
main()
"""


def test_a_stop_at_start_up_is_honoured_at_once(tmp_path):
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_START, "merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "merged"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdout.readline() == "planning\n"
    began = time.monotonic()
    child.send_signal(signal.SIGINT)
    child.communicate(timeout=20)
    assert time.monotonic() - began < 5 and child.returncode == -signal.SIGINT
    assert sorted(tmp_path.iterdir()) == []  # nothing had been written, nothing is left
