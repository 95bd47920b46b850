"""Tests for lore_jax.problems: constants against independent NumPy computations."""

import itertools

import numpy as np
import pytest

from lore_jax import problems


@pytest.fixture(scope="module")
def ls():
    return problems.make_least_squares(200, 40, 4, kappa=20.0, noise=0.1, seed=0)


@pytest.fixture(scope="module")
def logreg():
    return problems.make_logistic_regression(120, 12, 3, reg=0.05, seed=1)


def _fd_grad(f, x, h=1e-6):
    e = np.eye(x.size)
    return np.array([(f(x + h * e[i]) - f(x - h * e[i])) / (2 * h) for i in range(x.size)])


def test_dense_design_condition_number():
    A = problems.dense_design(60, 8, kappa=50.0, top_eigenvalue=3.0, seed=2)
    eig = np.linalg.eigvalsh(A.T @ A)
    np.testing.assert_allclose([eig[0], eig[-1]], [3.0 / 50.0, 3.0], rtol=1e-10)


def test_least_squares_constants_match_numpy(ls):
    eig = np.linalg.eigvalsh(ls.A.T @ ls.A)
    assert ls.L == pytest.approx(eig[-1], rel=1e-12)
    assert ls.mu == pytest.approx(eig[0], rel=1e-10)
    assert ls.kappa == pytest.approx(20.0, rel=1e-9)
    x_lstsq = np.linalg.lstsq(ls.A, ls.b, rcond=None)[0]
    np.testing.assert_allclose(ls.x_star, x_lstsq, atol=1e-10)
    assert ls.f_star == pytest.approx(0.5 * np.sum((ls.A @ x_lstsq - ls.b) ** 2), rel=1e-10)
    shards = np.array_split(np.arange(200), 4)
    L_i = [np.linalg.eigvalsh(ls.A[s].T @ ls.A[s])[-1] for s in shards]
    np.testing.assert_allclose(ls.L_i, L_i, rtol=1e-12)
    assert ls.L_max == pytest.approx(max(L_i))
    # L <= sum_i L_i (sum convention), and each shard sees its own rows.
    assert ls.L <= ls.L_i.sum() + 1e-12
    sigma = sum(np.sum((ls.A[s].T @ (ls.A[s] @ x_lstsq - ls.b[s])) ** 2) for s in shards)
    assert ls.sigma_star_sq == pytest.approx(sigma, rel=1e-8)
    assert ls.sigma_star_sq > 1e-4  # noisy targets make the shards disagree at x*


def test_least_squares_with_reg_and_homogeneous():
    p = problems.make_least_squares(40, 10, 4, kappa=5.0, noise=0.0, reg=0.0, seed=3)
    assert p.sigma_star_sq < 1e-20  # interpolation: every shard optimal at x*
    q = problems.make_least_squares(40, 10, 4, kappa=5.0, noise=0.1, reg=0.5, seed=3)
    eig = np.linalg.eigvalsh(q.A.T @ q.A)
    assert q.L == pytest.approx(eig[-1] + 0.5) and q.mu == pytest.approx(eig[0] + 0.5)
    L_i = [np.linalg.eigvalsh(q.shard(i)[0].T @ q.shard(i)[0])[-1] + 0.5 / 4 for i in range(4)]
    np.testing.assert_allclose(q.L_i, L_i, rtol=1e-12)
    np.testing.assert_allclose(q.grad(q.x_star), 0.0, atol=1e-10)


def test_gradients_and_shard_sums(ls, logreg):
    rng = np.random.default_rng(0)
    for p in (ls, logreg):
        x = rng.standard_normal(p.dim)
        np.testing.assert_allclose(p.grad(x), _fd_grad(p.loss, x), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(p.local_grads(x).sum(axis=0), p.grad(x), rtol=1e-10,
                                   atol=1e-10)
        assert p.local_losses(x).sum() == pytest.approx(p.loss(x), rel=1e-12)
        # Batched iterates: leading axes are kept.
        X = rng.standard_normal((5, p.dim))
        np.testing.assert_allclose(p.grad(X)[3], p.grad(X[3]), rtol=1e-12)
        assert p.local_grads(X).shape == (5, p.num_shards, p.dim)


def test_logistic_constants(logreg):
    p = logreg
    np.testing.assert_allclose(p.grad(p.x_star), 0.0, atol=1e-9)
    eig = np.linalg.eigvalsh(p.A.T @ p.A)
    assert p.L == pytest.approx(eig[-1] / 4 + 0.05, rel=1e-12)
    assert p.mu == 0.05
    L_i = [np.linalg.eigvalsh(p.shard(i)[0].T @ p.shard(i)[0])[-1] / 4 + 0.05 / 3
           for i in range(3)]
    np.testing.assert_allclose(p.L_i, L_i, rtol=1e-12)
    # The Hessian at random points lies between mu I and L I.
    rng = np.random.default_rng(1)
    for _ in range(3):
        x = 3 * rng.standard_normal(p.dim)
        s = 1 / (1 + np.exp(-(p.A @ x)))
        hess = (p.A.T * (s * (1 - s))) @ p.A + p.reg * np.eye(p.dim)
        ev = np.linalg.eigvalsh(hess)
        assert ev[0] >= p.mu - 1e-12 and ev[-1] <= p.L + 1e-12
    g = p.local_grads(p.x_star)
    assert p.sigma_star_sq == pytest.approx(np.sum(g * g), rel=1e-10) and p.sigma_star_sq > 0
    assert set(np.unique(p.b)) <= {-1.0, 1.0} and len(np.unique(p.b)) == 2
    assert p.f_star == pytest.approx(float(p.loss(p.x_star)))
    assert np.all(p.loss(p.x_star + 0.01 * rng.standard_normal((10, p.dim))) > p.f_star)


def test_sparse_design_support_statistics():
    p = problems.make_least_squares(64, 50, 4, design="sparse", nnz_per_row=3, reg=0.1, seed=4)
    mask = p.A != 0
    assert np.all(mask.sum(axis=1) == 3)
    np.testing.assert_allclose(np.linalg.norm(p.A, axis=1), 1.0)
    s = p.support
    assert s.row_nnz_mean == 3 and s.row_nnz_max == 3
    assert s.density == pytest.approx(3 / 50)
    unions = [int(mask[a:b].any(axis=0).sum()) for a, b in p.shard_bounds]
    np.testing.assert_array_equal(s.shard_support, unions)
    assert s.shard_support_max == max(unions)
    assert s.column_frequency_max == pytest.approx(mask.mean(axis=0).max())
    # The data part of each local gradient lives on the shard's support.
    x = np.random.default_rng(0).standard_normal(50)
    data_grads = p.local_grads(x) - p.reg / p.num_shards * x
    for i in range(4):
        assert np.count_nonzero(data_grads[i]) <= s.shard_support[i]
    # Zipf popularity: the most popular word is used far more often than the average one.
    assert s.column_frequency_max > 2 * s.density


def test_averaged_convention_and_blocks(ls):
    c = ls.constants("average")
    assert c.L == pytest.approx(ls.L / 4) and c.mu == pytest.approx(ls.mu / 4)
    assert c.L_max == ls.L_max and c.sigma_star_sq == ls.sigma_star_sq
    assert c.f_star == pytest.approx(ls.f_star / 4)
    assert ls.constants().L == ls.L
    blocks = ls.block_smoothness(4)
    H = ls.A.T @ ls.A
    expect = [np.linalg.eigvalsh(H[i * 10:(i + 1) * 10, i * 10:(i + 1) * 10])[-1]
              for i in range(4)]
    np.testing.assert_allclose(blocks, expect, rtol=1e-12)
    assert ls.mu <= blocks.min() and blocks.max() <= ls.L
    np.testing.assert_allclose(ls.block_smoothness(1), [ls.L])


def test_stacked_shards(ls):
    A_s, b_s = ls.stacked_shards()
    assert A_s.shape == (4, 50, 40) and b_s.shape == (4, 50)
    np.testing.assert_array_equal(A_s[2], ls.shard(2)[0])
    uneven = problems.make_least_squares(42, 5, 4, seed=0)
    assert [b - a for a, b in uneven.shard_bounds] == [11, 11, 10, 10]
    with pytest.raises(ValueError, match="different sizes"):
        uneven.stacked_shards()


@pytest.mark.parametrize("call, match", [
    (lambda: problems.dense_design(5, 10), "n >= d"),
    (lambda: problems.dense_design(10, 5, kappa=0.5), "kappa"),
    (lambda: problems.sparse_design(10, 5, nnz_per_row=6), "nnz_per_row"),
    (lambda: problems.make_least_squares(10, 4, 11), "num_shards"),
    (lambda: problems.make_least_squares(10, 4, 2, design="sparse"), "nnz_per_row"),
    (lambda: problems.make_least_squares(10, 4, 2, design="tfidf"), "design"),
    (lambda: problems.least_squares(np.ones((6, 3)), np.ones(6), 2), "not strongly convex"),
    (lambda: problems.least_squares(np.ones((6, 3)), np.ones(5), 2), "A must be"),
    (lambda: problems.least_squares(np.eye(3), np.ones(3), 1, reg=-1.0), "reg"),
    (lambda: problems.logistic_regression(np.eye(3), np.ones(3), 1, reg=0.0), "reg"),
    (lambda: problems.logistic_regression(np.eye(3), np.arange(3.0), 1, reg=1.0), "labels"),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_seeds_are_reproducible():
    a = problems.make_logistic_regression(30, 6, 2, design="sparse", nnz_per_row=2, seed=7)
    b = problems.make_logistic_regression(30, 6, 2, design="sparse", nnz_per_row=2, seed=7)
    np.testing.assert_array_equal(a.A, b.A)
    np.testing.assert_array_equal(a.b, b.b)
    assert a.L == b.L and a.sigma_star_sq == b.sigma_star_sq


def test_shard_bounds_cover_rows_once():
    p = problems.make_least_squares(23, 3, 5, seed=0)
    rows = list(itertools.chain.from_iterable(range(a, b) for a, b in p.shard_bounds))
    assert rows == list(range(23))
