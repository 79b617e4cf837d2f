"""The streaming executor: the only place that moves tensor data.

Three stages connected by bounded queues: a reader thread reads the next ops' tensors, the
calling thread computes (on ``device``), a writer thread hands results to the CheckpointWriter.
At most a few tensors are alive at once, whatever the model size. File reads, writes and torch
kernels release the GIL, so the stages overlap.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from .errors import LorasurgeonError
from .io.checkpoint import Checkpoint
from .io.writer import CheckpointWriter
from .ops.lora import add_lora, all_finite, dora_apply, lora_delta, replace_rows
from .plan import Ref, TensorOp

_DONE = object()
QUEUE_DEPTH = 2


@dataclass(frozen=True)
class ExecStats:
    tensors: int
    bytes_written: int
    seconds: float


class NonFiniteError(LorasurgeonError, ValueError):
    """A result holds NaN or Inf."""


class Progress(Protocol):
    """Told the total bytes to write, then each tensor's bytes as it is written, then done."""

    def start(self, total: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...

    def finish(self) -> None: ...


def _fetch(inputs: Sequence[Checkpoint], op: TensorOp) -> dict[Ref, torch.Tensor]:
    refs = [op.src] + [r for t in op.terms for r in (t.a, t.b, t.magnitude) if r is not None]
    refs += [p.values for p in op.rows]
    return {r: inputs[r.source].read(r.key) for r in dict.fromkeys(refs)}


def compute(op: TensorOp, tensors: dict[Ref, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Apply one op to its fetched tensors: fp32 throughout, rounded once to the output dtype."""
    src = tensors[op.src]
    if op.is_plain_copy:
        return src if src.dtype == op.dtype else src.to(device).to(op.dtype)
    base = src.to(device=device, dtype=torch.float32)
    cur = base
    for term in op.terms:
        b = tensors[term.b].to(device)
        if term.kind == "bias":
            cur = cur + term.scale * b.to(torch.float32)
            continue
        a = tensors[term.a].to(device)
        if term.magnitude is not None:
            delta = lora_delta(a, b, term.scale, term.kind)
            cur = dora_apply(base, cur, delta, tensors[term.magnitude].to(device), term.kind)
        else:
            cur = add_lora(cur, a, b, term.scale, term.kind)
    for patch in op.rows:
        cur = replace_rows(cur, patch.indices, tensors[patch.values])
    return cur.to(op.dtype).to("cpu")


def run(ops: Sequence[TensorOp], inputs: Sequence[Checkpoint], writer: CheckpointWriter, *,
        device: str = "cpu", progress: Progress | None = None,
        allow_nonfinite: bool = False) -> ExecStats:
    """Execute ``ops`` in order, streaming: read ahead, compute, write behind."""
    dev = torch.device(device)
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

    def reader() -> None:
        try:
            for op in ops:
                if not put(read_q, (op, _fetch(inputs, op))):
                    return
        except BaseException as exc:  # handed to the main thread, re-raised there
            errors.append(exc)
            stop.set()
        put(read_q, _DONE)

    def write_stage() -> None:
        try:
            while not stop.is_set():
                try:
                    item = write_q.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is _DONE:
                    return
                op, tensor = item
                writer.write(op.name, tensor)
                if progress is not None:
                    progress.advance(op.nbytes)
        except BaseException as exc:
            errors.append(exc)
            stop.set()

    if progress is not None:
        progress.start(sum(op.nbytes for op in ops))
    threads = [threading.Thread(target=reader, daemon=True, name="lorasurgeon-read"),
               threading.Thread(target=write_stage, daemon=True, name="lorasurgeon-write")]
    for t in threads:
        t.start()
    written = 0
    try:
        while not stop.is_set():
            try:
                item = read_q.get(timeout=0.1)
            except queue.Empty:
                continue
            if item is _DONE:
                break
            op, tensors = item
            out = compute(op, tensors, dev)
            del tensors
            if not allow_nonfinite and not op.is_plain_copy and not all_finite(out):
                raise NonFiniteError(
                    f"tensor {op.name!r}: the result holds NaN or Inf; nothing was written "
                    "(check the adapter, or pass --allow-nonfinite)")
            if not put(write_q, (op, out)):
                break
            written += op.nbytes
    except BaseException:
        stop.set()
        raise
    finally:
        if not stop.is_set():
            put(write_q, _DONE)  # gives up if the writer has failed meanwhile
        for t in threads:
            t.join()
        if progress is not None:
            progress.finish()
    if errors:
        raise errors[0]
    return ExecStats(len(ops), written, time.perf_counter() - start)
