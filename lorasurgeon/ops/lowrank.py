"""Truncated SVD of a weight delta, and its split into LoRA factors. Pure functions of tensors.

The randomized solver is block Krylov iteration (Musco & Musco, 2015): the range of
[MΩ, (MMᵀ)MΩ, …, (MMᵀ)^q MΩ] captures the top singular directions far better than plain
subspace iteration at the same cost, which matters for the slowly decaying spectra of
fine-tuning deltas. Whatever the solver, the factors are an orthogonal projection of M onto the
kept left singular directions, so the kept energy Σσᵢ² is exact and ‖M − BA‖² = ‖M‖² − Σσᵢ².
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch
else:
    from .._lazy import torch


Solver = Literal["auto", "randomized", "exact"]
KRYLOV_ITERS = 4
SIGMA_KEPT = 64  # singular values a factorization reports (extract --plot draws their decay)
EXACT_FP64_NUMEL = 512 * 512  # small exact cases are solved in float64


@dataclass(frozen=True)
class LowRank:
    """M ≈ B @ A with A = √S·Vᵀ (r, n) and B = U·√S (m, r), both float32."""

    a: torch.Tensor
    b: torch.Tensor
    kept: float  # Σ of the kept σᵢ², as a fraction of ‖M‖²
    energy: float  # ‖M‖² (float64 sum)
    solver: str
    sigma: tuple[float, ...] = ()  # the leading singular values the solver found (at most SIGMA_KEPT), kept or not

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def squared_norm(m: torch.Tensor, chunk_elements: int = 1 << 20) -> float:
    """‖M‖² accumulated in float64, a block of rows at a time (no float64 copy of M)."""
    flat = m.reshape(m.shape[0], -1) if m.dim() > 1 else m.reshape(1, -1)
    rows = max(1, chunk_elements // max(1, flat.shape[1]))
    return float(sum(torch.sum(flat[i : i + rows].double() ** 2) for i in range(0, flat.shape[0], rows)))


def difference(
    a: torch.Tensor, b: torch.Tensor, device: torch.device | str = "cpu", chunk_elements: int = 1 << 20
) -> torch.Tensor:
    """``a − b`` in float32 on ``device``: one float32 copy of ``a``, ``b`` subtracted a block
    at a time (subtracting a bf16 ``b`` whole would make a float32 copy of it first).

    ``a`` must be the caller's to give: if it is float32 on ``device`` already it is reused.
    """
    out = a.to(device, torch.float32).contiguous()
    flat_out, flat_b = out.view(-1), b.reshape(-1)
    for i in range(0, flat_out.numel(), chunk_elements):
        flat_out[i : i + chunk_elements].sub_(flat_b[i : i + chunk_elements].to(device))
    return out


def _oversample(k: int) -> int:
    return max(16, k // 4)


def block_krylov_svd(
    m: torch.Tensor, k: int, *, iters: int = KRYLOV_ITERS, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Approximate top-k SVD (U, S, Vh) of ``m`` (float32), with block size k + oversampling."""
    rows, cols = m.shape
    block = min(k + _oversample(k), rows, cols)
    omega = torch.randn(cols, block, generator=generator, device="cpu").to(m.device, m.dtype)
    y = torch.linalg.qr(m @ omega).Q
    blocks = [y]
    for _ in range(iters):
        y = torch.linalg.qr(m @ (m.T @ y)).Q
        blocks.append(y)
    q = torch.linalg.qr(torch.cat(blocks, dim=1)).Q
    ub, s, vh = torch.linalg.svd(q.T @ m, full_matrices=False)
    return (q @ ub)[:, :k], s[:k], vh[:k]


def exact_svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full thin SVD; float64 for small matrices, where it is cheap and removes all doubt."""
    work = m.double() if m.numel() <= EXACT_FP64_NUMEL else m
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    return u.to(m.dtype), s.to(m.dtype), vh.to(m.dtype)


def choose_solver(shape: tuple[int, int], k: int, solver: Solver) -> str:
    """auto: exact when the rank asked for is a large share of the matrix (or it is small)."""
    if solver != "auto":
        return solver
    small = min(shape)
    return "exact" if small <= 64 or (k + _oversample(k)) * (KRYLOV_ITERS + 1) >= small else "randomized"


def rank_for_energy(s: torch.Tensor, energy: float, fraction: float) -> int:
    """Smallest r with Σ_{i<r} σᵢ² ≥ fraction·energy (len(s) if even all of them fall short)."""
    cumulative = torch.cumsum(s.double() ** 2, dim=0)
    hit = torch.nonzero(cumulative >= fraction * energy * (1 - 1e-12))
    return int(hit[0].item()) + 1 if len(hit) else len(s)


def top_singular(
    m: torch.Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int | None = None,
    solver: Solver = "auto",
    seed: int = 0,
    total: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, str]:
    """(U, S, Vh, ‖M‖², solver) with enough leading singular triplets for ``rank`` or ``energy``.

    For ``energy`` the search widens (×4) until the triplets found hold that share of ‖M‖², or
    reach ``max_rank`` / the matrix's own rank; ``solver`` auto switches to the exact SVD when
    the rank needed is a large share of the matrix. ``total`` is ‖M‖² if the caller has it.
    """
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    m = m.to(torch.float32)
    full = min(m.shape)
    total = squared_norm(m) if total is None else total
    cap = min(full, max_rank or full)
    k = min(rank, full) if rank is not None else min(cap, 64)
    gen = torch.Generator().manual_seed(seed)
    while True:
        kind = choose_solver((m.shape[0], m.shape[1]), k, solver)
        u, s, vh = _solve(m, k if kind == "randomized" else full, kind, gen)
        if energy is None or kind == "exact" or k >= cap:
            return u, s, vh, total, kind
        if float(torch.sum(s.double() ** 2)) >= energy * total:
            return u, s, vh, total, kind
        k = min(cap, k * 4)  # not enough energy in the top k: widen the search


def factorize(
    m: torch.Tensor,
    *,
    rank: int | None = None,
    energy: float | None = None,
    max_rank: int | None = None,
    solver: Solver = "auto",
    seed: int = 0,
    total: float | None = None,
) -> LowRank:
    """Truncated SVD of a 2-D float tensor, split √S between the factors.

    Exactly one of ``rank`` (fixed; capped by the matrix's own) or ``energy`` (the smallest rank
    keeping that fraction of ‖M‖², capped by ``max_rank``) is given. ``solver`` is auto,
    randomized or exact; the randomized one falls back to exact if it fails to converge.
    ``total`` is ‖M‖² if the caller has it (each pass over a large M costs).
    """
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank and energy")
    total = squared_norm(m) if total is None else total
    if total == 0.0:  # all zeros
        m = m.to(torch.float32)
        return LowRank(m.new_zeros(0, m.shape[1]), m.new_zeros(m.shape[0], 0), 1.0, 0.0, "zero")
    u, s, vh, total, kind = top_singular(
        m, rank=rank, energy=energy, max_rank=max_rank, solver=solver, seed=seed, total=total
    )
    full, cap = min(m.shape), min(min(m.shape), max_rank or min(m.shape))
    if rank is not None:
        r = min(rank, full)
    else:
        assert energy is not None  # exactly one of the two, checked above
        r = min(rank_for_energy(s, total, energy), cap)
    sigma = tuple(float(x) for x in s[:SIGMA_KEPT].double())
    u, s, vh = u[:, :r], s[:r], vh[:r]
    root = torch.sqrt(s)
    kept = min(1.0, float(torch.sum(s.double() ** 2)) / total)
    return LowRank((root[:, None] * vh).contiguous(), (u * root[None, :]).contiguous(), kept, total, kind, sigma)


def _solve(m: torch.Tensor, k: int, kind: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if kind == "exact":
        return exact_svd(m)
    try:
        u, s, vh = block_krylov_svd(m, k, generator=gen)
    except RuntimeError:  # LAPACK did not converge
        return exact_svd(m)
    if not (torch.isfinite(s).all() and torch.isfinite(u).all() and torch.isfinite(vh).all()):
        return exact_svd(m)
    return u, s, vh


def relative_error(
    m: torch.Tensor, a: torch.Tensor, b: torch.Tensor, chunk_elements: int = 1 << 20, total: float | None = None
) -> float:
    """‖M − B·A‖ / ‖M‖ for the factors as stored (after any rounding of their dtype); ``total``
    is ‖M‖² if the caller has it."""
    m32 = m.to(torch.float32)
    total = squared_norm(m32) if total is None else total
    if total == 0.0:
        return 0.0
    if a.shape[0] == 0:
        return 1.0
    a32, b32 = a.to(torch.float32), b.to(torch.float32)
    rows = max(1, chunk_elements // max(1, m32.shape[1]))  # a block of the residual at a time
    err = sum(
        squared_norm(torch.addmm(m32[i : i + rows], b32[i : i + rows], a32, alpha=-1.0))
        for i in range(0, m32.shape[0], rows)
    )
    return math.sqrt(err / total)


def product_svd(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The SVD of B @ A (m × r times r × n) without forming the m × n product: B = Q_b R_b and
    Aᵀ = Q_a R_a, so B A = Q_b (R_b R_aᵀ) Q_aᵀ and the r × r core's SVD gives U = Q_b U_c,
    Vh = Vh_c Q_aᵀ. Computed in float64; returns (U (m, r'), S (r',), Vh (r', n)), r' = min(m, n, r)."""
    qb, rb = torch.linalg.qr(b.to(torch.float64))
    qa, ra = torch.linalg.qr(a.to(torch.float64).t())
    u, s, vh = torch.linalg.svd(rb @ ra.t())
    return qb @ u, s, vh @ qa.t()


def split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-k factors of U S Vh (Eckart–Young), balanced as LoRA stores them:
    (B = U_k √S_k (m, k), A = √S_k Vh_k (k, n)), float32."""
    root = s[:k].sqrt()
    return (u[:, :k] * root).to(torch.float32), (root[:, None] * vh[:k]).to(torch.float32)


DP_UNITS = 1 << 18  # budgets up to this many units of gcd(costs) are allocated exactly


class OverBudget(ValueError):
    """The floors alone cost more than the budget: ``need`` parameters, ``budget`` given."""

    def __init__(self, need: int, budget: int):
        super().__init__(f"the floors alone need {need} parameters, more than the budget of {budget}")
        self.need, self.budget = need, budget


def allocate(
    spectra: list[torch.Tensor], costs: list[int], budget: int, floors: list[int], caps: list[int]
) -> list[int]:
    """Ranks for several low-rank matrices that minimise the total squared error Σ (‖Mᵢ‖² − kept σ²)
    within ``budget`` parameters: every singular component of matrix i costs ``costs[i]`` (m + n), and
    matrix i keeps between ``floors[i]`` and ``caps[i]`` components, always its largest.

    Exact (a knapsack over budget units of gcd(costs), by dynamic programming) when the budget is at most
    DP_UNITS such units -- costs share large factors in real models, 1024 or more -- and otherwise
    greedy: components in decreasing σ² / cost across all matrices, a component that no longer fits
    closing its matrix.

    One allocator for every command that spends a budget (resize and combine over an adapter's modules, extract
    over a fine-tune's): the callers give the spectra, costs, floors and caps, and say what a budget too small
    for the floors means in their own words.

    Raises:
        OverBudget: the floors alone cost more than the budget (a ValueError; ``need`` says how much they cost).
    """
    lo = [min(f, c, len(s)) for f, c, s in zip(floors, caps, spectra, strict=True)]
    hi = [min(c, len(s)) for c, s in zip(caps, spectra, strict=True)]
    need = sum(r * c for r, c in zip(lo, costs, strict=True))
    if need > budget:
        raise OverBudget(need, budget)
    unit = math.gcd(*costs) if costs else 1
    if budget // unit <= DP_UNITS:
        return _allocate_exact(spectra, [c // unit for c in costs], budget // unit, lo, hi)
    return _allocate_greedy(spectra, costs, budget - need, lo, hi)


def _allocate_exact(
    spectra: list[torch.Tensor], costs: list[int], units: int, lo: list[int], hi: list[int]
) -> list[int]:
    """Multiple-choice knapsack: best[u] = the most energy kept with u units spent; one choice per matrix."""
    best = torch.full((units + 1,), -math.inf, dtype=torch.float64)
    best[0] = 0.0
    choices = []
    for s, cost, a, b in zip(spectra, costs, lo, hi, strict=True):
        gain = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(s.double() ** 2, 0)])
        new = torch.full_like(best, -math.inf)
        pick = torch.zeros(units + 1, dtype=torch.int32)
        for k in range(a, b + 1):
            shift = k * cost
            if shift > units:
                break
            cand = best[: units + 1 - shift] + gain[k]
            better = cand > new[shift:]
            new[shift:] = torch.where(better, cand, new[shift:])
            pick[shift:] = torch.where(better, torch.tensor(k, dtype=torch.int32), pick[shift:])
        best = new
        choices.append(pick)
    u = int(torch.argmax(best))
    ranks = []
    for pick, cost in zip(reversed(choices), reversed(costs), strict=True):
        k = int(pick[u])
        ranks.append(k)
        u -= k * cost
    return ranks[::-1]


def _allocate_greedy(
    spectra: list[torch.Tensor], costs: list[int], left: int, lo: list[int], hi: list[int]
) -> list[int]:
    ranks = list(lo)
    candidates = [
        (float(s[j]) ** 2 / cost, i, j)
        for i, (s, cost) in enumerate(zip(spectra, costs, strict=True))
        for j in range(lo[i], hi[i])
    ]
    candidates.sort(key=lambda c: (-c[0], c[1], c[2]))
    closed: set[int] = set()
    for _, i, j in candidates:
        if i in closed or j != ranks[i]:
            continue
        if costs[i] > left:
            closed.add(i)
            continue
        ranks[i] += 1
        left -= costs[i]
    return ranks
