"""CheckpointWriter: streams tensors into safetensors shards, atomically.

Every shard's header is written first, from the planned names, dtypes and shapes, so each
tensor's place in its file is known before any data arrives; a tensor is written to that place
as soon as it is handed over (in any order) and then dropped. No shard is ever held in memory.

Shards of results of DIRECT_MIN_BYTES or more are written with O_DIRECT where the filesystem takes it
(``io.direct``): straight from aligned buffers to the device, nothing left to write back.

Everything goes into a hidden sibling folder (``.NAME.PID.XXXX.lorasurgeon-partial``). Each
page-cache shard is synced to disk by a background thread as soon as its last tensor is in; ``commit``
fsyncs the files, writes the index last, and publishes the folder (``io.publish``): never over
anything that appeared at ``out`` meanwhile, and with ``overwrite`` only over an earlier result,
checked again at that moment. Any failure before that removes the partial folder.
"""

from __future__ import annotations

import json
import os
import posixpath
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CorruptCheckpointError, LorasurgeonError, OutputError, OutputExistsError
from .checkpoint import SAFETENSORS_INDEX, FileSlice
from .direct import AlignedWrites, BufferedFile, DirectFile, copy_range, open_shard, pwrite_all
from .dtypes import safetensors_name
from .header import build_header
from .layout import Shard, TensorSpec, human_bytes
from .publish import absolute, check_replaceable, is_file_result, not_a_result_folder, not_a_safetensors_file, publish
from .scratch import clean_stale, make_scratch, release

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch


# Results smaller than this go through the page cache: O_DIRECT's gain is in the bytes, its cost (an
# aligned buffer, synchronous writes) is per file.
DIRECT_MIN_BYTES = 64 << 20
SHARD_NAME = re.compile(r"(-\d{5}-of-\d{5})?\.safetensors$")  # a shard's file name, less its stem


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's bytes in C order, as safetensors stores them (a CPU copy only if needed)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data.cast("B")  # the array's own buffer, no copy


@dataclass(frozen=True)
class Placed:
    """Where one planned tensor goes in a result being written: its shard file, offset, dtype and shape."""

    path: str
    offset: int
    dtype_name: str
    shape: tuple[int, ...]


class PlacedSink:
    """Tensors written into shard files another process laid out (CheckpointWriter.placed), each at its place:
    what a Ray task writes its share of a result with. ``close()`` fsyncs every file it wrote."""

    def __init__(self, places: Mapping[str, Placed]):
        self.places = places
        self.fds: dict[str, int] = {}
        self.names: list[str] = []

    def write(self, name: str, tensor: torch.Tensor | FileSlice) -> None:
        place = self.places[name]
        got = tensor.dtype_name if isinstance(tensor, FileSlice) else safetensors_name(tensor.dtype)
        if got != place.dtype_name or tuple(tensor.shape) != place.shape:
            raise ValueError(
                f"tensor {name!r}: planned {place.dtype_name}{list(place.shape)}, got {got}{list(tensor.shape)}"
            )
        if place.path not in self.fds:
            self.fds[place.path] = os.open(place.path, os.O_WRONLY)
        fd, offset = self.fds[place.path], place.offset
        if isinstance(tensor, FileSlice):
            for part in tensor.ranges():
                copy_range(part.path, part.offset, fd, offset, part.nbytes)
                offset += part.nbytes
        else:
            pwrite_all(fd, tensor_bytes(tensor), offset)
        self.names.append(name)

    def close(self) -> None:
        """Every file written fsynced (on shared storage, what the driver's commit then finds), and closed."""
        try:
            for fd in self.fds.values():
                os.fsync(fd)
        finally:
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()


class CheckpointWriter:
    """Write a planned set of tensors as safetensors shards under ``out``.

    Args:
        out: the result folder; must not exist unless ``overwrite``, and then only an earlier
            result is replaced (see :mod:`lorasurgeon.io.publish`).
        shards: the planned files and their tensors (see :mod:`lorasurgeon.io.layout`).
        index_name: the index written when there is more than one shard (None: never).
        metadata: the safetensors ``__metadata__`` of every shard.
        overwrite: replace an existing ``out`` once the new result is complete (if it is still an earlier
            result then: see :mod:`lorasurgeon.io.publish`).
        checked: the caller checked ``out`` when its run started (a spool's late writer): only commit checks.

    Use as a context manager: a clean exit commits, an exception aborts.
    """

    def __init__(
        self,
        out: str | os.PathLike[str],
        shards: Sequence[Shard],
        *,
        index_name: str | None = SAFETENSORS_INDEX,
        metadata: dict[str, str] | None = None,
        overwrite: bool = False,
        direct: bool | None = None,
        checked: bool = False,
    ):
        self.out = absolute(out)
        self.shards = list(shards)
        # a one-file result (-o NAME.safetensors, io.publish.is_file_result): its one shard alone, renamed into place
        self.single = is_file_result(self.out)
        if self.single and len(self.shards) != 1:
            raise OutputError(
                f"{self.out}: a .safetensors path is a one-file result, and this one is {len(self.shards)} files "
                "(a sharded base or component, or --max-shard-size): give a folder"
            )
        self.index_name = index_name if len(self.shards) > 1 else None
        names = [t.name for s in self.shards for t in s.tensors]
        if len(set(names)) != len(names):
            raise ValueError("a tensor is planned twice")
        self.overwrite = overwrite
        if os.path.lexists(self.out) and not checked:
            if not overwrite:
                raise OutputExistsError(f"{self.out}: already exists (pass --overwrite to replace an earlier result)")
            check_replaceable(self.out, self._not_replaceable)
        self._files: dict[str, BufferedFile | DirectFile] = {}
        # O_DIRECT where the filesystem takes it: for results of DIRECT_MIN_BYTES or more (None), for any (True),
        # never (False); and the aligned buffers it writes from
        self._direct = direct
        self._io: AlignedWrites | None = None
        self._slots: dict[str, tuple[str, int, TensorSpec]] = {}
        self._unwritten = {s.filename: len(s.tensors) for s in self.shards}
        self._sync_q: queue.SimpleQueue = queue.SimpleQueue()
        self._syncer: threading.Thread | None = None
        self._tmp: Path | None = None
        self._done = False
        self.sync_seconds = 0.0  # in the early syncs of finished shards (a thread of their own)
        self.commit_seconds = 0.0  # in commit: the last fsyncs, the index, the renames
        try:
            self._start(sum(s.nbytes for s in self.shards), {"format": "pt"} if metadata is None else metadata)
        except LorasurgeonError:
            self.abort()
            raise
        except OSError as exc:
            self.abort()
            raise OutputError(f"{self.out}: cannot write the result here ({exc.strerror or exc})") from None
        except BaseException:
            self.abort()
            raise

    def _start(self, need: int, meta: dict[str, str]) -> None:
        """Check the space, make the hidden folder and lay out every shard's header."""
        parent = self.out.parent
        parent.mkdir(parents=True, exist_ok=True)
        usage = shutil.disk_usage(parent)
        free = usage.free
        if usage.total and need > free:  # a filesystem that reports no size at all (ramfs) is not "full"
            raise OutputError(
                f"{parent}: not enough free space: the result needs {human_bytes(need)}, {human_bytes(free)} are free; "
                "free some space or choose another -o"
            )
        clean_stale(self.out)  # debris of a killed run for this same output
        make_scratch(self.out, "partial", keep=self._keep)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.partial_dir, 0o777 & ~umask)  # mkdtemp makes it private; a result is an ordinary folder
        big = sum(s.nbytes for s in self.shards) >= DIRECT_MIN_BYTES
        if self._direct or (self._direct is None and big):
            self._io = AlignedWrites()
        for shard in self.shards:
            names = [t.name.removeprefix(shard.strip) for t in shard.tensors]
            header, offsets = build_header(
                [(n, t.dtype_name, t.shape) for n, t in zip(names, shard.tensors, strict=True)], meta
            )
            size = len(header) + shard.nbytes
            (self.partial_dir / shard.filename).parent.mkdir(parents=True, exist_ok=True)
            file = open_shard(self.partial_dir / shard.filename, size, io=self._io)
            self._files[shard.filename] = file
            file.write(memoryview(header), 0)
            for spec, off in zip(shard.tensors, offsets, strict=True):
                self._slots[spec.name] = (shard.filename, len(header) + off, spec)

    def _keep(self, folder: Path) -> None:
        self._tmp = folder

    @property
    def partial_dir(self) -> Path:
        """The hidden folder the result is assembled in (for sidecar files)."""
        assert self._tmp is not None
        return self._tmp

    @property
    def pending(self) -> list[str]:
        """Planned tensors not yet written."""
        return list(self._slots)

    def write(self, name: str, tensor: torch.Tensor | FileSlice) -> None:
        """Write one planned tensor; its dtype and shape must be the planned ones.

        ``tensor`` may also be a FileSlice (bytes of an input file), copied file to file.
        """
        try:
            filename, offset, spec = self._slots.pop(name)
        except KeyError:
            raise ValueError(f"tensor {name!r} was not planned, or was already written") from None
        if tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise ValueError(
                f"tensor {name!r}: planned {spec.dtype}{list(spec.shape)}, got {tensor.dtype}{list(tensor.shape)}"
            )
        try:
            file = self._files[filename]
            if isinstance(tensor, FileSlice):
                try:
                    for part in tensor.ranges():
                        file.copy(part.path, part.offset, offset, part.nbytes)
                        offset += part.nbytes
                except EOFError:
                    raise CorruptCheckpointError(
                        f"{tensor.path}: truncated while reading tensor {name!r} (was it changed while in use?)"
                    ) from None
            else:
                file.write(tensor_bytes(tensor), offset)
            self._unwritten[filename] -= 1
            if not self._unwritten[filename]:
                file.finish()
                if not file.direct:  # O_DIRECT bytes are on the device already: nothing to write back
                    self._sync_early(file.fd)
        except OSError as exc:
            raise OutputError(
                f"{self.out}: cannot write tensor {name!r} ({exc.strerror or exc}); nothing was kept"
            ) from None

    def placed(self) -> dict[str, Placed]:
        """Where each tensor not yet written goes: its file (absolute) and offset, dtype and shape -- what a
        writer in another process (a Ray task: engine.cluster) needs to write it into this result. The
        shard files' headers are on disk already unless the writer holds them in O_DIRECT blocks (direct=False
        where other processes write)."""
        if self._io is not None:
            raise ValueError("a result other processes write into is written through the page cache (direct=False)")
        return {
            name: Placed(str(self.partial_dir / filename), offset, spec.dtype_name, spec.shape)
            for name, (filename, offset, spec) in self._slots.items()
        }

    def written_elsewhere(self, names: Sequence[str]) -> None:
        """``names`` were written (and fsynced) by another process, at the places :meth:`placed` gave."""
        for name in names:
            filename, _, _ = self._slots.pop(name)
            self._unwritten[filename] -= 1

    def _sync_early(self, fd: int) -> None:
        """A complete shard goes to disk now, from a thread of its own, while the next is produced.

        Left to the kernel, data reaches the disk only past a dirty-memory threshold or at the
        final fsync, so the disk idles first and everything waits for it at the end. One thread
        syncs the shards in order; commit() still fsyncs every file (a no-op for these by then)
        and reports any error.
        """
        if self._syncer is None:
            self._syncer = threading.Thread(target=self._sync_loop, daemon=True, name="lorasurgeon-sync")
            self._syncer.start()
        self._sync_q.put(fd)

    def _sync_loop(self) -> None:
        while (fd := self._sync_q.get()) is not None:
            began = time.perf_counter()
            try:
                os.fdatasync(fd)
            except OSError:
                pass  # commit's fsync meets it again and reports it
            self.sync_seconds += time.perf_counter() - began

    def _join_syncs(self) -> None:
        if self._syncer is not None:
            self._sync_q.put(None)
            self._syncer.join()
            self._syncer = None

    @property
    def _not_replaceable(self) -> Callable[[Path], str | None]:
        return not_a_safetensors_file if self.single else not_a_result_folder

    def add_file(self, relname: str, data: bytes | str) -> None:
        """Put a small file (config, model card) into the result (a one-file result holds the tensors alone)."""
        if self.single:
            return
        path = self.partial_dir / relname
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        except OSError as exc:
            raise OutputError(f"{self.out}: cannot write {relname} ({exc.strerror or exc}); nothing was kept") from None

    def copy_file(self, src: Path, relname: str | None = None) -> None:
        """Copy a file (tokenizer, generation config) into the result (not into a one-file result)."""
        if self.single:
            return
        dst = self.partial_dir / (relname or src.name)
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        except OSError as exc:
            raise OutputError(
                f"{self.out}: cannot copy {src} into the result ({exc.strerror or exc}); nothing was kept"
            ) from None

    def commit(self) -> Path:
        """Make the result durable and visible at ``out``; the index is the last file written."""
        if self._done:
            raise RuntimeError("writer already finished")
        if self._slots:
            missing = ", ".join(list(self._slots)[:5])
            self.abort()
            raise RuntimeError(f"{len(self._slots)} planned tensors were never written ({missing} ...)")
        tmp = self.partial_dir
        began = time.perf_counter()
        try:
            self._join_syncs()
            self._release_bounce()  # every direct write done (each shard's finish() waited for its own)
            for file in self._files.values():
                os.fsync(file.fd)
                os.close(file.fd)
            self._files.clear()
            for path in tmp.rglob("*"):
                if path.is_file() and path.suffix != ".safetensors":
                    with open(path, "rb+") as fh:
                        os.fsync(fh.fileno())
            self._write_indexes()
            _fsync_dir(tmp)
            staged = tmp / self.shards[0].filename if self.single else tmp
            publish(staged, self.out, overwrite=self.overwrite, not_replaceable=self._not_replaceable)
            if self.single:  # the file went out of its hidden folder, left empty
                shutil.rmtree(tmp, ignore_errors=True)
            release(tmp)
            self._tmp = None
        except BaseException as exc:
            self.abort()
            if isinstance(exc, OSError) and not isinstance(exc, LorasurgeonError):
                raise OutputError(f"{self.out}: could not finish writing ({exc.strerror or exc})") from None
            raise
        self._done = True
        try:
            _fsync_dir(self.out.parent)
        except OSError:
            pass  # the result is complete and in place; only its durability across a power cut is left to the OS
        self.commit_seconds = time.perf_counter() - began
        return self.out

    def _write_indexes(self) -> None:
        """The index of the shards at the top (``index_name``, if there are several), and one in each folder of a
        pipeline's component written in several, named after its shards (diffusion_pytorch_model.safetensors.
        index.json), their names as the files hold them."""
        folders: dict[str, list[Shard]] = {}
        for shard in self.shards:
            folders.setdefault(posixpath.dirname(shard.filename), []).append(shard)
        for folder, shards in folders.items():
            if folder == "" and self.index_name and len(shards) > 1:
                self._write_index(self.index_name, shards)
            elif folder and len(shards) > 1:
                stem = SHARD_NAME.sub("", posixpath.basename(shards[0].filename))
                self._write_index(f"{folder}/{stem}.safetensors.index.json", shards)

    def _write_index(self, relname: str, shards: list[Shard]) -> None:
        base = posixpath.dirname(relname)
        weight_map = {
            t.name.removeprefix(s.strip): posixpath.relpath(s.filename, base or ".") for s in shards for t in s.tensors
        }
        doc = {
            "metadata": {"total_size": sum(s.nbytes for s in shards)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        path = self.partial_dir / relname
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(doc, indent=2) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def abort(self) -> None:
        """Throw away everything written so far."""
        self._join_syncs()  # before the files they sync are closed
        self._release_bounce()  # its writes done (or dropped) before their descriptors close and are reused
        for file in self._files.values():
            try:
                os.close(file.fd)
            except OSError:
                pass
        self._files.clear()
        self._done = True
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            release(self._tmp)
            self._tmp = None

    def _release_bounce(self) -> None:
        if self._io is not None:
            self._io.close()
            self._io = None

    @property
    def direct(self) -> bool:
        """Whether the shards are written with O_DIRECT (the filesystem took it)."""
        return any(f.direct for f in self._files.values())

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self._done:
            return
        if exc_type is None:
            self.commit()
        else:
            self.abort()
