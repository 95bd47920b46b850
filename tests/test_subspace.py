"""Tests of the shared subspace math: views, bases, the fast refresh, greedy selection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lore_jax
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


def _drifting(a=48, b=160, rank=4, seed=0):
    """A matrix with a decaying spectrum and its slightly rotated successor."""
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.standard_normal((a, a)))[0]
    v = np.linalg.qr(rng.standard_normal((b, a)))[0]
    s = 10.0 * 0.7 ** np.arange(a)
    h0 = (u * s) @ v.T
    rot = np.linalg.qr(np.eye(a) + 0.05 * rng.standard_normal((a, a)))[0]
    h1 = (rot @ u * s) @ v.T + 0.01 * rng.standard_normal((a, b))
    return h0.astype(np.float32), h1.astype(np.float32)


@pytest.mark.parametrize("rank", [2, 4, 8])
def test_fast_refresh_is_orthonormal_and_captures_top_r_energy(rank):
    h0, h1 = _drifting()
    u0, _ = subspace.svd_basis(jnp.asarray(h0))
    u1, s1 = subspace.subspace_iteration_basis(jnp.asarray(h1), u0, rank, iters=2)
    a = h1.shape[0]
    np.testing.assert_allclose(np.asarray(u1).T @ np.asarray(u1), np.eye(a), atol=2e-5)
    exact = np.linalg.svd(h1.astype(np.float64), compute_uv=False)[:rank] ** 2
    captured = np.sum((np.asarray(u1)[:, :rank].T @ h1.astype(np.float64)) ** 2)
    assert captured >= 0.99 * exact.sum()
    np.testing.assert_allclose(s1[:rank], np.sqrt(exact), rtol=1e-2)


def test_fast_refresh_handles_zero_and_rank_deficient_input():
    a, b = 16, 40
    u0 = jnp.eye(a)
    for h in (np.zeros((a, b), np.float32),
              np.outer(np.arange(a), np.ones(b)).astype(np.float32)):
        u, _ = subspace.subspace_iteration_basis(jnp.asarray(h), u0, 2)
        assert np.all(np.isfinite(u))
        np.testing.assert_allclose(np.asarray(u).T @ np.asarray(u), np.eye(a), atol=1e-5)


def test_greedylore_fast_refresh_tracks_the_exact_refresh():
    rng = np.random.default_rng(3)
    base = (10 * np.outer(rng.standard_normal(24), rng.standard_normal(64)) / 8
            + rng.standard_normal((24, 64))).astype(np.float32)
    grads = [base + 0.1 * rng.standard_normal((24, 64)).astype(np.float32) for _ in range(10)]
    bases = {}
    for method in ("svd", "subspace_iteration"):
        tx = lore_jax.greedylore(4, update_interval=3, refresh=method, refresh_iters=2,
                                 axis_name=None, tracking="off")
        state = tx.init({"w": jnp.zeros((24, 64))})
        update = jax.jit(tx.update)
        for g in grads:  # four refreshes: the first is always an exact SVD
            out, state = update({"w": jnp.asarray(g)}, state)
            assert np.all(np.isfinite(out["w"]))
        bases[method] = np.asarray(state.compressor_state[0].basis[0])
    fast, exact = bases["subspace_iteration"], bases["svd"]
    np.testing.assert_allclose(fast.T @ fast, np.eye(24), atol=2e-5)
    # The dominant direction agrees with the exact refresh (the trailing ones are noise
    # with nearly equal singular values, where any rotation is as good).
    assert abs(float(fast[:, 0] @ exact[:, 0])) > 0.99


def test_shared_probe_scores_are_u_transpose_h_v():
    rng = np.random.default_rng(5)
    u = np.linalg.qr(rng.standard_normal((2, 6, 6)))[0]
    h = rng.standard_normal((2, 6, 11))
    v = rng.standard_normal((3, 2, 11))
    lam = subspace.shared_probe_scores(*(jnp.asarray(x, jnp.float32) for x in (u, h, v)))
    expect = np.stack([[u[k].T @ h[k] @ v[p, k] for k in range(2)] for p in range(3)])
    np.testing.assert_allclose(lam, expect, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shared", [False, True])
def test_probe_scores_square_to_the_direction_energy_in_expectation(shared):
    """E[lam_j^2] = ||u_j^T H||^2 for independent and for shared probes (spec section 2.2)."""
    rng = np.random.default_rng(6)
    a, b, k = 8, 24, 4000
    u = np.linalg.qr(rng.standard_normal((a, a)))[0]   # not aligned with h
    h = rng.standard_normal((a, b)) * np.linspace(2.0, 0.2, a)[:, None]
    key = jax.random.PRNGKey(1)
    uj, hj = jnp.asarray(u, jnp.float32), jnp.asarray(h, jnp.float32)
    if shared:
        lam = subspace.shared_probe_scores(uj, hj, jax.random.normal(key, (k, b)))
    else:
        z = subspace.coordinates(uj, hj)
        lam = subspace.probe_scores(z, jax.random.normal(key, (k, a, b)))
    energy = np.sum((u.T @ h) ** 2, axis=1)
    mean_sq = np.asarray(lam, np.float64) ** 2
    # lam_j^2 / energy_j ~ chi^2_1: mean 1, standard error sqrt(2 / k) = 2.2%
    np.testing.assert_allclose(mean_sq.mean(0) / energy, 1.0, atol=5 * np.sqrt(2 / k))
    # shared probes correlate the directions through Z Z^T; independent ones do not
    corr = np.corrcoef(np.asarray(lam, np.float64).T)[0, 1]
    zzt = (u.T @ h) @ (u.T @ h).T
    expect = zzt[0, 1] / np.sqrt(zzt[0, 0] * zzt[1, 1]) if shared else 0.0
    assert abs(corr - expect) < 5 / np.sqrt(k)
