"""End-to-end: 8-device data-parallel MLP training, GreedyLore against a dense all-reduce."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lore_jax
from lore_jax import collectives

D_IN, HIDDEN, D_OUT, BATCH, STEPS = 32, 256, 8, 512, 400


def teacher_data(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy two-layer teacher: the best achievable MSE is the noise variance 0.25."""
    rng = np.random.default_rng(1234)  # the teacher is fixed; seed picks the samples
    w1 = rng.standard_normal((D_IN, 64)) / np.sqrt(D_IN)
    w2 = rng.standard_normal((64, D_OUT)) / 8
    x = np.random.default_rng(seed).standard_normal((n, D_IN))
    y = np.tanh(x @ w1) @ w2 + 0.5 * np.random.default_rng(seed + 1).standard_normal((n, D_OUT))
    return x.astype(np.float32), y.astype(np.float32)


def init_params(key: jax.Array) -> dict:
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w1": jax.random.normal(k1, (D_IN, HIDDEN)) / np.sqrt(D_IN), "b1": jnp.zeros(HIDDEN),
        "w2": jax.random.normal(k2, (HIDDEN, HIDDEN)) / np.sqrt(HIDDEN),
        "b2": jnp.zeros(HIDDEN),
        "w3": jax.random.normal(k3, (HIDDEN, D_OUT)) / np.sqrt(HIDDEN), "b3": jnp.zeros(D_OUT),
    }


def mse(p: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    h = jnp.tanh(h @ p["w2"] + p["b2"])
    return jnp.mean((h @ p["w3"] + p["b3"] - y) ** 2)


def dense_all_reduce() -> optax.GradientTransformation:
    """The baseline: a plain mean all-reduce of the local gradients."""
    return optax.GradientTransformation(
        lambda params: optax.EmptyState(),
        lambda updates, state, params=None: (collectives.pmean(updates, "data"), state),
    )


def train(tx: optax.GradientTransformation, mesh) -> tuple[float, dict]:
    params = jax.device_put(init_params(jax.random.PRNGKey(0)), NamedSharding(mesh, P()))
    state = lore_jax.sharded_init(tx, params, mesh)
    specs = lore_jax.state_specs(state, "data")

    def step(p, s, x, y):
        # The gradient of this device's own copy of the parameters: its local gradient.
        updates, s = tx.update(jax.grad(mse)(lore_jax.per_device(p), x, y), s, p)
        return optax.apply_updates(p, updates), s

    step = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), specs, P("data"), P("data")),
                                 out_specs=(P(), specs)))
    xs, ys = teacher_data(0, STEPS * BATCH)
    batch = NamedSharding(mesh, P("data"))
    for t in range(STEPS):
        sl = slice(t * BATCH, (t + 1) * BATCH)
        # Block every step: the CPU runtime's in-process collectives can starve when many
        # multi-device steps are queued on a 2-core machine.
        params, state = jax.block_until_ready(
            step(params, state, jax.device_put(xs[sl], batch), jax.device_put(ys[sl], batch)))
    x_test, y_test = teacher_data(99, 4096)
    return float(mse(jax.device_get(params), x_test, y_test)), lore_jax.communication(state)


@pytest.mark.slow
def test_greedylore_with_adam_matches_dense_loss_with_10x_fewer_bits(mesh):
    """SGD with momentum on the same teacher is the README quickstart's claim
    (tests/test_docs.py); this is Adam's."""
    dense_loss, _ = train(optax.chain(dense_all_reduce(), optax.adam(1e-3)), mesh)
    # The default, range tracking: measured 0.01% above the dense loss with SGD and 0.7%
    # with Adam, at 10.7x fewer bits. (The paper's settings, with each device compressing
    # its own gradient, ended 2.2% above dense with Adam here, 1.8% with two probes.)
    lore = lore_jax.greedylore(4, warmup_steps=5, axis_name="data")
    lore_loss, comm = train(optax.chain(lore, optax.adam(1e-3)), mesh)
    assert dense_loss < 0.3  # the dense run learned the teacher (noise floor 0.25)
    print(f"dense {dense_loss:.5f} greedylore {lore_loss:.5f} bits {comm}")
    assert lore_loss <= 1.02 * dense_loss, (lore_loss, dense_loss)
    assert comm["bits_dense"] >= 10 * comm["bits_sent"], comm
