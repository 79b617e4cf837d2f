"""inspect --verify: read every byte of a checkpoint and report what is wrong, tensor by tensor."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..adapter.config import CONFIG_NAME
from ..adapter.weights import load_adapter
from ..errors import LorasurgeonError
from ..hub.source import resolve
from ..io.checkpoint import open_checkpoint
from ..io.header import read_header


@dataclass(frozen=True)
class Problem:
    where: str  # a tensor name or a file
    what: str


@dataclass(frozen=True)
class VerifyReport:
    path: str
    tensors: int
    bytes_read: int
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def summary(self) -> str:
        head = (f"verify: read {self.tensors} tensors ({self.bytes_read:,} bytes): "
                + ("no problems" if self.ok else f"{len(self.problems)} problems"))
        return "\n".join([head] + [f"  {p.where}: {p.what}" for p in self.problems])


def verify(path: str | os.PathLike[str]) -> VerifyReport:
    """Check a checkpoint beyond its headers: index consistency, file layout, every tensor readable
    and finite. Structural damage that prevents opening it raises a LorasurgeonError instead."""
    root = resolve(path)
    problems: list[Problem] = []
    with open_checkpoint(root) as ckpt:
        indexed = set(ckpt)
        if ckpt.index_file is not None:
            doc = json.loads(ckpt.index_file.read_text(encoding="utf-8"))  # parsed once already by open
            metadata = doc.get("metadata")
            total = metadata.get("total_size") if isinstance(metadata, dict) else None
            if total is not None and total != ckpt.nbytes:
                problems.append(Problem(ckpt.index_file.name,
                                        f"metadata.total_size is {total}, the tensors hold {ckpt.nbytes} bytes"))
        for file in ckpt.files:
            if file.suffix == ".safetensors":
                problems += _layout_problems(file, indexed if ckpt.index_file else None)
        read = 0
        for name in ckpt:
            try:
                tensor = ckpt.read(name)
            except LorasurgeonError as exc:
                problems.append(Problem(name, str(exc)))
                continue
            read += tensor.numel() * tensor.element_size()
            if tensor.is_floating_point():
                nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
                if nan or inf:
                    problems.append(Problem(name, f"{nan} NaN and {inf} Inf of {tensor.numel()} values"))
        count = len(ckpt)
    folder = root if root.is_dir() else root.parent
    if (folder / CONFIG_NAME).is_file():
        try:
            load_adapter(folder).close()
        except LorasurgeonError as exc:
            problems.append(Problem(CONFIG_NAME, str(exc)))
    return VerifyReport(str(root), count, read, problems)


def _layout_problems(file: Path, indexed: set[str] | None) -> list[Problem]:
    """Gaps, trailing bytes and tensors the index does not list (safetensors itself rejects the first two)."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        header = read_header(file, size, fh)
    problems, end = [], header.data_start
    for entry in header.entries:
        if entry.begin > end:
            problems.append(Problem(file.name, f"{entry.begin - end} unused bytes before tensor {entry.name!r}"))
        end = max(end, entry.begin + entry.nbytes)
        if indexed is not None and entry.name not in indexed:
            problems.append(Problem(file.name, f"holds tensor {entry.name!r}, which the index does not list"))
    if size > end:
        problems.append(Problem(file.name, f"{size - end} bytes after the last tensor"))
    return problems
