"""Tests of the shared subspace math: views, bases, probe scores, greedy selection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lore_jax import subspace


@pytest.mark.parametrize(
    "shape, expect",
    [((6, 10), (6, 10, False)), ((10, 6), (10, 6, True)), ((3, 3, 2, 4), (18, 4, True)),
     ((4, 4), (4, 4, False))],
)
def test_matrix_view_orients_along_the_smaller_side(shape, expect):
    view = subspace.matrix_view(shape)
    assert (view.rows, view.cols, view.transpose) == expect
    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
    m = subspace.orient(x, view)
    assert m.shape == (view.a, view.b)
    np.testing.assert_array_equal(subspace.unorient(m, view, x.dtype), x)
    assert subspace.matrix_view((5,)) is None


def test_svd_basis_is_complete_orthonormal_with_fixed_signs():
    h = np.random.default_rng(1).standard_normal((3, 12, 30)).astype(np.float32)
    u, s = subspace.svd_basis(jnp.asarray(h))
    assert u.shape == (3, 12, 12)
    np.testing.assert_allclose(np.einsum("kxi,kxj->kij", u, u),
                               np.broadcast_to(np.eye(12), (3, 12, 12)), atol=1e-5)
    ref = np.linalg.svd(h.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(s, ref, rtol=1e-4)
    u = np.asarray(u)
    idx = np.argmax(np.abs(u), axis=1)
    assert np.all(np.take_along_axis(u, idx[:, None, :], axis=1) > 0)


def test_probe_scores_square_to_the_direction_energy_in_expectation():
    """E[lam_j^2] = ||u_j^T H||^2, and independent probes leave the directions'
    scores uncorrelated: the scores of Chen et al. 2025's greedy selection."""
    rng = np.random.default_rng(6)
    a, b, k = 8, 24, 4000
    u = np.linalg.qr(rng.standard_normal((a, a)))[0]   # not aligned with h
    h = rng.standard_normal((a, b)) * np.linspace(2.0, 0.2, a)[:, None]
    key = jax.random.PRNGKey(1)
    uj, hj = jnp.asarray(u, jnp.float32), jnp.asarray(h, jnp.float32)
    z = subspace.coordinates(uj, hj)
    lam = subspace.probe_scores(z, jax.random.normal(key, (k, a, b)))
    energy = np.sum((u.T @ h) ** 2, axis=1)
    mean_sq = np.asarray(lam, np.float64) ** 2
    # lam_j^2 / energy_j ~ chi^2_1: mean 1, standard error sqrt(2 / k) = 2.2%
    np.testing.assert_allclose(mean_sq.mean(0) / energy, 1.0, atol=5 * np.sqrt(2 / k))
    corr = np.corrcoef(np.asarray(lam, np.float64).T)[0, 1]
    assert abs(corr) < 5 / np.sqrt(k)
