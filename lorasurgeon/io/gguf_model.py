"""A llama.cpp GGUF *model* (convert_hf_to_gguf's output) read as a base, in transformers' names and layout.

transformers' own GGUF loader (modeling_gguf_pytorch_utils.load_gguf_checkpoint) is the reference: its
config (``return_tensors=False``: metadata only), its GGUF -> HF name map (``get_gguf_hf_weights_map``,
built here on a meta-device model: no weights) and its per-architecture ``TensorProcessor`` (llama's q/k
reverse permute) -- applied lazily, one tensor at a time, when a tensor is read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UnsupportedError
from .checkpoint import Checkpoint, CheckpointFormat, Decoded, TensorInfo
from .gguf_file import open_reader, tensor_header, text

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch

PLAIN = {"F32": "F32", "F16": "F16", "BF16": "BF16"}
GGUF_MODEL: CheckpointFormat = "gguf"
LLAMA_PERMUTED = ("llama", "mistral")  # transformers' LlamaConverter: q/k rows un-permuted, nothing else
NOT_WEIGHTS = ("rope_freqs.weight",)  # llama.cpp's precomputed RoPE factors: transformers derives them from config


@dataclass(frozen=True)
class Stored:
    """How a tensor lies in the GGUF file: its ggml type, and what reading it undoes -- LlamaModel.permute of q/k
    rows in ``heads`` heads, or (``processed``) another transform of transformers' processor for the architecture."""

    ggml: str
    heads: int | None = None
    processed: bool = False


class GgufModel(Checkpoint):
    """A GGUF model's tensors under transformers' names; ``config`` is transformers' config.json for it,
    ``stored`` how each tensor lies in the file (by transformers' name; its GGUF name is its info's ``key``)."""

    def __init__(self, path: Path, infos: list[TensorInfo], config: dict[str, Any], stored: dict[str, Stored]):
        super().__init__(path, GGUF_MODEL, [path], infos, {})
        self.config = config
        self.stored = stored

    def _view(self, infos: list[TensorInfo]) -> Checkpoint:
        return GgufModel(self.root, infos, self.config, self.stored)


def _reader(path: Path) -> Any:
    reader = open_reader(path, "reading a GGUF model")
    if text(reader, "general.type") == "adapter" or "adapter.type" in reader.fields:
        raise UnsupportedError(f"{path}: a llama.cpp LoRA adapter, not a model (the base it is for is a model)")
    if reader.byte_order != "I":
        raise UnsupportedError(f"{path}: a big-endian GGUF file, which is not read")
    return reader


def gguf_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The config.json transformers derives from a GGUF model's metadata.

    Raises:
        UnsupportedError: an adapter .gguf, or an architecture transformers' GGUF support lacks.
    """
    p = Path(path)
    _reader(p)
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    try:
        parsed = load_gguf_checkpoint(os.fspath(p), return_tensors=False)
    except ValueError as exc:
        raise UnsupportedError(f"{p}: {exc} (transformers' GGUF support lacks it)") from None
    from transformers import AutoConfig

    cfg = dict(parsed["config"])
    model_type = cfg.pop("model_type")
    return dict(AutoConfig.for_model(model_type, **cfg).to_dict())


def _name_map(config: dict[str, Any], arch: str) -> tuple[dict[str, str], Any]:
    """transformers' GGUF -> HF names (built on a meta-device model) and its tensor processor."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    cfg = AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k != "model_type"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config)
    return get_gguf_hf_weights_map(model, processor), processor


def open_gguf_model(path: str | os.PathLike[str]) -> GgufModel:
    """A GGUF model file as a Checkpoint in transformers' names and layout, read lazily.

    Raises:
        UnsupportedError: an adapter .gguf, an architecture transformers cannot read, a tensor type gguf
            cannot dequantize. CorruptCheckpointError: an unreadable file.
    """
    p = Path(path)
    reader = _reader(p)
    arch = text(reader, "general.architecture") or "?"
    config = gguf_config(p)
    names, processor = _name_map(config, arch)
    tensors = [tensor_header(r) for r in reader.tensors]
    unmapped = [t.name for t in tensors if t.name not in names and t.name not in NOT_WEIGHTS]
    if unmapped:  # (MoE experts, which transformers' processors stack or rename, are not read yet)
        raise UnsupportedError(
            f"{p}: {len(unmapped)} tensors lorasurgeon cannot place in transformers' layout ({', '.join(unmapped[:3])}"
            f"{', ...' if len(unmapped) > 3 else ''}): refused rather than left out of the model"
        )
    placed = [t for t in tensors if t.name in names]
    stored = {names[t.name]: _stored(t, arch, processor, config) for t in placed}
    infos = [_info(p, t, names[t.name], stored[names[t.name]], processor, names) for t in placed]
    return GgufModel(p, infos, config, stored)


def _stored(t: Any, arch: str, processor: Any, config: dict[str, Any]) -> Stored:
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor

    if type(processor).process is TensorProcessor.process:
        return Stored(t.ggml)
    if arch not in LLAMA_PERMUTED:
        return Stored(t.ggml, processed=True)
    n_head = int(config["num_attention_heads"])
    heads = {".attn_q.": n_head, ".attn_k.": int(config.get("num_key_value_heads") or n_head)}
    return Stored(t.ggml, next((n for part, n in heads.items() if part in t.name), None))


def _info(path: Path, t: Any, name: str, stored: Stored, processor: Any, names: dict[str, str]) -> TensorInfo:
    import gguf

    if t.ggml in PLAIN and not stored.heads and not stored.processed:
        return TensorInfo(name, PLAIN[t.ggml], t.shape, path, t.offset, key=t.name)
    qtype = gguf.GGMLQuantizationType[t.ggml]
    if t.ggml not in PLAIN and (
        t.ggml.startswith(("I", "F")) or qtype not in getattr(gguf.quants, "_type_traits", {qtype: None})
    ):
        raise UnsupportedError(f"{path}: {t.name} is stored as {t.ggml}, which gguf cannot dequantize")
    raw = TensorInfo(t.name, "U8", (t.nbytes,), path, t.offset)
    dtype = PLAIN.get(t.ggml, "F32")
    fn = partial(_decode, qtype, t.shape, t.name, processor, names)
    return TensorInfo(name, dtype, t.shape, path, None, key=t.name, decoded=Decoded((raw,), fn))


def _decode(qtype: Any, shape: tuple[int, ...], key: str, processor: Any, names: Any, parts: list[Any]) -> Any:
    """gguf's dequantize, then transformers' processor for this tensor (llama's q/k reverse permute)."""
    import gguf
    import numpy as np

    data = gguf.quants.dequantize(parts[0].numpy().reshape(*shape[:-1], -1), qtype).reshape(shape)
    out = processor.process(weights=data, name=key, tensor_key_mapping=names, parsed_parameters={"tensors": {}})
    return torch.from_numpy(np.ascontiguousarray(out.weights))
