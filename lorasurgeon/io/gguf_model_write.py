"""A GGUF model written like its base (docs/formats.md §11.1): every metadata field, in order, and every tensor's
bytes as the base holds them -- but the tensors a merge changed, each put back into llama.cpp's layout and
encoded by gguf's own quantizer in the base's type, or in the fallback where gguf cannot encode that type.

- Encoding: ``gguf.quants.quantize`` (numpy ports of ggml's reference quantizers) for F32, F16, BF16, Q4_0, Q4_1,
  Q5_0, Q5_1, Q8_0 and the rest it implements; a type it has no encoder for (the K-quants, the IQ types) falls back
  to Q8_0 (8.5 bits a weight: more than any of them), or F16 where a row is not whole 32-value blocks.
- Layout: transformers reads a llama/mistral GGUF's q and k rows un-permuted (its TensorProcessor); written back,
  they are permuted again as convert_hf_to_gguf's LlamaModel.permute does. Other per-architecture processors are
  not inverted: a changed tensor that one of them transformed is refused by name (``io.gguf_model``).
- Streaming: the header (metadata, tensor infos, offsets) is written first -- each tensor's size is known from
  its type and shape -- then every unchanged tensor is copied file to file (``os.copy_file_range``), and each
  changed one is written at its offset as the engine hands it over: a few tensors in memory, whatever the model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .gguf_file import gguf_module, open_reader, text

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch

FALLBACK = "Q8_0"  # what a changed tensor of a type gguf cannot encode is written as
COPY_CHUNK = 64 << 20


@dataclass(frozen=True)
class GgufTarget:
    """How one changed tensor is written: its GGUF name, the base's type and the type written, the rows'
    heads for LlamaModel.permute (q, k of llama/mistral; None: as it is)."""

    key: str
    was: str
    ggml: str
    heads: int | None = None


def encodable(ggml: str) -> bool:
    """gguf's quants module can encode this type."""
    gguf = gguf_module("writing a GGUF model")
    qtype = gguf.GGMLQuantizationType[ggml]
    if ggml in ("F32", "F16"):
        return True
    traits = getattr(gguf.quants, "_type_traits", {})
    cls = traits.get(qtype)
    return cls is not None and "quantize_blocks" in vars(cls)


def written_type(ggml: str, shape: tuple[int, ...]) -> str:
    """The type a changed tensor of the base's type ``ggml`` is written in."""
    if encodable(ggml):
        return ggml
    gguf = gguf_module("writing a GGUF model")
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[FALLBACK]][0]
    return FALLBACK if shape[-1] % block == 0 else "F16"


def encode(target: GgufTarget, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A merged tensor (transformers' layout, float32) as the bytes of ``target.ggml`` in llama.cpp's layout, and
    what they hold, decoded back into transformers' layout (to measure what encoding cost)."""
    import numpy as np

    gguf = gguf_module("writing a GGUF model")
    data = tensor.detach().to("cpu", torch.float32).numpy()
    shape = data.shape
    if target.heads:
        n = target.heads
        data = data.reshape(n, 2, shape[0] // n // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    qtype = gguf.GGMLQuantizationType[target.ggml]
    raw = np.ascontiguousarray(gguf.quants.quantize(np.ascontiguousarray(data), qtype))
    back = gguf.quants.dequantize(raw, qtype).reshape(shape).astype(np.float32)
    if target.heads:
        n = target.heads
        back = back.reshape(n, shape[0] // n // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    return torch.from_numpy(raw.view(np.uint8).reshape(-1)), torch.from_numpy(np.ascontiguousarray(back))


class GgufModelWriter:
    """The engine's sink for a GGUF result at ``path``: the base's metadata and tensors, ``targets`` (by the
    name the engine writes, transformers') re-encoded; the rest copied as they lie. ``close()`` when done."""

    def __init__(self, base: Path, path: Path, targets: Mapping[str, GgufTarget]):
        import numpy as np

        gguf = gguf_module("writing a GGUF model")
        reader = open_reader(base, "writing a GGUF model")
        self.targets = dict(targets)
        by_key = {t.key: t for t in targets.values()}
        writer = gguf.GGUFWriter(os.fspath(path), text(reader, "general.architecture") or "llama")
        _copy_fields(gguf, reader, writer)
        for t in reader.tensors:
            target = by_key.get(str(t.name))
            qtype = t.tensor_type if target is None else gguf.GGMLQuantizationType[target.ggml]
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            writer.add_tensor_info(str(t.name), shape, np.float32, _nbytes(gguf, shape, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        start = _align(writer.fout[0].tell(), writer.data_alignment)
        writer.close()
        self.offsets: dict[str, int] = {}
        at = start
        for name, info in writer.tensors[0].items():
            self.offsets[name] = at
            at = _align(at + info.nbytes, writer.data_alignment)
        self.fd = os.open(path, os.O_RDWR)
        try:
            os.ftruncate(self.fd, at)
            self._copy_unchanged(base, reader, by_key)
        except BaseException:
            os.close(self.fd)
            raise

    def _copy_unchanged(self, base: Path, reader: Any, changed: Mapping[str, GgufTarget]) -> None:
        with open(base, "rb") as src:
            for t in reader.tensors:
                if str(t.name) not in changed:
                    _copy_range(src.fileno(), self.fd, int(t.data_offset), self.offsets[str(t.name)], int(t.n_bytes))

    def write(self, name: str, tensor: Any) -> None:
        target = self.targets[name]  # the engine hands over only the changed tensors, encoded
        data = memoryview(tensor.numpy()).cast("B")
        at = self.offsets[target.key]
        while data:
            done = os.pwrite(self.fd, data, at)
            data, at = data[done:], at + done

    def close(self) -> None:
        os.close(self.fd)


def _copy_fields(gguf: Any, reader: Any, writer: Any) -> None:
    """Every metadata field of the base, as gguf's own gguf_new_metadata.py copies them."""
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        if field.name == gguf.Keys.General.ALIGNMENT:
            writer.add_custom_alignment(int(field.contents()))
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)


def _nbytes(gguf: Any, shape: tuple[int, ...], qtype: Any) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(math.prod(shape[:-1]) * (shape[-1] // block) * size)


def _align(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _copy_range(src: int, dst: int, src_at: int, dst_at: int, nbytes: int) -> None:
    """``nbytes`` from ``src`` at ``src_at`` to ``dst`` at ``dst_at``, file to file (never through Python)."""
    while nbytes > 0:
        try:
            done = os.copy_file_range(src, dst, min(nbytes, COPY_CHUNK), src_at, dst_at)
        except (AttributeError, OSError):  # not Linux, or a file system that refuses it
            done = os.pwrite(dst, os.pread(src, min(nbytes, COPY_CHUNK), src_at), dst_at)
        if done <= 0:
            raise OSError(f"copying a tensor stopped {nbytes} bytes short (the base file shrank?)")
        src_at, dst_at, nbytes = src_at + done, dst_at + done, nbytes - done
