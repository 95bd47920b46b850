"""Tests for lore_jax.staleness: exact delayed sequences, per-device delays, state, A5 bound."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lore_jax import layout, problems, theory
from lore_jax.staleness import ReuseLastState, StaleState, reuse_last, stale


def _inputs(steps, seed=0):
    """A pytree of distinct updates per step: a scalar and a (2, 3) matrix."""
    rng = np.random.default_rng(seed)
    return [{"a": np.float32(rng.standard_normal()),
             "b": rng.standard_normal((2, 3)).astype(np.float32)} for _ in range(steps)]


def _run(tx, inputs):
    """All steps in one jitted lax.scan; returns per-step outputs, delays and final state."""
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *inputs)

    def body(state, u):
        out, state = tx.update(u, state)
        return state, (out, state.delay[0])

    state = tx.init(jax.tree.map(jnp.zeros_like, inputs[0]))
    state, (outs, delays) = jax.jit(lambda s: jax.lax.scan(body, s, stacked))(state)
    outs = jax.tree.map(np.asarray, outs)
    outs = [jax.tree.map(lambda x, k=k: x[k], outs) for k in range(len(inputs))]
    return outs, np.asarray(delays).tolist(), state


def _assert_tree_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


# ----------------------------------------------------------------------------- stale


@pytest.mark.parametrize("max_delay", [0, 1, 3, 6])
def test_fixed_schedule_matches_reference(max_delay):
    inputs = _inputs(15)
    outs, delays, state = _run(stale(max_delay), inputs)
    # Hand-written reference: the input max_delay steps ago, or the first one before that.
    expected = [inputs[max(0, k - max_delay)] for k in range(len(inputs))]
    for out, ref in zip(outs, expected, strict=True):
        _assert_tree_equal(out, ref)
    assert delays == [min(k, max_delay) for k in range(len(inputs))]
    assert int(state.count) == len(inputs)
    assert state.buffer["b"].shape == (1, max_delay + 1, 2, 3)


def test_random_schedule_uses_recorded_delays_within_bounds():
    tau, steps = 3, 400
    inputs = _inputs(steps, seed=1)
    outs, delays, _ = _run(stale(tau, schedule="random", key=5), inputs)
    for k, (out, d) in enumerate(zip(outs, delays, strict=True)):
        assert 0 <= d <= min(k, tau)
        _assert_tree_equal(out, inputs[k - d])
    # Uniform on {0..tau} once the buffer is full: each value about 1/4 of the time.
    counts = np.bincount(delays[tau:], minlength=tau + 1)
    assert np.all(np.abs(counts / counts.sum() - 1 / (tau + 1)) < 0.07), counts
    # Same key, same delays; another key, other delays.
    assert _run(stale(tau, schedule="random", key=5), inputs[:40])[1] == delays[:40]
    assert _run(stale(tau, schedule="random", key=6), inputs[:40])[1] != delays[:40]


def test_dtypes_are_kept():
    tx = stale(2)
    params = {"w": jnp.zeros((3,), jnp.bfloat16)}
    state = tx.init(params)
    assert state.buffer["w"].dtype == jnp.bfloat16
    out, state = tx.update({"w": jnp.ones((3,), jnp.bfloat16)}, state)
    assert out["w"].dtype == jnp.bfloat16
    assert state.count.dtype == jnp.int32 and state.delay.dtype == jnp.int32


def _sharded_run(mesh, tx, steps, tau):
    """Runs tx under shard_map on 8 devices; device i's input at step k is 100 i + k."""
    params = {"w": jnp.zeros((4,))}
    state = layout.sharded_init(tx, params, mesh)
    specs = layout.state_specs(state, "data")

    def step(g, s):
        out, s = tx.update({"w": g[0]}, s)
        return out["w"][None], s

    f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("data"), specs),
                              out_specs=(P("data"), specs)))
    sharding = NamedSharding(mesh, P("data"))
    outs, delays = [], []
    for k in range(steps):
        g = jnp.broadcast_to(100.0 * jnp.arange(8.0)[:, None] + k, (8, 4))
        out, state = f(jax.device_put(g, sharding), state)
        outs.append(np.asarray(out)[:, 0])
        delays.append(np.asarray(state.delay))
    return np.array(outs), np.array(delays), state, specs


def test_random_delays_differ_per_device_under_shard_map(mesh):
    tau, steps = 4, 12
    tx = stale(tau, schedule="random", axis_name="data", key=3)
    outs, delays, state, specs = _sharded_run(mesh, tx, steps, tau)
    assert delays.shape == (steps, 8)
    # Each device applies its own input from delays[k, i] steps ago.
    k = np.arange(steps)[:, None]
    np.testing.assert_array_equal(outs, 100.0 * np.arange(8.0) + (k - delays))
    assert np.all((delays >= 0) & (delays <= np.minimum(k, tau)))
    # The devices draw independent delays: they differ on most steps.
    assert np.mean([len(set(row)) > 1 for row in delays[tau:]]) > 0.8
    assert state.buffer["w"].shape == (8, tau + 1, 4)
    assert specs.buffer["w"] == P("data") and specs.delay == P("data")
    assert specs.count == P() and specs.key == P()


def test_fixed_delays_agree_across_devices_under_shard_map(mesh):
    outs, delays, _, _ = _sharded_run(mesh, stale(2, axis_name="data"), 6, 2)
    k = np.arange(6)[:, None]
    np.testing.assert_array_equal(delays, np.broadcast_to(np.minimum(k, 2), (6, 8)))
    np.testing.assert_array_equal(outs, 100.0 * np.arange(8.0) + np.maximum(k - 2, 0))


def test_state_is_a_pytree_that_round_trips():
    tau = 3
    tx = stale(tau, schedule="random", key=1)
    inputs = _inputs(10, seed=2)
    state = tx.init(jax.tree.map(jnp.zeros_like, inputs[0]))
    update = jax.jit(tx.update)
    for u in inputs[:5]:
        _, state = update(u, state)
    assert isinstance(state, StaleState)
    leaves, treedef = jax.tree.flatten(state)
    rebuilt = jax.tree.unflatten(treedef, leaves)
    _assert_tree_equal(rebuilt, state)
    # A host copy (a checkpoint) resumes exactly where the live state would have gone.
    restored = jax.tree.map(jnp.asarray, jax.device_get(state))
    live, resumed = state, restored
    for u in inputs[5:]:
        a, live = update(u, live)
        b, resumed = update(u, resumed)
        _assert_tree_equal(a, b)
    _assert_tree_equal(live, resumed)


@pytest.mark.parametrize("make", [stale, reuse_last])
@pytest.mark.parametrize("kwargs, error, name", [
    ({"max_delay": -1}, ValueError, "max_delay"),
    ({"max_delay": 1.5}, TypeError, "max_delay"),
    ({"max_delay": True}, TypeError, "max_delay"),
    ({"max_delay": 2, "schedule": "poisson"}, ValueError, "schedule"),
    ({"max_delay": 2, "key": jnp.zeros((3,), jnp.uint32)}, ValueError, "key"),
])
def test_bad_arguments_name_the_parameter(make, kwargs, error, name):
    with pytest.raises(error, match=name):
        make(**kwargs)


def test_unbound_axis_name_is_reported():
    tx = stale(2, schedule="random", axis_name="data")
    state = tx.init(jnp.zeros(3))
    with pytest.raises(ValueError, match="axis_name"):
        tx.update(jnp.ones(3), state)


# ----------------------------------------------------------------------------- A5 end to end


def _rand_k(keep, key):
    """A worker-local unbiased random-k compressor (alpha = d / keep) as an optax transform."""

    def init_fn(params):
        del params
        return (jnp.zeros([], jnp.int32), key)

    def update_fn(updates, state, params=None):
        count, k0 = state
        sub = jax.random.fold_in(k0, count)

        def leaf(u):
            idx = jax.lax.top_k(jax.random.uniform(sub, (u.size,)), keep)[1]
            mask = jnp.zeros(u.size, u.dtype).at[idx].set(1).reshape(u.shape)
            return (u.size / keep) * mask * u

        return jax.tree.map(leaf, updates), (count + 1, k0)

    return optax.GradientTransformation(init_fn, update_fn)


@pytest.mark.parametrize("schedule", ["fixed", "random"])
def test_stale_then_compress_meets_a5_bound(schedule):
    """optax.chain(stale(tau), rand-k, sgd(gamma_A5)): the mean gap over seeds stays under
    the A5 bound (1 - gamma mu)^k (f(x_0) - f*) (spec §5.5)."""
    p = problems.make_least_squares(100, 20, 1, kappa=10.0, noise=0.1, seed=0)
    tau, keep, steps, seeds = 8, 10, 400, 32
    alpha = p.dim / keep
    g = theory.stale_cgd(p.L, p.mu, alpha, tau)
    H = jnp.asarray(p.hessian_bound(), jnp.float32)
    c = jnp.asarray(p.A.T @ p.b, jnp.float32)
    x_star = jnp.asarray(p.x_star, jnp.float32)
    tx = optax.chain(stale(tau, schedule=schedule), _rand_k(keep, jax.random.PRNGKey(0)),
                     optax.sgd(g.step_size))

    def run(seed):
        key_delay, key_comp = jax.random.split(jax.random.PRNGKey(seed))
        x0 = jnp.zeros(p.dim)
        s_stale, _, s_sgd = tx.init(x0)
        state = (s_stale._replace(key=key_delay), (jnp.zeros([], jnp.int32), key_comp), s_sgd)

        def body(carry, _):
            x, state = carry
            u, state = tx.update(H @ x - c, state, x)
            x = optax.apply_updates(x, u)
            d = x - x_star
            return (x, state), 0.5 * d @ H @ d

        _, gaps = jax.lax.scan(body, (x0, state), None, length=steps)
        return gaps

    gaps = np.asarray(jax.jit(jax.vmap(run))(jnp.arange(seeds)), np.float64).T
    gap0 = float(0.5 * p.x_star @ p.hessian_bound() @ p.x_star)
    bound = g.bound(np.arange(1, steps + 1), gap0)
    mean = gaps.mean(axis=1)
    se = gaps.std(axis=1, ddof=1) / math.sqrt(seeds)
    assert np.all(mean <= bound + 3 * se + 1e-6 * gap0)
    assert mean[-1] < 0.1 * gap0  # and it does converge


# ----------------------------------------------------------------------------- reuse_last


def test_reuse_last_fixed_matches_reference():
    tau = 3
    inputs = _inputs(14, seed=3)
    outs, delays, _ = _run(reuse_last(tau), inputs)
    # Device 0 reports at k = 0, tau + 1, 2 (tau + 1), ...
    expected_delays = [k % (tau + 1) for k in range(14)]
    assert delays == expected_delays
    for k, out in enumerate(outs):
        _assert_tree_equal(out, inputs[k - expected_delays[k]])


def test_reuse_last_random_is_a_sawtooth_within_bounds():
    tau = 4
    inputs = _inputs(300, seed=4)
    outs, delays, state = _run(reuse_last(tau, schedule="random", key=2), inputs)
    assert isinstance(state, ReuseLastState)
    assert delays[0] == 0
    for k in range(1, 300):
        assert delays[k] in (0, delays[k - 1] + 1) and delays[k] <= tau
        _assert_tree_equal(outs[k], inputs[k - delays[k]])
    # Gaps between reports are uniform on {1, ..., tau + 1}.
    reports = np.flatnonzero(np.array(delays) == 0)
    gaps = np.diff(reports)
    assert set(gaps.tolist()) == set(range(1, tau + 2))


def test_reuse_last_round_robin_under_shard_map(mesh):
    tau, steps = 7, 20
    outs, delays, state, specs = _sharded_run(mesh, reuse_last(tau, axis_name="data"), steps, tau)
    # After step 0 (everyone reports), exactly one of the 8 = tau + 1 devices reports per step.
    assert np.all(delays[0] == 0)
    np.testing.assert_array_equal((delays[1:] == 0).sum(axis=1), 1)
    assert delays.max() == tau
    k = np.arange(steps)[:, None]
    np.testing.assert_array_equal(outs, 100.0 * np.arange(8.0) + (k - delays))
    assert specs.message["w"] == P("data") and specs.deadline == P("data")


def test_reuse_last_returns_the_stored_compressed_message():
    """After a random compressor, reused steps return the stored message bit for bit: the
    compression noise is not re-sampled (spec §5.6)."""
    tau = 2
    tx = optax.chain(_rand_k(2, jax.random.PRNGKey(1)), reuse_last(tau))
    state = tx.init(jnp.zeros(8))
    update = jax.jit(tx.update)
    g = jnp.arange(1.0, 9.0)  # the same gradient every step
    outs = []
    for _ in range(6):
        out, state = update(g, state)
        outs.append(np.asarray(out))
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    assert not np.array_equal(outs[0], outs[3])  # a fresh report, with fresh randomness
    np.testing.assert_array_equal(outs[3], outs[5])
