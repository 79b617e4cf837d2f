"""ModelNames remembered on disk, so that asking transformers (an import of seconds and a meta model) is paid
once per model and transformers version, not on every command.

The key is everything the answer depends on: this file format's version, the installed transformers' and
lorasurgeon's versions (read from their package metadata, without importing them), a digest of this
package's code, the config.json and the file keys. A value is written whole (a hidden file renamed into
place) and one that cannot be read is recomputed.
``LORASURGEON_CACHE`` names the folder (default ``$XDG_CACHE_HOME/lorasurgeon``, or ``~/.cache/lorasurgeon``);
``LORASURGEON_CACHE=off`` turns it off.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from .model import FusedExperts, ModelNames

FORMAT = 2  # bump when ModelNames or the way it is computed changes


def cache_dir() -> Path | None:
    chosen = os.environ.get("LORASURGEON_CACHE")
    if chosen and chosen.lower() in ("off", "0", "none"):
        return None
    if chosen:
        return Path(chosen).expanduser() / "names"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lorasurgeon" / "names"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


@functools.cache
def _code() -> str:
    """A digest of the code that computes the names (this package's files): an edited checkout is not
    answered from what an earlier version of it computed."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _key(file_keys: Sequence[str], config_json: str) -> str:
    versions = [_version("transformers"), _version("lorasurgeon"), _code()]
    text = json.dumps([FORMAT, *versions, config_json, list(file_keys)])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def to_json(names: ModelNames) -> dict[str, Any]:
    return {
        "file_of": dict(names.file_of),
        "tied": dict(names.tied),
        "head": names.head,
        "embedding": names.embedding,
        "fused": {k: {"parts": [list(p) for p in f.parts], "axis": f.axis} for k, f in names.fused.items()},
        "model_class": names.model_class,
        "task_type": names.task_type,
        "source": names.source,
        "saved_as": dict(names.saved_as),
        "transposed": sorted(names.transposed),
        "layers": dict(names.layers),
        "stacked": {k: list(v) for k, v in names.stacked.items()},
        "model_type": names.model_type,
        "row_blocks": {k: list(v) for k, v in names.row_blocks.items()},
    }


def from_json(doc: dict[str, Any]) -> ModelNames:
    return ModelNames(
        file_of=doc["file_of"],
        tied=doc["tied"],
        head=doc["head"],
        embedding=doc["embedding"],
        fused={k: FusedExperts(tuple(tuple(p) for p in f["parts"]), f["axis"]) for k, f in doc["fused"].items()},
        model_class=doc["model_class"],
        task_type=doc["task_type"],
        source=doc["source"],
        saved_as=doc["saved_as"],
        transposed=frozenset(doc["transposed"]),
        layers=doc["layers"],
        stacked={k: tuple(v) for k, v in doc["stacked"].items()},
        model_type=doc["model_type"],
        row_blocks={k: (v[0], v[1], v[2], v[3]) for k, v in doc.get("row_blocks", {}).items()},
    )


def remembered(file_keys: Sequence[str], config_json: str, compute: Callable[[], ModelNames]) -> ModelNames:
    """The names from the disk cache, or ``compute()``'s, then stored (a cache that cannot be written is
    skipped: it is never a reason to fail)."""
    doc = _remembered_doc(_key(file_keys, config_json), lambda: to_json(compute()))
    try:
        return from_json(doc)
    except (KeyError, TypeError, ValueError):  # a damaged cache file: answer afresh
        return compute()


def remembered_keys(
    shapes: Mapping[str, tuple[int, ...]], config_json: str, compute: Callable[[], list[str] | None]
) -> list[str] | None:
    """The file keys save_pretrained writes for in-memory tensors of these shapes (``saved_keys``), cached alike."""
    parts = ["saved-keys", *(f"{name}:{list(shape)}" for name, shape in sorted(shapes.items()))]
    doc = _remembered_doc(_key(parts, config_json), lambda: {"keys": compute()})
    keys = doc.get("keys")
    return [str(k) for k in keys] if isinstance(keys, list) else compute()


def _remembered_doc(key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    folder = cache_dir()
    if folder is None:
        return compute()
    path = folder / f"{key}.json"
    try:
        found: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return found
    except (OSError, ValueError):
        pass
    doc = compute()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh)
        os.replace(tmp, path)
    except OSError:
        pass
    return doc
