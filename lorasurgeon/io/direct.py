"""Shard files written with O_DIRECT: bytes go from our memory to the disk, not copied into the page cache
and written back from there later (what cost a merge as much CPU as its arithmetic).

O_DIRECT wants the file offset, the length and the memory address of every write to be multiples of the
device's block size (4 KiB covers every common one). A safetensors shard is not laid out in such blocks,
and its tensors may arrive in any order, so a ``DirectFile`` keeps the blocks it has only part of (at most
two per tensor, 4 KiB each) until their other bytes arrive, and copies whole blocks into aligned buffers
that ``AlignedWrites``' threads write while the next are filled. Every byte of a shard is written exactly
once (header, then tensors, no gaps), so each kept block completes; the last one is written padded and
the file cut to its size in ``finish``.

Where the filesystem refuses O_DIRECT (ramfs, tmpfs before Linux 6.6, some network filesystems)
``open_shard`` returns a ``BufferedFile``: plain pwrite, and copy_file_range for bytes left in an input.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

BLOCK = 4096
CHUNK = 8 << 20  # bytes copied and written at a time through the aligned buffer


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def copy_range(src: Path, src_offset: int, dst_fd: int, dst_offset: int, nbytes: int) -> None:
    """Copy bytes between files in the kernel (copy_file_range), or through a small buffer."""
    fd = os.open(src, os.O_RDONLY)
    try:
        done = 0
        use_kernel = hasattr(os, "copy_file_range")
        while done < nbytes:
            if use_kernel:
                try:
                    n = os.copy_file_range(fd, dst_fd, nbytes - done, src_offset + done, dst_offset + done)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                        raise
                    use_kernel = False
                    continue
            else:
                chunk = os.pread(fd, min(nbytes - done, 16 << 20), src_offset + done)
                n = len(chunk) and os.pwrite(dst_fd, chunk, dst_offset + done)
            if n == 0:
                raise EOFError(src)
            done += n
    finally:
        os.close(fd)


class BufferedFile:
    """A shard written through the page cache (the fallback, and the way for small results)."""

    direct = False

    def __init__(self, fd: int, size: int):
        self.fd, self.size = fd, size

    def write(self, data: memoryview, offset: int) -> None:
        pwrite_all(self.fd, data, offset)

    def copy(self, src: Path, src_offset: int, offset: int, nbytes: int) -> None:
        copy_range(src, src_offset, self.fd, offset, nbytes)

    def finish(self) -> None:
        pass


class AlignedWrites:
    """Page-aligned buffers (anonymous mappings) written by threads of their own, so that one is filled
    while others go to the disk (an O_DIRECT write returns when the device has the bytes; two in flight
    keep the device busier than one: 2.6 against 2.2 GB/s with dd on this project's VM)."""

    def __init__(self, buffers: int = 4, size: int = CHUNK, writers: int = 2):
        self._free: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
        self._all = [mmap.mmap(-1, size) for _ in range(buffers)]
        for buf in self._all:
            self._free.put(buf)
        self._todo: queue.SimpleQueue[tuple[int, mmap.mmap, int, int] | None] = queue.SimpleQueue()
        self._pending = 0
        self._cond = threading.Condition()
        self._error: OSError | None = None
        self._threads = [
            threading.Thread(target=self._loop, daemon=True, name=f"lorasurgeon-direct-{i}") for i in range(writers)
        ]
        for t in self._threads:
            t.start()

    def buffer(self) -> mmap.mmap:
        """A buffer to fill (waits while all are being written)."""
        buf = self._free.get()
        self._raise()
        return buf

    def submit(self, fd: int, buf: mmap.mmap, nbytes: int, offset: int) -> None:
        """Write the first ``nbytes`` (a multiple of BLOCK) of ``buf`` at ``offset``; the buffer comes back free."""
        with self._cond:
            self._pending += 1
        self._todo.put((fd, buf, nbytes, offset))

    def _loop(self) -> None:
        while (item := self._todo.get()) is not None:
            fd, buf, nbytes, offset = item
            try:
                if self._error is None:
                    pwrite_all(fd, memoryview(buf)[:nbytes], offset)
            except OSError as exc:
                self._error = exc
            finally:
                self._free.put(buf)
                with self._cond:
                    self._pending -= 1
                    self._cond.notify_all()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def flush(self) -> None:
        """Wait for every write handed over; raise the first that failed."""
        with self._cond:
            while self._pending:
                self._cond.wait()
        self._raise()

    def close(self) -> None:
        """Stop the writing threads once what was handed over is done (or dropped after an error)."""
        for _ in self._threads:
            self._todo.put(None)
        for t in self._threads:
            t.join()
        self._all.clear()  # freed with their last reference (closing one still viewed would raise)
        while not self._free.empty():
            self._free.get()


class DirectFile:
    """A shard of ``size`` bytes written with O_DIRECT, in any order, each byte once."""

    direct = True

    def __init__(self, fd: int, size: int, io: AlignedWrites):
        self.fd, self.size = fd, size
        self._io = io  # the aligned buffers and their writing thread, shared by the writer's files
        self._partial: dict[int, tuple[mmap.mmap, int]] = {}  # block number -> (its bytes so far, how many)

    def _block_bytes(self, block: int) -> int:
        return min(BLOCK, self.size - block * BLOCK)

    def _put_partial(self, data: memoryview, offset: int) -> None:
        """Bytes within one block, not covering it: kept until the block is whole."""
        block = offset // BLOCK
        buf, filled = self._partial.get(block) or (mmap.mmap(-1, BLOCK), 0)
        start = offset - block * BLOCK
        buf[start : start + len(data)] = data
        filled += len(data)
        if filled == self._block_bytes(block):
            del self._partial[block]
            pwrite_all(self.fd, memoryview(buf), block * BLOCK)  # padded past the end for the last block
        else:
            self._partial[block] = (buf, filled)

    def _pieces(self, offset: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """[offset, end) cut as it is written: (position, bytes, whole) — an edge up to the next block
        boundary (kept as a partial block), or up to CHUNK of whole blocks from a block-aligned position
        (the file's last block whole when the file ends there, written padded)."""
        pos = offset
        while pos < end:
            whole = 0
            if pos % BLOCK == 0:
                whole = min(CHUNK, (end - pos) // BLOCK * BLOCK)
                if whole == 0 and end == self.size:
                    whole = end - pos
            size = whole or min(end, (pos // BLOCK + 1) * BLOCK) - pos
            yield pos, size, bool(whole)
            pos += size

    def _submit(self, buf: mmap.mmap, nbytes: int, pos: int) -> None:
        self._io.submit(self.fd, buf, -(-nbytes // BLOCK) * BLOCK, pos)  # the last block padded

    def write(self, data: memoryview, offset: int) -> None:
        """Bytes for [offset, offset + len): edges kept as partial blocks, whole blocks through the buffers."""
        data = data.cast("B")
        for pos, size, whole in self._pieces(offset, offset + len(data)):
            piece = data[pos - offset : pos - offset + size]
            if not whole:
                self._put_partial(piece, pos)
                continue
            buf = self._io.buffer()
            buf[:size] = piece
            self._submit(buf, size, pos)

    def copy(self, src: Path, src_offset: int, offset: int, nbytes: int) -> None:
        """Bytes of an input file: the whole blocks read straight into an aligned buffer and written from
        it, the edges read apart and kept like any others."""
        fd = os.open(src, os.O_RDONLY)
        try:
            for pos, size, whole in self._pieces(offset, offset + nbytes):
                at = src_offset + pos - offset
                if not whole:
                    piece = os.pread(fd, size, at)
                    if len(piece) != size:
                        raise EOFError(src)
                    self._put_partial(memoryview(piece), pos)
                    continue
                buf = self._io.buffer()
                got = os.preadv(fd, [memoryview(buf)[:size]], at)
                self._submit(buf, size if got == size else 0, pos)  # a short read: the buffer back, unwritten
                if got != size:
                    raise EOFError(src)
        finally:
            os.close(fd)

    def finish(self) -> None:
        """The writes handed over done, the partial blocks left (only the last, in a complete file) written,
        and the file cut to its size."""
        self._io.flush()
        for block, (buf, _) in sorted(self._partial.items()):
            pwrite_all(self.fd, memoryview(buf), block * BLOCK)
        self._partial.clear()
        os.ftruncate(self.fd, self.size)


def open_shard(path: Path, size: int, *, io: AlignedWrites | None) -> BufferedFile | DirectFile:
    """A new shard file (it must not exist): with O_DIRECT where ``io`` is given and the filesystem takes
    it, else buffered."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    o_direct = getattr(os, "O_DIRECT", 0)
    if o_direct and io is not None:
        try:
            fd = os.open(path, flags | o_direct, 0o644)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            if os.path.lexists(path):  # some (ramfs) create the file, then refuse the flag: it is ours (O_EXCL)
                os.unlink(path)
        else:
            try:  # some filesystems take the flag at open and refuse the write: try one block
                with mmap.mmap(-1, BLOCK) as probe:
                    os.pwrite(fd, memoryview(probe), 0)
                return DirectFile(fd, size, io)
            except OSError as exc:
                os.close(fd)
                os.unlink(path)
                if exc.errno != errno.EINVAL:
                    raise
    return BufferedFile(os.open(path, flags, 0o644), size)
