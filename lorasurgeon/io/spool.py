"""SpoolWriter: for results whose tensor shapes are known only once computed (extract --energy).

Tensors are appended to a hidden spool file as they come; ``commit`` lays them out as
safetensors (header first, as CheckpointWriter does) and makes the result appear atomically.
Memory stays at one tensor: commit copies the spooled tensors across one at a time. The spool
holds adapter-sized data (a few % of a model), so the extra copy is cheap.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LorasurgeonError, OutputError, OutputExistsError
from .checkpoint import FileSlice, TensorInfo, pread_into
from .direct import copy_range, pwrite_all
from .layout import TensorSpec, plan_shards
from .publish import absolute, check_replaceable, is_file_result, not_a_safetensors_file
from .scratch import clean_stale, make_scratch, release
from .writer import CheckpointWriter, tensor_bytes

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch


def folder_only(out: str | os.PathLike[str], what: str) -> None:
    """Refuse a one-file result (``-o NAME.safetensors``) for an adapter whose config is a file beside its weights."""
    if is_file_result(out):
        raise OutputError(
            f"{out}: {what} is a folder (its config beside its weights): give -o FOLDER (a LoRA as one .safetensors "
            "file is kohya's: `lorasurgeon convert ADAPTER --to kohya -o NAME.safetensors`)"
        )


class SpoolWriter:
    """Collect tensors of any shape, in any order; write them as one checkpoint at commit."""

    def __init__(
        self,
        out: str | os.PathLike[str],
        *,
        prefix: str = "model",
        overwrite: bool = False,
        metadata: dict[str, str] | None = None,
    ):
        self.out = absolute(out)
        self.prefix, self.overwrite, self.metadata = prefix, overwrite, metadata
        if os.path.lexists(self.out):
            if not overwrite:
                raise OutputExistsError(f"{self.out}: already exists (pass --overwrite to replace an earlier result)")
            check_replaceable(self.out, not_a_safetensors_file if is_file_result(self.out) else None)
        self._dir: Path | None = None
        self._fd = -1
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            clean_stale(self.out)
            self._path = make_scratch(self.out, "spool", keep=self._keep) / "spool.bin"
            self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT, 0o600)
        except LorasurgeonError:
            self.abort()
            raise
        except OSError as exc:
            self.abort()
            raise OutputError(f"{self.out}: cannot write the result here ({exc.strerror or exc})") from None
        except BaseException:
            self.abort()
            raise
        self._end = 0
        self._items: dict[str, TensorInfo] = {}
        self._files: dict[str, bytes] = {}

    def _keep(self, folder: Path) -> None:
        self._dir = folder

    def write(self, name: str, tensor: torch.Tensor | FileSlice) -> None:
        """Spool one tensor, or copy a FileSlice's bytes in (a later write of the same name replaces it)."""
        try:
            if isinstance(tensor, FileSlice):
                at = self._end
                for part in tensor.ranges():
                    copy_range(part.path, part.offset, self._fd, at, part.nbytes)
                    at += part.nbytes
                nbytes = tensor.nbytes
            else:
                data = tensor_bytes(tensor)
                pwrite_all(self._fd, data, self._end)
                nbytes = len(data)
        except OSError as exc:
            raise OutputError(f"{self.out}: cannot write tensor {name!r} ({exc.strerror or exc})") from None
        self._items[name] = TensorInfo.of(name, tensor.dtype, tuple(tensor.shape), self._path, self._end)
        self._end += nbytes

    def rename(self, names: Mapping[str, str]) -> None:
        """Give spooled tensors other names (``names``: old -> new; others keep theirs), in the order written."""
        items = [dataclasses.replace(i, name=names.get(n, n)) for n, i in self._items.items()]
        self._items = {i.name: i for i in items}
        if len(self._items) != len(items):
            raise ValueError("two tensors renamed to one name")

    def discard(self, name: str) -> None:
        self._items.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def names(self) -> list[str]:
        return list(self._items)

    def info(self, name: str) -> TensorInfo:
        return self._items[name]

    def read(self, name: str) -> torch.Tensor:
        """A spooled tensor read back (the spool is on disk: this costs one read)."""
        info = self._items[name]
        out = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            assert info.offset is not None
            pread_into(info.file, out.numpy().data, info.offset)
        return out.view(info.dtype).reshape(info.shape)

    def add_file(self, relname: str, data: bytes | str) -> None:
        self._files[relname] = data.encode("utf-8") if isinstance(data, str) else data

    def commit(self) -> Path:
        """Write the spooled tensors as ``{prefix}.safetensors`` plus the added files, atomically."""
        os.close(self._fd)
        self._fd = -1
        try:
            specs = [TensorSpec.of(i.name, i.dtype, i.shape) for i in self._items.values()]
            shards = plan_shards(specs, max_shard_size=None, prefix=self.prefix)
            with CheckpointWriter(
                self.out, shards, overwrite=self.overwrite, index_name=None, metadata=self.metadata, checked=True
            ) as writer:
                for name, data in self._files.items():
                    writer.add_file(name, data)
                for info in self._items.values():  # spool file to result file, never through memory
                    piece = info.file_slice()
                    assert piece is not None
                    writer.write(info.name, piece)
        finally:
            self.abort()
        return self.out

    def abort(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            release(self._dir)
            self._dir = None
