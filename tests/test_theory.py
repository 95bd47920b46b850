"""Tests for lore_jax.theory: formulas, validation, and measured iterates against each bound.

The rate tests run the algorithms of the spec (§5) in NumPy on a strongly convex sharded
least-squares problem from lore_jax.problems (x* checked against numpy's lstsq), at the
step size the calculator returns, and assert that the measured quantity stays under the
calculator's bound at every iteration: exactly for deterministic methods, and for the mean
over seeds (plus three standard errors) where the bound holds in expectation.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lore_jax import problems, theory

NOT_QUOTED = "consistent with the paper's framework; not quoted from the paper"


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def ls():
    """The spec's test problem shape: n = 200, d = 40, m = 4, kappa = 20, noisy targets."""
    p = problems.make_least_squares(200, 40, 4, kappa=20.0, noise=0.1, seed=0)
    np.testing.assert_allclose(p.x_star, np.linalg.lstsq(p.A, p.b, rcond=None)[0], atol=1e-10)
    return p


def _gap(p, X):
    """f(x) - f* = 1/2 (x - x*)^T H (x - x*), exact for least squares; X is (..., d)."""
    D = X - p.x_star
    return 0.5 * np.einsum("...d,de,...e->...", D, p.hessian_bound(), D)


def _dist_sq(p, X):
    return np.sum((X - p.x_star) ** 2, axis=-1)


def _rand_k(rng, G, k):
    """Unbiased random-k along the last axis, independent per row: alpha = d / k."""
    d = G.shape[-1]
    idx = np.argpartition(rng.random(G.shape), k - 1, axis=-1)[..., :k]
    mask = np.zeros(G.shape)
    np.put_along_axis(mask, idx, 1.0, axis=-1)
    return (d / k) * mask * G


def _assert_mean_below(samples, bound):
    """samples: (K + 1, R) per-seed values; the seed mean must stay under the bound."""
    mean = samples.mean(axis=1)
    se = samples.std(axis=1, ddof=1) / math.sqrt(samples.shape[1])
    excess = mean - (bound + 3 * se + 1e-9 * bound[0])
    assert np.all(excess <= 0), (int(np.argmax(excess)), float(excess.max()))


def _grad(p, X):
    return X @ p.hessian_bound() - p.A.T @ p.b


def _stale_cgd(p, gamma, tau, keep, steps, seeds, delays, rng):
    """A5: x_{k+1} = x_k - gamma Q(grad f(x_{k - tau_k})), iterates before x_0 read as x_0."""
    X = np.zeros((seeds, p.dim))
    history = np.zeros((tau + 1, seeds, p.dim))
    gaps = [_gap(p, X)]
    for k in range(steps):
        if delays == "fixed":
            t = np.full(seeds, min(k, tau))
        else:
            t = np.minimum(rng.integers(0, tau + 1, seeds), k)
        G = _grad(p, history[(k - t) % (tau + 1), np.arange(seeds)])
        X = X - gamma * (_rand_k(rng, G, keep) if keep < p.dim else G)
        history[(k + 1) % (tau + 1)] = X
        gaps.append(_gap(p, X))
        if not np.all(np.isfinite(gaps[-1])) or gaps[-1].min() > 1e8 * gaps[0].max():
            break
    return np.array(gaps)


# ----------------------------------------------------------------------------- A1 / A2 / A3


@pytest.mark.parametrize("step_factor", [None, 1.5])
def test_a1_unbiased_rand_k_under_bound(ls, step_factor):
    d, keep = ls.dim, 10
    alpha = d / keep
    step = None if step_factor is None else step_factor / (alpha * ls.L)
    g = theory.cgd_unbiased(ls.L, ls.mu, alpha, step_size=step)
    if step is None:
        assert g.step_size == pytest.approx(1 / (alpha * ls.L))
        assert g.rate == pytest.approx(1 - ls.mu / (alpha * ls.L))
    rng = np.random.default_rng(1)
    X = np.zeros((200, d))
    gaps = [_gap(ls, X)]
    for _ in range(300):
        X = X - g.step_size * _rand_k(rng, _grad(ls, X), keep)
        gaps.append(_gap(ls, X))
    gaps = np.array(gaps)
    k = np.arange(len(gaps))
    _assert_mean_below(gaps, g.bound(k, gaps[0, 0]))


@pytest.mark.parametrize("factor, diverges", [(0.9, False), (1.1, True)])
def test_a1_admissible_range_is_sharp(factor, diverges):
    """On f = 1/2 sum_i lam_i x_i^2 started on the top eigenvector, rand-k (alpha = d/k)
    multiplies x_1^2 by (1 - gamma alpha L)^2 w.p. 1/alpha and by 1 otherwise: the
    calculator's edge 2/(alpha L) separates convergence from divergence exactly."""
    d, keep, L, mu = 8, 2, 3.0, 0.3
    lam = np.linspace(L, mu, d)
    g = theory.cgd_unbiased(L, mu, d / keep)
    step = factor * g.max_step_size
    rng = np.random.default_rng(0)
    X = np.zeros((32, d))
    X[:, 0] = 1.0
    for _ in range(600):
        X = X - step * _rand_k(rng, lam * X, keep)
    gap = 0.5 * np.sum(lam * X * X, axis=1)
    if diverges:
        assert np.all(gap > 1e3 * 0.5 * L)
    else:
        assert np.all(gap < 1e-6 * 0.5 * L)


def test_a1_step_beyond_admissible_diverges(ls):
    """alpha = 1: a step above 2/(alpha L) diverges, and the calculator refuses it."""
    step = 2.1 / ls.L
    with pytest.raises(ValueError, match="step_size"):
        theory.cgd_unbiased(ls.L, ls.mu, 1.0, step_size=step)
    x = np.zeros(ls.dim)
    for _ in range(300):
        x = x - step * _grad(ls, x)
    assert _gap(ls, x) > 1e3 * _gap(ls, np.zeros(ls.dim))


def test_a2_top_k_under_bound_every_iteration(ls):
    d, keep = ls.dim, 10
    g = theory.cgd_contractive(ls.L, ls.mu, keep / d)
    assert g.step_size == pytest.approx(1 / ls.L)
    x, gaps = np.zeros(d), [_gap(ls, np.zeros(d))]
    for _ in range(300):
        G = _grad(ls, x)
        top = np.argsort(-np.abs(G))[:keep]
        # Top-k is a (k/d)-contraction on this vector.
        Q = np.zeros(d)
        Q[top] = G[top]
        assert np.sum((Q - G) ** 2) <= (1 - keep / d) * np.sum(G * G) + 1e-12
        x = x - g.step_size * Q
        gaps.append(_gap(ls, x))
    gaps = np.array(gaps)
    assert np.all(gaps <= g.bound(np.arange(len(gaps)), gaps[0]) * (1 + 1e-9) + 1e-12)
    assert gaps[-1] < 1e-3 * gaps[0]


@pytest.mark.parametrize("quadratic", [True, False])
@pytest.mark.parametrize("grid", [0.05, 0.5])
def test_a3_rounding_under_bound_every_iteration(ls, quadratic, grid):
    d = ls.dim
    eps = math.sqrt(d) * grid / 2  # ||Delta round(v / Delta) - v|| <= sqrt(d) Delta / 2
    g = theory.cgd_absolute(ls.L, ls.mu, eps, quadratic=quadratic)
    assert g.floor == pytest.approx(eps / ls.mu)
    x = np.zeros(d)
    dists = [np.linalg.norm(x - ls.x_star)]
    for _ in range(200):
        G = _grad(ls, x)
        Q = grid * np.round(G / grid)
        assert np.linalg.norm(Q - G) <= eps + 1e-12
        x = x - g.step_size * Q
        dists.append(np.linalg.norm(x - ls.x_star))
    dists = np.array(dists)
    bound = g.bound(np.arange(len(dists)), dists[0])
    assert np.all(dists <= bound * (1 + 1e-9))
    # A smaller step contracts more slowly; its bound still holds.
    slow = theory.cgd_absolute(ls.L, ls.mu, eps, quadratic=quadratic,
                               step_size=0.5 * g.step_size)
    assert slow.rate > g.rate


# ----------------------------------------------------------------------------- A4


def _dcgd(p, gamma, keep, steps, seeds, rng, average=False):
    X = np.zeros((seeds, p.dim))
    out = [_dist_sq(p, X)]
    for _ in range(steps):
        msgs = _rand_k(rng, p.local_grads(X), keep)  # (seeds, m, d), independent per worker
        agg = msgs.mean(axis=1) if average else msgs.sum(axis=1)
        X = X - gamma * agg
        out.append(_dist_sq(p, X))
    return np.array(out)


@pytest.mark.parametrize("convention", ["sum", "average"])
def test_a4_dcgd_under_bound_with_floor(ls, convention):
    d, m, keep = ls.dim, ls.num_shards, 20
    c = ls.constants(convention)
    g = theory.dcgd(c.L, c.mu, d / keep, c.L_max, c.sigma_star_sq, m, convention=convention)
    assert g.floor > 0
    dist = _dcgd(ls, g.step_size, keep, 300, 128, np.random.default_rng(2),
                 average=convention == "average")
    _assert_mean_below(dist, g.bound(np.arange(len(dist)), dist[0, 0]))
    # Only a neighbourhood is reached: the error stalls well above the exact-method level.
    assert dist[-1].mean() > 1e-6


def test_a4_dcgd_homogeneous_has_no_floor():
    p = problems.make_least_squares(120, 20, 4, kappa=10.0, noise=0.0, seed=5)
    g = theory.dcgd(p.L, p.mu, 2.0, p.L_max, p.sigma_star_sq, 4)
    assert g.floor < 1e-15
    dist = _dcgd(p, g.step_size, 10, 400, 50, np.random.default_rng(3))
    _assert_mean_below(dist, g.bound(np.arange(len(dist)), dist[0, 0]))
    assert dist[-1].mean() < 1e-6 * dist[0, 0]


def test_a4_conventions_and_corollary(ls):
    m, alpha = ls.num_shards, 3.0
    s = theory.dcgd(ls.L, ls.mu, alpha, ls.L_max, ls.sigma_star_sq, m)
    a = theory.dcgd(ls.L / m, ls.mu / m, alpha, ls.L_max, ls.sigma_star_sq, m,
                    convention="average")
    # The averaged method is the sum method with step gamma / m.
    assert a.step_size == pytest.approx(m * s.step_size)
    assert a.rate == pytest.approx(s.rate) and a.floor == pytest.approx(s.floor)
    # Averaged bidirectional step agrees term by term with the FL_PyTorch DCGD formula
    # A = L + 2 (wM + 1) max(L_i w / m) + L wM (lore_jax spec §5.4).
    w, wM = alpha - 1, 0.5
    b = theory.dcgd(ls.L / m, ls.mu / m, alpha, ls.L_max, ls.sigma_star_sq, m,
                    convention="average", alpha_server=1 + wM)
    flp = ls.L / m + 2 * (wM + 1) * ls.L_max * w / m + ls.L / m * wM
    assert b.step_size == pytest.approx(1 / flp)
    assert b.floor == pytest.approx(
        2 * (b.step_size / m) * (1 + wM) * w * ls.sigma_star_sq / ls.mu)
    # Corollary: floor <= eps / 2, bound(K) <= eps, K <= the spec's ceil(ln(2 e0/eps)/(g mu)).
    e0, eps = float(np.sum(ls.x_star ** 2)), 1e-3
    c = theory.dcgd(ls.L, ls.mu, alpha, ls.L_max, ls.sigma_star_sq, m, initial=e0, target=eps,
                    uplink_bits=32 * 40)
    assert c.step_size == pytest.approx(min(s.step_size, eps * ls.mu / (4 * (alpha - 1)
                                                                       * ls.sigma_star_sq)))
    assert c.floor <= eps / 2 * (1 + 1e-12)
    assert c.bound(c.iterations, e0) <= eps
    assert c.bound(c.iterations - 1, e0) > eps * 0.999
    assert c.iterations <= math.ceil(math.log(2 * e0 / eps) / (c.step_size * ls.mu))
    assert c.bits == c.iterations * m * 32 * 40
    with pytest.raises(ValueError, match="target"):
        theory.dcgd(ls.L, ls.mu, alpha, ls.L_max, ls.sigma_star_sq, m, initial=e0,
                    target=s.floor / 2, step_size=s.step_size)


# ----------------------------------------------------------------------------- A5


@pytest.mark.parametrize("delays", ["fixed", "random"])
def test_a5_stale_under_bound(ls, delays):
    tau, keep = 8, 20
    alpha = ls.dim / keep
    g = theory.stale_cgd(ls.L, ls.mu, alpha, tau)
    sa = math.sqrt(alpha)
    assert g.step_size == pytest.approx(1 / (2 * ls.L * sa * (sa + tau)))
    gaps = _stale_cgd(ls, g.step_size, tau, keep, 1000, 64, delays, np.random.default_rng(4))
    assert len(gaps) == 1001
    _assert_mean_below(gaps, g.bound(np.arange(len(gaps)), gaps[0, 0]))


@pytest.mark.parametrize("delays, tau", [("fixed", 8), ("fixed", 16), ("random", 16)])
def test_a5_delay_blind_step_diverges(ls, tau, delays):
    """Spec C4: the step 1/(alpha L), optimal without delay, diverges for tau >= 8.

    Every seed diverges for constant delays tau >= 8. With delays uniform in [0, tau] the
    mean delay is tau / 2: at tau = 8 only the mean over seeds blows up (heavy tails, most
    runs converge), at tau = 16 every seed diverges, which is what is asserted here.
    """
    keep = 20
    alpha = ls.dim / keep
    blind = 1 / (alpha * ls.L)
    with pytest.raises(ValueError, match="step_size"):
        theory.stale_cgd(ls.L, ls.mu, alpha, tau, step_size=blind)
    gaps = _stale_cgd(ls, blind, tau, keep, 1500, 8, delays, np.random.default_rng(5))
    assert gaps[-1].min() > 1e6 * gaps[0, 0]


def test_a5_deterministic_delay_stability_is_exact():
    """alpha = 1: x_{k+1} = x_k - g lam x_{k - tau} is stable iff the roots of
    z^{tau+1} - z^tau + g lam lie in the unit disc. The A5 step is stable on [mu, L] for
    every tau; the delay-blind step 1/L is unstable for every tau >= 2."""
    for tau in range(0, 33):
        g = theory.stale_cgd(1.0, 0.01, 1.0, tau)
        for lam in (0.01, 0.5, 1.0):
            coeffs = np.zeros(tau + 2)
            coeffs[0], coeffs[1] = 1.0, -1.0
            coeffs[-1] += g.step_size * lam
            assert np.abs(np.roots(coeffs)).max() < 1
        if tau >= 2:
            coeffs = np.zeros(tau + 2)
            coeffs[0], coeffs[1], coeffs[-1] = 1.0, -1.0, 1.0
            assert np.abs(np.roots(coeffs)).max() > 1


def test_a5_formulas():
    L, mu, alpha, tau = 2.0, 0.1, 4.0, 8
    g = theory.stale_cgd(L, mu, alpha, tau, initial=1.0, target=1e-4, uplink_bits=100,
                         downlink_bits=50)
    kappa = L / mu
    assert g.iterations == math.ceil(2 * kappa * (alpha + tau * math.sqrt(alpha))
                                     * math.log(1e4))
    assert g.bits == g.iterations * 150
    # tau = 0 recovers A1 up to a factor of 2 in the step.
    assert theory.stale_cgd(L, mu, alpha, 0).step_size == pytest.approx(
        theory.cgd_unbiased(L, mu, alpha).step_size / 2)
    # Non-convex: the recommended step satisfies alpha L g + alpha L^2 tau^2 g^2 <= 1, and the
    # admissible maximum meets it with equality.
    nc = theory.stale_cgd(L, None, alpha, tau)
    for step in (nc.step_size, nc.max_step_size):
        assert alpha * L * step + alpha * L ** 2 * tau ** 2 * step ** 2 <= 1 + 1e-12
    s = nc.max_step_size
    assert alpha * L * s + alpha * L ** 2 * tau ** 2 * s ** 2 == pytest.approx(1.0)
    assert nc.rate is None and nc.coefficient == pytest.approx(2 / nc.step_size)
    assert nc.bound(10, 3.0) == pytest.approx(2 * 3.0 / (nc.step_size * 10))
    assert theory.stale_cgd(L, None, alpha, 0).max_step_size == pytest.approx(1 / (alpha * L))


# ----------------------------------------------------------------------------- A7 / A8


def test_a7_block_coordinate_under_bound(ls):
    d, blocks, keep = ls.dim, 4, 5
    size = d // blocks
    L_blk = float(ls.block_smoothness(blocks).max())
    g = theory.compressed_bcd(L_blk, ls.mu, size / keep, blocks)
    assert g.rate == pytest.approx(1 - ls.mu / (blocks * (size / keep) * L_blk))
    rng = np.random.default_rng(6)
    seeds = 200
    X = np.zeros((seeds, d))
    gaps = [_gap(ls, X)]
    for _ in range(400):
        j = rng.integers(0, blocks, seeds)
        cols = j[:, None] * size + np.arange(size)
        G = np.take_along_axis(_grad(ls, X), cols, axis=1)
        np.put_along_axis(X, cols, np.take_along_axis(X, cols, axis=1)
                          - g.step_size * _rand_k(rng, G, keep), axis=1)
        gaps.append(_gap(ls, X))
    gaps = np.array(gaps)
    _assert_mean_below(gaps, g.bound(np.arange(len(gaps)), gaps[0, 0]))


def test_minibatch_constants_exact_by_enumeration():
    """E||g||^2 <= 2A (f - f*) + C, averaging over every b-subset of n = 8 samples."""
    from itertools import combinations

    n = 8
    p = problems.make_least_squares(n, 3, n, kappa=4.0, noise=0.5, reg=0.1, seed=7)
    rng = np.random.default_rng(8)
    for b in (1, 3, 8):
        for convention, scale in (("sum", n / b), ("average", 1 / b)):
            A, C = theory.minibatch_constants(p.L, p.L_max, p.sigma_star_sq, n, b,
                                              convention=convention)
            denom = 1.0 if convention == "sum" else n
            for x in rng.standard_normal((5, 3)) * 3:
                local = p.local_grads(x)
                second = np.mean([np.sum((scale * local[list(B)].sum(0)) ** 2)
                                  for B in combinations(range(n), b)])
                gap = (p.loss(x) - p.f_star) / denom
                assert second <= 2 * A * gap + C + 1e-9
            if b == n:
                assert C == 0 and A == pytest.approx(2 * p.L / denom)


def test_a8_compressed_minibatch_under_bound():
    n, b, keep = 48, 6, 4
    p = problems.make_least_squares(n, 8, n, kappa=5.0, noise=0.3, seed=1)
    A, C = theory.minibatch_constants(p.L, p.L_max, p.sigma_star_sq, n, b)
    g = theory.compressed_sgd(A, C, p.mu, p.dim / keep)
    rng = np.random.default_rng(9)
    seeds = 200
    X = np.zeros((seeds, p.dim))
    dist = [_dist_sq(p, X)]
    for _ in range(400):
        batch = np.argpartition(rng.random((seeds, n)), b - 1, axis=1)[:, :b]
        rows_a = p.A[batch]  # (seeds, b, d): one sample per shard
        resid = np.einsum("sbd,sd->sb", rows_a, X) - p.b[batch]
        G = (n / b) * np.einsum("sb,sbd->sd", resid, rows_a)  # reg = 0
        X = X - g.step_size * _rand_k(rng, G, keep)
        dist.append(_dist_sq(p, X))
    dist = np.array(dist)
    _assert_mean_below(dist, g.bound(np.arange(len(dist)), dist[0, 0]))


# ----------------------------------------------------------------------------- formulas


def test_a1_a2_iterations_match_spec():
    L, mu, alpha = 10.0, 0.5, 4.0
    g = theory.cgd_unbiased(L, mu, alpha, initial=2.0, target=1e-6, uplink_bits=320,
                            num_workers=4, downlink_bits=1280)
    assert g.iterations == math.ceil(alpha * L / mu * math.log(2.0 / 1e-6))
    assert g.bits == g.iterations * (4 * 320 + 1280)
    assert g.step_size_range == (0.0, 2 / (alpha * L)) and not g.max_step_admissible
    nc = theory.cgd_unbiased(L, None, alpha, initial=2.0, target=1e-2)
    assert nc.iterations == math.ceil(2 * alpha * L * 2.0 / 1e-2)
    c = theory.cgd_contractive(L, mu, 0.25, initial=2.0, target=1e-6)
    assert c.iterations == math.ceil(L / (0.25 * mu) * math.log(2.0 / 1e-6))
    assert theory.cgd_contractive(L, None, 0.25).coefficient == pytest.approx(2 * L / 0.25)
    assert theory.cgd_contractive(L, mu, 0.25, step_size=0.05).rate == pytest.approx(
        1 - 0.05 * mu * 0.25)
    # A1 at a general step: rho = 1 - 2 mu g (1 - alpha L g / 2).
    gg = theory.cgd_unbiased(L, mu, alpha, step_size=0.03)
    assert gg.rate == pytest.approx(1 - 2 * mu * 0.03 * (1 - alpha * L * 0.03 / 2))
    assert theory.cgd_unbiased(L, mu, alpha, initial=1e-9, target=1e-6).iterations == 0


def test_a3_a7_a8_formulas():
    a3 = theory.cgd_absolute(4.0, 1.0, 0.2, quadratic=True, step_size=0.3, initial=5.0,
                             target=1.0)
    assert a3.rate == pytest.approx(max(abs(1 - 0.3), abs(1 - 1.2)))
    assert a3.floor == pytest.approx(0.3 * 0.2 / (1 - a3.rate))
    assert a3.bound(a3.iterations, 5.0) <= 1.0
    general = theory.cgd_absolute(4.0, 1.0, 0.2, step_size=0.3)
    assert general.rate == pytest.approx(math.sqrt(1 - 2 * 0.3 * 4.0 / 5.0))
    with pytest.raises(ValueError, match="step_size"):
        theory.cgd_absolute(4.0, 1.0, 0.2, step_size=0.45)  # > 2/(mu+L) = 0.4
    assert theory.cgd_absolute(4.0, 1.0, 0.2, quadratic=True, step_size=0.45).rate < 1
    a7 = theory.compressed_bcd(2.0, 0.5, 2.0, 4, initial=1.0, target=1e-3)
    assert a7.iterations == math.ceil(4 * 2.0 * 2.0 / 0.5 * math.log(1e3))
    a8 = theory.compressed_sgd(4.0, 1.0, 0.5, 2.0, initial=3.0, target=1.0)
    assert a8.floor == pytest.approx(a8.step_size * 2.0 * 1.0 / 0.5)
    assert a8.bound(a8.iterations, 3.0) <= 1.0


def test_guarantee_is_immutable_and_labelled():
    results = [
        theory.cgd_unbiased(1.0, 0.1, 2.0),
        theory.cgd_unbiased(1.0, None, 2.0),
        theory.cgd_contractive(1.0, 0.1, 0.5),
        theory.cgd_absolute(1.0, 0.1, 0.1),
        theory.dcgd(1.0, 0.1, 2.0, 1.0, 0.1, 2),
        theory.stale_cgd(1.0, 0.1, 2.0, 3),
        theory.stale_cgd(1.0, None, 2.0, 3),
        theory.compressed_bcd(1.0, 0.1, 2.0, 2),
        theory.compressed_sgd(1.0, 0.1, 0.1, 2.0),
    ]
    for r in results:
        assert isinstance(r, theory.Guarantee)
        assert r.provenance.startswith("derived (lore_jax spec §5.") and NOT_QUOTED in r.provenance
        assert 0 < r.step_size <= r.max_step_size
        assert r.rate is None or 0 <= r.rate < 1
        with pytest.raises(AttributeError):
            r.step_size = 1.0
    calculators = [theory.cgd_unbiased, theory.cgd_contractive, theory.cgd_absolute,
                   theory.dcgd, theory.stale_cgd, theory.compressed_bcd, theory.compressed_sgd,
                   theory.max_delay_lemma_rate, theory.minibatch_constants,
                   theory.bits_to_accuracy, theory.omega_from_alpha, theory.delta_from_alpha]
    for fn in calculators:
        doc = " ".join(fn.__doc__.split())
        assert "Derived (lore_jax spec §" in doc and NOT_QUOTED in doc, fn.__name__


def test_conversions():
    assert theory.omega_from_alpha(4.0) == 3.0 and theory.alpha_from_omega(3.0) == 4.0
    assert theory.delta_from_alpha(4.0) == 0.25
    assert theory.eps_from_delta(theory.delta_from_eps(0.3)) == pytest.approx(0.3)
    # Scaling an unbiased compressor by 1/alpha gives a (1/alpha)-contraction (spec §3.1):
    # check on rand-k by Monte Carlo with the exact second moment.
    rng = np.random.default_rng(10)
    v = rng.standard_normal(16)
    q = _rand_k(rng, np.tile(v, (20000, 1)), 4) / 4.0
    ratio = np.mean(np.sum((q - v) ** 2, axis=1)) / np.sum(v * v)
    assert ratio <= 1 - theory.delta_from_alpha(4.0) + 0.02
    assert theory.bits_to_accuracy(10, 3, num_workers=2, downlink_bits=4) == 100


def test_compressor_objects_by_duck_typing():
    class RandK:
        kind = "unbiased"
        alpha = 4.0

    class TopK:
        kind = "contractive"

        def delta(self):
            return 0.25

    class Rounding:
        kind = "absolute"
        eps = 0.1

    class Omega:
        omega = 3.0

    assert theory.cgd_unbiased(1.0, 0.1, RandK()) == theory.cgd_unbiased(1.0, 0.1, 4.0)
    assert theory.cgd_unbiased(1.0, 0.1, Omega()) == theory.cgd_unbiased(1.0, 0.1, 4.0)
    assert theory.cgd_contractive(1.0, 0.1, TopK()) == theory.cgd_contractive(1.0, 0.1, 0.25)
    assert theory.cgd_absolute(1.0, 0.1, Rounding()) == theory.cgd_absolute(1.0, 0.1, 0.1)
    with pytest.raises(ValueError, match="kind='contractive'"):
        theory.cgd_unbiased(1.0, 0.1, TopK())
    with pytest.raises(TypeError, match="delta"):
        theory.cgd_contractive(1.0, 0.1, object())


@pytest.mark.parametrize("call, error, name", [
    (lambda: theory.cgd_unbiased(0.0, 0.1, 2.0), ValueError, "L"),
    (lambda: theory.cgd_unbiased(float("inf"), 0.1, 2.0), ValueError, "L"),
    (lambda: theory.cgd_unbiased(1.0, 2.0, 2.0), ValueError, "mu"),
    (lambda: theory.cgd_unbiased(1.0, -0.1, 2.0), ValueError, "mu"),
    (lambda: theory.cgd_unbiased(1.0, 0.1, 0.5), ValueError, "alpha"),
    (lambda: theory.cgd_unbiased(1.0, 0.1, "2"), TypeError, "alpha"),
    (lambda: theory.cgd_unbiased(1.0, 0.1, 2.0, step_size=-1.0), ValueError, "step_size"),
    (lambda: theory.cgd_unbiased(1.0, 0.1, 2.0, initial=1.0), ValueError, "target"),
    (lambda: theory.cgd_contractive(1.0, 0.1, 0.0), ValueError, "delta"),
    (lambda: theory.cgd_contractive(1.0, 0.1, 1.5), ValueError, "delta"),
    (lambda: theory.cgd_contractive(1.0, 0.1, 0.5, step_size=1.5), ValueError, "step_size"),
    (lambda: theory.cgd_absolute(1.0, 0.1, -0.1), ValueError, "eps"),
    (lambda: theory.cgd_absolute(1.0, 0.1, 1.0, initial=1.0, target=0.5), ValueError, "target"),
    (lambda: theory.dcgd(1.0, 0.1, 2.0, 0.0, 0.1, 2), ValueError, "L_max"),
    (lambda: theory.dcgd(1.0, 0.1, 2.0, 1.0, -0.1, 2), ValueError, "sigma_star_sq"),
    (lambda: theory.dcgd(1.0, 0.1, 2.0, 1.0, 0.1, 0), ValueError, "num_workers"),
    (lambda: theory.dcgd(1.0, 0.1, 2.0, 1.0, 0.1, 2.5), TypeError, "num_workers"),
    (lambda: theory.dcgd(1.0, 0.1, 2.0, 1.0, 0.1, 2, convention="mean"), ValueError,
     "convention"),
    (lambda: theory.dcgd(1.0, 0.1, 2.0, 1.0, 0.1, 2, alpha_server=0.5), ValueError,
     "alpha_server"),
    (lambda: theory.stale_cgd(1.0, 0.1, 2.0, -1), ValueError, "max_delay"),
    (lambda: theory.stale_cgd(1.0, 0.1, 2.0, 1.5), TypeError, "max_delay"),
    (lambda: theory.stale_cgd(1.0, 0.1, 2.0, True), TypeError, "max_delay"),
    (lambda: theory.compressed_bcd(1.0, 0.1, 2.0, 0), ValueError, "num_blocks"),
    (lambda: theory.compressed_bcd(1.0, 2.0, 2.0, 2), ValueError, "mu"),
    (lambda: theory.compressed_sgd(0.0, 1.0, 0.1, 2.0), ValueError, "A"),
    (lambda: theory.compressed_sgd(1.0, -1.0, 0.1, 2.0), ValueError, "C"),
    (lambda: theory.minibatch_constants(1.0, 1.0, 0.1, 4, 5), ValueError, "batch_size"),
    (lambda: theory.max_delay_lemma_rate(0.5, 0.5, 1), ValueError, "p \\+ q"),
    (lambda: theory.max_delay_lemma_rate(0.5, -0.1, 1), ValueError, "q"),
    (lambda: theory.max_delay_lemma_rate(0.5, 0.1, -1), ValueError, "tau"),
    (lambda: theory.alpha_from_omega(-1.0), ValueError, "omega"),
    (lambda: theory.delta_from_eps(1.0), ValueError, "eps"),
    (lambda: theory.bits_to_accuracy(-1, 10), ValueError, "iterations"),
])
def test_validation_names_the_parameter(call, error, name):
    with pytest.raises(error, match=name):
        call()


@settings(max_examples=60, deadline=None)
@given(p=st.floats(0.0, 0.95), frac=st.floats(0.0, 1.0), tau=st.integers(0, 6),
       v0=st.floats(0.1, 10.0))
def test_max_delay_lemma_bounds_worst_case_sequences(p, frac, tau, v0):
    q = frac * (0.999 - p)
    r = theory.max_delay_lemma_rate(p, q, tau)
    assert r == pytest.approx((p + q) ** (1 / (1 + tau)))
    V = [v0]
    for k in range(60):
        V.append(p * V[k] + q * max(V[max(0, k - tau):k + 1]))
    V = np.array(V)
    assert np.all(V <= v0 * r ** np.arange(len(V)) * (1 + 1e-9) + 1e-300)


@settings(max_examples=40, deadline=None)
@given(L=st.floats(1e-3, 1e3), kappa=st.floats(1.0, 1e4), alpha=st.floats(1.0, 100.0),
       tau=st.integers(0, 64))
def test_step_sizes_are_admissible_and_ordered(L, kappa, alpha, tau):
    mu = L / kappa
    a1 = theory.cgd_unbiased(L, mu, alpha)
    a5 = theory.stale_cgd(L, mu, alpha, tau)
    # Delay only shrinks the step; with tau = 0 A5 is A1 halved.
    assert a5.step_size <= a1.step_size / 2 * (1 + 1e-12)
    assert 0 <= a5.rate < 1 and 0 <= a1.rate < 1
    # The Lyapunov conditions behind A5 hold at its step (spec §5.5).
    g = a5.step_size
    assert 2 * alpha * L ** 2 * g ** 2 * tau ** 2 <= 1 - alpha * L * g
    assert (1 - g * mu) ** (-tau) <= 2
