"""inspect of a .gguf file: a llama.cpp LoRA adapter (what ``convert --to gguf`` writes) or a full model.

Read with the ``gguf`` package's GGUFReader, headers only: the key/value metadata and the tensor infos
(name, ggml type, shape, offset); tensor data is mapped, never read. gguf is optional and imported only
here, only when a .gguf is inspected. A LoRA pair is ``NAME.lora_a`` + ``NAME.lora_b``; its rank is
``lora_b``'s first ggml dimension (llama.cpp checks ``a.ne[1] == b.ne[0]``; for the token embedding A and B
are both stored {r, n}, so the rule is the same).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io.gguf_file import corrupt_gguf, open_reader, scalar, text

MAGIC = b"GGUF"
LORA_SUFFIXES = (".lora_a", ".lora_b")
# llama.cpp's per-architecture hyperparameter keys ({arch}.KEY) -> the name inspect gives them
MODEL_KEYS = {
    "block_count": "layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "attention_heads",
    "attention.head_count_kv": "kv_heads",
    "vocab_size": "vocab_size",
}


@dataclass(frozen=True)
class GgufTensor:
    name: str
    dtype: str  # the ggml type's name: F32, F16, BF16, Q8_0, Q4_K, ...
    shape: tuple[int, ...]  # ggml order: ne[0] (the contiguous dimension) first
    parameters: int
    nbytes: int


@dataclass(frozen=True)
class GgufReport:
    """What a .gguf holds beyond the tensor counts: the ``gguf`` entry of ``inspect --json``."""

    version: int
    architecture: str | None  # general.architecture (llama, qwen2, ...)
    type: str  # general.type: adapter | model (older files have none: told from adapter.type / the tensors)
    name: str | None = None  # general.name
    adapter_type: str | None = None  # adapter.type: lora (llama.cpp's other kind: control_vector)
    lora_alpha: float | None = None  # adapter.lora.alpha: llama.cpp scales every pair by alpha / rank
    pairs: int = 0  # .lora_a/.lora_b pairs
    ranks: dict[int, int] = field(default_factory=dict)  # rank -> pairs of that rank
    unpaired: list[str] = field(default_factory=list)  # a .lora_a without its .lora_b, or the reverse
    model: dict[str, int] = field(default_factory=dict)  # a model's {arch}.block_count etc., by inspect's names
    file_bytes: int = 0


def is_gguf(path: Path) -> bool:
    """A file named .gguf, or one that starts with GGUF's magic."""
    if not path.is_file():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with path.open("rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def read_gguf(path: Path) -> tuple[GgufReport, list[GgufTensor], dict[str, str]]:
    """The report, the tensors and the scalar metadata (key -> text) of a .gguf file.

    Raises:
        UnsupportedError: the gguf package is not installed.
        CorruptCheckpointError: a file GGUFReader cannot parse, or whose tensors run past its end.
    """
    reader = open_reader(path, "inspecting a .gguf")
    size = path.stat().st_size
    tensors = [_tensor(t) for t in reader.tensors]
    for t in reader.tensors:
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise corrupt_gguf(path, f"tensor {t.name} runs past the end of the file ({size:,} bytes): truncated")
    meta = _metadata(reader)
    report = GgufReport(
        version=int(scalar(reader, "GGUF.version") or 0),
        architecture=text(reader, "general.architecture"),
        type=_kind(reader, tensors),
        name=text(reader, "general.name"),
        adapter_type=text(reader, "adapter.type"),
        lora_alpha=_float(reader, "adapter.lora.alpha"),
        model=_model_numbers(reader),
        file_bytes=size,
        **_pairs(tensors),
    )
    return report, tensors, meta


def _tensor(t: Any) -> GgufTensor:
    return GgufTensor(
        name=str(t.name),
        dtype=str(t.tensor_type.name),
        shape=tuple(int(d) for d in t.shape),
        parameters=int(t.n_elements),
        nbytes=int(t.n_bytes),
    )


def _float(reader: Any, key: str) -> float | None:
    value = scalar(reader, key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _metadata(reader: Any) -> dict[str, str]:
    """Every scalar key/value (arrays, e.g. the tokenizer's vocabulary, are left out), as text."""
    out = {}
    for key in reader.fields:
        value = None if key.startswith("GGUF.") else scalar(reader, key)
        if value is not None:
            out[key] = str(value)
    return out


def _kind(reader: Any, tensors: list[GgufTensor]) -> str:
    declared = text(reader, "general.type")
    if declared:
        return declared
    lora = any(t.name.endswith(LORA_SUFFIXES) for t in tensors)
    return "adapter" if lora or text(reader, "adapter.type") else "model"


def _model_numbers(reader: Any) -> dict[str, int]:
    """A model's {arch}.block_count, embedding_length, ... (those that are plain integers)."""
    arch = text(reader, "general.architecture")
    out = {}
    for key, name in MODEL_KEYS.items():
        value = scalar(reader, f"{arch}.{key}") if arch else None
        if isinstance(value, int) and not isinstance(value, bool):
            out[name] = value
    if "vocab_size" not in out and "tokenizer.ggml.tokens" in reader.fields:
        out["vocab_size"] = len(reader.fields["tokenizer.ggml.tokens"].data)
    return out


def _pairs(tensors: list[GgufTensor]) -> dict[str, Any]:
    """pairs, ranks (rank -> pairs of that rank: each pair's rank is its ``lora_b``'s ne[0], see the module's
    docstring) and unpaired halves, from the tensors' names and shapes."""
    halves: dict[str, dict[str, GgufTensor]] = {}
    for t in tensors:
        for suffix in LORA_SUFFIXES:
            if t.name.endswith(suffix):
                halves.setdefault(t.name[: -len(suffix)], {})[suffix] = t
    whole = [v for v in halves.values() if len(v) == 2]
    ranks = Counter(v[".lora_b"].shape[0] for v in whole if v[".lora_b"].shape)
    unpaired = sorted(t.name for v in halves.values() if len(v) == 1 for t in v.values())
    return {"pairs": len(whole), "ranks": dict(sorted(ranks.items())), "unpaired": unpaired}
