"""The files around the weights: config.json, tokenizer and generation files.

Copied into a result unchanged, except config.json, which is edited where the result differs
from its source (dtype, untied embeddings).
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CorruptCheckpointError, LorasurgeonError
from .dtypes import torch_name

if TYPE_CHECKING:
    import torch

    from .checkpoint import Checkpoint
else:
    from .._lazy import torch


CONFIG = "config.json"
# The files around the weights that a model or adapter folder carries (top level only): what is
# fetched from the Hub, copied into a result, and expected in one. Custom code (*.py) and the
# licence travel with the weights; training logs, optimizer states and the like do not.
SIDECARS = (
    "config.json",
    "generation_config.json",
    "adapter_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "chat_template*",
    "preprocessor_config.json",
    "processor_config.json",
    "*.tiktoken",
    "*.py",
    "LICENSE*",
    "LICENCE*",
    "NOTICE*",
    "USE_POLICY*",
)
# A base's model card describes another model; an adapter config belongs to the adapter.
_NOT_COPIED = {"README.md", "adapter_config.json"}


def is_sidecar(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in SIDECARS)


def sidecar_files(folder: Path) -> list[Path]:
    """The sidecar files of a model folder to copy into a result (config, tokenizer, generation config, code)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and is_sidecar(p.name) and p.name not in _NOT_COPIED)


def read_config(folder: Path | Checkpoint) -> dict[str, Any]:
    """config.json as a dict ({} when absent: it is optional for the math); given a checkpoint, its folder's, or
    the config it derives itself (a GGUF model's, from its metadata).

    Raises:
        CorruptCheckpointError: a config.json that is there but not a JSON object, by name.
    """
    config = getattr(folder, "config", None)  # a checkpoint that derives its own (io.gguf_model: GGUF metadata)
    if isinstance(config, dict):
        return dict(config)
    folder = folder if isinstance(folder, Path) else folder.folder
    path = folder / CONFIG
    if not path.exists():
        return {}
    return read_json_object(path, CorruptCheckpointError)


def read_json_object(path: Path, error: type[LorasurgeonError]) -> dict[str, Any]:
    """A JSON config file (config.json, adapter_config.json) as a dict; anything else is ``error``, naming the
    file and, for a syntax error, where it is."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise error(f"{path}: not valid JSON (line {exc.lineno} column {exc.colno}: {exc.msg})") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not valid JSON (not UTF-8: {exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if not isinstance(doc, dict):
        raise error(f"{path}: expected a JSON object, not {type(doc).__name__}")
    return doc


def edit_config(
    config: dict[str, Any], *, dtype: torch.dtype | str | None, untie: bool, dequantized: bool = False
) -> dict[str, Any]:
    """A copy of config with the dtype and tie_word_embeddings the result really has; ``dequantized``:
    without the quantization_config (or compression_config) of a quantized base."""
    out: dict[str, Any] = json.loads(json.dumps(config))
    targets = [out] + [v for k, v in out.items() if k == "text_config" and isinstance(v, dict)]
    for doc in targets:
        if dtype is not None:
            name = torch_name(dtype).removeprefix("torch.")
            for key in ("dtype", "torch_dtype"):
                if key in doc or (doc is out and key == "dtype" and "torch_dtype" not in doc):
                    doc[key] = name
        if untie:
            doc["tie_word_embeddings"] = False
        if dequantized:
            doc.pop("quantization_config", None)
            doc.pop("compression_config", None)
            if isinstance(doc.get("quantization"), dict):  # MLX's own block, which mlx-lm reads first
                doc.pop("quantization")
    return out


def config_bytes(config: dict[str, Any]) -> bytes:
    """A JSON config (config.json, adapter_config.json) as written: indented, sorted keys, newline."""
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")
