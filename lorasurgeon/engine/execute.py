"""The streaming executor: the only place that moves tensor data.

Three stages connected by bounded queues: a reader thread reads the next ops' tensors, the
calling thread computes (on ``device``), a writer thread hands results to the sink (a
CheckpointWriter or SpoolWriter). At most a few tensors are alive at once, whatever the model
size. File reads, writes and torch kernels release the GIL, so the stages overlap.

Every command uses this one loop; what differs is the op type and its ``compute`` function
(``commands.merge.compute.compute_merge``, ``commands.extract.compute.compute_extract``,
``commands.diff.compute_diff``). The loop holds no command's math.
An op needs ``name``, ``nbytes`` (its share of the progress bar) and ``refs()`` (what to read).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from ..io.buffers import ReadBuffers
from ..io.checkpoint import Checkpoint
from .plan import Ref

_DONE = object()
QUEUE_DEPTH = 2
READ_AHEAD_BYTES = 256 << 20


@dataclass(frozen=True)
class ExecStats:
    tensors: int
    bytes_written: int
    seconds: float
    infos: tuple[Any, ...] = ()  # what each op's compute reported (extract: per-module statistics)


@dataclass(frozen=True)
class FileSlice:
    """A tensor's bytes left in its file: written by copying file to file, never through memory."""

    path: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Outcome:
    """What computing one op gave: tensors to write (possibly none) and anything to report."""

    outputs: list[tuple[str, torch.Tensor]]
    info: Any = None


class Sink(Protocol):
    def write(self, name: str, tensor: torch.Tensor) -> None: ...


class Progress(Protocol):
    """Told the total bytes to write, then each tensor's bytes as it is written, then done."""

    def start(self, total: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def finish(self) -> None: ...


def _slice(inputs: Sequence[Checkpoint], op) -> FileSlice | None:
    """A plain copy's bytes, left on disk (same bytes out as in), where they can be."""
    if getattr(op, "is_plain_copy", False):
        info = inputs[op.src.source].info(op.src.key)
        if info.offset is not None and info.dtype == op.dtype and info.shape == op.shape:
            return FileSlice(info.file, info.offset, info.nbytes, info.dtype, info.shape)
    return None


def _fetch(inputs: Sequence[Checkpoint], op, alloc: ReadBuffers) -> dict[Ref, torch.Tensor | FileSlice]:
    if (piece := _slice(inputs, op)) is not None:
        return {op.src: piece}
    return {r: inputs[r.source].read(r.key, alloc) for r in dict.fromkeys(op.refs())}


def _fetch_bytes(inputs: Sequence[Checkpoint], op) -> int:
    """The memory ``_fetch`` will take for ``op``."""
    if _slice(inputs, op) is not None:
        return 0
    return sum(inputs[r.source].info(r.key).nbytes for r in dict.fromkeys(op.refs()))


class _ReadAhead:
    """Bytes fetched but not yet taken by compute: the reader waits while a fetch would pass
    ``limit``, unless nothing is held (one op always goes ahead, however large)."""

    def __init__(self, limit: int):
        self.limit, self.held = limit, 0
        self._cond = threading.Condition()

    def acquire(self, nbytes: int, stop: threading.Event) -> bool:
        with self._cond:
            while self.held and self.held + nbytes > self.limit:
                if stop.is_set():
                    return False
                self._cond.wait(0.1)
            self.held += nbytes
            return True

    def release(self, nbytes: int) -> None:
        with self._cond:
            self.held -= nbytes
            self._cond.notify_all()


def run(ops: Sequence[Any], inputs: Sequence[Checkpoint], sink: Sink, *,
        compute: Callable[[Any, dict, torch.device], Outcome], device: str = "cpu", progress: Progress | None = None,
        read_ahead: int = READ_AHEAD_BYTES) -> ExecStats:
    """Execute ``ops`` in order, streaming: read ahead, compute, write behind.

    The reader runs ahead of compute by at most QUEUE_DEPTH ops and ``read_ahead`` bytes (but
    always by one op), so huge tensors (a 128 K-token embedding is 1 GB in bf16) are not queued
    several deep.
    """
    dev = torch.device(device)
    ahead = _ReadAhead(read_ahead)
    start = time.perf_counter()
    read_q: queue.Queue = queue.Queue(QUEUE_DEPTH)
    write_q: queue.Queue = queue.Queue(QUEUE_DEPTH)
    errors: list[BaseException] = []
    stop = threading.Event()

    def put(q: queue.Queue, item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def take(q: queue.Queue) -> object:
        """The next item, or _DONE once the run is stopping (a failed stage sets ``stop``)."""
        while not stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return _DONE

    def reader() -> None:
        try:
            buffers = ReadBuffers()
            for op in ops:
                nbytes = _fetch_bytes(inputs, op)
                if not ahead.acquire(nbytes, stop) or not put(read_q, (op, _fetch(inputs, op, buffers), nbytes)):
                    return
        except BaseException as exc:  # handed to the main thread, re-raised there
            errors.append(exc)
            stop.set()
        put(read_q, _DONE)

    def write_stage() -> None:
        try:
            while (item := take(write_q)) is not _DONE:
                op, outputs = item
                for name, tensor in outputs:
                    sink.write(name, tensor)
                if progress is not None:
                    progress.advance(op.nbytes)
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    if progress is not None:
        progress.start(sum(op.nbytes for op in ops))
    # Not daemons: a daemon thread still inside torch when the interpreter exits is unwound
    # through C++ destructors and aborts the process. Every way out of the try below sets
    # ``stop`` or sends _DONE, so both threads end within one tensor and are joined.
    threads = [threading.Thread(target=reader, name="lorasurgeon-read"),
               threading.Thread(target=write_stage, name="lorasurgeon-write")]
    written = 0
    infos = []
    try:
        for t in threads:
            t.start()
        while (item := take(read_q)) is not _DONE:
            op, tensors, nbytes = item
            ahead.release(nbytes)  # the reader may fetch the next ops while this one computes
            outcome = compute(op, tensors, dev)
            del tensors
            infos.append(outcome.info)
            if not put(write_q, (op, outcome.outputs)):
                break
            written += sum(t.nbytes for _, t in outcome.outputs)
    except BaseException:
        stop.set()
        raise
    finally:
        if not stop.is_set():
            put(write_q, _DONE)  # gives up if the writer has failed meanwhile
        for t in threads:
            if t.ident is not None:
                t.join()
        if progress is not None:
            progress.finish()
    if errors:
        raise errors[0]
    return ExecStats(len(ops), written, time.perf_counter() - start, tuple(infos))
