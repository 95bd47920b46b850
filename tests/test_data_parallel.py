"""Local gradients, the axis name, and the data-parallel step builder, on 8 devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lore_jax
from lore_jax import compressors as C

N = 8


def loss_fn(params, batch):
    x, y = batch
    return jnp.mean((jnp.tanh(x @ params["w"]) @ params["v"] - y) ** 2)


def make_params(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.standard_normal((16, 32)) / 4, jnp.float32),
            "v": jnp.asarray(rng.standard_normal((32, 8)) / 6, jnp.float32),
            "unused": jnp.ones(5, jnp.float32)}


def make_batch(seed: int = 1, n: int = 64):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 16)).astype(np.float32),
            rng.standard_normal((n, 8)).astype(np.float32))


TRANSFORMS = {
    "greedylore": lambda axis: lore_jax.greedylore(2, axis_name=axis, min_compression_rate=0),
    "powersgd": lambda axis: lore_jax.compressed_mean(C.powersgd(2), axis_name=axis),
    "top_k": lambda axis: lore_jax.compressed_mean(C.top_k(4), axis_name=axis),
}


def hand_written_step(tx, mesh, state, local: bool):
    """The README's explicit shard_map step, with or without ``per_device``."""
    specs = lore_jax.state_specs(state)

    def step(params, state, batch):
        p = lore_jax.per_device(params) if local else params
        updates, state = tx.update(jax.grad(loss_fn)(p, batch), state, params)
        return updates, state

    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), specs, P("data")),
                                 out_specs=(P(), specs)))


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_gradients_of_replicated_parameters_are_refused(mesh, name):
    tx = TRANSFORMS[name]("data")
    params = jax.device_put(make_params(), NamedSharding(mesh, P()))
    state = lore_jax.sharded_init(tx, params, mesh)
    batch = jax.device_put(make_batch(), NamedSharding(mesh, P("data")))
    with pytest.raises(ValueError, match=r"gradient leaf \['unused'\].*summed over 'data'.*"
                                         r"per_device"):
        hand_written_step(tx, mesh, state, local=False)(params, state, batch)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_per_device_gradients_give_the_mean_of_the_local_gradients(mesh, name):
    tx = TRANSFORMS[name]("data")
    params = jax.device_put(make_params(), NamedSharding(mesh, P()))
    state = lore_jax.sharded_init(tx, params, mesh)
    x, y = make_batch()
    batch = jax.device_put((x, y), NamedSharding(mesh, P("data")))
    out, _ = hand_written_step(tx, mesh, state, local=True)(params, state, batch)
    # The mean of the 8 devices' gradients (NumPy-side reference: the full-batch gradient).
    params0 = make_params()
    full = jax.grad(loss_fn)(params0, (x, y))          # the mean of the devices' gradients
    local = jax.vmap(lambda xb, yb: jax.grad(loss_fn)(params0, (xb, yb)))(
        x.reshape(N, -1, 16), y.reshape(N, -1, 8))
    for k in full:
        if name == "greedylore":   # its first step is a dense refresh: exactly the mean
            np.testing.assert_allclose(out[k], full[k], rtol=1e-5, atol=1e-7)
        elif name == "powersgd":   # a projection of the mean: never longer than it
            assert np.linalg.norm(out[k]) <= (1 + 1e-5) * np.linalg.norm(full[k])
        else:                      # the mean of local top-k: at most the mean local norm
            norms = np.linalg.norm(np.asarray(local[k]).reshape(N, -1), axis=1)
            assert np.linalg.norm(out[k]) <= (1 + 1e-5) * norms.mean()
    if name != "top_k":            # the vector is sent dense: exactly the mean
        np.testing.assert_allclose(out["unused"], full["unused"], atol=1e-7)


def test_axis_name_defaults_to_data_and_none_is_refused_for_varying_gradients(mesh):
    params = make_params()
    # Outside any mapping, the default "data" axis is not bound: a clear error.
    with pytest.raises(ValueError, match=r"axis_name='data' is not bound.*axis_name=None"):
        lore_jax.greedylore(2).update(params, lore_jax.greedylore(2).init(params))
    # axis_name=None inside shard_map with per-device gradients: refused, naming the axis.
    for tx in (lore_jax.greedylore(2, axis_name=None, min_compression_rate=0),
               lore_jax.compressed_mean(C.top_k(4), axis_name=None)):
        state = lore_jax.sharded_init(tx, params, mesh)
        batch = jax.device_put(make_batch(), NamedSharding(mesh, P("data")))
        with pytest.raises(ValueError, match=r"axis_name=None.*varies over the mesh axes "
                                             r"\['data'\].*axis_name='data'"):
            hand_written_step(tx, mesh, state, local=True)(
                jax.device_put(params, NamedSharding(mesh, P())), state, batch)


def test_default_axis_name_averages_under_pmap():
    params = make_params()
    tx = lore_jax.greedylore(2, min_compression_rate=0)      # axis_name="data" by default
    stacked = jax.tree.map(lambda v: jnp.broadcast_to(v, (N, *v.shape)), params)
    state = jax.pmap(tx.init, axis_name="data")(stacked)
    x, y = make_batch()
    grads = jax.pmap(jax.grad(loss_fn), axis_name="data")(
        stacked, (x.reshape(N, -1, 16), y.reshape(N, -1, 8)))
    out, _ = jax.pmap(tx.update, axis_name="data")(grads, state)
    full = jax.grad(loss_fn)(params, (x, y))
    for k in full:
        for i in range(N):
            np.testing.assert_allclose(out[k][i], full[k], rtol=1e-5, atol=1e-7)


def test_data_parallel_averages_aux_and_checks_its_arguments(mesh):
    def with_aux(params, batch):
        loss = loss_fn(params, batch)
        return loss, {"twice": 2 * loss}

    tx = optax.chain(lore_jax.greedylore(2), optax.sgd(0.1))
    train = lore_jax.data_parallel(with_aux, tx, mesh, has_aux=True)
    params = make_params()
    state = train.init(params)
    x, y = make_batch()
    _, _, loss, aux = train.step(params, state, (x, y))
    np.testing.assert_allclose(loss, loss_fn(params, (x, y)), rtol=1e-6)
    np.testing.assert_allclose(aux["twice"], 2 * loss, rtol=1e-6)
    with pytest.raises(ValueError, match="60 examples.*8 devices x 1 micro-batches"):
        train.step(params, state, make_batch(n=60))
    with pytest.raises(ValueError, match="micro_batches must be an integer >= 1, got 0"):
        lore_jax.data_parallel(loss_fn, tx, mesh, micro_batches=0)
    with pytest.raises(ValueError, match="axis_name='batch' is not an axis of the mesh"):
        lore_jax.data_parallel(loss_fn, tx, mesh, axis_name="batch")
    with pytest.raises(ValueError, match="every_k_steps must be an integer >= 1"):
        lore_jax.multi_steps(tx, 0)


def test_data_parallel_refuses_optax_wrappers_and_unlaid_states_before_any_step(mesh):
    """optax.MultiSteps / apply_if_finite around the chain, and a state made by tx.init
    outside shard_map: init or step names the fix, and nothing is donated or trained."""
    inner = optax.chain(lore_jax.greedylore(2), optax.sgd(0.1))
    params, batch = make_params(), make_batch()
    placed = jax.device_put(params, NamedSharding(mesh, P()))
    for wrapped, name, fix in (
            (optax.MultiSteps(inner, 4), "optax.MultiSteps", r"micro_batches=k"),
            (optax.apply_if_finite(inner, 3), "optax.apply_if_finite",
             r"around the base optimizer")):
        train = lore_jax.data_parallel(loss_fn, wrapped, mesh)
        with pytest.raises(ValueError, match=rf"{name} wraps the lore_jax state.*{fix}"):
            train.init(params)
        with pytest.raises(ValueError, match=rf"{name} wraps the lore_jax state.*{fix}"):
            train.step(placed, wrapped.init(params), batch)
    train = lore_jax.data_parallel(loss_fn, inner, mesh)
    state = inner.init(params)
    with pytest.raises(ValueError, match=r"opt_state\[0\]\.error\['unused'\] has shape "
                                         r"\(1, 5\).*8 devices.*one row for all devices.*"
                                         r"lore_jax\.shard_state\(opt_state, mesh\).*"
                                         r"train\.init\(params\)"):
        train.step(placed, state, batch)
    assert not any(x.is_deleted() for x in jax.tree.leaves(placed))   # nothing donated
    np.testing.assert_array_equal(placed["w"], params["w"])
    assert lore_jax.communication(state)["bits_sent"] == 0


def test_multi_steps_under_hand_made_specs_names_optax_multi_steps(mesh):
    """A step written by hand whose specs did not come from lore_jax.state_specs: inside
    shard_map the accumulator optax.MultiSteps passes is the same on every device, and
    the error names it and lore_jax.multi_steps, though the gradients come from
    per_device."""
    tx = optax.MultiSteps(optax.chain(lore_jax.greedylore(2), optax.sgd(0.1)), 4)
    params = jax.device_put(make_params(), NamedSharding(mesh, P()))
    state = tx.init(make_params())
    state = jax.tree_util.tree_map_with_path(
        lambda path, x: jax.device_put(jnp.broadcast_to(x, (N, *x.shape[1:])),
                                       NamedSharding(mesh, P("data")))
        if "error" in lore_jax.collectives.path_keys(path) else x, state)
    specs = jax.tree_util.tree_map_with_path(
        lambda path, _: P("data") if "error" in lore_jax.collectives.path_keys(path) else P(),
        state)

    def step(params, state, batch):
        return tx.update(jax.grad(loss_fn)(lore_jax.per_device(params), batch), state, params)

    step = jax.shard_map(step, mesh=mesh, in_specs=(P(), specs, P("data")),
                         out_specs=(P(), specs))
    batch = jax.device_put(make_batch(), NamedSharding(mesh, P("data")))
    with pytest.raises(ValueError, match=r"optax\.MultiSteps passes its accumulator.*"
                                         r"lore_jax\.multi_steps\(tx, every_k_steps=k\).*"
                                         r"micro_batches=k"):
        jax.eval_shape(step, params, state, batch)


def test_every_communicating_transform_documents_what_pmap_cannot_check():
    """Under jax.pmap nothing sees the wrappers or axis_name=None: the docstrings say so."""
    for fn in (lore_jax.greedylore, lore_jax.compressed_mean, lore_jax.demo, lore_jax.diloco,
               lore_jax.multi_steps):
        doc = " ".join(fn.__doc__.split())
        for words in ("jax.pmap", "optax.apply_if_finite", "optax.MultiSteps",
                      "axis_name=None"):
            assert words in doc, (fn.__name__, words)


def test_per_device_needs_the_axis():
    with pytest.raises(ValueError, match="axis_name='data' is not bound"):
        lore_jax.per_device(make_params())


def test_evaluate_and_the_step_metrics_equal_numpy_on_the_whole_batch(mesh):
    """The mean loss and aux over 8 devices (and over 3 micro-batches each) equal a
    float64 NumPy computation on the whole batch; evaluation updates nothing."""
    def with_aux(params, batch):
        x, y = batch
        err = jnp.tanh(x @ params["w"]) @ params["v"] - y
        return jnp.mean(err ** 2), {"mae": jnp.mean(jnp.abs(err))}

    params = make_params()
    x, y = make_batch(n=48)
    w, v = (np.asarray(params[k], np.float64) for k in ("w", "v"))
    err = np.tanh(x @ w) @ v - y
    ref_loss, ref_mae = np.mean(err ** 2), np.mean(np.abs(err))
    tx = optax.chain(lore_jax.greedylore(2), optax.sgd(0.1))
    for k in (1, 3):
        train = lore_jax.data_parallel(
            with_aux, tx, mesh, has_aux=True, micro_batches=k,
            compiler_options={"xla_disable_hlo_passes": "constant_folding"})
        loss, aux = train.evaluate(params, (x, y))
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        np.testing.assert_allclose(aux["mae"], ref_mae, rtol=1e-5)
        _, _, step_loss, step_aux = train.step(params, train.init(params), (x, y))
        np.testing.assert_allclose(step_loss, ref_loss, rtol=1e-5)
        np.testing.assert_allclose(step_aux["mae"], ref_mae, rtol=1e-5)
    np.testing.assert_array_equal(train.evaluate(params, (x, y))[0], loss)
    with pytest.raises(ValueError, match="20 examples, which does not split into 8 devices;"):
        train.evaluate(params, make_batch(n=20))
