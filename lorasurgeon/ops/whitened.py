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


@dataclass(frozen=True)
class Whitening:
    """One module's weighted problem as a change of variables: its error ‖Lrᵀ·(ΔW − BA)·Lc‖² with Lc Lcᵀ = Gc + λI
    (Gc: the second moment of its inputs) and Lr Lrᵀ = Gr + λI (Gr: a weight on its output rows -- the loss
    gradients' second moment at its output, K-FAC's factor of the Fisher, or a tied head's inputs, for the embedding
    it shares a change with -- or none: Lr = I). A diagonal G (an embedding's token
    frequencies: its inputs are one-hot) is held as the vector of its roots. Float64 throughout."""

    cols: torch.Tensor  # (n, n) lower-triangular, or (n,): a diagonal's roots
    rows: torch.Tensor | None  # (m, m) lower-triangular, (m,), or None
    ridge: float  # λ added to Gc

    @classmethod
    def of(cls, cols: torch.Tensor, rows: torch.Tensor | None = None, ridge: float = RIDGE) -> Whitening:
        """From the inputs' second moment (2-D, or 1-D for a diagonal) and an optional row weight alike."""
        lc, lam = _root(cols, ridge)
        return cls(lc, None if rows is None else _root(rows, ridge)[0], lam)

    def whiten(self, m: torch.Tensor) -> torch.Tensor:
        """Lrᵀ·M·Lc: the matrix whose plain truncated SVD is the weighted problem's (Eckart–Young)."""
        return _left(self.rows, _right(m.to(torch.float64), self.cols))

    def left(self, b: torch.Tensor) -> torch.Tensor:
        """Lrᵀ·B: a product B·A's left factor whitened (float64)."""
        return _left(self.rows, b.to(torch.float64))

    def right(self, a: torch.Tensor) -> torch.Tensor:
        """A·Lc: a product B·A's right factor whitened (float64)."""
        return _right(a.to(torch.float64), self.cols)

    def factors(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The whitened factors mapped back: A·Lc⁻¹ and Lr⁻ᵀ·B (float64)."""
        a, b = a.to(torch.float64), b.to(torch.float64)
        if self.cols.ndim == 1:
            a = a / self.cols
        else:
            a = torch.linalg.solve_triangular(self.cols.T, a.T, upper=True).T
        if self.rows is not None:
            if self.rows.ndim == 1:
                b = b / self.rows[:, None]
            else:
                b = torch.linalg.solve_triangular(self.rows.T, b, upper=True)
        return a, b

    def plain_errors(self, mw: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
        """The weighted error left by the first k components of the *plain* SVD M ≈ U·S·Vh, for k = 0..len(s)
        (float64), ``mw`` = whiten(M): what the report compares the whitened factors with, at every rank at once."""
        s = s.to(torch.float64)
        return errors_by_rank(mw, _left(self.rows, u.to(torch.float64) * s), _right(vh.to(torch.float64), self.cols))


def errors_by_rank(
    m: torch.Tensor | tuple[torch.Tensor, torch.Tensor], b: torch.Tensor, a: torch.Tensor
) -> torch.Tensor:
    """‖M − B_k·A_k‖² for k = 0..r, B_k and A_k the first k columns of B and rows of A (any factors, orthogonal or
    not), float64, without forming a product: ‖M‖² − 2·Σ_{j<k} bⱼᵀ·M·aⱼ + Σ_{i,j<k} (BᵀB)ᵢⱼ·(AAᵀ)ᵢⱼ. ``m`` may
    be given as factors (P, Q) of M = P·Q, which is then never formed either."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    if isinstance(m, tuple):
        p, q = m[0].to(torch.float64), m[1].to(torch.float64)
        cross = ((b.T @ p) * (a @ q.T)).sum(1)
        total = float(((p.T @ p) * (q @ q.T)).sum())
    else:
        m = m.to(torch.float64)
        cross = torch.einsum("ij,ik,kj->k", m, b, a)
        total = float(m.square().sum())
    inner = ((b.T @ b) * (a @ a.T)).cumsum(0).cumsum(1).diagonal()
    zero = torch.zeros(1, dtype=torch.float64, device=a.device)
    return (total - 2 * torch.cat([zero, cross.cumsum(0)]) + torch.cat([zero, inner])).clamp_min(0.0)


def _root(g: torch.Tensor, ridge: float) -> tuple[torch.Tensor, float]:
    """A square root of G + λI: Cholesky's (2-D) or the roots of a diagonal (1-D), and λ."""
    if g.ndim == 2:
        return regularized_cholesky(g, ridge)
    d = g.to(torch.float64)
    if bool((d < 0).any()):
        raise ValueError("a diagonal second moment cannot be negative")
    lam = max(ridge * float(d.mean()), torch.finfo(torch.float64).tiny)
    return (d + lam).sqrt(), lam


def _right(m: torch.Tensor, root: torch.Tensor) -> torch.Tensor:
    return m * root if root.ndim == 1 else m @ root


def _left(root: torch.Tensor | None, m: torch.Tensor) -> torch.Tensor:
    if root is None:
        return m
    return root[:, None] * m if root.ndim == 1 else root.T @ m


def whitened_factorize(
    delta: torch.Tensor, g: torch.Tensor, rank: int, ridge: float = RIDGE, rows: torch.Tensor | None = None
) -> Whitened:
    """The rank-``rank`` B·A minimising E‖(ΔW − BA)·x‖² for inputs of second moment ``g`` (+ the ridge; 1-D: a
    diagonal), its rows weighted by ``rows`` where given: ΔW (m, n), G (n, n). Exact SVD in float64;
    A = √Σ_k·V_kᵀ·Lc⁻¹ and B = Lr⁻ᵀ·U_k·√Σ_k for Lrᵀ·ΔW·Lc = UΣVᵀ.

    Raises:
        ValueError: shapes that do not go together, a rank below 0, or a G the ridge cannot make definite.
    """
    if delta.ndim != 2 or g.shape[-1] != delta.shape[1]:
        raise ValueError(f"ΔW {list(delta.shape)} and G {list(g.shape)}: G must be (in, in) of ΔW's (out, in)")
    if rank < 0:
        raise ValueError(f"rank must be 0 or more, not {rank}")
    whitening = Whitening.of(g, rows, ridge)
    u, s, vh = torch.linalg.svd(whitening.whiten(delta), full_matrices=False)
    k = min(rank, int(s.numel()))
    root = s[:k].sqrt()
    a, b = whitening.factors(root[:, None] * vh[:k], u[:, :k] * root)
    total = float((s**2).sum())
    return Whitened(a.to(torch.float32), b.to(torch.float32), s, total, float((s[k:] ** 2).sum()), whitening.ridge)


def output_error(delta: torch.Tensor, g: torch.Tensor) -> float:
    """E‖ΔW·x‖² = tr(ΔW·G·ΔWᵀ) for inputs of second moment G (float64): what any approximation leaves, measured."""
    d = delta.to(torch.float64)
    return float(torch.einsum("ij,jk,ik->", d, g.to(torch.float64), d))
