"""Tests of DeMo on 8 devices against a NumPy reference written from the algorithm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.fft
from helpers import put
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lore_jax
from lore_jax.accounting import hlo_collectives

N = 8
CHUNK = 8
# (12, 40) cuts into 6 x 8 chunks, (3, 4, 10) is the matrix (12, 10) in 6 x 5 chunks,
# (40,) into 8-entry chunks, and the scalar is one chunk of one coefficient.
SHAPES = {"w": (12, 40), "c": (3, 4, 10), "b": (40,), "s": ()}


# ----------------------------------------------------------------------------- reference


def largest_divisor(n: int, most: int) -> int:
    return max(d for d in range(1, n + 1) if n % d == 0 and d <= most)


def matrix(x: np.ndarray) -> np.ndarray:
    """A leaf as the matrix DeMo chunks; vectors and scalars stay one-dimensional."""
    return x.reshape(-1, x.shape[-1]) if x.ndim >= 2 else x.reshape(-1)


def blocks(shape: tuple[int, ...]) -> list[tuple[slice, ...]]:
    """The chunks of a (1-D or 2-D) array, as index tuples."""
    sizes = [largest_divisor(n, CHUNK) for n in shape]
    grids = [[slice(a, a + s) for a in range(0, n, s)] for n, s in zip(shape, sizes, strict=True)]
    if len(shape) == 1:
        return [(i,) for i in grids[0]]
    return [(i, j) for i in grids[0] for j in grids[1]]


def dct(x: np.ndarray) -> np.ndarray:
    return scipy.fft.dctn(x, norm="ortho")


def idct(c: np.ndarray) -> np.ndarray:
    return scipy.fft.idctn(c, norm="ortho")


class Reference:
    """DeMo in float64 on N simulated devices, one leaf at a time."""

    def __init__(self, lr, decay, topk, weight_decay, sign_only):
        self.lr, self.decay, self.topk = lr, decay, topk
        self.wd, self.sign_only = weight_decay, sign_only
        self.m = {k: np.zeros((N,) + s) for k, s in SHAPES.items()}

    def step(self, grads: dict, params: dict) -> dict:
        return {k: self.leaf(k, grads[k], params[k]) for k in SHAPES}

    def leaf(self, name, g, p):
        m = self.m[name] = self.decay * self.m[name] + self.lr * g
        shape = matrix(p).shape
        sums, senders = {}, {}
        for i in range(N):
            mi = matrix(m[i]).copy()
            for n, b in enumerate(blocks(shape)):
                c = dct(mi[b]).ravel()
                keep = np.argsort(-np.abs(c), kind="stable")[:self.topk]
                kept = np.zeros_like(c)
                kept[keep] = c[keep]
                mi[b] -= idct(kept.reshape(mi[b].shape))
                sent = np.where(c[keep] < 0, -1.0, 1.0) if self.sign_only else c[keep]
                for q, v in zip(keep, sent, strict=True):
                    sums[n, q] = sums.get((n, q), 0.0) + v
                    senders[n, q] = senders.get((n, q), 0) + 1
            m[i] = mi.reshape(m[i].shape)
        decoded = np.zeros(shape)
        for n, b in enumerate(blocks(shape)):
            c = np.zeros(decoded[b].size)
            for q in range(c.size):
                if (n, q) in sums:
                    c[q] = sums[n, q] / senders[n, q]
            decoded[b] = idct(c.reshape(decoded[b].shape))
        update = -self.lr * self.wd * matrix(p) - self.lr * np.sign(decoded)
        return update.reshape(p.shape)


def sent_bits(topk: int, sign_only: bool) -> int:
    """Bits one device sends per step: per kept coefficient, its index and value."""
    total = 0
    for s in SHAPES.values():
        for b in blocks(matrix(np.zeros(s)).shape):
            size = int(np.prod([x.stop - x.start for x in b]))
            index = 8 if size <= 256 else 16
            total += min(topk, size) * (index + (1 if sign_only else 32))
    return total


# ----------------------------------------------------------------------------- helpers


def make_params(rng) -> dict:
    return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in SHAPES.items()}


def device_grads(rng) -> dict:
    return {k: rng.standard_normal((N,) + s).astype(np.float32) for k, s in SHAPES.items()}


def per_device_step(tx, mesh, state):
    """A jitted step returning every device's own copy of the update (leading axis N)."""
    specs = lore_jax.state_specs(state, "data")

    def step(g, s, p):
        u, s = tx.update(jax.tree.map(lambda x: x[0], g), s, p)
        return jax.tree.map(lambda x: x[None], u), s

    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("data"), specs, P()),
                                 out_specs=(P("data"), specs)))


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("topk, weight_decay, sign_only", [
    (5, 0.0, False), (5, 0.1, False), (12, 0.0, True), (5, 0.1, True),
])
def test_matches_the_numpy_reference_with_identical_replicas(mesh, topk, weight_decay,
                                                             sign_only):
    lr, decay = 0.01, 0.9
    tx = lore_jax.demo(lr, compression_decay=decay, compression_topk=topk,
                       compression_chunk=CHUNK, weight_decay=weight_decay, sign_only=sign_only)
    rng = np.random.default_rng(topk + 10 * sign_only)
    params = make_params(rng)
    state = lore_jax.sharded_init(tx, params, mesh)
    step = per_device_step(tx, mesh, state)
    ref = Reference(lr, decay, topk, weight_decay, sign_only)
    for _ in range(3):
        g = device_grads(rng)
        out, state = step(put(g, mesh), state, params)
        want = ref.step({k: v.astype(np.float64) for k, v in g.items()},
                        {k: np.asarray(v, np.float64) for k, v in params.items()})
        for k in SHAPES:
            copies = np.asarray(out[k])
            assert (copies == copies[0]).all(), k          # bit-identical replicas
            np.testing.assert_allclose(copies[0], want[k], rtol=1e-6, atol=1e-9, err_msg=k)
            np.testing.assert_allclose(np.asarray(state.momentum[k]), ref.m[k],
                                       rtol=1e-4, atol=1e-7, err_msg=k)
    assert lore_jax.communication(state) == {
        "bits_sent": 3 * sent_bits(topk, sign_only),
        "bits_dense": 3 * 32 * sum(int(np.prod(s)) for s in SHAPES.values())}


def test_runs_under_pmap():
    tx = lore_jax.demo(0.01, compression_topk=5, compression_chunk=CHUNK, axis_name="i")
    rng = np.random.default_rng(7)
    params = make_params(rng)
    state = jax.pmap(lambda _: tx.init(params))(jnp.arange(N))
    g = device_grads(rng)
    out, state = jax.pmap(tx.update, axis_name="i")(g, state)
    want = Reference(0.01, 0.999, 5, 0.0, False).step(
        {k: v.astype(np.float64) for k, v in g.items()},
        {k: np.asarray(v, np.float64) for k, v in params.items()})
    for k in SHAPES:
        copies = np.asarray(out[k])
        assert (copies == copies[0]).all(), k
        np.testing.assert_allclose(copies[0], want[k], rtol=1e-6, atol=1e-9, err_msg=k)


def test_model_sharded_leaf_is_sent_shard_by_shard():
    """On a ("data", "model") mesh each model shard of a matrix is compressed over the
    data axis on its own: the update equals a data-only run on that shard."""
    devices = jax.devices()
    mesh2 = jax.make_mesh((4, 2), ("data", "model"))
    tx = lore_jax.demo(0.01, compression_topk=3, compression_chunk=CHUNK)
    params = {"w": jax.device_put(jnp.zeros((12, 40)), NamedSharding(mesh2, P(None, "model")))}
    state = lore_jax.sharded_init(tx, params, mesh2)
    assert lore_jax.state_specs(state).momentum["w"] == P(("data", "model"))
    g = np.random.default_rng(4).standard_normal((4, 12, 40)).astype(np.float32)

    def run(mesh, state, g, g_spec, u_spec):
        specs = lore_jax.state_specs(state)
        step = jax.jit(jax.shard_map(lambda g, s: tx.update({"w": g[0]}, s), mesh=mesh,
                                     in_specs=(g_spec, specs), out_specs=({"w": u_spec}, specs)))
        return np.asarray(step(jax.device_put(g, NamedSharding(mesh, g_spec)), state)[0]["w"])

    both = run(mesh2, state, g, P("data", None, "model"), P(None, "model"))
    mesh1 = jax.make_mesh((4,), ("data",), devices=devices[:4])
    state1 = lore_jax.sharded_init(tx, {"w": jnp.zeros((12, 20))}, mesh1)
    for half in (slice(0, 20), slice(20, 40)):
        np.testing.assert_array_equal(both[:, half],
                                      run(mesh1, state1, g[:, :, half], P("data"), P()))


def test_one_all_gather_carries_the_payload(mesh):
    tx = lore_jax.demo(0.01, compression_topk=5, compression_chunk=CHUNK)
    params = make_params(np.random.default_rng(0))
    state = lore_jax.sharded_init(tx, params, mesh)
    g = put(device_grads(np.random.default_rng(1)), mesh)
    text = per_device_step(tx, mesh, state).lower(g, state, params).compile().as_text()
    (gather,) = hlo_collectives(text)
    assert gather["op"] == "all-gather"
    assert gather["bits"] == N * sent_bits(5, sign_only=False)


def test_trains_a_regression_through_data_parallel(mesh):
    rng = np.random.default_rng(0)
    teacher = 0.5 * rng.standard_normal((16, 4)).astype(np.float32)
    x = rng.standard_normal((256, 16)).astype(np.float32)
    batch = (x, x @ teacher)

    def loss_fn(params, batch):
        x, y = batch
        return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)

    tx = lore_jax.demo(0.02, compression_topk=8, compression_chunk=8)
    train = lore_jax.data_parallel(loss_fn, tx, mesh)
    params = {"w": jnp.zeros((16, 4)), "b": jnp.zeros(4)}
    opt_state = train.init(params)
    assert opt_state.momentum["w"].shape == (N, 16, 4)
    first = float(train.evaluate(params, batch))
    for _ in range(40):
        params, opt_state, _ = train.step(params, opt_state, batch)
    last = float(train.evaluate(params, batch))
    assert last < 0.1 * first, (first, last)       # about 0.035 of it
    comm = lore_jax.communication(opt_state)
    assert comm["bits_dense"] == 40 * 32 * (64 + 4)


def test_one_device_matches_the_reference_with_a_schedule():
    schedule = optax.linear_schedule(0.01, 0.005, 4)
    tx = lore_jax.demo(schedule, compression_decay=0.5, compression_topk=3,
                       compression_chunk=CHUNK, axis_name=None)
    params = {"b": jnp.zeros(40)}
    state, update = tx.init(params), jax.jit(tx.update)
    rng = np.random.default_rng(3)
    m = np.zeros(40)
    for t in range(3):
        g = rng.standard_normal(40)
        out, state = update({"b": jnp.asarray(g, jnp.float32)}, state)
        lr = float(schedule(t))
        m = 0.5 * m + lr * g
        decoded = np.zeros(40)
        for (b,) in blocks((40,)):
            c = dct(m[b])
            keep = np.argsort(-np.abs(c), kind="stable")[:3]
            kept = np.zeros_like(c)
            kept[keep] = c[keep]
            m[b] -= idct(kept)
            decoded[b] = idct(kept)
        np.testing.assert_allclose(out["b"], -lr * np.sign(decoded), rtol=1e-6)


@pytest.mark.parametrize("kwargs, name", [
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"compression_decay": 1.0}, "compression_decay"),
    ({"compression_decay": -0.1}, "compression_decay"),
    ({"compression_topk": 0}, "compression_topk"),
    ({"compression_topk": 2.5}, "compression_topk"),
    ({"compression_chunk": 0}, "compression_chunk"),
    ({"weight_decay": -1.0}, "weight_decay"),
    ({"sign_only": 1}, "sign_only"),
    ({"axis_name": ["data"]}, "axis_name"),
])
def test_bad_arguments_name_the_parameter(kwargs, name):
    args = {"learning_rate": 0.01, **kwargs}
    with pytest.raises(ValueError, match=name):
        lore_jax.demo(args.pop("learning_rate"), **args)


def test_weight_decay_needs_params_and_the_state_must_fit():
    tx = lore_jax.demo(0.01, weight_decay=0.1, axis_name=None)
    params = {"w": jnp.zeros((4, 4))}
    state = tx.init(params)
    with pytest.raises(ValueError, match="params"):
        tx.update(params, state)
    with pytest.raises(ValueError, match=r"\['w'\]"):
        tx.update({"w": jnp.zeros((4, 5))}, state, {"w": jnp.zeros((4, 5))})
