"""The streaming executor: the one loop in which every command reads, computes and writes tensors.

Three stages connected by bounded queues: a reader thread reads the next ops' tensors, the
calling thread computes (on ``device``), a writer thread hands results to the sink (a
CheckpointWriter or SpoolWriter). At most a few tensors are alive at once, whatever the model
size. File reads, writes and torch kernels release the GIL, so the stages overlap.

What differs between commands is the op type (see ``plan.Op``) and the ``compute`` function
(``commands.merge.compute``, ``commands.extract.compute``, ``commands.diff``, ``commands.verify``);
the loop holds no command's math. An op whose output is an input's bytes unchanged
(``Op.byte_copy``) is not computed at all: its bytes are copied file to file.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import torch

from ..errors import LorasurgeonError
from ..io.buffers import ReadBuffers
from ..io.checkpoint import FileSlice, TensorInfo
from .plan import Op, Ref

QUEUE_DEPTH = 2
READ_AHEAD_BYTES = 256 << 20

OpT = TypeVar("OpT", bound=Op)
InfoT = TypeVar("InfoT")
Written = torch.Tensor | FileSlice


@dataclass(frozen=True)
class Outcome(Generic[InfoT]):
    """What computing one op gave: tensors to write (possibly none) and what to report about it."""

    outputs: list[tuple[str, torch.Tensor]]
    info: InfoT


@dataclass(frozen=True)
class ExecStats(Generic[InfoT]):
    tensors: int
    bytes_written: int
    seconds: float
    infos: tuple[InfoT, ...]  # what each computed op reported (extract: per-module statistics), in order


class Source(Protocol):
    """What the engine needs of an input: its tensors' descriptions, and reading one (a Checkpoint)."""

    def info(self, name: str) -> TensorInfo: ...

    def read(self, name: str, alloc: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor: ...


class Sink(Protocol):
    def write(self, name: str, tensor: Written) -> None: ...


class Discard:
    """The sink of a run that writes nothing (diff, verify): an output reaching it is a bug."""

    def write(self, name: str, tensor: Written) -> None:
        raise AssertionError(f"a run that writes nothing produced {name!r}")


class Progress(Protocol):
    """Told the total bytes to write, then each tensor's bytes as it is written, then done."""

    def start(self, total: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def finish(self) -> None: ...


Compute = Callable[[OpT, Mapping[Ref, torch.Tensor], torch.device], Outcome[InfoT]]


def _byte_copy(inputs: Sequence[Source], op: Op) -> FileSlice | None:
    """An op's output as its input's bytes left on disk, where they can be (same bytes out as in)."""
    spec = op.byte_copy
    if spec is None:
        return None
    (ref,) = op.refs()[:1]
    info = inputs[ref.source].info(ref.key)
    piece: FileSlice | None = info.file_slice()
    if piece is not None and piece.dtype == spec.dtype and piece.shape == spec.shape:
        return piece
    return None


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


@dataclass(frozen=True)
class _Writes:
    """What the compute stage hands the writer for one op."""

    op: Op
    outputs: list[tuple[str, Written]]


@dataclass(frozen=True)
class _Fetched:
    """What the reader hands on for ``ops[index]``: its tensors, its bytes left on disk, or why it could not be read."""

    index: int
    tensors: dict[Ref, torch.Tensor]
    piece: FileSlice | None
    error: LorasurgeonError | None
    nbytes: int


_DONE = object()


def run(
    ops: Sequence[OpT],
    inputs: Sequence[Source],
    sink: Sink,
    *,
    compute: Compute[OpT, InfoT],
    device: str = "cpu",
    progress: Progress | None = None,
    read_ahead: int = READ_AHEAD_BYTES,
    unreadable: Callable[[OpT, LorasurgeonError], InfoT] | None = None,
) -> ExecStats[InfoT]:
    """Execute ``ops`` in order, streaming: read ahead, compute, write behind.

    The reader runs ahead of compute by at most QUEUE_DEPTH ops and ``read_ahead`` bytes (but
    always by one op), so huge tensors (a 128 K-token embedding is 1 GB in bf16) are not queued
    several deep. A failure in any stage stops all three and is raised here; with ``unreadable``,
    an op whose input cannot be read is reported by it instead, and the run goes on.
    """
    dev = torch.device(device)
    ahead = _ReadAhead(read_ahead)
    start = time.perf_counter()
    read_q: queue.Queue[object] = queue.Queue(QUEUE_DEPTH)
    write_q: queue.Queue[object] = queue.Queue(QUEUE_DEPTH)
    errors: list[BaseException] = []
    stop = threading.Event()

    def put(q: queue.Queue[object], item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def take(q: queue.Queue[object]) -> object:
        """The next item, or _DONE once the run is stopping (a failed stage sets ``stop``)."""
        while not stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return _DONE

    def fetch(index: int, buffers: ReadBuffers) -> _Fetched:
        op = ops[index]
        piece = _byte_copy(inputs, op)
        if piece is not None:
            return _Fetched(index, {}, piece, None, 0)
        refs = list(dict.fromkeys(op.refs()))
        nbytes = sum(inputs[r.source].info(r.key).nbytes for r in refs)
        if not ahead.acquire(nbytes, stop):
            raise _Stopping
        try:
            return _Fetched(index, {r: inputs[r.source].read(r.key, buffers) for r in refs}, None, None, nbytes)
        except LorasurgeonError as exc:
            if unreadable is None:
                raise
            return _Fetched(index, {}, None, exc, nbytes)

    def reader() -> None:
        try:
            buffers = ReadBuffers()
            for index in range(len(ops)):
                if not put(read_q, fetch(index, buffers)):
                    return
        except _Stopping:
            return
        except BaseException as exc:  # handed to the main thread, re-raised there
            errors.append(exc)
            stop.set()
        put(read_q, _DONE)

    def write_stage() -> None:
        try:
            while (item := take(write_q)) is not _DONE:
                assert isinstance(item, _Writes)
                for name, tensor in item.outputs:
                    sink.write(name, tensor)
                if progress is not None:
                    progress.advance(item.op.nbytes)
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    if progress is not None:
        progress.start(sum(op.nbytes for op in ops))
    # Not daemons: a daemon thread still inside torch when the interpreter exits is unwound
    # through C++ destructors and aborts the process. Every way out of the try below sets
    # ``stop`` or sends _DONE, so both threads end within one tensor and are joined.
    threads = [
        threading.Thread(target=reader, name="lorasurgeon-read"),
        threading.Thread(target=write_stage, name="lorasurgeon-write"),
    ]
    written = 0
    infos: list[InfoT] = []
    try:
        for t in threads:
            t.start()
        while (item := take(read_q)) is not _DONE:
            assert isinstance(item, _Fetched)
            ahead.release(item.nbytes)  # the reader may fetch the next ops while this one computes
            op = ops[item.index]
            outputs: list[tuple[str, Written]]
            if item.piece is not None:
                outputs = [(op.name, item.piece)]
            elif item.error is not None:
                assert unreadable is not None
                infos.append(unreadable(op, item.error))
                outputs = []
            else:
                outcome = compute(op, item.tensors, dev)
                infos.append(outcome.info)
                outputs = list(outcome.outputs)
            del item
            if not put(write_q, _Writes(op, outputs)):
                break
            written += sum(t.nbytes for _, t in outputs)
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


class _Stopping(Exception):
    """The run stopped while the reader waited for room to read ahead."""
