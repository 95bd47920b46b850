"""Tests of GreedyLore's lore_jax extensions: basis tracking and group allocation.

Each is checked against the NumPy reference (tests/greedylore_reference.py, written from
the module docstring's spec), the dense mean at full rank, the telescoping invariant of
EF14, the contraction bound with a stale basis, and the compiled HLO's payload.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from greedylore_reference import GreedyLoreReference
from helpers import greedylore_bases, init_and_step, put, with_greedylore_stack
from test_greedylore import (
    N,
    check_against_reference,
    check_telescoping,
    device_grads,
    make_params,
)

import lore_jax
from lore_jax import accounting

RANGE = dict(tracking="range")
TRACKED = dict(tracking="power")
GROUPED = dict(allocation="group")
PAPER = dict(tracking="off", probes="independent", allocation="matrix")


@pytest.mark.parametrize("kwargs, match", [
    (dict(tracking="svd"), "tracking"),
    (dict(update_interval=0), "update_interval"),
    (dict(track_every=0), "track_every"),
    (dict(allocation="model"), "allocation"),
])
def test_bad_extension_arguments_name_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lore_jax.greedylore(2, **kwargs)


@pytest.mark.parametrize("error_feedback, options", [
    ("ef14", dict(tracking="range", probes="shared", allocation="group")),   # the default
    ("ef14", dict(tracking="range", num_probes=2, probes="independent", allocation="matrix",
                  track_every=2)),
    ("ef14", dict(tracking="power", probes="independent", allocation="matrix")),
    ("ef14", dict(tracking="power", allocation="group", probes="shared", num_probes=2)),
    ("ef21", dict(tracking="power", track_every=2, allocation="group",
                  probes="independent")),
    (None, dict(tracking="off", allocation="group", probes="independent")),
])
def test_matches_numpy_reference_step_by_step(mesh, error_feedback, options):
    rng = np.random.default_rng(11)
    params = make_params(rng)
    key = jax.random.PRNGKey(3)
    tx = lore_jax.greedylore(2, update_interval=5, warmup_steps=1, min_compression_rate=1.5,
                             error_feedback=error_feedback, key=key, **options)
    ref = GreedyLoreReference(params, 2, 5, 1, N, key, ef=error_feedback, rate=1.5,
                              **options)
    # 12 steps: warm-up, two refreshes, tracked and untracked compressed steps.
    check_against_reference(tx, ref, params, rng, mesh, steps=12, rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("options", [RANGE, {**TRACKED, **GROUPED}])
def test_full_rank_reproduces_dense_mean_every_step(mesh, options):
    rng = np.random.default_rng(12)
    params = make_params(rng)
    tx = lore_jax.greedylore(16, update_interval=4, min_compression_rate=0.0, **options)
    state, step = init_and_step(tx, params, mesh)
    for _ in range(6):
        g = device_grads(rng, params)
        out, state = step(put(g, mesh), state)
        for k in params:
            np.testing.assert_allclose(out[k], g[k].mean(0), rtol=2e-4, atol=3e-5)


@pytest.mark.parametrize("num_probes", [1, 2])
def test_range_tracking_with_no_room_for_probes_reproduces_dense_mean(mesh, num_probes):
    """A square matrix at full rank (r = a = b): the probe columns outside span(Q_hat)
    vanish to rounding, with one probe (a division) and two (a 2 x 2 inverse); the
    output stays the mean and the state finite."""
    rng = np.random.default_rng(14)
    params = {"w": jnp.asarray(rng.standard_normal((5, 5)), jnp.float32)}
    tx = lore_jax.greedylore(5, min_compression_rate=0.0, num_probes=num_probes, **RANGE)
    state, step = init_and_step(tx, params, mesh)
    for _ in range(4):
        g = device_grads(rng, params)
        out, state = step(put(g, mesh), state)
        np.testing.assert_allclose(out["w"], g["w"].mean(0), rtol=2e-4, atol=3e-5)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))


def test_range_tracking_keeps_only_its_ritz_vectors_and_loses_nothing(mesh):
    """Every-step range tracking stores its c = min(a, r + p) Ritz vectors, not a complete
    a x a basis. Until its second refresh, a fast refresh's run (which keeps the complete
    basis for the refresh to complete from) is the same algorithm: same outputs, and its
    bases' leading c columns are the Ritz vectors kept."""
    rng = np.random.default_rng(15)
    params = make_params(rng)
    lean = lore_jax.greedylore(2, update_interval=6, min_compression_rate=1.5)
    full = lore_jax.greedylore(2, update_interval=6, min_compression_rate=1.5,
                               refresh="subspace_iteration")
    (s_lean, step_lean), (s_full, step_full) = (init_and_step(t, params, mesh)
                                                for t in (lean, full))
    for _ in range(5):   # the refresh, then four compressed steps
        g = put(device_grads(rng, params), mesh)
        (o_lean, s_lean), (o_full, s_full) = step_lean(g, s_lean), step_full(g, s_full)
        for k in params:
            np.testing.assert_allclose(o_lean[k], o_full[k], rtol=1e-5, atol=1e-6)
    pairs = list(zip(greedylore_bases(s_lean), greedylore_bases(s_full), strict=True))
    assert pairs
    for kept, complete in pairs:
        k, a, c = kept.basis.shape
        assert complete.basis.shape == (k, a, a) and c == min(a, 2 + 1)
        np.testing.assert_allclose(kept.basis, complete.basis[..., :c], atol=1e-5)
        np.testing.assert_allclose(np.swapaxes(kept.basis, 1, 2) @ kept.basis,
                                   np.broadcast_to(np.eye(c), (k, c, c)), atol=1e-5)
    tracked_every_other = lore_jax.greedylore(2, track_every=2, min_compression_rate=1.5)
    assert all(s.basis.shape[-1] == s.basis.shape[-2] for s in
               greedylore_bases(tracked_every_other.init(params)))


@pytest.mark.parametrize("options", [RANGE, {**TRACKED, **GROUPED}])
def test_telescoping_invariant_with_tracking_and_group_allocation(mesh, options):
    """sum_t out_t = sum_t mean_i g_i^t - mean_i E_i^T holds for the extensions too."""
    tx = lore_jax.greedylore(2, min_compression_rate=1.5, **options)
    check_telescoping(tx, mesh, seed=13, steps=30, atol=3e-4)


@pytest.mark.parametrize("options", [RANGE, TRACKED, {**PAPER, **GROUPED},
                                     {**TRACKED, **GROUPED}])
def test_compressed_step_contracts_in_expectation_with_stale_basis(options):
    """One compressed step from a basis and factor unrelated to the gradients:
    E||C(x) - x||^2 <= (1 - r/a)||x||^2 over the group (spec section 2.2)."""
    rng = np.random.default_rng(0)
    k, a, b, rank = 3, 16, 40, 4
    basis = np.stack([np.linalg.qr(rng.standard_normal((a, a)))[0] for _ in range(k)])
    factor = rng.standard_normal((k, b, rank))
    x = rng.standard_normal((k, a, b)) * np.linspace(3, 0.1, a)[:, None]
    x[0] *= 4.0                                      # unequal energies across the group
    params = {f"w{i}": jnp.zeros((a, b)) for i in range(k)}
    grads = {f"w{i}": jnp.asarray(x[i], jnp.float32) for i in range(k)}

    def one_step(key):
        tx = lore_jax.greedylore(rank, update_interval=10 ** 6, key=key, axis_name=None,
                                 **options)
        state = tx.init(params)
        tracks = greedylore_bases(state)[0].factor is not None
        state = with_greedylore_stack(state, basis=jnp.asarray(basis, jnp.float32),
                                      factor=jnp.asarray(factor, jnp.float32) if tracks
                                      else None)
        state = state._replace(count=jnp.ones([], jnp.int32))   # past the first refresh
        out, _ = tx.update(grads, state)
        err = sum(jnp.sum((out[n] - grads[n]) ** 2) for n in grads)
        return err / np.sum(x ** 2)

    keys = jax.random.split(jax.random.PRNGKey(0), 300)
    ratios = np.asarray(jax.jit(jax.vmap(one_step))(keys))
    assert ratios.mean() + 3 * ratios.std() / np.sqrt(len(ratios)) <= 1 - rank / a
    assert ratios.max() <= 1 + 1e-5


def test_range_tracking_contracts_even_orthogonal_to_its_factor():
    """The worst case of range tracking: a gradient orthogonal to the warm start Q. Only the
    fresh probe column finds it, and the documented bound is E||C(x) - x||^2 <= (1 -
    delta) ||x||^2 with delta = r / ((r + p)(b - r))."""
    rng = np.random.default_rng(1)
    a, b, rank, p = 8, 24, 2, 1
    factor = np.linalg.qr(rng.standard_normal((b, b)))[0]
    q, rest = factor[:, :rank], factor[:, rank:]
    x = rng.standard_normal((a, b - rank)) @ rest.T           # x q = 0
    params = {"w": jnp.zeros((a, b))}

    def one_step(key):
        tx = lore_jax.greedylore(rank, key=key, axis_name=None, num_probes=p)
        state = tx.init(params)
        state = with_greedylore_stack(state, factor=jnp.asarray(q, jnp.float32)[None])
        state = state._replace(count=jnp.ones([], jnp.int32))
        out, _ = tx.update({"w": jnp.asarray(x, jnp.float32)}, state)
        return jnp.sum((out["w"] - x) ** 2) / np.sum(x ** 2)

    ratios = np.asarray(jax.jit(jax.vmap(one_step))(jax.random.split(jax.random.PRNGKey(2),
                                                                     300)))
    delta = rank / ((rank + p) * (b - rank))
    assert ratios.mean() + 3 * ratios.std() / np.sqrt(len(ratios)) <= 1 - delta
    assert ratios.max() <= 1 + 1e-5


def test_compiled_hlo_all_reduces_exactly_the_reported_payload(mesh):
    """The tracked branch adds exactly one a x r float32 all-reduce per matrix."""
    rng = np.random.default_rng(14)
    params = make_params(rng)
    tx = lore_jax.greedylore(2, update_interval=6, warmup_steps=1, min_compression_rate=1.5,
                             track_every=2, **RANGE)
    state, step = init_and_step(tx, params, mesh)
    g = put(device_grads(rng, params), mesh)
    text = step.lower(g, state).compile().as_text()
    cols = accounting.hlo_collectives(text)
    # The phase switch (the state's keep-or-revert conditionals have two branches).
    (branches,) = [b for b in accounting.hlo_conditional_branches(text) if len(b) == 4]
    bits = [sum(c["bits"] for c in cols if c["computation"] == b) for b in branches]
    outside = sum(c["bits"] for c in cols if c["computation"] not in branches)
    groups = [(2, 6, 10), (1, 4, 18), (1, 8, 12)]   # (k, a, b), r = 2
    assert outside == (10 + 12) * 32
    assert bits[0] == bits[1] == sum(k * a * b * 32 for k, a, b in groups)
    assert bits[2] == sum(k * (a + 2 * b) * 32 for k, a, b in groups)
    assert bits[3] == bits[2] + sum(k * a * 2 * 32 for k, a, b in groups)
    # warm-up, refresh, then compressed steps 1..5 of the cycle: tracked on 1, 3, 5.
    expected = [0, 1, 3, 2, 3, 2, 3]
    for phase in expected:
        before = accounting.counter_value(state.bits_sent)
        _, state = step(g, state)
        assert accounting.counter_value(state.bits_sent) - before == outside + bits[phase]
