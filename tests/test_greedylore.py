"""Tests of GreedyLore's paper mode against the paper's algorithm (a NumPy reference),
dense runs and its invariants."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from greedylore_reference import GreedyLoreReference
from helpers import greedylore_bases, init_and_step, put, with_greedylore_stack
from jax.sharding import PartitionSpec as P

import lore_jax
from lore_jax import accounting

N = 8


def paper_greedylore(*args, **kwargs):
    """``lore_jax.greedylore`` with the paper's settings (``tracking="off"``), which this
    file checks against the paper's NumPy reference; the extensions are checked in
    test_greedylore_extensions.py."""
    return lore_jax.greedylore(*args, **{"tracking": "off", **kwargs})


# ----------------------------------------------------------------------------- helpers


def make_params(rng: np.random.Generator) -> dict:
    """A small multi-matrix model: two matrices of the same oriented shape (one tall),
    a conv kernel, a matrix failing the size gate, and a bias."""
    shapes = {
        "a_w": (6, 10),
        "b_w": (10, 6),
        "c_conv": (3, 3, 2, 4),
        "d_bias": (10,),
        "e_w": (12, 8),
        "f_small": (3, 4),
    }
    return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}


def device_grads(rng: np.random.Generator, params: dict, scale: float = 1.0) -> dict:
    """Per-device gradients (leading axis N): a shared low-rank signal plus device noise."""
    out = {}
    for k, v in params.items():
        shared = rng.standard_normal(v.shape)
        if v.ndim >= 2:
            m = shared.reshape(-1, v.shape[-1])
            u, s, vt = np.linalg.svd(m, full_matrices=False)
            s = s * (0.5 ** np.arange(len(s)))
            shared = ((u * s) @ vt).reshape(v.shape)
        noise = 0.3 * rng.standard_normal((N,) + v.shape)
        out[k] = np.asarray(scale * (shared + noise), np.float32)
    return out


def unoriented_mean_error(state: lore_jax.CompressedMeanState, params: dict, rank: int,
                          rate: float) -> dict:
    """Mean over devices of the EF14 buffers of the compressed leaves (NumPy)."""
    ref = GreedyLoreReference(params, rank, 1, 0, N, jax.random.PRNGKey(0), rate=rate)
    return {name: np.asarray(state.error[name], np.float64).mean(axis=0) for name in ref.comp}


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(rank=0), "rank"),
        (dict(rank=2.5), "rank"),
        (dict(rank=2, update_interval=0), "update_interval"),
        (dict(rank=2, warmup_steps=-1), "warmup_steps"),
        (dict(rank=2, error_feedback="ef99"), "error_feedback"),
        (dict(rank=2, min_compression_rate=-1.0), "min_compression_rate"),
        (dict(rank=2, num_probes=0), "num_probes"),
        (dict(rank=2, key="seed"), "key"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs, match):
    with pytest.raises(ValueError, match=match):
        paper_greedylore(**kwargs)


@pytest.mark.parametrize("name, value, match", [
    ("probes", "shared", "the probes follow `tracking`"),
    ("allocation", "group", "the allocation follows `tracking`"),
    ("refresh", "subspace_iteration", "exact SVD"),
    ("refresh_iters", 2, "exact SVD"),
    ("track_every", 2, "every compressed step"),
])
def test_removed_arguments_say_what_replaced_them(name, value, match):
    with pytest.raises(TypeError, match=f"{name}= was removed; .*{match}"):
        lore_jax.greedylore(2, **{name: value})


def test_signature_keeps_ten_keyword_arguments():
    import inspect

    kinds = [p.kind for p in inspect.signature(lore_jax.greedylore).parameters.values()]
    assert kinds.count(inspect.Parameter.KEYWORD_ONLY) == 10


def test_unbound_axis_name_is_a_clear_error():
    tx = paper_greedylore(2, axis_name="data")
    params = {"w": jnp.ones((8, 16))}
    with pytest.raises(ValueError, match="axis_name='data' is not bound"):
        tx.update(params, tx.init(params))


def test_wrong_axis_name_inside_shard_map(mesh):
    tx = paper_greedylore(2, axis_name="model")
    params = {"w": jnp.ones((8, 16))}
    state = tx.init(params)
    f = jax.shard_map(lambda g: tx.update(g, state)[0], mesh=mesh, in_specs=P(),
                      out_specs=P())
    with pytest.raises(ValueError, match="axis_name='model'"):
        jax.jit(f)(params)


def test_non_float_gradients_are_rejected():
    tx = paper_greedylore(2, axis_name=None)
    params = {"w": jnp.ones((8, 16)), "steps": jnp.zeros((), jnp.int32)}
    with pytest.raises(TypeError, match="int32"):
        tx.update(params, tx.init(params))


def test_mismatched_dense_mask():
    tx = paper_greedylore(2, axis_name=None, dense={"w": True, "v": False})
    with pytest.raises(ValueError, match="dense"):
        tx.init({"w": jnp.ones((8, 16))})


# ----------------------------------------------------------------------------- exactness


def test_full_rank_reproduces_dense_mean_every_step(mesh):
    rng = np.random.default_rng(0)
    params = make_params(rng)
    tx = paper_greedylore(16, update_interval=4, warmup_steps=1, axis_name="data",
                             min_compression_rate=0.0)
    state, step = init_and_step(tx, params, mesh)
    for _ in range(9):  # warm-up, refreshes and compressed steps
        g = device_grads(rng, params)
        out, state = step(put(g, mesh), state)
        for k in params:
            np.testing.assert_allclose(out[k], g[k].mean(0), rtol=2e-4, atol=2e-5)
        # With r = a nothing is left over for the error buffers.
        for e in jax.tree.leaves(state.error):
            assert float(jnp.max(jnp.abs(e))) < 1e-4


@pytest.mark.parametrize("error_feedback, num_probes", [
    ("ef14", 1), ("ef21", 1), (None, 1), ("ef14", 2), ("ef21", 2)])
def test_matches_numpy_reference_step_by_step(mesh, error_feedback, num_probes):
    rng = np.random.default_rng(1)
    params = make_params(rng)
    key = jax.random.PRNGKey(7)
    kw = dict(update_interval=4, warmup_steps=2, min_compression_rate=1.5)
    tx = paper_greedylore(2, axis_name="data", error_feedback=error_feedback, key=key,
                          num_probes=num_probes, **kw)
    ref = GreedyLoreReference(params, 2, 4, 2, N, key, ef=error_feedback, rate=1.5,
                              num_probes=num_probes)
    assert set(ref.comp) == {"a_w", "b_w", "c_conv", "e_w"}  # f_small fails the gate
    check_against_reference(tx, ref, params, rng, mesh, steps=12, rtol=1e-3, atol=1e-4)


def check_against_reference(tx, ref, params, rng, mesh, steps: int, rtol: float,
                            atol: float) -> None:
    """Runs ``tx`` on the 8-device mesh and the NumPy reference ``ref`` on the same random
    per-device gradients; their outputs agree at every step and leaf."""
    state, step = init_and_step(tx, params, mesh)
    for t in range(steps):
        g = device_grads(rng, params)
        out, state = step(put(g, mesh), state)
        expect = ref.step([{k: v[i] for k, v in g.items()} for i in range(N)])
        for k in params:
            np.testing.assert_allclose(out[k], expect[k], rtol=rtol, atol=atol,
                                       err_msg=f"step {t}, leaf {k}")


def check_telescoping(tx, mesh, seed: int, steps: int, atol: float) -> dict:
    """Runs ``tx`` on random per-device gradients and checks ``sum_t out_t = sum_t mean_i
    g_i^t - mean_i E_i^T`` (EF14's telescoping sum), with a non-trivial error; returns
    the mean error by leaf."""
    rng = np.random.default_rng(seed)
    params = make_params(rng)
    state, step = init_and_step(tx, params, mesh)
    sum_out = {k: np.zeros(v.shape) for k, v in params.items()}
    sum_mean = {k: np.zeros(v.shape) for k, v in params.items()}
    for _ in range(steps):
        g = device_grads(rng, params)
        out, state = step(put(g, mesh), state)
        for k in params:
            sum_out[k] += np.asarray(out[k], np.float64)
            sum_mean[k] += g[k].astype(np.float64).mean(0)
    err = unoriented_mean_error(state, params, 2, 1.5)
    for k in params:
        expect = sum_mean[k] - err.get(k, 0.0)
        np.testing.assert_allclose(sum_out[k], expect, rtol=1e-4, atol=atol, err_msg=k)
        if k in err:  # the invariant is not vacuous: the error is non-trivial
            assert np.linalg.norm(err[k]) > 0.1
    return err


def test_telescoping_invariant_over_50_steps(mesh):
    tx = paper_greedylore(2, update_interval=10, warmup_steps=3, axis_name="data",
                          min_compression_rate=1.5)
    err = check_telescoping(tx, mesh, seed=2, steps=50, atol=2e-4)
    assert set(err) == {"a_w", "b_w", "c_conv", "e_w"}


def test_ef21_global_tracker_is_mean_of_device_trackers(mesh):
    rng = np.random.default_rng(3)
    params = make_params(rng)
    tx = paper_greedylore(2, update_interval=5, axis_name="data", error_feedback="ef21",
                             min_compression_rate=1.5)
    state, step = init_and_step(tx, params, mesh)
    for _ in range(8):
        _, state = step(put(device_grads(rng, params), mesh), state)
        for e, h in zip(jax.tree.leaves(state.error), jax.tree.leaves(state.tracker),
                        strict=True):
            np.testing.assert_allclose(np.mean(e, axis=0), h, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- contraction


def _stale_setup(a=16, b=40, seed=0):
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((a, a)))[0]  # unrelated to x: stale
    x = rng.standard_normal((a, b)) * np.linspace(3, 0.1, a)[:, None]
    return basis, x


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_exact_greedy_selection_is_contractive_on_any_basis(rank):
    from lore_jax import subspace

    for seed in range(20):
        basis, x = _stale_setup(seed=seed)
        c = np.asarray(subspace.exact_greedy_project(jnp.asarray(basis, jnp.float32),
                                                     jnp.asarray(x, jnp.float32), rank))
        ratio = np.sum((c - x) ** 2) / np.sum(x ** 2)
        assert ratio <= 1 - rank / basis.shape[0] + 1e-5


@pytest.mark.parametrize("rank", [2, 4])
def test_compressed_step_contracts_in_expectation_with_stale_basis(rank):
    """One compressed step with the probe-selected directions of a stale basis:
    E||C(x) - x||^2 <= (1 - r/a)||x||^2 (Chen et al. 2025: the probe-scored greedy
    selection contracts in expectation)."""
    basis, x = _stale_setup()
    a = basis.shape[0]
    params = {"w": jnp.zeros((a, x.shape[1]))}

    def one_step(key):
        tx = paper_greedylore(rank, update_interval=10 ** 6, key=key, axis_name=None)
        state = tx.init(params)
        state = with_greedylore_stack(state, basis=jnp.asarray(basis, jnp.float32)[None])
        state = state._replace(count=jnp.ones([], jnp.int32))  # past the first refresh
        out, _ = tx.update({"w": jnp.asarray(x, jnp.float32)}, state)
        return jnp.sum((out["w"] - x) ** 2) / jnp.sum(x ** 2)

    keys = jax.random.split(jax.random.PRNGKey(0), 400)
    ratios = np.asarray(jax.jit(jax.vmap(one_step))(keys))
    random_subspace = 1 - rank / a
    assert ratios.mean() + 3 * ratios.std() / np.sqrt(len(ratios)) <= random_subspace
    # and it is a real projection: never worse than dropping everything
    assert ratios.max() <= 1 + 1e-5


@pytest.mark.parametrize("tracking", ["off", "range"])
def test_probes_do_not_depend_on_vmap(tracking):
    """A compressed step under ``jax.vmap`` over keys returns what each key's step returns
    alone: the probe draw is portable."""
    rng = np.random.default_rng(10)
    params = {"w": jnp.zeros((8, 32))}
    g = {"w": jnp.asarray(rng.standard_normal((8, 32)), jnp.float32)}

    def one_step(key):
        tx = lore_jax.greedylore(2, tracking=tracking, key=key, axis_name=None)
        state = tx.init(params)._replace(count=jnp.ones([], jnp.int32))   # compressed
        return tx.update(g, state)[0]["w"]

    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    batched = jax.jit(jax.vmap(one_step))(keys)
    alone = jax.jit(one_step)
    for i, key in enumerate(keys):
        np.testing.assert_allclose(batched[i], alone(key), rtol=1e-5, atol=1e-6)
    assert not np.allclose(batched[0], batched[1], atol=1e-3)   # the keys matter


# ----------------------------------------------------------------------------- HLO


def test_compiled_hlo_all_reduces_exactly_the_reported_payload(mesh):
    rng = np.random.default_rng(4)
    params = make_params(rng)
    tx = paper_greedylore(2, update_interval=4, warmup_steps=1, axis_name="data",
                             min_compression_rate=1.5)
    state, step = init_and_step(tx, params, mesh)
    g = put(device_grads(rng, params), mesh)
    text = step.lower(g, state).compile().as_text()
    collectives = accounting.hlo_collectives(text)
    assert {c["op"] for c in collectives} == {"all-reduce"}
    # The phase switch (the state's keep-or-revert conditionals have two branches).
    (branches,) = [b for b in accounting.hlo_conditional_branches(text) if len(b) == 3]
    warm, refresh, compressed = branches

    def bits_in(names):
        return sum(c["bits"] for c in collectives if c["computation"] in names)

    outside = bits_in({c["computation"] for c in collectives} - set(branches))
    # Dense leaves: bias (10) and the gated 3x4 matrix, every step, outside the switch.
    assert outside == (10 + 12) * 32
    # Compressed groups: (6,10) x2 [a_w, b_w], (4,18) [c_conv], (8,12) [e_w]; r = 2.
    groups = [(2, 6, 10), (1, 4, 18), (1, 8, 12)]
    assert bits_in({compressed}) == sum(k * (a + 2 * b) * 32 for k, a, b in groups)
    assert bits_in({refresh}) == bits_in({warm}) == sum(k * a * b * 32 for k, a, b in groups)
    # No full gradient matrix is all-reduced outside the warm-up / refresh branches.
    full = {(k, a, b) for k, a, b in groups}
    for c in collectives:
        if c["computation"] not in (warm, refresh):
            assert not any(s in full for _, s in c["shapes"]), c

    # The state's counters advance by exactly these amounts.
    def sent(s):
        return accounting.counter_value(s.bits_sent)

    before = sent(state)
    _, state = step(g, state)                       # warm-up
    assert sent(state) - before == outside + bits_in({warm})
    before = sent(state)
    _, state = step(g, state)                       # refresh
    assert sent(state) - before == outside + bits_in({refresh})
    before = sent(state)
    _, state = step(g, state)                       # compressed
    assert sent(state) - before == outside + bits_in({compressed})
    total = sum(np.prod(v.shape) for v in params.values()) * 32
    assert accounting.counter_value(state.bits_dense) == 3 * total


# ----------------------------------------------------------------------------- pmap


def test_pmap_and_shard_map_agree_and_bases_are_identical(mesh):
    rng = np.random.default_rng(5)
    params = make_params(rng)
    tx = paper_greedylore(2, update_interval=3, warmup_steps=1, axis_name="data",
                             min_compression_rate=1.5)
    s_shard, step = init_and_step(tx, params, mesh)
    replicated = jax.tree.map(lambda x: jnp.broadcast_to(x, (N,) + x.shape), params)
    s_pmap = jax.pmap(tx.init, axis_name="data")(replicated)
    pstep = jax.pmap(tx.update, axis_name="data")
    for _ in range(6):
        g = device_grads(rng, params)
        out_s, s_shard = step(put(g, mesh), s_shard)
        out_p, s_pmap = pstep(g, s_pmap)
        for k in params:
            for i in range(N):  # every device returns the same mean
                np.testing.assert_array_equal(out_p[k][i], out_p[k][0])
            np.testing.assert_allclose(out_p[k][0], out_s[k], rtol=1e-4, atol=1e-5)
        for s in greedylore_bases(s_pmap):  # bitwise-identical bases on all devices
            for i in range(N):
                np.testing.assert_array_equal(s.basis[i], s.basis[0])
        for sp, ss in zip(greedylore_bases(s_pmap), greedylore_bases(s_shard), strict=True):
            np.testing.assert_allclose(sp.basis[0], ss.basis, atol=1e-4)
    assert lore_jax.communication(s_pmap) == lore_jax.communication(s_shard)


# ----------------------------------------------------------------------------- dtypes, masks


def test_bf16_gradients_keep_float32_state_and_bf16_output(mesh):
    rng = np.random.default_rng(6)
    params = {k: v.astype(jnp.bfloat16) for k, v in make_params(rng).items()}
    tx = paper_greedylore(2, update_interval=3, axis_name="data", min_compression_rate=1.5)
    tx32 = paper_greedylore(2, update_interval=3, axis_name="data",
                               min_compression_rate=1.5)
    state, step = init_and_step(tx, params, mesh)
    params32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    state32, step32 = init_and_step(tx32, params32, mesh)
    for _ in range(4):
        g = jax.tree.map(lambda x: x.astype(jnp.bfloat16), device_grads(rng, params))
        out, state = step(put(g, mesh), state)
        g32 = jax.tree.map(lambda x: x.astype(np.float32), g)
        out32, state32 = step32(put(g32, mesh), state32)
        for k in params:
            assert out[k].dtype == jnp.bfloat16
            np.testing.assert_allclose(np.asarray(out[k], np.float32), out32[k],
                                       rtol=3e-2, atol=3e-2)
    assert all(s.basis.dtype == jnp.float32 for s in greedylore_bases(state))
    assert all(e.dtype == jnp.float32 for e in jax.tree.leaves(state.error))


def test_dense_mask_keeps_leaves_exact(mesh):
    rng = np.random.default_rng(7)
    params = make_params(rng)
    mask = {k: k == "a_w" for k in params}
    tx = paper_greedylore(1, update_interval=100, axis_name="data", dense=mask,
                             min_compression_rate=1.5)
    tx_fn = paper_greedylore(1, update_interval=100, axis_name="data",
                                min_compression_rate=1.5,
                                dense=lambda p: {k: k == "a_w" for k in p})
    for t in (tx, tx_fn):
        state, step = init_and_step(t, params, mesh)
        for _ in range(3):
            g = device_grads(rng, params)
            out, state = step(put(g, mesh), state)
        np.testing.assert_allclose(out["a_w"], g["a_w"].mean(0), rtol=1e-5, atol=1e-6)
        assert not np.allclose(out["b_w"], g["b_w"].mean(0), atol=1e-3)  # compressed
        # a_w left the group it shared with b_w (and at rank 1 f_small passes the gate)
        assert sorted(s.basis.shape for s in greedylore_bases(state)) == [
            (1, 3, 3), (1, 4, 4), (1, 6, 6), (1, 8, 8)]


# ----------------------------------------------------------------------------- non-finite


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("phase_step", [0, 2])  # a dense and a compressed step
def test_nonfinite_gradients_do_not_poison_state(mesh, bad, phase_step):
    rng = np.random.default_rng(8)
    params = make_params(rng)
    tx = paper_greedylore(2, update_interval=100, axis_name="data",
                             min_compression_rate=1.5)
    state, step = init_and_step(tx, params, mesh)
    for _ in range(phase_step):
        _, state = step(put(device_grads(rng, params), mesh), state)
    g = device_grads(rng, params)
    g["e_w"][3, 1, 2] = bad  # one entry on one device
    out, new_state = step(put(g, mesh), state)
    assert not np.all(np.isfinite(out["e_w"]))
    assert int(new_state.nonfinite_steps) == 1
    for new, old in zip(jax.tree.leaves(new_state._replace(
            bits_sent=0, bits_dense=0, nonfinite_steps=0)),
            jax.tree.leaves(state._replace(bits_sent=0, bits_dense=0, nonfinite_steps=0)),
            strict=True):
        np.testing.assert_array_equal(new, old)


def test_composes_with_apply_if_finite():
    params = {"w": jnp.ones((8, 32))}
    tx = optax.apply_if_finite(
        optax.chain(paper_greedylore(2, axis_name=None), optax.sgd(0.1)), 3)
    state = tx.init(params)
    good = {"w": jnp.ones((8, 32))}
    bad = {"w": good["w"].at[0, 0].set(jnp.nan)}
    upd, state = tx.update(good, state, params)
    upd_bad, state_after_bad = tx.update(bad, state, params)
    assert np.all(np.asarray(upd_bad["w"]) == 0)
    for a, b in zip(jax.tree.leaves(state.inner_state),
                    jax.tree.leaves(state_after_bad.inner_state), strict=True):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- single device


def test_single_device_matches_reference_with_n_equal_one():
    rng = np.random.default_rng(9)
    params = make_params(rng)
    key = jax.random.PRNGKey(3)
    tx = paper_greedylore(2, update_interval=3, warmup_steps=1, key=key,
                             min_compression_rate=1.5, axis_name=None)
    ref = GreedyLoreReference(params, 2, 3, 1, 1, key, rate=1.5)
    ref.n = 1
    ref.E = {k: v[:1] for k, v in ref.E.items()}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(7):
        g = {k: v[0] for k, v in device_grads(rng, params).items()}
        out, state = update(g, state)
        expect = ref.step([g])
        for k in params:
            np.testing.assert_allclose(out[k], expect[k], rtol=1e-3, atol=1e-4)


def test_state_specs_cover_nested_optax_states(mesh):
    params = {"w": jnp.ones((8, 32)), "b": jnp.ones(8)}
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     paper_greedylore(2, axis_name="data", error_feedback="ef21"),
                     optax.adam(1e-3))
    specs = lore_jax.state_specs(jax.eval_shape(tx.init, params), "data")
    lore_spec = specs[1]
    assert isinstance(lore_spec, lore_jax.CompressedMeanState)
    assert lore_spec.error == {"b": P("data"), "w": P("data")}
    assert lore_spec.tracker == {"b": P(), "w": P()}
    assert [s.basis for s in lore_spec.compressor_state] == [P()]
    assert all(s == P() for s in jax.tree.leaves(specs[2],
                                                  is_leaf=lambda x: isinstance(x, P)))
    state = lore_jax.sharded_init(tx, params, mesh)
    assert state[1].error["w"].shape == (N, 8, 32)
    assert state[1].error["w"].sharding.spec[0] == "data"



# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize("grads, match", [
    ({"a": (16, 64), "b": (32, 64)}, r"greedylore: .*\['a'\] has shape \(1, 16, 32\) in the "
                                     r"state, the gradient needs \(1, 16, 64\)"),
    ({"a": (32, 64), "b": (16, 32)}, r"\['a'\] has shape \(1, 16, 32\) .* needs \(1, 32, 64\); "
                                     r"\['b'\] has shape \(1, 32, 64\) .* needs \(1, 16, 32\)"),
    ({"a": (16, 32), "b": (32, 64), "c": (16, 32)}, r"the state has no \['c'\]"),
])
def test_gradients_that_do_not_match_the_state_name_the_leaves(grads, match):
    params = {"a": jnp.zeros((16, 32)), "b": jnp.zeros((32, 64))}
    tx = paper_greedylore(2, axis_name=None, min_compression_rate=0)
    with pytest.raises(ValueError, match=match):
        tx.update({k: jnp.ones(s) for k, s in grads.items()}, tx.init(params))
