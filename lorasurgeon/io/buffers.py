"""Read buffers that are used again once nothing holds them, instead of fresh memory per tensor.

Every fresh buffer costs a page fault and a page of zeros per 4 KiB the first time it is touched:
for a merge that is the whole model again in kernel time. The reader takes its buffers here. A
buffer is handed out again only when the pool's own reference is the only one left on its memory
(torch's storage use count), so a tensor still being computed on or written can never be
overwritten; where that count cannot be read, every buffer is fresh.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch


def _use_count(t: torch.Tensor) -> int | None:
    try:
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata)
    except (AttributeError, RuntimeError):  # a torch without it: no reuse
        return None


class ReadBuffers:
    """At most ``slots`` reusable uint8 buffers, each lent for tensors of half to all its size.

    Called from one thread (the reader). Requests under ``min_bytes`` get fresh memory.
    """

    def __init__(self, slots: int = 8, min_bytes: int = 1 << 20):
        self.slots, self.min_bytes = slots, min_bytes
        self._bufs: list[tuple[torch.Tensor, int]] = []  # (buffer, use count when only we hold it)
        probe = torch.empty(1, dtype=torch.uint8)
        self._enabled = _use_count(probe) is not None

    def __call__(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of ``nbytes``, contents undefined."""
        if not self._enabled or nbytes < self.min_bytes:  # small ones cost little
            return torch.empty(nbytes, dtype=torch.uint8)
        free = [i for i, (buf, idle) in enumerate(self._bufs) if _use_count(buf) == idle]
        # Not a big buffer for a small tensor: the next big one would then need fresh memory.
        fits = [i for i in free if nbytes <= self._bufs[i][0].numel() <= 2 * nbytes]
        if fits:
            buf = self._bufs[min(fits, key=lambda i: self._bufs[i][0].numel())][0]
            return buf[:nbytes]
        if len(self._bufs) >= self.slots:
            if not free:
                return torch.empty(nbytes, dtype=torch.uint8)  # all in use: not pooled
            del self._bufs[free[0]]  # the longest-pooled free one makes room
        buf = torch.empty(nbytes, dtype=torch.uint8)
        idle = _use_count(buf)
        assert idle is not None  # enabled: the count can be read
        self._bufs.append((buf, idle))
        return buf[:nbytes]
