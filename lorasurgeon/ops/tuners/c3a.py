"""C3A: block-circulant ΔW from a kernel (out/b, in/b, b), divided by in_features. Additive.

peft/tuners/c3a/layer.py: get_delta_weight (:50: ``get_circulant_fast(kernel) / W.size(-1)``), merge
(:130: ``W + ΔW``), unmerge (:170); peft/tuners/c3a/utils.py get_circulant_fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._base import ModuleConfig, Parts, Tuner, need

if TYPE_CHECKING:
    import torch
else:
    from ..._lazy import torch


def circulant(kernel: torch.Tensor) -> torch.Tensor:
    """get_circulant_fast: the (out, in) block-circulant matrix of ``kernel`` (m, n, b)."""
    _, n, b = kernel.shape
    x = torch.eye(n * b, dtype=kernel.dtype).reshape(n * b, n, b)
    x = torch.einsum("...nb,mnb->...mb", torch.fft.ifft(x), torch.fft.fft(kernel))
    result: torch.Tensor = torch.fft.fft(x).real.flatten(start_dim=1).T
    return result


@dataclass(frozen=True)
class C3A(Tuner):
    def delta_weight(self, shape: tuple[int, ...], parts: Parts, cfg: ModuleConfig) -> torch.Tensor:
        return circulant(need(parts, "c3a_kernel", self.name)) / shape[-1]


C3A_TUNER = C3A("c3a", ("c3a_kernel",))
