"""inspect --verify: read every byte of a checkpoint and report what is wrong, tensor by tensor."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..adapter.config import CONFIG_NAME
from ..adapter.weights import load_adapter
from ..engine.execute import Discard, Outcome, run
from ..engine.plan import Ref
from ..errors import LorasurgeonError, UnsupportedError
from ..hub.source import resolve
from ..io.checkpoint import open_checkpoint
from ..io.header import read_header
from ..io.layout import TensorSpec
from ..io.sidecar import CONFIG, read_config
from ..words import plural
from .inspect_gguf import is_gguf

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch


@dataclass(frozen=True)
class VerifyProblem:
    where: str  # a tensor name or a file
    what: str


@dataclass(frozen=True)
class VerifyReport:
    path: str
    tensors: int
    bytes_read: int
    problems: list[VerifyProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}

    def summary(self) -> str:
        head = f"verify: read {plural(self.tensors, 'tensor')} ({self.bytes_read:,} bytes): " + (
            "no problems" if self.ok else plural(len(self.problems), "problem")
        )
        return "\n".join([head] + [f"  {p.where}: {p.what}" for p in self.problems])


def verify(path: str | os.PathLike[str]) -> VerifyReport:
    """Check a checkpoint beyond its headers: index consistency, file layout, every tensor readable and finite.

    Args:
        path: a folder, a single file, or a Hub repo id.

    Returns:
        A VerifyReport listing the problems found, tensor by tensor (``ok`` when there are none);
        a tensor that cannot be read is one of them.

    Raises:
        InputNotFoundError: no such local path, or no such Hub repo or revision.
        CorruptCheckpointError, UnsafeCheckpointError: a file that cannot be read safely.
            Damage that prevents opening the checkpoint at all is raised, not listed.
        UnsupportedError: a .gguf file.
    """
    root = resolve(path)
    if is_gguf(root):
        raise UnsupportedError(
            f"{path}: a GGUF file; --verify reads safetensors and .bin checkpoints (inspect shows what its "
            "headers hold, and llama.cpp checks its tensors when it loads it)"
        )
    problems: list[VerifyProblem] = []
    with open_checkpoint(root) as ckpt:
        indexed = set(ckpt)
        if ckpt.index_file is not None:
            doc = json.loads(ckpt.index_file.read_text(encoding="utf-8"))  # parsed once already by open
            metadata = doc.get("metadata")
            total = metadata.get("total_size") if isinstance(metadata, dict) else None
            if total is not None and total != ckpt.nbytes:
                problems.append(
                    VerifyProblem(
                        ckpt.index_file.name, f"metadata.total_size is {total}, the tensors hold {ckpt.nbytes} bytes"
                    )
                )
        for file in ckpt.files:
            if file.suffix == ".safetensors":
                problems += _layout_problems(file, indexed if ckpt.index_file else None)
        ops = [ReadOp(name, Ref(0, name), ckpt.info(name).nbytes) for name in ckpt]
        stats = run(ops, [ckpt], Discard(), compute=_check, unreadable=_unreadable)
        problems += [c.problem for c in stats.infos if c.problem is not None]
        read = sum(c.nbytes_read for c in stats.infos)
        count = len(ckpt)
    folder = root if root.is_dir() else root.parent
    if (folder / CONFIG_NAME).is_file():
        try:
            load_adapter(folder).close()
        except LorasurgeonError as exc:
            problems.append(VerifyProblem(CONFIG_NAME, str(exc)))
    try:
        read_config(folder)
    except LorasurgeonError as exc:
        problems.append(VerifyProblem(CONFIG, str(exc)))
    return VerifyReport(str(root), count, read, problems)


@dataclass(frozen=True)
class ReadOp:
    """One tensor, read whole and checked."""

    name: str
    src: Ref
    nbytes: int
    byte_copy: TensorSpec | None = None  # read, never copied

    def refs(self) -> list[Ref]:
        return [self.src]


@dataclass(frozen=True)
class _Checked:
    nbytes_read: int
    problem: VerifyProblem | None


def _check(op: ReadOp, tensors: Mapping[Ref, torch.Tensor], device: torch.device) -> Outcome[_Checked]:
    tensor = tensors[op.src]
    problem = None
    if tensor.is_floating_point():
        nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
        if nan or inf:
            problem = VerifyProblem(op.name, f"{nan} NaN and {inf} Inf of {tensor.numel()} values")
    return Outcome([], _Checked(tensor.numel() * tensor.element_size(), problem))


def _unreadable(op: ReadOp, exc: LorasurgeonError) -> _Checked:
    return _Checked(0, VerifyProblem(op.name, str(exc)))


def _layout_problems(file: Path, indexed: set[str] | None) -> list[VerifyProblem]:
    """Gaps, trailing bytes and tensors the index does not list (safetensors itself rejects the first two)."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        header = read_header(file, size, fh)
    problems, end = [], header.data_start
    for entry in header.entries:
        if entry.begin > end:
            problems.append(
                VerifyProblem(file.name, f"{plural(entry.begin - end, 'unused byte')} before tensor {entry.name!r}")
            )
        end = max(end, entry.begin + entry.nbytes)
        if indexed is not None and entry.name not in indexed:
            problems.append(VerifyProblem(file.name, f"holds tensor {entry.name!r}, which the index does not list"))
    if size > end:
        problems.append(VerifyProblem(file.name, f"{plural(size - end, 'byte')} after the last tensor"))
    return problems
