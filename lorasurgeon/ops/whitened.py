"""The low-rank change that is best on data, not on weights: whitened truncated SVD (issue 27's math; pure
functions of tensors, no model).

A layer's output error on inputs x is E‖(ΔW − BA)·x‖² = tr((ΔW − BA)·G·(ΔW − BA)ᵀ) = ‖(ΔW − BA)·S‖²_F, where
G = E[x xᵀ] is the inputs' second moment and S Sᵀ = G. The rank-k minimiser is BA = [ΔW·S]_k · S⁻¹ (Eckart–Young in
the whitened space; SVD-LLM, ASVD and CorDA use the same change of variables), whatever square root S is: a
Cholesky factor here. Its output error is Σ_{j>k} σ_j² of ΔW·S, so the σ_j² are each component's gain in output
error -- what an allocator across modules compares.

G from few samples is singular (fewer samples than inputs) or near it: G + λ·I is factored, λ = ``ridge`` times
G's mean diagonal (the mean squared input), so that directions no sample reached are weighed as an average
input would be, rather than not at all. The ridge used is returned with the factors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch

RIDGE = 1e-4  # λ = RIDGE × mean(diag G): the default ridge, relative to the mean squared input


@dataclass(frozen=True)
class Whitened:
    """ΔW ≈ B @ A best on the data: A (r, n) and B (m, r) float32, the whitened singular values σ (all of them,
    float64: σ_j² is component j's output error), the output error before and after, and the λ added to G."""

    a: torch.Tensor
    b: torch.Tensor
    sigma: torch.Tensor
    error_before: float  # E‖ΔW·x‖² under G + λI
    error_after: float  # E‖(ΔW − BA)·x‖² under G + λI
    ridge: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


def regularized_cholesky(g: torch.Tensor, ridge: float = RIDGE) -> tuple[torch.Tensor, float]:
    """L (lower, float64) with L Lᵀ = G + λI, and λ = ``ridge`` · mean(diag G) (at least tiny, for a G of zeros).

    Raises:
        ValueError: G is not a square matrix, or is not positive semi-definite enough for the ridge to mend.
    """
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise ValueError(f"G must be a square matrix, not {list(g.shape)}")
    g64 = g.to(torch.float64)
    g64 = (g64 + g64.T) / 2
    lam = max(ridge * float(torch.diagonal(g64).mean()), torch.finfo(torch.float64).tiny)
    eye = torch.eye(g64.shape[0], dtype=torch.float64, device=g64.device)
    chol, info = torch.linalg.cholesky_ex(g64 + lam * eye)
    if int(info) != 0:
        raise ValueError(
            f"G + {lam:.3g}·I is not positive definite (minor {int(info)}): a ridge above {ridge} is needed"
        )
    return chol, lam


def whitened_factorize(delta: torch.Tensor, g: torch.Tensor, rank: int, ridge: float = RIDGE) -> Whitened:
    """The rank-``rank`` B·A minimising E‖(ΔW − BA)·x‖² for inputs of second moment ``g`` (+ the ridge):
    ΔW (m, n), G (n, n). Computed in float64; A = √Σ_k·V_kᵀ·L⁻¹ and B = U_k·√Σ_k for ΔW·L = UΣVᵀ.

    Raises:
        ValueError: shapes that do not go together, a rank below 0, or a G the ridge cannot make definite.
    """
    if delta.ndim != 2 or g.shape[-1] != delta.shape[1]:
        raise ValueError(f"ΔW {list(delta.shape)} and G {list(g.shape)}: G must be (in, in) of ΔW's (out, in)")
    if rank < 0:
        raise ValueError(f"rank must be 0 or more, not {rank}")
    chol, lam = regularized_cholesky(g, ridge)
    m = delta.to(torch.float64) @ chol
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    k = min(rank, int(s.numel()))
    root = s[:k].sqrt()
    b = u[:, :k] * root
    a = torch.linalg.solve_triangular(chol.T, vh[:k].T * root, upper=True).T  # √Σ_k V_kᵀ L⁻¹
    total = float((s**2).sum())
    return Whitened(a.to(torch.float32), b.to(torch.float32), s, total, float((s[k:] ** 2).sum()), lam)


def output_error(delta: torch.Tensor, g: torch.Tensor) -> float:
    """E‖ΔW·x‖² = tr(ΔW·G·ΔWᵀ) for inputs of second moment G (float64): what any approximation leaves, measured."""
    d = delta.to(torch.float64)
    return float(torch.einsum("ij,jk,ik->", d, g.to(torch.float64), d))
