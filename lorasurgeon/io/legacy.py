"""Legacy PyTorch pickles (``pytorch_model.bin``): loaded only with ``weights_only=True, mmap=True``.

``weights_only`` makes torch refuse any pickle that asks for more than tensors and plain
containers (such a file could run code when loaded); ``mmap`` keeps tensor data on disk until it
is read. A file is mapped while it is open; :class:`Checkpoint` keeps at most one open.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CorruptCheckpointError, UnsafeCheckpointError

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch


def _reason(exc: BaseException) -> str:
    text = str(exc)
    match = re.search(r"(Unsupported global: [^\n]*|Unsupported operand[^\n]*|WeightsUnpickler error: [^\n]*)", text)
    return (match.group(1) if match else text.splitlines()[0] if text else type(exc).__name__).strip()


class LegacyFile:
    """One mapped ``.bin`` file: a flat dict of tensor name -> tensor."""

    def __init__(self, path: Path):
        self.path = path
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as exc:
            if "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
                raise UnsafeCheckpointError(
                    f"{path}: refused to load this pickle, it asks for more than tensors "
                    f"({_reason(exc)}); convert it to safetensors with a tool you trust"
                ) from None
            raise CorruptCheckpointError(f"{path}: not a readable PyTorch checkpoint ({_reason(exc)})") from None
        except Exception as exc:  # a damaged zip or pickle makes torch raise almost anything
            raise CorruptCheckpointError(
                f"{path}: cannot read as a PyTorch checkpoint ({type(exc).__name__}: {_reason(exc)}); "
                "only the zip format of torch >= 1.6 is supported"
            ) from None
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise CorruptCheckpointError(
                f"{path}: expected a flat mapping of tensor names to tensors, found {type(state).__name__}"
            )
        self._state: dict[str, torch.Tensor] | None = state

    def entries(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        assert self._state is not None
        return [(k, v.dtype, tuple(v.shape)) for k, v in self._state.items()]

    def read(self, name: str) -> torch.Tensor:
        """A contiguous copy in anonymous memory; the mapped original is never handed out."""
        assert self._state is not None
        src = self._state[name]
        try:
            return torch.empty(src.shape, dtype=src.dtype).copy_(src)
        except Exception as exc:  # storage that points past the mapped data
            raise CorruptCheckpointError(f"{self.path}: tensor {name!r} cannot be read ({exc})") from None

    def close(self) -> None:
        self._state = None

    def __enter__(self) -> LegacyFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
