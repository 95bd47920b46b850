"""lore_jax.diloco against NumPy references of DiLoCo's Algorithm 1, and its plumbing."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import lore_jax
from lore_jax import compressors
from lore_jax.training import TrainConfig, train

N = 8
SHAPES = {"w": (6, 4), "b": (4,)}


def dense_mean():
    return lore_jax.compressed_mean(compressors.identity(), error_feedback=None)


def linear_problem(seed=0, n=8 * N):
    """Least squares ``x @ w + b ~ y`` with a batch of ``n`` examples."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 6)).astype(np.float32)
    y = (x @ rng.standard_normal((6, 4)) + 0.1 * rng.standard_normal((n, 4))).astype(np.float32)
    return x, y


def loss_fn(p, batch):
    x, y = batch
    return jnp.mean((x @ p["w"] + p["b"] - y) ** 2)


def np_grad(p, x, y):
    r = x @ p["w"] + p["b"] - y
    return {"w": 2 * x.T @ r / r.size, "b": 2 * r.sum(0) / r.size}


class NumpyAdam:
    def __init__(self, lr, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.b1, self.b2, self.eps, self.t = lr, b1, b2, eps, 0
        self.m = self.v = None

    def step(self, g):
        if self.m is None:
            self.m = {k: np.zeros_like(v) for k, v in g.items()}
            self.v = {k: np.zeros_like(v) for k, v in g.items()}
        self.t += 1
        out = {}
        for k in g:
            self.m[k] = self.b1 * self.m[k] + (1 - self.b1) * g[k]
            self.v[k] = self.b2 * self.v[k] + (1 - self.b2) * g[k] ** 2
            mhat, vhat = self.m[k] / (1 - self.b1 ** self.t), self.v[k] / (1 - self.b2 ** self.t)
            out[k] = -self.lr * mhat / (np.sqrt(vhat) + self.eps)
        return out


def reference(x, y, steps, h, inner_lr, outer_lr, momentum, compress=None, decay=1.0):
    """DiLoCo (Algorithm 1) in NumPy, float64: per-device Adam kept across rounds, outer
    SGD with Nesterov momentum (optax's form); ``compress(leaf) -> kept`` with EF14 whose
    memory is multiplied by ``decay`` each round."""
    theta = {"w": np.zeros((6, 4)), "b": np.zeros(4)}
    local = [dict(theta) for _ in range(N)]
    adams = [NumpyAdam(inner_lr) for _ in range(N)]
    errors = [{k: np.zeros_like(v) for k, v in theta.items()} for _ in range(N)]
    mom = {k: np.zeros_like(v) for k, v in theta.items()}
    xs, ys = x.reshape(N, -1, 6).astype(np.float64), y.reshape(N, -1, 4).astype(np.float64)
    history = []
    for t in range(1, steps + 1):
        for i in range(N):
            u = adams[i].step(np_grad(local[i], xs[i], ys[i]))
            local[i] = {k: local[i][k] + u[k] for k in theta}
        if t % h == 0:
            sent = []
            for i in range(N):
                d = {k: theta[k] - local[i][k] + decay * errors[i][k] for k in theta}
                c = {k: compress(d[k]) for k in theta} if compress else d
                errors[i] = {k: d[k] - c[k] for k in theta}
                sent.append(c)
            delta = {k: np.mean([c[k] for c in sent], 0) for k in theta}
            mom = {k: momentum * mom[k] + delta[k] for k in theta}
            step = {k: delta[k] + momentum * mom[k] for k in theta} if momentum else delta
            theta = {k: theta[k] - outer_lr * step[k] for k in theta}
            local = [dict(theta) for _ in range(N)]
        history.append(theta)
    return history


def run(tx, mesh, x, y, steps):
    train_ = lore_jax.data_parallel(loss_fn, tx, mesh)
    params = {"w": jnp.zeros((6, 4)), "b": jnp.zeros(4)}
    state = train_.init(params)
    history = []
    for _ in range(steps):
        params, state, _ = train_.step(params, state, (x, y))
        history.append(jax.device_get(params))
    return history, state


def test_dense_rounds_equal_the_numpy_algorithm(mesh):
    """Inner Adam (its state kept across rounds), the dense mean, outer Nesterov SGD: the
    shared parameters after every step, over three rounds of 3 steps."""
    x, y = linear_problem()
    tx = lore_jax.diloco(optax.adam(0.05), optax.sgd(0.7, momentum=0.9, nesterov=True),
                         sync_every=3)
    got, state = run(tx, mesh, x, y, 9)
    want = reference(x, y, 9, 3, 0.05, 0.7, 0.9)
    for t, (g, w) in enumerate(zip(got, want, strict=True)):
        for k in SHAPES:
            np.testing.assert_allclose(g[k], w[k], rtol=2e-4, atol=1e-6, err_msg=f"{k} {t}")
    assert not np.allclose(want[1]["w"], want[2]["w"])      # a round (step 3) moved them
    np.testing.assert_array_equal(got[3]["w"], got[4]["w"])  # steps 4, 5 did not
    # Bits: one dense all-reduce per round against one per step.
    dense_bits = 32 * sum(int(np.prod(s)) for s in SHAPES.values())
    assert lore_jax.communication(state) == {"bits_sent": 3 * dense_bits,
                                             "bits_dense": 9 * dense_bits}


@pytest.mark.parametrize("decay", [1.0, 0.5])
def test_compressed_rounds_carry_error_feedback(mesh, decay):
    """Top-2 of every leaf with EF14 memory carried from round to round (decayed by
    ``error_decay``, SparseLoCo's form), outer SGD 1.0."""
    x, y = linear_problem(1)
    k = 2

    def top(v):
        flat = v.ravel()
        keep = np.zeros_like(flat)
        idx = np.argsort(-np.abs(flat))[:k]
        keep[idx] = flat[idx]
        return keep.reshape(v.shape)

    tx = lore_jax.diloco(optax.adam(0.05), optax.sgd(1.0), sync_every=2,
                         mean=lore_jax.compressed_mean(compressors.top_k(k),
                                                       error_decay=decay))
    got, state = run(tx, mesh, x, y, 8)
    want = reference(x, y, 8, 2, 0.05, 1.0, 0.0, compress=top, decay=decay)
    for t, (g, w) in enumerate(zip(got, want, strict=True)):
        for name in SHAPES:
            np.testing.assert_allclose(g[name], w[name], rtol=2e-4, atol=1e-6,
                                       err_msg=f"{name} {t}")
    # Four rounds of what compressed_mean all-gathers per leaf: k float32 values and the
    # k indices packed into 32-bit words (5 bits each for w's 24 entries, 2 for b's 4).
    per_round = sum(32 * k + 32 * -(-k * bits // 32) for bits in (5, 2))
    assert lore_jax.communication(state)["bits_sent"] == 4 * per_round
    # The memory is per device and differs between devices.
    err = np.asarray(state.mean_state.error["w"])
    assert err.shape == (N, 6, 4) and not np.allclose(err[0], err[1])


def test_one_step_rounds_are_data_parallel_sgd(mesh):
    """H = 1, inner SGD, outer SGD(1): the mean of the devices' SGD steps, which is dense
    data-parallel SGD."""
    x, y = linear_problem(2)
    got, _ = run(lore_jax.diloco(optax.sgd(0.1), optax.sgd(1.0), sync_every=1), mesh, x, y, 4)
    want, _ = run(optax.chain(dense_mean(), optax.sgd(0.1)), mesh, x, y, 4)
    for g, w in zip(got, want, strict=True):
        for k in SHAPES:
            np.testing.assert_allclose(g[k], w[k], rtol=1e-5, atol=1e-7)


def test_a_non_finite_inner_step_is_skipped_on_its_device(mesh):
    """A NaN in device 3's shard: that device skips the step, the others go on, the
    round's mean stays finite."""
    x, y = linear_problem(3)
    x[3 * 8] = np.nan                                   # the first example of device 3
    tx = lore_jax.diloco(optax.sgd(0.1), optax.sgd(1.0), sync_every=2)
    got, state = run(tx, mesh, x, y, 2)
    assert all(np.isfinite(v).all() for v in got[-1].values())
    np.testing.assert_array_equal(np.asarray(state.nonfinite_steps), [0, 0, 0, 2, 0, 0, 0, 0])
    # The round's mean counted device 3's pseudo-gradient as zero: it never moved.
    xs, ys = x.reshape(N, -1, 6), y.reshape(N, -1, 4)
    delta = {k: np.zeros(s) for k, s in SHAPES.items()}
    for i in (0, 1, 2, 4, 5, 6, 7):
        p = {k: np.zeros(s) for k, s in SHAPES.items()}
        for _ in range(2):
            g = np_grad(p, xs[i].astype(np.float64), ys[i].astype(np.float64))
            p = {k: p[k] - 0.1 * g[k] for k in p}
        delta = {k: delta[k] - p[k] / N for k in p}
    np.testing.assert_allclose(got[-1]["w"], -delta["w"], rtol=1e-4, atol=1e-6)


def test_runs_under_pmap():
    """Under pmap (each device its own state), two steps of inner SGD and one round."""
    tx = lore_jax.diloco(optax.sgd(0.5), optax.sgd(1.0), sync_every=2, axis_name="i",
                         mean=lore_jax.compressed_mean(compressors.identity(),
                                                       error_feedback=None, axis_name="i"))
    params = {"w": jnp.ones((3, 2))}
    g = np.random.default_rng(5).standard_normal((2, N, 3, 2)).astype(np.float32)
    replicate = jax.pmap(lambda _: params)(jnp.arange(N))
    state = jax.pmap(lambda _: tx.init(params))(jnp.arange(N))
    step = jax.pmap(lambda g, s, p: tx.update(g, s, p), axis_name="i")
    out, state = step({"w": g[0]}, state, replicate)
    assert not np.asarray(out["w"]).any()
    out, state = step({"w": g[1]}, state, replicate)
    want = -0.5 * g.sum(0).mean(0)
    for copy in np.asarray(out["w"]):
        np.testing.assert_allclose(copy, want, rtol=1e-5, atol=1e-6)


def test_layout_keeps_the_devices_own_copies_per_device(mesh):
    tx = lore_jax.diloco(optax.adam(1e-3), optax.sgd(0.7, momentum=0.9, nesterov=True),
                         sync_every=4, mean=lore_jax.greedylore(2))
    state = lore_jax.sharded_init(tx, {"w": jnp.zeros((16, 8))}, mesh)
    specs = lore_jax.state_specs(state)
    assert specs.local["w"] == P("data") and state.local["w"].shape == (N, 16, 8)
    assert jax.tree.leaves(specs.inner_state, is_leaf=lambda s: isinstance(s, P)) == \
        [P("data")] * 3
    assert specs.mean_state.error["w"] == P("data")
    assert specs.outer_state[0].trace["w"] == P() and specs.count == P()
    local = jax.jit(jax.shard_map(lambda s: lore_jax.local_params(s, None)["w"], mesh=mesh,
                                  in_specs=(specs,), out_specs=P("data")))(state)
    assert local.shape == (N * 16, 8)


def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="sync_every must be an integer >= 1.*got 0"):
        lore_jax.diloco(optax.sgd(0.1), optax.sgd(1.0), sync_every=0)
    with pytest.raises(TypeError, match="inner must be an optax GradientTransformation"):
        lore_jax.diloco(0.1, optax.sgd(1.0), sync_every=2)
    with pytest.raises(ValueError, match=r"error_decay must be a number in \[0, 1\].*got 1.5"):
        lore_jax.compressed_mean(compressors.top_k(2), error_decay=1.5)
    with pytest.raises(ValueError, match="applies to EF14's memory only.*'ef21'"):
        lore_jax.compressed_mean(compressors.top_k(2), error_feedback="ef21", error_decay=0.9)
    with pytest.raises(TypeError, match="mean must be"):
        lore_jax.diloco(optax.sgd(0.1), optax.sgd(1.0), sync_every=2, mean="greedylore")
    tx = lore_jax.diloco(optax.sgd(0.1), optax.sgd(1.0), sync_every=2, axis_name=None,
                         mean=lore_jax.compressed_mean(compressors.identity(),
                                                       error_feedback=None, axis_name=None))
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"update needs the shared parameters"):
        tx.update(params, tx.init(params))
    with pytest.raises(ValueError, match="holds 2 diloco states"):
        lore_jax.local_params((tx.init(params), tx.init(params)), params)


SMALL = dict(task="digits", compressor="greedylore", rank=2, hidden=(32, 32), batch_size=32,
             optimizer="adam", learning_rate=0.01, eval_every=1000, progress=False,
             devices=4, sync_every=3)


def test_cli_run_resumes_mid_round_exactly(tmp_path):
    """A checkpoint at step 4 (one step into the second round, the devices' copies
    apart): the resumed run's losses and bits are the uninterrupted run's."""
    full = train(TrainConfig(steps=8, checkpoint_dir=str(tmp_path / "a"), checkpoint_every=4,
                             **SMALL))
    ckpt = tmp_path / "b"
    shutil.copytree(tmp_path / "a", ckpt)
    shutil.rmtree(ckpt / "8")
    resumed = train(TrainConfig(steps=8, checkpoint_dir=str(ckpt), resume=True, **SMALL))
    assert resumed.summary["start_step"] == 4
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history][4:]
    for k in ("bits_sent", "bits_dense", "test_loss"):
        assert resumed.summary[k] == full.summary[k], k
    assert full.summary["compression"] > 3           # one compressed mean every 3 steps


def test_cli_outer_defaults_follow_the_mean():
    """Nesterov 0.7 / 0.9 (DiLoCo's) for the dense mean; SGD 1.0 without momentum for a
    compressed one, whose error feedback takes the momentum's place; given values win."""
    def outer(**kw):
        c = TrainConfig(sync_every=5, **kw).resolved()
        return c.outer_learning_rate, c.outer_momentum

    assert outer(compressor="dense") == (0.7, 0.9)
    assert outer(compressor="greedylore") == outer(compressor="topk") == (1.0, 0.0)
    assert outer(compressor="greedylore", outer_momentum=0.5) == (1.0, 0.5)
