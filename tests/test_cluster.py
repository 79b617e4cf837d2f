"""--cluster ray, on a real local Ray cluster started here (2 CPUs): the same bytes as one process, with a worker
killed mid-run, and a task that fails for a real reason failing the whole command with nothing published."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import make_fixtures as mf
import pytest
import torch
from helpers import FIX_ADAPTER, FIX_BASE, listing, one_line_error, run_cli
from safetensors.torch import load_file, save_file

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module: the CLI finds Ray initialised and uses it (and leaves it running)."""
    import logging

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[Path, Path]:
    """A base in several shards whose merge takes a moment per shard, and a LoRA on every projection."""
    root = tmp_path_factory.mktemp("cluster")
    config = mf.llama_config(hidden=256, layers=4, vocab=4096)
    base = mf.save_model(mf.build_model(config), root / "base", max_shard_size="2MB")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapter = mf.make_adapter(mf.build_model(config), root / "adapter", r=8, target_modules=targets)
    return base, adapter


def same_folders(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir() if p.suffix in (".safetensors", ".json") and p.name != "config.json")
    assert names == sorted(
        p.name for p in b.iterdir() if p.suffix in (".safetensors", ".json") and p.name != "config.json"
    )
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_a_merge_on_ray_is_the_same_bytes_as_one_process(cluster, sharded, tmp_path):
    base, adapter = sharded
    assert len(list(base.glob("*.safetensors"))) > 2
    one = run_cli("merge", base, adapter, "-o", tmp_path / "one")
    on_ray = run_cli("merge", base, adapter, "-o", tmp_path / "ray", "--cluster", "ray")
    assert one.exit_code == on_ray.exit_code == 0, on_ray.stderr
    same_folders(tmp_path / "one", tmp_path / "ray")
    fixtures = run_cli("merge", FIX_BASE, FIX_ADAPTER, "--cluster", "ray", "-o", tmp_path / "fix", "-q")
    assert fixtures.exit_code == 0 and run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "fix1").exit_code == 0
    same_folders(tmp_path / "fix", tmp_path / "fix1")


def ray_task_pids() -> list[int]:
    """The worker processes running one of our tasks now (Ray titles a busy worker ray::<function>)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(b"ray::_run_group"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@contextmanager
def killing_a_busy_worker(kill: bool = True) -> Iterator[list[int]]:
    """While the block runs, SIGKILL the first Ray worker seen running one of our tasks (when ``kill``); the
    list of the pids killed."""
    killed: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        while kill and not stop.is_set() and not killed:
            for pid in ray_task_pids():
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                break
            time.sleep(0.002)

    watcher = threading.Thread(target=killer)
    watcher.start()
    try:
        yield killed
    finally:
        stop.set()
        watcher.join()


def test_a_worker_killed_mid_run_is_retried_and_the_bytes_are_the_same(cluster, sharded, tmp_path):
    base, adapter = sharded
    assert run_cli("merge", base, adapter, "-o", tmp_path / "one").exit_code == 0
    with killing_a_busy_worker() as killed:
        result = run_cli("merge", base, adapter, "-o", tmp_path / "ray", "--cluster", "ray")
    assert killed, "no task was caught running"
    assert result.exit_code == 0, result.stderr
    same_folders(tmp_path / "one", tmp_path / "ray")


def test_a_task_that_fails_for_a_real_reason_fails_the_run_with_one_line(cluster, sharded, tmp_path):
    base, adapter = sharded
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    tensors = load_file(adapter / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if "layers.3.mlp.down_proj.lora_B" in k)
    tensors[key] = torch.full_like(tensors[key], float("inf"))  # the last shard's down_proj: NaN/Inf there
    save_file(tensors, broken / "adapter_model.safetensors")
    out = tmp_path / "merged"
    one_line_error(run_cli("merge", base, broken, "-o", out, "--cluster", "ray"), "down_proj")
    assert not out.exists()
    assert not [p for p in listing(tmp_path) if "lorasurgeon" in p]  # no partial folder left behind


def test_cluster_mistakes_are_named(tmp_path):
    one_line_error(
        run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "o", "--cluster", "ray", "--device", "cuda"),
        "--cluster ray",
    )
    r = run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "o", "--cluster", "slurm")
    assert r.exit_code == 2 and "--cluster" in r.output
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def merged(sharded, tmp_path_factory) -> Path:
    base, adapter = sharded
    out = tmp_path_factory.mktemp("cluster-merged") / "merged"
    assert run_cli("merge", base, adapter, "-o", out, "-q").exit_code == 0
    return out


@pytest.mark.parametrize("kill", [False, True])
def test_an_extract_on_ray_is_the_same_adapter_with_or_without_a_killed_worker(
    cluster, sharded, merged, tmp_path, kill
):
    base, _ = sharded
    args = ("extract", base, merged, "--budget", "200KB", "--dtype", "bf16")
    assert run_cli(*args, "-o", tmp_path / "one").exit_code == 0
    with killing_a_busy_worker(kill) as killed:
        result = run_cli(*args, "-o", tmp_path / "ray", "--cluster", "ray")
    assert result.exit_code == 0, result.stderr
    assert bool(killed) == kill
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes()


def test_a_calibrated_extract_on_ray_is_the_same_adapter(cluster, tmp_path):
    merged = tmp_path / "merged"
    assert run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", merged, "-q").exit_code == 0
    args = ("extract", FIX_BASE, merged, "--rank", "4", "--calibration", FIX_BASE.parent / "calibration.txt")
    assert run_cli(*args, "-o", tmp_path / "one").exit_code == 0
    result = run_cli(*args, "-o", tmp_path / "ray", "--cluster", "ray")
    assert result.exit_code == 0, result.stderr
    name = "adapter_model.safetensors"
    assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes()


def test_hub_inputs_read_in_place_are_read_so_by_the_tasks_too(cluster, tmp_path, monkeypatch):
    from hub_server import serving

    with serving(monkeypatch, tmp_path / "hf_cache") as hub:
        hub.add_folder("org/base", FIX_BASE)
        result = run_cli("merge", "org/base", FIX_ADAPTER, "--stream", "--cluster", "ray", "-o", tmp_path / "ray")
        assert result.exit_code == 0, result.stderr
        assert hub.served["model.safetensors"] >= (FIX_BASE / "model.safetensors").stat().st_size
    assert run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "one").exit_code == 0
    same_folders(tmp_path / "one", tmp_path / "ray")
    assert not list((tmp_path / "hf_cache").rglob("*.safetensors"))


def test_a_gguf_result_is_not_written_on_a_cluster(tmp_path):
    r = run_cli("merge", FIX_BASE, FIX_ADAPTER, "-o", tmp_path / "out.gguf", "--cluster", "ray")
    one_line_error(r, "--cluster ray", ".gguf")
    assert not (tmp_path / "out.gguf").exists()


@pytest.mark.parametrize(
    "args",
    [
        ("resize", "{adapter}", "--budget", "300KB"),
        ("combine", "{adapter}", "{adapter}", "--weight", "1", "--weight", "0.5", "--rank", "4"),
        ("resize", "{fixture}", "--rank", "2", "--base", "{base}", "--calibration", "{calibration}"),
    ],
    ids=["resize", "combine", "resize calibrated"],
)
def test_resize_and_combine_on_ray_are_the_same_adapter(cluster, sharded, tmp_path, args):
    """One task per layer's modules (and one for the rest), the tensors sent back and written by the driver."""
    _, adapter = sharded
    where = {
        "adapter": adapter,
        "fixture": FIX_ADAPTER,
        "base": FIX_BASE,
        "calibration": FIX_BASE.parent / "calibration.txt",
    }
    args = tuple(a.format(**where) for a in args)
    assert run_cli(*args, "-o", tmp_path / "one").exit_code == 0
    result = run_cli(*args, "-o", tmp_path / "ray", "--cluster", "ray")
    assert result.exit_code == 0, result.stderr
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes(), name
    one = json.loads((tmp_path / "one" / "resize_report.json").read_text())
    on_ray = json.loads((tmp_path / "ray" / "resize_report.json").read_text())
    assert one["modules"] == on_ray["modules"]  # the report in the plan's order, wherever each was computed


def test_resize_cluster_mistakes_are_named(tmp_path):
    r = run_cli("resize", FIX_ADAPTER, "--rank", "2", "-o", tmp_path / "o", "--cluster", "ray", "--device", "cuda")
    one_line_error(r, "--cluster ray")
    assert not (tmp_path / "o").exists()
