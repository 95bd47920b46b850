"""Tests of compressed_mean on 8 devices: NumPy references, HLO collectives, error feedback."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import init_and_step, put
from jax.sharding import PartitionSpec as P

import lore_jax
from lore_jax import compressors as C
from lore_jax.accounting import counter_value, hlo_collectives
from lore_jax.compressed_mean import CompressedMeanState, compressed_mean

N = 8
# No word padding at these sizes: packed codes fill whole uint32 words, so the spec's
# bit counts and the collectives' buffer sizes agree.
PARAMS = {"w": jnp.zeros((8, 32)), "b": jnp.zeros((64,))}


# ----------------------------------------------------------------------------- helpers


def device_grads(seed: int, params=PARAMS, scale: float = 1.0) -> dict:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal((N,) + v.shape)).astype(np.float32)
            for k, v in params.items()}


def setup(comp, mesh, params=PARAMS, **kwargs):
    tx = compressed_mean(comp, axis_name="data", **kwargs)
    state, step = init_and_step(tx, params, mesh)
    return tx, state, step


def collectives_of(step, g, state) -> tuple[set, int]:
    cols = hlo_collectives(step.lower(g, state).compile().as_text())
    return {c["op"] for c in cols}, sum(c["bits"] for c in cols)


def np_top_k(v: np.ndarray, k: int) -> np.ndarray:
    flat = v.reshape(-1)
    idx = np.argsort(-np.abs(flat), kind="stable")[:k]
    out = np.zeros_like(flat)
    out[idx] = flat[idx]
    return out.reshape(v.shape)


# ------------------------------------------------------------------------------- tests


def test_identity_is_the_exact_mean(mesh):
    params = {**PARAMS, "h": jnp.zeros((4, 4), jnp.bfloat16)}
    _, state, step = setup(C.identity(), mesh, params)
    g = device_grads(0, params)
    g["h"] = g["h"].astype(jnp.bfloat16)
    g = put(g, mesh)
    out, new = step(g, state)
    for k in ("w", "b"):
        np.testing.assert_allclose(out[k], np.asarray(g[k]).mean(0), rtol=1e-6, atol=1e-7)
    assert out["h"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out["h"], np.float32),
                               np.asarray(g["h"], np.float32).mean(0), rtol=1e-2, atol=1e-2)
    for e in jax.tree.leaves(new.error):
        np.testing.assert_array_equal(e, 0.0)
    # One all-reduce of the dense gradients, in their own dtypes: bits_sent = bits_dense.
    # XLA:CPU widens a bfloat16 all-reduce to float32, so its HLO shows 32-bit words there.
    ops, bits = collectives_of(step, g, state)
    assert ops == {"all-reduce"}
    assert counter_value(new.bits_sent) == counter_value(new.bits_dense) == 32 * 320 + 16 * 16
    assert bits == 32 * 320 + 32 * 16


@pytest.mark.parametrize("mode", ["ef14", "ef21"])
def test_top_k_matches_numpy_reference(mesh, mode):
    k = 16
    _, state, step = setup(C.top_k(k), mesh, error_feedback=mode)
    e = {name: np.zeros((N,) + v.shape, np.float32) for name, v in PARAMS.items()}
    h = {name: np.zeros(v.shape, np.float32) for name, v in PARAMS.items()}
    for t in range(4):
        g = device_grads(t)
        out, state = step(put(g, mesh), state)
        for name in PARAMS:
            if mode == "ef14":   # compress g + e; e <- x - c; output mean c
                x = g[name] + e[name]
                c = np.stack([np_top_k(xi, k) for xi in x])
                e[name] = x - c
                want = c.mean(0)
            else:                # compress g - e; e <- e + c; h <- h + mean c, the output
                c = np.stack([np_top_k(xi, k) for xi in g[name] - e[name]])
                e[name] = e[name] + c
                h[name] = h[name] + c.mean(0)
                want = h[name]
            np.testing.assert_allclose(out[name], want, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(state.error[name], e[name], rtol=1e-5, atol=1e-6)
    if mode == "ef21":
        np.testing.assert_allclose(state.tracker["w"], h["w"], rtol=1e-5, atol=1e-6)
    # All-gathered: the HLO carries N payloads of k (32 + ceil(log2 d)) bits per leaf.
    spec = k * (32 + 8) + k * (32 + 6)
    ops, bits = collectives_of(step, put(device_grads(0), mesh), state)
    assert ops == {"all-gather"} and bits == N * spec
    assert counter_value(state.bits_sent) == 4 * spec
    assert counter_value(state.bits_dense) == 4 * 32 * (256 + 64)


def test_runs_under_pmap():
    tx = compressed_mean(C.top_k(16), axis_name="i")
    state = jax.pmap(lambda _: tx.init(PARAMS))(jnp.arange(N))
    g = device_grads(5)
    out, state = jax.pmap(tx.update, axis_name="i")(g, state)
    for name in PARAMS:
        c = np.stack([np_top_k(x, 16) for x in g[name]])
        np.testing.assert_allclose(out[name], np.broadcast_to(c.mean(0), out[name].shape),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(state.error[name][:, 0], g[name] - c, rtol=1e-5, atol=1e-6)


def np_powersgd(x: np.ndarray, q: np.ndarray, tall: bool) -> tuple:
    """One PowerSGD step of the device matrices ``x`` ``(N, rows, cols)`` from warm start
    ``q``: (mean output, local reconstructions, new ``q``), float64."""
    m = np.swapaxes(x, 1, 2) if tall else x                     # oriented (N, a, b)
    p_hat = np.linalg.qr(np.mean(m @ q, axis=0))[0]             # all-reduce #1
    q_i = np.swapaxes(m, 1, 2) @ p_hat                          # (N, b, r)
    q = q_i.mean(0)                                             # all-reduce #2
    c, want = p_hat @ np.swapaxes(q_i, 1, 2), p_hat @ q.T
    if tall:
        c, want = np.swapaxes(c, 1, 2), want.T
    return want, c, q


def group_slots(params: dict, by_shape: bool = True) -> dict[str, tuple[int, int]]:
    """Matrix leaf -> (group, position) of its state in a grouped compressor state: groups
    of the same oriented shape in the order of their first leaf (one per matrix
    without ``batch_by_shape``), matrices in leaf order."""
    groups, out = {}, {}
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        if x.ndim == 2:
            key = tuple(sorted(x.shape)) if by_shape else path
            g = groups.setdefault(key, [len(groups), 0])
            out[path[0].key] = (g[0], g[1])
            g[1] += 1
    return out


def check_powersgd(mesh, params, rank, steps=3, **kwargs):
    """compressed_mean(powersgd) against :func:`np_powersgd`, leaf by leaf; returns the
    compiled step's collectives and the final state."""
    _, state, step = setup(C.powersgd(rank), mesh, params, **kwargs)
    slots = group_slots(params, kwargs.get("batch_by_shape", True))
    mats = list(slots)

    def q_of(state, k):
        g, pos = slots[k]
        return np.asarray(state.compressor_state[g][pos], np.float64)

    q = {k: q_of(state, k) for k in mats}
    e = {k: np.zeros((N,) + v.shape) for k, v in params.items()}
    for t in range(steps):
        g = device_grads(t, params)
        out, state = step(put(g, mesh), state)
        for k in params:
            x = g[k].astype(np.float64) + e[k]
            if k in mats:
                want, c, q[k] = np_powersgd(x, q[k], tall=x.shape[1] > x.shape[2])
            else:  # a vector: sent dense
                want, c = x.mean(0), x
            e[k] = x - c
            np.testing.assert_allclose(out[k], want, atol=2e-5)
            np.testing.assert_allclose(state.error[k], e[k], atol=2e-5)
    for k in mats:
        np.testing.assert_allclose(q_of(state, k), q[k], atol=2e-5)
    cols = hlo_collectives(step.lower(put(device_grads(0, params), mesh), state)
                           .compile().as_text())
    return cols, state


def test_powersgd_matches_numpy_reference(mesh):
    params = {"w": jnp.zeros((8, 32)), "tall": jnp.zeros((24, 6)), "b": jnp.zeros((64,))}
    rank = 2
    cols, state = check_powersgd(mesh, params, rank)
    assert [q.shape for q in state.compressor_state] == [(1, 24, 2), (1, 32, 2)]   # tall, w
    # Two all-reduces per matrix (a r and b r floats) plus the dense vector.
    spec = 32 * rank * (8 + 32) + 32 * rank * (6 + 24) + 32 * 64
    assert {c["op"] for c in cols} == {"all-reduce"} and sum(c["bits"] for c in cols) == spec
    assert counter_value(state.bits_sent) == 3 * spec


@pytest.mark.parametrize("by_shape", [True, False], ids=["stacked", "matrix-by-matrix"])
def test_powersgd_of_many_leaves_runs_in_two_all_reduces(mesh, by_shape):
    """Same-shape matrices stacked (or not), every round packed: the NumPy reference leaf
    by leaf, and two all-reduce ops per step for the whole model (PowerSGD's inner round,
    then the payloads with the dense vectors), however many leaves."""
    params = {f"w{i}": jnp.zeros((8, 32)) for i in range(4)}
    params.update({f"tall{i}": jnp.zeros((24, 6)) for i in range(3)})
    params.update({"b0": jnp.zeros((64,)), "b1": jnp.zeros((8,)), "sq": jnp.zeros((6, 6))})
    cols, _ = check_powersgd(mesh, params, 2, batch_by_shape=by_shape)
    assert [c["op"] for c in cols] == ["all-reduce", "all-reduce"]


@pytest.mark.parametrize("make", [lambda: compressed_mean(C.powersgd(2), axis_name="data"),
                                  lambda: compressed_mean(C.greedy_svd(2), axis_name="data"),
                                  lambda: lore_jax.greedylore(2, axis_name="data")],
                         ids=["powersgd", "greedy_svd", "greedylore"])
def test_distinct_kernels_do_not_grow_with_same_shape_leaves(mesh, make):
    """Twice the same-shape matrices compile to no more distinct kernels (XLA:CPU compiles
    each distinct kernel once): a group's matrices are cut out of its stacks by one
    kernel, not one per matrix."""
    from benchmarks.collectives import distinct_kernels

    def kernels(n):
        params = {f"w{i}": jnp.zeros((8, 32)) for i in range(n)}
        params.update({f"tall{i}": jnp.zeros((24, 6)) for i in range(n)})
        params["b"] = jnp.zeros((64,))
        tx = make()
        state, step = init_and_step(tx, params, mesh)
        g = put(device_grads(0, params), mesh)
        return distinct_kernels(step.lower(g, state).compile().as_text())

    assert kernels(6) <= kernels(3)


@pytest.mark.parametrize("comp, ops", [(C.random_projection(2), ["all-reduce"]),
                                       (C.greedy_svd(2), ["all-gather", "all-reduce"])],
                         ids=["random_projection", "greedy_svd"])
def test_one_round_compressors_of_many_leaves_send_one_collective(mesh, comp, ops):
    params = {f"w{i}": jnp.zeros((8, 32)) for i in range(5)}
    params.update({"tall": jnp.zeros((24, 6)), "b": jnp.zeros((64,))})
    _, state, step = setup(comp, mesh, params)
    g = put(device_grads(1, params), mesh)
    cols = hlo_collectives(step.lower(g, state).compile().as_text())
    assert sorted(c["op"] for c in cols) == ops
    out, new = step(g, state)
    sent = counter_value(new.bits_sent)
    assert sent == sum(comp.bits(v.shape) for v in params.values()) - (
        32 * 6 if comp.name.startswith("random") else 0)   # seeds: counted, never sent
    # The output equals the per-leaf compressor on the mean (linear) or the mean of
    # the per-device reconstructions (greedy SVD), leaf by leaf.
    for name, v in params.items():
        x = jnp.asarray(device_grads(1, params)[name])
        leaf_key = None
        if v.ndim == 2 and comp.linear:
            i = list(sorted(params)).index(name)
            step_key = jax.random.fold_in(jax.random.fold_in(state.key, 1), 0)
            leaf_key = jax.random.fold_in(jax.random.fold_in(step_key, 0), i)
        if v.ndim == 2 and not comp.linear:
            recs = [comp.decompress(*comp.compress(None, x[d])) for d in range(N)]
            want = np.mean(np.asarray(recs), axis=0)
        elif v.ndim == 2:
            want = comp.decompress(*comp.compress(leaf_key, x.mean(0)))
        else:
            want = x.mean(0)
        np.testing.assert_allclose(out[name], want, rtol=1e-4, atol=1e-5)


def test_random_projection_keys_each_matrix_as_when_sent_alone(mesh):
    """A stack mixing a leaf of 3 matrices with a lone matrix of the same shape: matrix
    ``j`` of leaf ``i`` is projected with ``fold_in(fold_in(shared, i), j)``, a lone
    matrix with ``fold_in(shared, i)``, whatever the stack they are drawn for."""
    comp = C.random_projection(2)
    params = {"layers": jnp.zeros((3, 8, 24)), "w": jnp.zeros((8, 24))}
    dims = {"layers": lore_jax.DimensionNumbers(reduction_axis=1, output_axis=2),
            "w": lore_jax.DimensionNumbers(reduction_axis=0, output_axis=1)}
    _, state, step = setup(comp, mesh, params, weight_dimension_numbers=dims)
    assert [s for s in state.compressor_state] == [None]   # one stateless group of 4
    g = device_grads(3, params)
    out, _ = step(put(g, mesh), state)
    shared = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(state.key, 1), 0), 0)
    mean = {k: jnp.asarray(v.mean(0)) for k, v in g.items()}
    for j in range(3):
        key = jax.random.fold_in(jax.random.fold_in(shared, 0), j)
        np.testing.assert_allclose(out["layers"][j],
                                   comp.decompress(*comp.compress(key, mean["layers"][j])),
                                   rtol=1e-4, atol=1e-5)
    want = comp.decompress(*comp.compress(jax.random.fold_in(shared, 1), mean["w"]))
    np.testing.assert_allclose(out["w"], want, rtol=1e-4, atol=1e-5)


def test_shared_seed_random_k_is_unbiased_across_devices(mesh):
    k, steps = 16, 2000
    tx = compressed_mean(C.random_k(k, shared_seed=True), axis_name="data",
                         error_feedback=None, key=7)
    state = lore_jax.sharded_init(tx, PARAMS, mesh)
    specs = lore_jax.state_specs(state, "data")

    def run(g, s):
        g = jax.tree.map(lambda x: x[0], g)

        def body(s, _):
            out, s = tx.update(g, s)
            return s, out

        s, outs = jax.lax.scan(body, s, None, length=steps)
        return outs, s

    f = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P("data"), specs),
                              out_specs=(P(), specs)))
    g = device_grads(1)
    outs, new = f(put(g, mesh), state)
    for name in PARAMS:
        o = np.asarray(outs[name], np.float64).reshape(steps, -1)
        gbar = g[name].astype(np.float64).mean(0).reshape(-1)
        d = gbar.size
        # Every device kept the same k entries: the mean is (d/k) gbar on them.
        support = o != 0
        assert np.all(support.sum(1) == k)
        np.testing.assert_allclose(o[support], (d / k * np.broadcast_to(gbar, o.shape))[support],
                                   rtol=1e-5)
        # Unbiased for the mean gradient, within 6 standard errors (exact variance).
        se = np.abs(gbar) * math.sqrt((d / k - 1) / steps)
        assert np.all(np.abs(o.mean(0) - gbar) <= 6 * se + 1e-6)
    # A single all-reduce of k values per leaf; the 32-bit seed is never sent.
    assert counter_value(new.bits_sent) == steps * 2 * 32 * k
    ops, bits = collectives_of(f, put(g, mesh), state)  # the scan body's one all-reduce
    assert ops == {"all-reduce"} and bits == 2 * 32 * k


# (compressor, per-device spec bits per step for PARAMS, seed bits counted but not sent)
HLO_CASES = [
    (C.random_k(16), 16 * (32 + 8) + 16 * (32 + 6), 0),
    (C.scaled_sign(), (256 + 32) + (64 + 32), 0),
    (C.qsgd(3, bucket_size=64), (32 * 4 + 256 * 3) + (32 + 64 * 3), 0),
    (C.terngrad(), (32 + 2 * 256) + (32 + 2 * 64), 0),
    (C.random_projection(2), (32 * 2 * 32 + 32) + 32 * 64, 32),
    (C.greedy_svd(2), 32 * 2 * (8 + 32) + 32 * 64, 0),
]


@pytest.mark.parametrize("comp,spec,seed", HLO_CASES, ids=[c[0].name for c in HLO_CASES])
def test_collectives_in_hlo_match_bits_sent(mesh, comp, spec, seed):
    _, state, step = setup(comp, mesh)
    g = put(device_grads(2), mesh)
    out, new = step(g, state)
    sent = counter_value(new.bits_sent)
    assert comp.bits(PARAMS["w"].shape) + comp.bits(PARAMS["b"].shape) == spec
    assert sent == spec - seed
    ops, bits = collectives_of(step, g, state)
    if comp.linear:
        assert ops == {"all-reduce"} and bits == sent
    elif comp.matrix:
        # The matrix is all-gathered; the vector "b" is no matrix, so it is sent dense by
        # one all-reduce of its 32 * 64 bits (not all-gathered N times).
        cols = hlo_collectives(step.lower(g, state).compile().as_text())
        gathered = sum(c["bits"] for c in cols if c["op"] == "all-gather")
        reduced = sum(c["bits"] for c in cols if c["op"] == "all-reduce")
        assert ops == {"all-gather", "all-reduce"} and reduced == 32 * 64
        assert gathered == N * (sent - 32 * 64)
    else:
        assert ops == {"all-gather"} and bits == N * sent
    for v in jax.tree.leaves(out):
        assert np.all(np.isfinite(np.asarray(v)))
    if comp.name.startswith("random_k"):
        # Independent per-device keys: the mean has the union of N supports.
        assert np.count_nonzero(np.asarray(out["w"])) > 16


def test_bernoulli_counts_the_longest_message(mesh):
    """Device i sends 2^i everywhere, so the mean spells out every device's mask."""
    p = 0.25
    _, state, step = setup(C.bernoulli(p), mesh, error_feedback=None)
    g = {k: np.broadcast_to(2.0 ** np.arange(N).reshape((N,) + (1,) * v.ndim),
                            (N,) + v.shape).astype(np.float32) for k, v in PARAMS.items()}
    out, new = step(put(g, mesh), state)
    want = 0
    for k, v in PARAMS.items():
        code = np.rint(np.asarray(out[k]).reshape(-1) * N * p).astype(np.int64)
        masks = (code[None, :] >> np.arange(N)[:, None]) & 1              # (N, d)
        assert 0 < masks.sum() < masks.size and len(set(masks.sum(1))) > 1
        # Each device's message: kept entries at 32 + ceil(log2 d) bits; a variable-length
        # all-gather pads every slot to the longest.
        want += masks.sum(1).max() * (32 + math.ceil(math.log2(v.size)))
    assert counter_value(new.bits_sent) == want


def test_nonfinite_step_keeps_the_state():
    tx = compressed_mean(C.top_k(2), axis_name=None)
    params = {"w": jnp.zeros(8)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    _, state = update({"w": jnp.arange(8.0)}, state)
    out, new = update({"w": jnp.array([1.0, jnp.nan, 0, 0, 0, 0, 0, 0])}, state)
    assert not np.all(np.isfinite(out["w"]))
    np.testing.assert_array_equal(new.error["w"], state.error["w"])
    assert int(new.count) == int(state.count) == 1 and int(new.nonfinite_steps) == 1
    assert counter_value(new.bits_sent) == 2 * counter_value(state.bits_sent)
    # Composed with apply_if_finite, the parameters do not move either.
    guarded = optax.apply_if_finite(optax.chain(tx, optax.sgd(0.1)), max_consecutive_errors=3)
    gstate = guarded.init(params)
    update = jax.jit(guarded.update)
    upd, gstate = update({"w": jnp.full(8, jnp.inf)}, gstate)
    np.testing.assert_array_equal(upd["w"], 0.0)
    upd, gstate = update({"w": jnp.arange(8.0)}, gstate)
    np.testing.assert_allclose(upd["w"], -0.1 * np.where(np.arange(8) >= 6, np.arange(8), 0))


def test_a_nonfinite_entry_left_out_of_the_payload_keeps_the_old_memory_only():
    # random-k leaves most entries out of the payload: a NaN among them spoils this
    # device's new memory but not the output. The step counts as a finite one (count
    # advances, nonfinite_steps does not), and the memory stays as it was.
    tx = compressed_mean(C.random_k(2), axis_name=None)
    params = {"w": jnp.zeros(8)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    grad = np.arange(1.0, 9.0, dtype=np.float32)
    out, good = update({"w": jnp.asarray(grad)}, state)
    sent = np.asarray(out["w"]) != 0
    assert sent.sum() == 2
    np.testing.assert_allclose(good.error["w"][0], grad - np.asarray(out["w"]))
    broken = grad.copy()
    broken[np.flatnonzero(~sent)[0]] = np.nan
    out_b, new = update({"w": jnp.asarray(broken)}, state)
    np.testing.assert_array_equal(out_b["w"], out["w"])
    np.testing.assert_array_equal(new.error["w"], state.error["w"])
    assert int(new.count) == 1 and int(new.nonfinite_steps) == 0


_POWERSGD_CASES = [(leaf, index, bad, "powersgd") for bad in (np.nan, np.inf)
                   for leaf, index in [("a", (3, 2, 1)), ("b", (0, 5, 0)), ("bias", (6, 4)),
                                       ("h", (1, 0, 3))]]


@pytest.mark.parametrize("leaf, index, bad, method", _POWERSGD_CASES + [
    ("a", (3, 2, 1), np.nan, "greedylore"), ("bias", (6, 4), np.inf, "greedylore")])
def test_grouped_nonfinite_step_keeps_the_state(mesh, leaf, index, bad, method):
    # PowerSGD stacks a and b (one group) and sends the bias dense; h is bfloat16.
    # GreedyLore runs its own rounds and sends the dense pieces in a packed mean. The
    # finiteness is read from the stacks and dense buffers the outputs are cut from: a
    # bad entry on one device in any of them must skip the step on every device.
    rng = np.random.default_rng(0)
    params = {"a": jnp.zeros((8, 6)), "b": jnp.zeros((8, 6)), "bias": jnp.zeros(6),
              "h": jnp.zeros((6, 4), jnp.bfloat16)}
    grads = {k: rng.standard_normal((N,) + v.shape).astype(np.float32) for k, v in
             params.items()}
    grads["h"] = grads["h"].astype(jnp.bfloat16)
    tx = compressed_mean(C.powersgd(2)) if method == "powersgd" else lore_jax.greedylore(2)
    state, step = init_and_step(tx, params, mesh)
    _, state = step(put(grads, mesh), state)
    broken = dict(grads, **{leaf: np.array(grads[leaf])})
    broken[leaf][index] = bad
    out, new = step(put(broken, mesh), state)
    assert int(new.nonfinite_steps) == 1 and int(new.count) == int(state.count) == 1
    for kept, old in zip(jax.tree.leaves((new.error, new.compressor_state)),
                         jax.tree.leaves((state.error, state.compressor_state)), strict=True):
        np.testing.assert_array_equal(np.asarray(kept, np.float32), np.asarray(old, np.float32))
    # The same step without the bad entry is a normal one.
    good_out, good = step(put(grads, mesh), state)
    assert int(good.nonfinite_steps) == 0 and int(good.count) == 2
    # The non-finite step returns its mean as it is (for optax.apply_if_finite to skip):
    # a bad bias entry spoils that entry alone, and every other value is the good step's.
    assert not np.isfinite(np.asarray(out[leaf], np.float32)).all()
    if leaf == "bias":
        spoiled = ~np.isfinite(np.asarray(out["bias"]))
        np.testing.assert_array_equal(spoiled, np.arange(6) == index[1])
        np.testing.assert_array_equal(np.asarray(out["bias"])[~spoiled],
                                      np.asarray(good_out["bias"])[~spoiled])
        for k in ("a", "b", "h"):
            np.testing.assert_array_equal(np.asarray(out[k], np.float32),
                                          np.asarray(good_out[k], np.float32))


# --------------------------------------------------------------- error feedback (EF14)


def _least_squares(seed: int = 0, n: int = 16, d: int = 16):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((N, n, d)).astype(np.float32)
    b = rng.standard_normal((N, n)).astype(np.float32)
    hess = np.einsum("inj,ink->jk", a.astype(np.float64), a) / N
    x_star = np.linalg.solve(hess, np.einsum("inj,in->j", a.astype(np.float64), b) / N)
    return a, b, x_star, np.linalg.eigvalsh(hess).max()


@pytest.mark.parametrize("comp", [C.top_k(2), C.scaled_sign()], ids=lambda c: c.name)
def test_ef14_reaches_the_optimum_where_plain_compression_stalls(mesh, comp):
    """Distributed least squares, heterogeneous devices, step (1/L) / (1 + t/50).

    Without error feedback the mean of the compressed local gradients does not vanish
    at the optimum, so the iterates stall at a fixed distance; with EF14 the distance
    keeps shrinking like the step size (to zero).
    """
    a, b, x_star, lip = _least_squares()
    steps = 3000

    def final_errors(mode):
        tx = optax.chain(
            compressed_mean(comp, axis_name="data", error_feedback=mode),
            optax.sgd(lambda t: (1.0 / lip) / (1.0 + t / 50.0)),
        )
        x0 = {"x": jnp.zeros(a.shape[-1])}
        state = lore_jax.sharded_init(tx, x0, mesh)
        specs = lore_jax.state_specs(state, "data")

        def run(a_i, b_i, x, s):
            a_i, b_i = a_i[0], b_i[0]

            def body(carry, _):
                x, s = carry
                g = {"x": a_i.T @ (a_i @ x["x"] - b_i)}
                u, s = tx.update(g, s, x)
                return (optax.apply_updates(x, u), s), None

            (x1, s), _ = jax.lax.scan(body, (x, s), None, length=steps // 3)
            (x2, s), _ = jax.lax.scan(body, (x1, s), None, length=steps - steps // 3)
            return x1["x"], x2["x"]

        f = jax.jit(jax.shard_map(run, mesh=mesh, in_specs=(P("data"), P("data"), P(), specs),
                                  out_specs=(P(), P())))
        x1, x2 = f(put(a, mesh), put(b, mesh), x0, state)
        scale = np.linalg.norm(x_star)
        return (np.linalg.norm(np.asarray(x1) - x_star) / scale,
                np.linalg.norm(np.asarray(x2) - x_star) / scale)

    early, late = final_errors("ef14")
    assert late < 0.03 and late < 0.6 * early, (early, late)
    early, late = final_errors(None)
    assert late > 0.3 and late > 0.8 * early, (early, late)


# ------------------------------------------------------------------------------ errors


def test_bad_arguments_raise_at_construction():
    with pytest.raises(ValueError, match="error_feedback='ef99'"):
        compressed_mean(C.top_k(2), error_feedback="ef99")
    with pytest.raises(TypeError, match="compressor must be a lore_jax.compressors.Compressor"):
        compressed_mean(optax.sgd(0.1))
    with pytest.raises(ValueError, match="key"):
        compressed_mean(C.top_k(2), key="seed")
    with pytest.raises(TypeError, match="batch_by_shape must be True or False, got 'yes'"):
        compressed_mean(C.powersgd(2), batch_by_shape="yes")


def test_non_float_gradients_and_unbound_axis_raise_at_trace_time():
    tx = compressed_mean(C.top_k(2), axis_name=None)
    params = {"w": jnp.zeros(8), "n": jnp.zeros(3, jnp.int32)}
    with pytest.raises(TypeError, match=r"\['n'\] of dtype int32"):
        tx.update(params, tx.init(params))
    tx = compressed_mean(C.top_k(2), axis_name="data")
    params = {"w": jnp.zeros(8)}
    with pytest.raises(ValueError, match="axis_name='data' is not bound"):
        tx.update(params, tx.init(params))


@pytest.mark.parametrize("comp", [C.top_k(3), C.powersgd(1)], ids=["top_k", "powersgd"])
def test_dense_mask_sends_the_masked_leaves_exactly(mesh, comp):
    """``dense`` (a mask, or a callable giving one): the masked leaf's output is the exact
    mean and it has no compressor state; the other matrix is still compressed."""
    rng = np.random.default_rng(5)
    params = {"emb": jnp.zeros((16, 32)), "w": jnp.zeros((16, 32))}
    for dense in ({"emb": True, "w": False}, lambda p: {k: k == "emb" for k in p}):
        tx = compressed_mean(comp, axis_name="data", dense=dense)
        state, step = init_and_step(tx, params, mesh)
        if comp.groups is not None:   # PowerSGD: a warm start for "w" alone
            assert [q.shape for q in state.compressor_state] == [(1, 32, 1)]
        for _ in range(2):
            g = {k: rng.standard_normal((N, *v.shape)).astype(np.float32)
                 for k, v in params.items()}
            out, state = step(put(g, mesh), state)
            np.testing.assert_allclose(out["emb"], g["emb"].mean(0), rtol=1e-5, atol=1e-6)
            assert not np.allclose(out["w"], g["w"].mean(0), atol=1e-2)
            np.testing.assert_array_equal(np.asarray(state.error["emb"]), 0)
    with pytest.raises(ValueError, match="dense must be a pytree of bools"):
        compressed_mean(comp, axis_name=None, dense={"emb": True}).init(params)


@pytest.mark.parametrize("method", ["powersgd", "greedylore", "top_k"])
def test_a_dense_leaf_sends_its_memory_and_keeps_none(mesh, method):
    # A dense leaf's EF14 memory is zero after any step: whatever it held (here injected,
    # as after a mask change) is sent with the gradient, mean_i (g_i + e_i), and cleared.
    # The second step is a compressed one for every method.
    rng = np.random.default_rng(6)
    params = {"w": jnp.zeros((8, 6)), "bias": jnp.zeros(6)}
    tx = {"powersgd": compressed_mean(C.powersgd(2)), "greedylore": lore_jax.greedylore(2),
          "top_k": compressed_mean(C.top_k(2), dense={"w": False, "bias": True})}[method]
    state, step = init_and_step(tx, params, mesh)
    _, state = step(put({k: rng.standard_normal((N,) + v.shape).astype(np.float32)
                         for k, v in params.items()}, mesh), state)   # GreedyLore: refresh
    e = rng.standard_normal((N, 6)).astype(np.float32)
    state = state._replace(error=dict(state.error, bias=jax.device_put(
        e, state.error["bias"].sharding)))
    g = {k: rng.standard_normal((N,) + v.shape).astype(np.float32) for k, v in params.items()}
    out, new = step(put(g, mesh), state)
    np.testing.assert_allclose(out["bias"], (g["bias"] + e).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(new.error["bias"]), 0)
    assert np.abs(np.asarray(new.error["w"])).max() > 0   # the compressed leaf keeps some


def test_state_layout(mesh):
    tx = optax.chain(compressed_mean(C.powersgd(2), axis_name="data", error_feedback="ef21"),
                     optax.sgd(0.1))
    state = lore_jax.sharded_init(tx, PARAMS, mesh)
    cm = state[0]
    assert isinstance(cm, CompressedMeanState)
    assert cm.error["w"].shape == (N, 8, 32) and cm.tracker["w"].shape == (8, 32)
    assert [q.shape for q in cm.compressor_state] == [(1, 32, 2)]   # w; b is sent dense
    specs = lore_jax.state_specs(state, "data")[0]
    assert specs.error["w"] == P("data") and specs.tracker["w"] == P()
    assert specs.bits_sent == P() and specs.key == P()


@pytest.mark.parametrize("comp, ef", [(C.top_k(3), "ef14"), (C.powersgd(2), None)],
                         ids=["top_k-ef14", "powersgd-no-ef"])
@pytest.mark.parametrize("grads, match, grouped", [
    ({"a": (16, 64), "b": (32, 64)}, r"\['a'\] has shape \(.*\) in the state, the gradient "
                                     r"needs \(.*64",
     r"groups are 1 of 16x64: \['a'\]; 1 of 32x64: \['b'\]; the state's group states have "
     r"shapes \[\(1, 32, 2\), \(1, 64, 2\)\], the gradients need \[\(1, 64, 2\), \(1, 64, 2\)\]"),
    ({"a": (32, 64), "b": (16, 32)}, r"\['a'\] has shape .* in the state.*\['b'\]",
     r"groups are 1 of 32x64: \['a'\]; 1 of 16x32: \['b'\]"),
    ({"a": (16, 32), "b": (32, 64), "c": (16, 32)}, r"the state has no \['c'\]",
     r"groups are 2 of 16x32: \['a'\], \['c'\]; 1 of 32x64: \['b'\]"),
    ({"a": (16, 32)}, r"the gradients have no leaf for the state's \['b'\]",
     r"groups are 1 of 16x32: \['a'\]; the state's .* \[\(1, 32, 2\), \(1, 64, 2\)\], the "
     r"gradients need \[\(1, 32, 2\)\]"),
], ids=["shape", "swapped", "extra", "missing"])
def test_gradients_that_do_not_match_the_state_name_the_leaf(comp, ef, grads, match, grouped):
    """Leaf by leaf where the state holds per-leaf parts (error memory); without them, a
    grouped compressor state names the gradients' groups and both sides' shapes."""
    params = {"a": jnp.zeros((16, 32)), "b": jnp.zeros((32, 64))}
    tx = compressed_mean(comp, axis_name=None, error_feedback=ef)
    with pytest.raises(ValueError, match=match if ef else grouped):
        tx.update({k: jnp.ones(s) for k, s in grads.items()}, tx.init(params))
