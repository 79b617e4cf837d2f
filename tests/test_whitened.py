"""ops.whitened: the rank-k change best on data (#27's math). The oracle is the weighted problem formed densely
here with another square root of G (its symmetric one, from eigh): the minimiser [ΔW·S]_k·S⁻¹ does not depend on
which root, so two roots agreeing is the closed form checked, not a restatement of the code."""

from __future__ import annotations

import pytest
import torch

from lorasurgeon.ops.lowrank import factorize
from lorasurgeon.ops.whitened import (
    Whitening,
    errors_by_rank,
    output_error,
    regularized_cholesky,
    whitened_factorize,
)


def problem(out: int = 24, inp: int = 16, samples: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW and the inputs' second moment G = XᵀX / n, the inputs correlated (as a layer's are)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g, dtype=torch.float64) * torch.logspace(0, -2, inp, dtype=torch.float64)
    x = torch.randn(samples, inp, generator=g, dtype=torch.float64) @ mix
    return torch.randn(out, inp, generator=g, dtype=torch.float64), x.T @ x / samples


def dense_optimum(delta: torch.Tensor, g: torch.Tensor, rank: int, lam: float) -> torch.Tensor:
    """[ΔW·S]_k·S⁻¹ with S the symmetric square root of G + λI."""
    w, q = torch.linalg.eigh(g + lam * torch.eye(g.shape[0], dtype=torch.float64))
    root, inv = q @ torch.diag(w.sqrt()) @ q.T, q @ torch.diag(w.rsqrt()) @ q.T
    u, s, vh = torch.linalg.svd(delta @ root)
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank] @ inv


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_the_factors_are_the_closed_form_optimum(rank):
    delta, g = problem()
    got = whitened_factorize(delta, g, rank)
    product = got.b.double() @ got.a.double()
    want = dense_optimum(delta, g, rank, got.ridge)
    assert float((product - want).abs().max() / want.abs().max()) <= 1e-5
    assert got.rank == rank
    reg = g + got.ridge * torch.eye(g.shape[0], dtype=torch.float64)
    assert got.error_after == pytest.approx(output_error(delta - want, reg), rel=1e-9)
    assert got.error_before == pytest.approx(output_error(delta, reg), rel=1e-9)


def test_it_beats_the_plain_svd_on_the_data_and_the_plain_svd_beats_it_on_weights():
    delta, g = problem(seed=1)
    whitened = whitened_factorize(delta, g, 4)
    plain = factorize(delta.float(), rank=4, solver="exact")
    w_prod, p_prod = whitened.b.double() @ whitened.a.double(), plain.b.double() @ plain.a.double()
    assert output_error(delta - w_prod, g) < 0.9 * output_error(delta - p_prod, g)
    assert float((delta - p_prod).norm()) < float((delta - w_prod).norm())


def test_white_inputs_give_the_plain_truncated_svd():
    delta, _ = problem(seed=2)
    got = whitened_factorize(delta, torch.eye(delta.shape[1], dtype=torch.float64), 3, ridge=0.0)
    u, s, vh = torch.linalg.svd(delta)
    want = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
    assert float((got.b.double() @ got.a.double() - want).abs().max()) <= 1e-5


def test_fewer_samples_than_inputs_need_the_ridge_and_get_it():
    delta, g = problem(inp=32, samples=8, seed=3)  # G has rank 8 of 32
    with pytest.raises(ValueError, match="ridge"):
        whitened_factorize(delta, g, 4, ridge=0.0)
    got = whitened_factorize(delta, g, 4)
    assert torch.isfinite(got.a).all() and torch.isfinite(got.b).all()
    assert got.ridge == pytest.approx(1e-4 * float(torch.diagonal(g).mean()))
    chol, lam = regularized_cholesky(g)
    assert lam == got.ridge and torch.allclose(chol @ chol.T, g + lam * torch.eye(32, dtype=torch.float64))


def test_shapes_that_do_not_go_together_are_refused():
    delta, g = problem()
    with pytest.raises(ValueError, match="must be"):
        whitened_factorize(delta.T, g, 2)
    with pytest.raises(ValueError, match="rank"):
        whitened_factorize(delta, g, -1)


def root_of(g: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The symmetric square root of G + λI (G given whole or as its diagonal) and its inverse."""
    full = torch.diag(g) if g.ndim == 1 else g
    w, q = torch.linalg.eigh(full + lam * torch.eye(full.shape[0], dtype=torch.float64))
    return q @ torch.diag(w.sqrt()) @ q.T, q @ torch.diag(w.rsqrt()) @ q.T


@pytest.mark.parametrize("diagonal", [False, True])
def test_rows_weighted_too_the_factors_are_the_two_sided_closed_form(diagonal):
    """A tied embedding and head share one change: the inputs' moment on one side, the head's on the other
    (an embedding's moment is diagonal: one-hot inputs). The optimum is Sr⁻¹·[Srᵀ·ΔW·Sc]_k·Sc⁻¹, whatever roots."""
    delta, g_rows = problem(out=16, inp=16, seed=3)
    g_cols = torch.rand(16, dtype=torch.float64) if diagonal else problem(out=1, inp=16, seed=4)[1]
    got = whitened_factorize(delta, g_cols, 3, rows=g_rows)
    lam_r = 1e-4 * float(torch.diagonal(g_rows).mean())
    (sr, sr_inv), (sc, sc_inv) = root_of(g_rows, lam_r), root_of(g_cols, got.ridge)
    u, s, vh = torch.linalg.svd(sr @ delta @ sc)
    want = sr_inv @ u[:, :3] @ torch.diag(s[:3]) @ vh[:3] @ sc_inv
    product = got.b.double() @ got.a.double()
    assert float((product - want).abs().max() / want.abs().max()) <= 1e-5


def test_the_plain_svds_weighted_error_at_every_rank_is_measured_as_formed_densely():
    delta, g = problem(out=20, inp=12, seed=5)
    rows = torch.rand(20, dtype=torch.float64) + 0.1
    whitening = Whitening.of(g, rows)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    got = whitening.plain_errors(whitening.whiten(delta), u, s, vh)
    reg = g + whitening.ridge * torch.eye(12, dtype=torch.float64)
    lam_r = 1e-4 * float(rows.mean())
    for k in range(len(s) + 1):
        residual = delta - u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
        want = float(torch.einsum("ij,i,ik,jk->", residual, rows + lam_r, residual, reg))
        assert float(got[k]) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_errors_by_rank_of_a_product_given_as_factors_are_those_of_the_product_formed():
    g = torch.Generator().manual_seed(6)
    p, q = torch.randn(20, 5, generator=g, dtype=torch.float64), torch.randn(5, 12, generator=g, dtype=torch.float64)
    b, a = torch.randn(20, 4, generator=g, dtype=torch.float64), torch.randn(4, 12, generator=g, dtype=torch.float64)
    got = errors_by_rank((p, q), b, a)
    for k in range(5):
        want = float((p @ q - b[:, :k] @ a[:k]).square().sum())
        assert float(got[k]) == pytest.approx(want, rel=1e-9)
    assert torch.allclose(got, errors_by_rank(p @ q, b, a), rtol=1e-9)
