"""Checkpoint: the tensors of a model or adapter, indexed from headers, read one at a time.

A checkpoint is opened from a folder (``model.safetensors``, a sharded
``model.safetensors.index.json``, a PEFT adapter folder, legacy ``pytorch_model.bin`` with or
without its index) or from a single file. Names, dtypes and shapes come from the headers alone.
``read(name)`` returns a fresh tensor that owns its memory: nothing is cached, no file is
memory-mapped for safetensors, so memory does not grow with the number of tensors read and
nothing the caller does to a tensor can reach an input file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import CorruptCheckpointError, InputNotFoundError, UnsupportedError
from .dtypes import DtypeByName, itemsize, safetensors_name
from .header import read_header
from .legacy import LegacyFile
from .remote import file_size, is_file, open_binary, remote_of

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# What a checkpoint's files are (Checkpoint.format).
CheckpointFormat = Literal[
    "safetensors", "safetensors-sharded", "pytorch-bin", "pytorch-bin-sharded", "gguf", "pipeline"
]
# Folder layouts, most preferred first: (file to look for, format name).
FOLDER_LAYOUTS: tuple[tuple[str, CheckpointFormat], ...] = (
    (SAFETENSORS_INDEX, "safetensors-sharded"),
    ("model.safetensors", "safetensors"),
    ("adapter_model.safetensors", "safetensors"),
    ("adapters.safetensors", "safetensors"),  # an MLX-LM adapter folder (adapter.formats.mlx)
    # a diffusers model folder (one component of a pipeline: unet/, transformer/, vae/)
    ("diffusion_pytorch_model.safetensors.index.json", "safetensors-sharded"),
    ("diffusion_pytorch_model.safetensors", "safetensors"),
    ("pytorch_lora_weights.safetensors", "safetensors"),  # a diffusers LoRA folder (adapter.formats.diffusers)
    (BIN_INDEX, "pytorch-bin-sharded"),
    ("pytorch_model.bin", "pytorch-bin"),
    ("adapter_model.bin", "pytorch-bin"),
    ("diffusion_pytorch_model.bin", "pytorch-bin"),
)
BIN_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass(frozen=True)
class TensorInfo(DtypeByName):
    """Where one tensor lives and what it is, known without reading it."""

    name: str
    dtype_name: str  # safetensors' name ("BF16"): known without torch; ``dtype`` is the torch dtype
    shape: tuple[int, ...]
    file: Path
    offset: int | None  # absolute byte offset in a safetensors file; None for pickles
    key: str = ""  # the name inside the file, when a renamed view calls it something else
    # Set when the tensor is computed from others (a quantized weight from its codes and scales):
    # read() reads the parts and hands them to the decoder; its bytes are in no file.
    decoded: Decoded | None = None

    @staticmethod
    def of(
        name: str, dtype: torch.dtype | str, shape: tuple[int, ...], file: Path, offset: int | None, **kw: Any
    ) -> TensorInfo:
        """A TensorInfo from a torch dtype or a safetensors dtype name."""
        return TensorInfo(name, safetensors_name(dtype), shape, file, offset, **kw)

    @property
    def file_key(self) -> str:
        return self.key or self.name

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype_name)

    def file_slice(self) -> FileSlice | None:
        """Where this tensor's bytes lie in its file (None for a pickle, whose layout is not ours to read)."""
        if self.offset is None or self.decoded is not None or remote_of(self.file) is not None:
            return None  # a pickle, a decoded tensor, or a file read in place (its bytes go through memory)
        return FileSlice(self.file, self.offset, self.nbytes, self.dtype_name, self.shape)


@dataclass(frozen=True)
class Decoded:
    """A tensor made from other tensors of the same checkpoint: ``decode(parts read in order)``."""

    parts: tuple[TensorInfo, ...]
    decode: Callable[[list[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class FileSlice(DtypeByName):
    """A tensor's bytes left in its file: written by copying file to file, never through memory.

    ``parts``, when set: the tensor is these slices one after another (experts stacked from per-expert
    tensors); ``path`` and ``offset`` are then the first one's."""

    path: Path
    offset: int
    nbytes: int
    dtype_name: str  # safetensors' name
    shape: tuple[int, ...]
    parts: tuple[FileSlice, ...] = ()

    def ranges(self) -> tuple[FileSlice, ...]:
        """The contiguous pieces to copy, in order."""
        return self.parts or (self,)

    @staticmethod
    def joined(parts: tuple[FileSlice, ...], dtype: torch.dtype | str, shape: tuple[int, ...]) -> FileSlice:
        """One tensor made of several slices' bytes, in order."""
        total = sum(p.nbytes for p in parts)
        return FileSlice(parts[0].path, parts[0].offset, total, safetensors_name(dtype), shape, parts)


class Checkpoint:
    """A lazily read set of tensors. Use :func:`open_checkpoint` to make one."""

    def __init__(
        self,
        root: Path,
        format: CheckpointFormat,
        files: list[Path],
        infos: list[TensorInfo],
        metadata: dict[str, str],
        index_file: Path | None = None,
    ):
        self.root = root
        self.format = format
        self.files = tuple(files)
        self.index_file = index_file
        self.metadata = metadata
        self._infos = {i.name: i for i in infos}
        self._legacy: LegacyFile | None = None

    # --- what is in it -------------------------------------------------------------
    @property
    def folder(self) -> Path:
        return self.root if self.root.is_dir() else self.root.parent

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise KeyError(f"{self.root}: no tensor named {name!r}") from None

    def infos(self) -> list[TensorInfo]:
        return list(self._infos.values())

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    # --- reading --------------------------------------------------------------------
    def read(self, name: str, alloc: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
        """Read one tensor into writable CPU memory that this checkpoint keeps no reference to.

        ``alloc(nbytes)`` gives that memory as a uint8 tensor (default: new memory; the executor
        passes reused buffers, io.buffers).
        """
        return self.read_info(self.info(name), alloc)

    def read_info(self, info: TensorInfo, alloc: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
        """Read the tensor ``info`` describes (see :meth:`read`); a decoded one from its parts."""
        name = info.name
        if info.decoded is not None:
            return info.decoded.decode([self.read_info(p) for p in info.decoded.parts])
        if info.offset is None:
            return self._read_legacy(info)
        out = alloc(info.nbytes) if alloc is not None else torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            try:
                pread_into(info.file, out.numpy().data, info.offset)  # the buffer's own memory
            except EOFError:
                raise CorruptCheckpointError(
                    f"{info.file}: truncated while reading tensor {name!r} (was it changed while in use?)"
                ) from None
            except OSError as exc:
                raise CorruptCheckpointError(
                    f"{info.file}: cannot read tensor {name!r} ({exc.strerror or exc})"
                ) from None
        return out.view(info.dtype).reshape(info.shape)

    def same_values(self, a: str, b: str) -> bool:
        """Whether two tensors hold the same values, bit for bit (as transformers decides whether a tied
        pair the files both hold is tied on load). Reads the two tensors, one pair at a time."""
        ia, ib = self.info(a), self.info(b)
        if (ia.file, ia.offset) == (ib.file, ib.offset) and ia.offset is not None:
            return True
        return ia.shape == ib.shape and ia.dtype == ib.dtype and torch.equal(self.read(a), self.read(b))

    def _read_legacy(self, info: TensorInfo) -> torch.Tensor:
        # One pickle is mapped at a time: moving to the next shard unmaps the previous one.
        if self._legacy is None or self._legacy.path != info.file:
            self.close()
            self._legacy = LegacyFile(info.file)
        return self._legacy.read(info.file_key)

    def renamed(self, names: dict[str, str]) -> Checkpoint:
        """A view of some tensors under other names: ``names`` maps new name -> name here."""
        infos = [
            dataclasses.replace(self.info(old), name=new, key=self.info(old).file_key) for new, old in names.items()
        ]
        return self._view(infos)

    def _view(self, infos: list[TensorInfo]) -> Checkpoint:
        return Checkpoint(self.root, self.format, list(self.files), infos, self.metadata, self.index_file)

    def carved(self, pieces: dict[str, tuple[str, int, int, int]]) -> Checkpoint:
        """This checkpoint with some 3-D tensors carved up into slices of their own: ``pieces`` maps a
        new name to (name here, index on axis 0, first row, end row). The carved tensors leave the view.
        Each slice is contiguous in its file, so it is read -- or copied byte for byte -- where it lies.

        Raises:
            UnsupportedError: the tensor is in a pickle (.bin), whose layout is not ours to slice.
        """
        carved = {name for name, _, _, _ in pieces.values()}
        infos = [info for info in self._infos.values() if info.name not in carved]
        for new, (name, index, start, stop) in pieces.items():
            info = self.info(name)
            if info.offset is None or info.decoded is not None or len(info.shape) != 3:
                raise UnsupportedError(f"{info.file}: {name!r} cannot be read in slices (a pickle, or not 3-D)")
            rows, cols = info.shape[1], info.shape[2]
            offset = info.offset + (index * rows + start) * cols * itemsize(info.dtype_name)
            shape = (stop - start, cols)
            infos.append(dataclasses.replace(info, name=new, key=info.file_key, shape=shape, offset=offset))
        return self._view(infos)

    def close(self) -> None:
        if self._legacy is not None:
            self._legacy.close()
            self._legacy = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.root)!r}, format={self.format!r}, tensors={len(self)})"


def pread_into(path: Path, view: memoryview, offset: int) -> None:
    remote = remote_of(path)
    if remote is not None:
        remote.read_into(view, offset)
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                raise EOFError
            done += n
    finally:
        os.close(fd)


def open_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Open a checkpoint folder or file, reading headers only.

    Args:
        path: a folder (model.safetensors, a sharded index, a PEFT adapter, pytorch_model.bin with or
            without its index, a diffusers model or pipeline folder) or a single .safetensors / .bin /
            .index.json / .gguf file.

    Returns:
        A Checkpoint: its tensors' names, dtypes and shapes, each read on demand with ``read(name)``.

    Raises:
        InputNotFoundError: the path, or a shard its index names, does not exist.
        CorruptCheckpointError: a header or index is malformed, truncated or inconsistent.
        UnsafeCheckpointError: a pickle asks for anything but tensors.
    """
    root = Path(path)
    if not root.exists():
        raise InputNotFoundError(f"{root}: no such file or folder")
    if root.is_dir():
        if (root / "model_index.json").is_file():  # a diffusers pipeline: its components as one (io.pipeline)
            from .pipeline import open_pipeline

            return open_pipeline(root)
        for filename, fmt in FOLDER_LAYOUTS:
            if is_file(root / filename):
                return _open_file(root, root / filename, fmt)
        found = sorted(p.name for p in root.iterdir() if p.suffix in (".safetensors", ".json") + BIN_SUFFIXES)
        single = [f for f in found if f.endswith(".safetensors")]
        whole = len(single) == 1 and not re.search(r"-\d{5}-of-\d{5}\.safetensors$", single[0])
        if whole and not any(f.endswith(".index.json") for f in found):  # a LoRA file's own folder, not a shard
            return _open_file(root, root / single[0], "safetensors")
        raise InputNotFoundError(
            f"{root}: no checkpoint found (looked for {', '.join(f for f, _ in FOLDER_LAYOUTS)}; "
            f"found {', '.join(found) or 'nothing usable'})"
        )
    if root.name.endswith(".index.json"):
        fmt = "safetensors-sharded" if ".safetensors." in root.name else "pytorch-bin-sharded"
        return _open_file(root.parent, root, fmt)
    if root.suffix == ".safetensors":
        return _open_file(root, root, "safetensors")
    if root.suffix == ".gguf":  # a llama.cpp model, in transformers' names (io.gguf_model)
        from .gguf_model import open_gguf_model

        return open_gguf_model(root)
    if root.suffix in BIN_SUFFIXES:
        return _open_file(root, root, "pytorch-bin")
    raise CorruptCheckpointError(
        f"{root}: not a checkpoint (expected .safetensors, .bin or an .index.json file, or a folder)"
    )


def _open_file(root: Path, file: Path, fmt: CheckpointFormat) -> Checkpoint:
    if fmt.endswith("-sharded"):
        shards = _read_index(file)
        infos: list[TensorInfo] = []
        metadata: dict[str, str] = {}
        for shard, names in shards.items():
            shard_infos, meta = _scan(shard)
            metadata = metadata or meta
            by_name = {i.name: i for i in shard_infos}
            for name in names:
                if name not in by_name:
                    raise CorruptCheckpointError(
                        f"{file}: the index puts tensor {name!r} in {shard.name}, which does not contain it"
                    )
                infos.append(by_name[name])
        return Checkpoint(root, fmt, list(shards), infos, metadata, index_file=file)
    infos, metadata = _scan(file)
    return Checkpoint(root, fmt, [file], infos, metadata)


def _scan(file: Path) -> tuple[list[TensorInfo], dict[str, str]]:
    if file.suffix == ".safetensors":
        size = file_size(file)
        with open_binary(file) as fh:
            header = read_header(file, size, fh)
        infos = [TensorInfo(e.name, e.dtype_name, e.shape, file, e.begin) for e in header.entries]
        return infos, header.metadata
    with LegacyFile(file) as legacy:
        return [TensorInfo.of(n, d, s, file, None) for n, d, s in legacy.entries()], {}


def _read_index(index: Path) -> dict[Path, list[str]]:
    """The shards an index names, in order, each with its tensor names."""
    try:
        doc = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"{index}: not valid JSON ({exc})") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CorruptCheckpointError(f'{index}: no "weight_map" of tensor name -> shard file')
    shards: dict[Path, list[str]] = {}
    folder = Path(os.path.normpath(index.parent))
    for name, filename in weight_map.items():
        # Checked lexically: shards may be symlinks (the Hugging Face cache links them to blobs).
        shard = Path(os.path.normpath(index.parent / filename))
        if folder not in shard.parents or os.path.isabs(filename):
            raise CorruptCheckpointError(
                f"{index}: shard {filename!r} (for {name!r}) lies outside the checkpoint folder"
            )
        shards.setdefault(shard, []).append(name)
    for shard in shards:
        if not is_file(shard):
            raise InputNotFoundError(
                f"{index}: names shard {shard.name}, which is not there "
                "(download the missing shard, or pass a complete checkpoint)"
            )
    return shards
