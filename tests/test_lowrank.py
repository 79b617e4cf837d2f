"""Truncated SVD: against torch.linalg.svd's optimum (Eckart–Young), on the hard, slowly decaying spectra."""

from __future__ import annotations

import pytest
import torch

from lorasurgeon.ops.lowrank import difference, factorize, rank_for_energy, relative_error


def spectrum_matrix(m, n, decay, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    s = torch.arange(1, k + 1, dtype=torch.float32) ** (-decay)
    return (u * s) @ v.T


@pytest.mark.parametrize("decay", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("shape,rank", [((768, 512), 16), ((512, 1024), 32), ((1024, 1024), 64)])
def test_randomized_keeps_the_optimum_energy(decay, shape, rank):
    m = spectrum_matrix(*shape, decay)
    optimum = float((torch.linalg.svdvals(m.double())[:rank] ** 2).sum() / (m.double() ** 2).sum())
    got = factorize(m, rank=rank, solver="randomized", seed=3)
    assert got.solver == "randomized" and got.rank == rank
    assert got.kept >= 0.995 * optimum, (got.kept, optimum)
    # the kept energy is exact: the stored factors' error is what it implies
    assert relative_error(m, got.a, got.b) == pytest.approx((1 - got.kept) ** 0.5, rel=1e-3, abs=1e-5)


def test_hand_computed_case():
    m = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    got = factorize(m, rank=2, solver="exact")
    torch.testing.assert_close(got.b @ got.a, torch.diag(torch.tensor([3.0, 2.0, 0.0])), atol=1e-6, rtol=0)
    assert got.kept == pytest.approx(13 / 14)
    # √S split: A has the singular values' roots in its rows, B in its columns
    torch.testing.assert_close(got.a.norm(dim=1), torch.tensor([3.0, 2.0]).sqrt())
    torch.testing.assert_close(got.b.norm(dim=0), torch.tensor([3.0, 2.0]).sqrt())


@pytest.mark.parametrize("solver", ["randomized", "exact", "auto"])
def test_rank_at_or_above_the_matrix_rank_is_exact(solver):
    g = torch.Generator().manual_seed(0)
    m = torch.randn(300, 8, generator=g) @ torch.randn(8, 200, generator=g)  # rank 8
    got = factorize(m, rank=24, solver=solver)
    assert relative_error(m, got.a, got.b) < 1e-5
    full = factorize(torch.randn(40, 30, generator=g), rank=30, solver=solver)
    assert full.kept == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.99])
def test_energy_picks_the_smallest_sufficient_rank(fraction):
    m = spectrum_matrix(600, 400, 0.7)
    s = torch.linalg.svdvals(m.double())
    best = rank_for_energy(s, float((s**2).sum()), fraction)
    got = factorize(m, energy=fraction, solver="randomized", seed=1)
    assert got.kept >= fraction
    assert best <= got.rank <= best + 1  # the randomized σ may fall a hair short of the exact ones


def test_energy_respects_max_rank():
    m = spectrum_matrix(300, 300, 0.1)
    got = factorize(m, energy=0.99, max_rank=20)
    assert got.rank == 20 and got.kept < 0.99


def test_zero_matrix():
    got = factorize(torch.zeros(5, 4), rank=2)
    assert got.rank == 0 and got.energy == 0.0


@pytest.mark.parametrize("transposed", [False, True])
def test_relative_error_by_blocks_is_the_whole_residual(transposed):
    # extract passes an embedding's ΔW transposed (a strided view); blocks of 1, 7 and all rows
    g = torch.Generator().manual_seed(5)
    m = torch.randn(90, 60, generator=g)
    m = m.T if transposed else m
    a, b = torch.randn(3, m.shape[1], generator=g), torch.randn(m.shape[0], 3, generator=g)
    whole = float(torch.linalg.vector_norm(m.double() - b.double() @ a.double()) / torch.linalg.vector_norm(m.double()))
    for chunk in (1, 7 * m.shape[1], m.numel()):
        assert relative_error(m, a, b, chunk_elements=chunk) == pytest.approx(whole, rel=1e-6)


@pytest.mark.parametrize("shape", [(37,), (300, 70), (5, 4, 3, 3)])
def test_difference_by_blocks(shape):
    g = torch.Generator().manual_seed(2)
    a = torch.randn(shape, generator=g).to(torch.bfloat16)
    b = torch.randn(shape, generator=g).to(torch.bfloat16)
    got = difference(a.clone(), b, chunk_elements=100)  # several blocks and a partial last one
    assert got.dtype == torch.float32 and torch.equal(got, a.float() - b.float())


def test_difference_of_a_strided_float32_tensor():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(40, 30, generator=g).T, torch.randn(30, 40, generator=g)
    assert torch.equal(difference(a, b, chunk_elements=64), a - b)
