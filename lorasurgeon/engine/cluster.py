"""Independent groups of ops run as Ray tasks (``--cluster ray``): the driver plans, lays the result out and
commits it; each task reads its inputs where they lie (a shared filesystem) and either writes its tensors into the
result's shard files at the places the driver's writer fixed (io.writer.PlacedSink: a merge, whose layout is known
from headers), or sends them back through Ray's object store for the driver's sink to write (extract's factors,
whose shapes are known only once computed).

Ray is connected to as ``ray.init()`` connects: to ``RAY_ADDRESS`` when it is set, else to a local cluster
started for the run (and stopped after it). Each task runs :func:`engine.execute.run` on its group -- the same
read-ahead, compute workers and memory bound as a single process -- so a result is the same bytes wherever its
tensors were computed. A task whose worker dies is run again by Ray (:data:`RETRIES` times): it writes the same
bytes at the same places. A task that fails for a reason of its own fails the run: its error, raised here, and
nothing is published (the caller's writer aborts).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic

from ..errors import LorasurgeonError, UnsupportedError
from ..io.checkpoint import FileSlice
from ..io.remote import register, registered
from ..io.writer import Placed, PlacedSink
from .execute import Compute, ExecStats, InfoT, OpT, Progress, Readable, Sink, run

RETRIES = 3  # runs of a task after its worker died (Ray's own default for tasks)
HUB_ENV = ("HF_ENDPOINT", "HF_TOKEN", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_DOWNLOAD_TIMEOUT")  # as the driver has them


@dataclass(frozen=True)
class Group(Generic[OpT]):
    """One task's ops (in plan order), their places in the plan, and what a failure of it is called."""

    label: str
    ops: list[OpT]
    indices: list[int]


def groups_by(ops: Sequence[OpT], key: Callable[[OpT], str]) -> list[Group[OpT]]:
    """The ops grouped by ``key`` (a result's shard file), groups in the order they first appear."""
    found: dict[str, Group[OpT]] = {}
    for index, op in enumerate(ops):
        group = found.setdefault(key(op), Group(key(op), [], []))
        group.ops.append(op)
        group.indices.append(index)
    return list(found.values())


def run_on_ray(
    groups: Sequence[Group[OpT]],
    inputs: Sequence[Readable],
    places: Mapping[str, Placed] | Sink,
    *,
    compute: Compute[OpT, InfoT],
    device: str = "cpu",
    workers: int = 1,
    threads: int | None = None,
    progress: Progress | None = None,
) -> tuple[ExecStats[InfoT], list[str]]:
    """Each group a Ray task writing into ``places`` (or computing, when ``places`` is the driver's sink, and
    sending its tensors back to be written there); the combined stats (infos group by group, in the groups' order)
    and the names written, once every task is done.

    Raises:
        UnsupportedError: Ray is not installed.
        LorasurgeonError: a task's own error (as it was raised there), or a task whose worker died every time.
    """
    import time

    ray, started = _connect()
    start = time.perf_counter()
    try:
        # a task asks for the CPUs its torch threads use (at most a node's): its arithmetic is the same as a process
        # on that many threads (a matrix product's sums are split by thread), so the bytes are too
        cpus = min(threads or 1, max(int(n["Resources"].get("CPU", 1)) for n in ray.nodes() if n["Alive"]))
        remotes = registered()  # Hub files read in place: the tasks read them so too, with the driver's Hub settings
        env = {"env_vars": {"HF_HUB_OFFLINE": "0"} | {k: os.environ[k] for k in HUB_ENV if k in os.environ}}
        options = {"runtime_env": env} if remotes else {}
        task = ray.remote(max_retries=RETRIES, retry_exceptions=False, num_cpus=cpus, **options)(_run_group)
        sink, where = (None, dict(places)) if isinstance(places, Mapping) else (places, None)
        shared = ray.put(list(inputs)), ray.put(where), ray.put(remotes)
        pending = {task.remote(g.ops, *shared, compute, device, workers, threads): g for g in groups}
        if progress is not None:
            progress.start(sum(op.nbytes for g in groups for op in g.ops))
        infos: dict[int, list[InfoT]] = {}
        names: list[str] = []
        written, stages = 0, dict.fromkeys(("read", "compute", "write"), 0.0)
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            group = pending.pop(ref)
            done, got, nbytes, seconds = _result(ray, ref, group, pending)
            if sink is not None:
                for name, tensor in done:
                    sink.write(name, tensor)
                done = [name for name, _ in done]
            names += done
            infos[group.indices[0]] = got
            written += nbytes
            stages = {k: v + seconds.get(k, 0.0) for k, v in stages.items()}
            if progress is not None:
                progress.advance(sum(op.nbytes for op in group.ops))
        if progress is not None:
            progress.finish()
        ops = sum(len(g.ops) for g in groups)
        ordered = tuple(info for first in sorted(infos) for info in infos[first])
        stats = ExecStats(ops, written, time.perf_counter() - start, ordered, stages)
        return stats, names
    finally:
        if started:
            ray.shutdown()


def _connect() -> tuple[Any, bool]:
    """Ray, connected (RAY_ADDRESS, else a local cluster), and whether this call started it."""
    try:
        import ray
    except ImportError:
        raise UnsupportedError("--cluster ray needs Ray: pip install 'lorasurgeon[ray]'") from None
    if ray.is_initialized():
        return ray, False
    address = os.environ.get("RAY_ADDRESS") or None
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at RAY_ADDRESS={address}" if address else "a local Ray cluster"
        raise LorasurgeonError(f"--cluster ray: cannot connect to {where} ({exc})") from None
    return ray, True


def _result(ray: Any, ref: Any, group: Group[Any], pending: dict[Any, Any]) -> Any:
    """A finished task's result, or its failure raised (the other tasks cancelled first)."""
    from ray import exceptions as rex

    try:
        return ray.get(ref)
    except rex.RayTaskError as exc:
        _cancel(ray, pending)
        cause = exc.cause
        if isinstance(cause, LorasurgeonError):
            raise cause from None
        raise LorasurgeonError(f"--cluster ray: the task writing {group.label} failed: {cause!r}") from None
    except rex.RayError as exc:  # its worker died every time, or the cluster went away
        _cancel(ray, pending)
        raise LorasurgeonError(
            f"--cluster ray: the task writing {group.label} did not finish in {RETRIES + 1} tries "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None


def _cancel(ray: Any, pending: dict[Any, Any]) -> None:
    for ref in pending:
        ray.cancel(ref, force=True)


def _run_group(
    ops: list[Any],
    inputs: list[Readable],
    places: dict[str, Placed] | None,
    remotes: dict[Any, Any],
    compute: Compute[Any, Any],
    device: str,
    workers: int,
    threads: int | None,
) -> tuple[list[Any], list[Any], int, dict[str, float]]:
    """In a Ray worker: one group through the engine into the result's files (``places``), or into a list sent
    back; what it wrote (names, or (name, tensor) pairs) and reported. ``remotes``: the driver's files read in
    place (io.remote), registered here too."""
    for path, remote in remotes.items():
        register(path, remote)
    if places is None:
        kept = _Kept()
        stats = run(ops, inputs, kept, compute=compute, device=device, workers=workers, threads=threads)
        return kept.outputs, list(stats.infos), stats.bytes_written, stats.stages
    sink = PlacedSink(places)
    try:
        stats = run(ops, inputs, sink, compute=compute, device=device, workers=workers, threads=threads)
    finally:
        sink.close()
    return sink.names, list(stats.infos), stats.bytes_written, stats.stages


class _Kept:
    """A task's outputs kept to be sent back (a FileSlice's bytes read: the driver may not see the file)."""

    def __init__(self) -> None:
        self.outputs: list[tuple[str, Any]] = []

    def write(self, name: str, tensor: Any) -> None:
        if isinstance(tensor, FileSlice):
            tensor = _read_slice(tensor)
        self.outputs.append((name, tensor))


def _read_slice(piece: FileSlice) -> Any:
    import torch

    from ..io.checkpoint import pread_into

    out = torch.empty(piece.nbytes, dtype=torch.uint8)
    at = 0
    for part in piece.ranges():
        pread_into(part.path, out[at : at + part.nbytes].numpy().data, part.offset)
        at += part.nbytes
    return out.view(piece.dtype).reshape(piece.shape)
