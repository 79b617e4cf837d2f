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

import math
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Protocol, TypeAlias, TypeVar

from ..errors import LorasurgeonError
from ..io.buffers import ReadBuffers
from ..io.checkpoint import FileSlice, TensorInfo
from ..io.dtypes import itemsize
from .devices import devices_of
from .plan import Op, Ref

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch

QUEUE_DEPTH = 2
READ_AHEAD_BYTES = 256 << 20

OpT = TypeVar("OpT", bound=Op)
InfoT = TypeVar("InfoT")
Written: TypeAlias = "torch.Tensor | FileSlice"  # (strings: torch is imported when first used)


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
    # seconds each stage spent working, and the compute stage waiting on the others: read (the reader's
    # reads), compute, write (handing outputs to the sink: its pwrite or file-to-file copy), wait_read
    # (compute starved of input), wait_write (compute blocked on a full write queue)
    stages: dict[str, float] = field(default_factory=dict)


class Readable(Protocol):
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


Compute: TypeAlias = "Callable[[OpT, Mapping[Ref, torch.Tensor], torch.device], Outcome[InfoT]]"


def _byte_copy(inputs: Sequence[Readable], op: Op) -> FileSlice | None:
    """An op's output as its inputs' bytes left on disk, where they can be (same bytes out as in)."""
    spec = op.byte_copy
    if spec is None:
        return None
    pieces = [inputs[r.source].info(r.key).file_slice() for r in op.refs()]
    found = tuple(p for p in pieces if p is not None and p.dtype == spec.dtype)
    if len(found) != len(pieces):
        return None
    if len(found) == 1:
        return found[0] if found[0].shape == spec.shape else None
    joined = FileSlice.joined(found, spec.dtype, spec.shape)
    return joined if joined.nbytes == math.prod(spec.shape) * itemsize(spec.dtype) else None


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


class _Stopping(Exception):
    """The run stopped while the reader waited for room to read ahead."""


class _Stages(Generic[OpT]):
    """What a run's stages share: a stop flag, the first error, bounded queues polled so that no stage
    waits on one that has failed, and the reader thread, which fetches ``ops`` in order."""

    def __init__(
        self,
        ops: Sequence[OpT],
        inputs: Sequence[Readable],
        *,
        read_ahead: int,
        byte_copies: bool,
        tolerate_unreadable: bool,
    ):
        self.ops, self.inputs = ops, inputs
        self.byte_copies, self.tolerate_unreadable = byte_copies, tolerate_unreadable
        self.ahead = _ReadAhead(read_ahead)
        self.read_q: queue.Queue[object] = queue.Queue(QUEUE_DEPTH)
        self.errors: list[BaseException] = []
        self.stop = threading.Event()
        # Not daemons: a daemon thread still inside torch when the interpreter exits is unwound
        # through C++ destructors and aborts the process. Every way out of a run sets ``stop`` or
        # sends _DONE, so each thread ends within one tensor and is joined.
        self.threads = [threading.Thread(target=self._read, name="lorasurgeon-read")]
        self.seconds = {"read": 0.0, "compute": 0.0, "write": 0.0, "wait_read": 0.0, "wait_write": 0.0}

    def put(self, q: queue.Queue[object], item: object) -> bool:
        while not self.stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def take(self, q: queue.Queue[object]) -> object:
        """The next item, or _DONE once the run is stopping (a failed stage sets ``stop``)."""
        while not self.stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return _DONE

    def fail(self, exc: BaseException) -> None:
        self.errors.append(exc)
        self.stop.set()

    def fetched(self) -> Iterator[tuple[OpT, _Fetched]]:
        """The ops and their fetched tensors, in order, as the reader delivers them."""
        while True:
            waited = time.perf_counter()
            item = self.take(self.read_q)
            self.seconds["wait_read"] += time.perf_counter() - waited
            if item is _DONE:
                return
            assert isinstance(item, _Fetched)
            self.ahead.release(item.nbytes)  # the reader may fetch the next ops while this one computes
            yield self.ops[item.index], item

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        for t in self.threads:
            if t.ident is not None:
                t.join()

    def raise_errors(self) -> None:
        """The first error a stage met, raised in the calling thread (after a clean exit from its loop)."""
        if self.errors:
            raise self.errors[0]

    def _fetch(self, index: int, buffers: ReadBuffers) -> _Fetched:
        op = self.ops[index]
        piece = _byte_copy(self.inputs, op) if self.byte_copies else None
        if piece is not None:
            return _Fetched(index, {}, piece, None, 0)
        refs = list(dict.fromkeys(op.refs()))
        nbytes = sum(self.inputs[r.source].info(r.key).nbytes for r in refs)
        if not self.ahead.acquire(nbytes, self.stop):
            raise _Stopping
        try:
            began = time.perf_counter()
            tensors = {r: self.inputs[r.source].read(r.key, buffers) for r in refs}
            self.seconds["read"] += time.perf_counter() - began
            return _Fetched(index, tensors, None, None, nbytes)
        except LorasurgeonError as exc:
            if not self.tolerate_unreadable:
                raise
            return _Fetched(index, {}, None, exc, nbytes)

    def _read(self) -> None:
        try:
            buffers = ReadBuffers()
            for index in range(len(self.ops)):
                if not self.put(self.read_q, self._fetch(index, buffers)):
                    return
        except _Stopping:
            return
        except BaseException as exc:  # handed to the calling thread, raised there
            self.fail(exc)
        self.put(self.read_q, _DONE)


def run(
    ops: Sequence[OpT],
    inputs: Sequence[Readable],
    sink: Sink,
    *,
    compute: Compute[OpT, InfoT],
    device: str | Sequence[str] = "cpu",
    progress: Progress | None = None,
    read_ahead: int = READ_AHEAD_BYTES,
    unreadable: Callable[[OpT, LorasurgeonError], InfoT] | None = None,
    workers: int = 1,
    threads: int | None = None,
) -> ExecStats[InfoT]:
    """Execute ``ops`` in order, streaming: read ahead, compute, write behind.

    The reader runs ahead of compute by at most QUEUE_DEPTH ops and ``read_ahead`` bytes (but
    always by one op), so huge tensors (a 128 K-token embedding is 1 GB in bf16) are not queued
    several deep. A failure in any stage stops all three and is raised here; with ``unreadable``,
    an op whose input cannot be read is reported by it instead, and the run goes on.

    ``workers`` > 1 computes that many ops at once, each on a thread of its own, their results handed
    to the writer in plan order; at most ``workers`` results wait for their turn, so memory stays
    bounded by a few tensors per worker. ``threads``: torch's intra-op threads while the run computes
    (torch's own setting, process-wide, put back afterwards); None leaves it as it is.

    ``device``: one device, several (``cuda:0,1``; ``cuda``: every GPU, engine.devices) or a list of them:
    at least one worker on each, worker *i* on device *i* mod *n*.
    """
    start = time.perf_counter()
    stages = _Stages(ops, inputs, read_ahead=read_ahead, byte_copies=True, tolerate_unreadable=unreadable is not None)
    devices = devices_of(device) if isinstance(device, str) else list(device)
    job = _Run(stages, sink, _Compute(compute, devices, threads, unreadable), progress, max(workers, len(devices)))
    written, infos = job.execute()
    return ExecStats(len(ops), written, time.perf_counter() - start, tuple(infos), dict(stages.seconds))


class _Compute(Generic[OpT, InfoT]):
    """What computing one fetched op takes: the compute function, the devices (worker *i* computes on device
    *i* mod *n*; torch's threads set when the first tensor is computed), and the report of an unreadable input."""

    def __init__(
        self,
        compute: Compute[OpT, InfoT],
        devices: list[str],
        threads: int | None,
        unreadable: Callable[[OpT, LorasurgeonError], InfoT] | None,
    ):
        self.compute, self.devices, self.threads, self.unreadable = compute, devices, threads, unreadable
        self._made: dict[int, torch.device] = {}
        self._previous_threads: int | None = None
        self._lock = threading.Lock()

    def _device(self, worker: int) -> torch.device:
        with self._lock:
            if not self._made and self.threads is not None:
                self._previous_threads = torch.get_num_threads()
                torch.set_num_threads(self.threads)
            slot = worker % len(self.devices)
            if slot not in self._made:
                self._made[slot] = torch.device(self.devices[slot])
            return self._made[slot]

    def settle(self, op: OpT, item: _Fetched, worker: int = 0) -> tuple[list[tuple[str, Written]], list[InfoT], float]:
        """An op's outputs, what it reports (none for a copy), and the seconds its compute took on ``worker``'s
        device."""
        if item.piece is not None:
            return [(op.name, item.piece)], [], 0.0
        if item.error is not None:
            assert self.unreadable is not None
            return [], [self.unreadable(op, item.error)], 0.0
        on = self._device(worker)
        began = time.perf_counter()
        outcome = self.compute(op, item.tensors, on)
        return list(outcome.outputs), [outcome.info], time.perf_counter() - began

    def restore_threads(self) -> None:
        if self._previous_threads is not None:
            torch.set_num_threads(self._previous_threads)


class _Run(Generic[OpT, InfoT]):
    """One run's compute and write stages around the reader (``_Stages``): the calling thread hands results to
    the writer in plan order, computing them itself or taking them from ``workers`` compute threads."""

    def __init__(
        self,
        stages: _Stages[OpT],
        sink: Sink,
        computer: _Compute[OpT, InfoT],
        progress: Progress | None,
        workers: int,
    ):
        self.stages, self.sink, self.computer, self.progress, self.workers = stages, sink, computer, progress, workers
        self.write_q: queue.Queue[object] = queue.Queue(QUEUE_DEPTH)
        self.done: dict[int, tuple[list[tuple[str, Written]], list[InfoT]]] = {}  # computed, waiting for its turn
        self.turn = threading.Condition()
        stages.threads.append(threading.Thread(target=self._write_stage, name="lorasurgeon-write"))
        if workers > 1:
            stages.threads += [
                threading.Thread(target=self._compute_stage, args=(i,), name=f"lorasurgeon-compute-{i}")
                for i in range(workers)
            ]

    def execute(self) -> tuple[int, list[InfoT]]:
        """Run every stage to the end; the bytes handed to the sink and what each op reported."""
        stages, written, infos = self.stages, 0, []
        if self.progress is not None:
            torch.Tensor  # noqa: B018  (torch's import, seconds on a cold start, before the bar, not inside its 0%)
            self.progress.start(sum(op.nbytes for op in stages.ops))
        try:
            stages.start()
            for op, outputs, info in self._in_order():
                infos += info
                waited = time.perf_counter()
                if not stages.put(self.write_q, _Writes(op, outputs)):
                    break
                stages.seconds["wait_write"] += time.perf_counter() - waited
                written += sum(t.nbytes for _, t in outputs)
        except BaseException:
            stages.stop.set()
            raise
        finally:
            self._close()
        stages.raise_errors()
        return written, infos

    def _close(self) -> None:
        if not self.stages.stop.is_set():
            self.stages.put(self.write_q, _DONE)  # gives up if the writer has failed meanwhile
        else:
            with self.turn:
                self.turn.notify_all()
        self.stages.join()
        self.computer.restore_threads()
        if self.progress is not None:
            self.progress.finish()

    def _write_stage(self) -> None:
        stages = self.stages
        try:
            while (item := stages.take(self.write_q)) is not _DONE:
                assert isinstance(item, _Writes)
                began = time.perf_counter()
                for name, tensor in item.outputs:
                    self.sink.write(name, tensor)
                stages.seconds["write"] += time.perf_counter() - began
                if self.progress is not None:
                    self.progress.advance(item.op.nbytes)
        except BaseException as exc:
            stages.fail(exc)

    def _compute_stage(self, worker: int) -> None:
        """A worker: the next fetched op, computed (on its device); its result kept until its turn (while fewer
        than ``workers`` results wait)."""
        stages, turn = self.stages, self.turn
        try:
            for op, item in stages.fetched():
                index = item.index
                outputs, info, seconds = self.computer.settle(op, item, worker)
                del item
                with turn:
                    stages.seconds["compute"] += seconds
                    self.done[index] = (outputs, info)
                    turn.notify_all()
                    while len(self.done) > self.workers and not stages.stop.is_set():
                        turn.wait(0.1)
            stages.put(stages.read_q, _DONE)  # the reader's one end mark, passed on to the next worker
        except BaseException as exc:
            stages.fail(exc)
        with turn:
            turn.notify_all()

    def _in_order(self) -> Iterator[tuple[OpT, list[tuple[str, Written]], list[InfoT]]]:
        stages = self.stages
        if self.workers <= 1:  # the calling thread computes
            for op, item in stages.fetched():
                outputs, info, seconds = self.computer.settle(op, item)
                stages.seconds["compute"] += seconds
                del item
                yield op, outputs, info
            return
        for index, op in enumerate(stages.ops):
            with self.turn:
                while index not in self.done and not stages.stop.is_set():
                    self.turn.wait(0.1)
                if index not in self.done:
                    return
                outputs, info = self.done.pop(index)
                self.turn.notify_all()
            yield op, outputs, info


def stream(
    ops: Sequence[OpT],
    inputs: Sequence[Readable],
    *,
    compute: Compute[OpT, InfoT],
    device: str = "cpu",
    read_ahead: int = READ_AHEAD_BYTES,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Execute ``ops`` in order and yield their output tensors instead of writing them.

    The same reading ahead as :func:`run`; each op is computed when the caller asks for the next
    tensor, so memory holds what the caller keeps plus a few tensors. Every op is computed (there
    are no file-to-file copies when the caller wants tensors). Closing the iterator early stops the
    reader.
    """
    dev = torch.device(devices_of(device)[0])  # one consumer in order: the first device
    stages = _Stages(ops, inputs, read_ahead=read_ahead, byte_copies=False, tolerate_unreadable=False)
    try:
        stages.start()
        for op, item in stages.fetched():
            outcome = compute(op, item.tensors, dev)
            del item
            yield from outcome.outputs
            del outcome  # not held while the next op is read and computed
    finally:
        stages.stop.set()  # done, failed, or closed by the caller: the reader stops within one op
        stages.join()
    stages.raise_errors()
