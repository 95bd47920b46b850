"""State layout on a mesh: any state container, nnx.Optimizer, model-sharded parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from greedylore_reference import GreedyLoreReference
from helpers import greedylore_bases
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lore_jax
from lore_jax import compressors as C

N = 8


def keys(path) -> tuple:
    """A leaf's path as plain names, whatever the containers (nnx.State, dict, NamedTuple)."""
    return lore_jax.collectives.path_keys(path)


def per_device_paths(specs) -> set[tuple]:
    return {keys(p) for p, s in jax.tree_util.tree_flatten_with_path(specs)[0]
            if s == P("data")}


def paths_with(tree, field: str) -> set[tuple]:
    return {keys(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]
            if field in keys(p)}


PARAMS = {"w": jnp.zeros((16, 32)), "b": jnp.zeros(32)}


@pytest.mark.parametrize("wrap", [
    lambda tx: tx,
    lambda tx: optax.inject_hyperparams(lambda lr: optax.chain(tx, optax.sgd(lr)))(lr=0.1),
    lambda tx: optax.masked(tx, {"w": True, "b": True}),
    lambda tx: lore_jax.multi_steps(optax.chain(tx, optax.adam(1e-3)), 2),
], ids=["plain", "inject_hyperparams", "masked", "multi_steps"])
@pytest.mark.parametrize("make", [
    lambda: lore_jax.greedylore(2, min_compression_rate=0),
    lambda: lore_jax.compressed_mean(C.powersgd(2), error_feedback="ef21"),
    lambda: optax.chain(lore_jax.stale(2), lore_jax.compressed_mean(C.top_k(4))),
], ids=["greedylore", "compressed_mean", "stale"])
def test_state_specs_find_every_per_device_field_in_any_container(mesh, wrap, make):
    tx = wrap(make())
    state = tx.init(PARAMS)
    specs = lore_jax.state_specs(state)
    fields = ("error", "buffer", "delay", "acc_grads")
    want = set().union(*(paths_with(state, f) for f in fields))
    assert per_device_paths(specs) == want and want
    # The same from dicts of the same names (a checkpoint restored without a target) ...
    assert per_device_paths(lore_jax.state_specs(as_dicts(state))) == want
    # ... and the state laid out by sharded_init trains a step under shard_map.
    laid_out = lore_jax.sharded_init(tx, PARAMS, mesh)
    assert lore_jax.state_specs(laid_out) == specs
    for path, x in jax.tree_util.tree_flatten_with_path(laid_out)[0]:
        if keys(path) in want:
            assert x.shape[0] == N
    step = jax.jit(jax.shard_map(lambda g, s: tx.update(jax.tree.map(lambda v: v[0], g), s,
                                                        PARAMS),
                                 mesh=mesh, in_specs=(P("data"), specs), out_specs=(P(), specs)))
    grads = jax.device_put({k: jnp.ones((N, *v.shape)) for k, v in PARAMS.items()},
                           NamedSharding(mesh, P("data")))
    step(grads, laid_out)


def as_dicts(tree):
    """Every NamedTuple of ``tree`` as a dict of its fields (types lost, names kept)."""
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return {k: as_dicts(v) for k, v in tree._asdict().items()}
    if isinstance(tree, (tuple, list)):
        return type(tree)(as_dicts(v) for v in tree)
    if isinstance(tree, dict):
        return {k: as_dicts(v) for k, v in tree.items()}
    return tree


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1, self.l2 = nnx.Linear(16, 32, rngs=rngs), nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def test_nnx_optimizer_state_of_demo_keeps_its_momentum_per_device(mesh):
    """An nnx.Optimizer around lore_jax.demo, split into an nnx.State: its momentum is
    recognised by name as per-device, and nothing else is."""
    model = MLP(nnx.Rngs(0))
    _, state = nnx.split((model, nnx.Optimizer(model, lore_jax.demo(1e-3), wrt=nnx.Param)))
    assert per_device_paths(lore_jax.state_specs(state)) == paths_with(state, "momentum")
    assert paths_with(state, "momentum") != set()


def test_nnx_optimizer_state_specs_and_shard_state(mesh):
    model = MLP(nnx.Rngs(0))
    tx = optax.chain(lore_jax.greedylore(2, min_compression_rate=0), optax.adam(1e-3))
    graphdef, state = nnx.split((model, nnx.Optimizer(model, tx, wrt=nnx.Param)))
    specs = lore_jax.state_specs(state)            # the nnx.State lost the state's types
    assert per_device_paths(specs) == paths_with(state, "error") != set()
    placed = lore_jax.shard_state(state, mesh)
    assert lore_jax.state_specs(placed) == specs
    for path, x in jax.tree_util.tree_flatten_with_path(placed)[0]:
        rows = N if "error" in keys(path) else None
        assert rows is None or (x.shape[0] == rows and np.all(np.asarray(x) == 0)), path
    # A dict of the same names (e.g. nnx.to_pure_dict, or a restore without a target).
    assert per_device_paths(lore_jax.state_specs(nnx.to_pure_dict(state))) == paths_with(
        state, "error")
    x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    y = np.random.default_rng(1).standard_normal((64, 4)).astype(np.float32)

    def local_step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        loss_fn = lambda m, b: jnp.mean((m(b[0]) - b[1]) ** 2)  # noqa: E731
        optimizer.update(model, nnx.grad(loss_fn)(lore_jax.per_device(model), batch))
        return nnx.state((model, optimizer))

    step = jax.jit(jax.shard_map(local_step, mesh=mesh, in_specs=(specs, P("data")),
                                 out_specs=specs))
    new = step(placed, jax.device_put((x, y), NamedSharding(mesh, P("data"))))
    # Step 0 is a dense refresh: Adam's first update is -lr * sign(mean gradient).
    full = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    model1, _ = nnx.merge(graphdef, new)
    moved = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b),
                         nnx.state(model1, nnx.Param), nnx.state(model, nnx.Param))
    for d, g in zip(jax.tree.leaves(moved), jax.tree.leaves(full), strict=True):
        np.testing.assert_allclose(d, -1e-3 * np.sign(np.asarray(g)), rtol=1e-3, atol=1e-7)



# ------------------------------------------------- wrappers and states laid out by hand

WRAPPED = {
    "MultiSteps": (lambda tx: optax.MultiSteps(tx, 4),
                   (r"optax\.MultiSteps wraps the lore_jax state opt_state\W+inner_opt_state\W+0\]"
                    r".*every micro-step.*count one in k.*lore_jax\.multi_steps\(tx, "
                    r"every_k_steps=k\).*data_parallel\(.*micro_batches=k\)")),
    "apply_if_finite": (lambda tx: optax.apply_if_finite(tx, 3),
                        (r"optax\.apply_if_finite wraps the lore_jax state opt_state"
                         r"\W+inner_state\W+0\].*skips the collectives.*after the lore_jax "
                         r"transform, around the base optimizer")),
}


@pytest.mark.parametrize("wrapper", list(WRAPPED))
def test_optax_wrappers_around_a_mean_are_refused_before_anything_runs(mesh, wrapper):
    """optax.MultiSteps / apply_if_finite around the chain: every lore_jax helper that lays
    the state out names the wrapper and the placement to use, typed or as an nnx.State's
    dicts; around the base optimizer alone (the right placement) they are fine."""
    wrap, message = WRAPPED[wrapper]
    tx = wrap(optax.chain(lore_jax.greedylore(2, min_compression_rate=0), optax.sgd(0.1)))
    state = tx.init(PARAMS)
    for call in (lambda: lore_jax.sharded_init(tx, PARAMS, mesh),
                 lambda: lore_jax.state_specs(state),
                 lambda: lore_jax.state_specs(as_dicts(state)),
                 lambda: lore_jax.shard_state(state, mesh)):
        with pytest.raises(ValueError, match=message):
            call()
    right = optax.chain(lore_jax.greedylore(2), wrap(optax.sgd(0.1)))
    assert per_device_paths(lore_jax.state_specs(right.init(PARAMS))) == {(0, "error", "b"),
                                                                          (0, "error", "w")}
    # Bounded delay does not communicate: a wrapper around it alone is not refused.
    lore_jax.state_specs(wrap(lore_jax.stale(2)).init(PARAMS))


def test_multi_steps_without_shape_checks_is_refused_not_miscounted(mesh):
    """With check_vma=False the optax.MultiSteps chain would run, all-reducing on every
    micro-step while lore_jax.communication counted one step in 4: the state's layout
    refuses it first, and the parameters and state are untouched."""
    tx = optax.MultiSteps(optax.chain(lore_jax.greedylore(2), optax.sgd(0.1)), 4)
    state = tx.init(PARAMS)
    before = jax.tree.map(np.asarray, state)
    with pytest.raises(ValueError, match=r"optax\.MultiSteps.*count one in k"):
        specs = lore_jax.state_specs(state)
        jax.shard_map(lambda s: s, mesh=mesh, in_specs=(specs,), out_specs=specs,
                      check_vma=False)(state)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state), before)


def test_a_state_made_outside_shard_map_names_shard_state(mesh):
    """tx.init outside shard_map gives each per-device field one row. Replicated by hand
    and handed to state_specs, or passed into shard_map as P() (check_vma on), lore_jax
    names shard_state / sharded_init before any step runs."""
    tx = optax.chain(lore_jax.greedylore(2, min_compression_rate=0), optax.sgd(0.1))
    state = tx.init(PARAMS)
    placed = jax.device_put(state, NamedSharding(mesh, P()))
    with pytest.raises(ValueError, match=r"opt_state\[0\]\.error\['b'\] has shape \(1, 32\)"
                                         r".*one row for all devices.*lore_jax\.shard_state"
                                         r"\(opt_state, mesh\).*lore_jax\.sharded_init"):
        lore_jax.state_specs(placed)
    grads = jax.device_put({k: jnp.ones((N, *v.shape)) for k, v in PARAMS.items()},
                           NamedSharding(mesh, P("data")))

    def step(g, s):
        return tx.update(jax.tree.map(lambda v: v[0], g), s, PARAMS)

    by_hand = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("data"), P()),
                                    out_specs=(P(), P())))
    with pytest.raises(ValueError, match=r"greedylore: its state's per-device field error"
                                         r"\['b'\] \(shape \(1, 32\)\) is the same on every "
                                         r"device.*lore_jax\.shard_state\(opt_state, mesh\)"):
        by_hand(grads, placed)
    # shard_state lays the same state out, and the step then runs.
    laid_out = lore_jax.shard_state(state, mesh)
    assert laid_out[0].error["w"].shape == (N, 16, 32)
    specs = lore_jax.state_specs(laid_out)
    jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P("data"), specs),
                          out_specs=(P(), specs)))(grads, laid_out)


@pytest.mark.parametrize("make", [
    lambda: lore_jax.demo(1e-3),
    lambda: lore_jax.stale(2, axis_name="data"),
    lambda: lore_jax.multi_steps(optax.sgd(0.1), 2),
], ids=["demo", "stale", "multi_steps"])
def test_a_laid_out_state_passed_whole_names_state_specs(mesh, make):
    """A laid out state (N rows) passed whole to every device: each transform with
    per-device fields names them and state_specs (check_vma off: rows are all it sees)."""
    tx = make()
    state = lore_jax.sharded_init(tx, PARAMS, mesh)
    grads = jax.device_put({k: jnp.ones((N, *v.shape)) for k, v in PARAMS.items()},
                           NamedSharding(mesh, P("data")))
    specs = jax.tree.map(lambda _: P(), state)
    step = jax.shard_map(lambda g, s: tx.update(jax.tree.map(lambda v: v[0], g), s, PARAMS),
                         mesh=mesh, in_specs=(P("data"), specs), out_specs=(P(), specs),
                         check_vma=False)
    with pytest.raises(ValueError, match=r"its state's per-device field \w+.* has shape "
                                         r"\(8,.*lore_jax\.state_specs\(opt_state\)"):
        jax.eval_shape(step, grads, jax.device_put(state, NamedSharding(mesh, P())))


# --------------------------------------------------------------- model-sharded parameters

MODEL_SPECS = {"w1": P(None, "model"), "w2": P("model", None), "b1": P("model")}


def sharded_params(mesh2):
    rng = np.random.default_rng(0)
    full = {"w1": rng.standard_normal((12, 32)) / 4, "w2": rng.standard_normal((32, 10)) / 6,
            "b1": np.zeros(32)}
    return {k: jax.device_put(jnp.asarray(v, jnp.float32), NamedSharding(mesh2, MODEL_SPECS[k]))
            for k, v in full.items()}


@pytest.fixture(scope="module")
def mesh2():
    return jax.make_mesh((4, 2), ("data", "model"))


def sharded_step(tx, mesh2, state):
    """``(grads, state) -> (update, state)``; grads ``(4, *shape)``, sharded like the params."""
    specs = lore_jax.state_specs(state)
    grad_specs = {k: P("data", *s) for k, s in MODEL_SPECS.items()}

    def step(g, s):
        return tx.update(jax.tree.map(lambda v: v[0], g), s)

    return jax.jit(jax.shard_map(step, mesh=mesh2, in_specs=(grad_specs, specs),
                                 out_specs=(MODEL_SPECS, specs)))


def shard_of(x: np.ndarray, spec: P, m: int) -> np.ndarray:
    """Model shard ``m`` of 2 of a (global) parameter-shaped array."""
    axis = list(spec).index("model")
    return np.split(x, 2, axis=axis)[m]


def test_model_sharded_greedylore_compresses_each_shard_like_the_reference(mesh2):
    params = sharded_params(mesh2)
    tx = lore_jax.greedylore(3, update_interval=3, warmup_steps=1, key=7, tracking="off",
                             min_compression_rate=1.0)
    state = lore_jax.sharded_init(tx, params, mesh2)
    gl = state
    bases = [s.basis for s in greedylore_bases(gl)]
    assert [u.sharding.spec[0] for u in bases] == ["model"] * len(bases)
    errors = jax.tree.leaves(gl.error)
    assert [e.sharding.spec[0] for e in errors] == [("data", "model")] * len(errors)
    step = sharded_step(tx, mesh2, state)
    local = {k: shard_of(np.asarray(v), MODEL_SPECS[k], 0) for k, v in params.items()}
    refs = [GreedyLoreReference(local, 3, 3, 1, 4, jax.random.PRNGKey(7), rate=1.0)
            for _ in range(2)]
    rng = np.random.default_rng(1)

    def place(grads):
        return {k: jax.device_put(v, NamedSharding(mesh2, P("data", *MODEL_SPECS[k])))
                for k, v in grads.items()}

    text = step.lower(place({k: np.zeros((4, *v.shape), np.float32) for k, v in params.items()}),
                      state).compile().as_text()
    for t in range(6):    # warm-up, refresh, compressed x 2, refresh, compressed
        grads = {k: (rng.standard_normal((4, *v.shape)) * (1 + np.arange(v.shape[-1]) / 4)
                     ).astype(np.float32) for k, v in params.items()}
        before = lore_jax.communication(state)["bits_sent"]
        out, state = step(place(grads), state)
        for m, ref in enumerate(refs):
            want = ref.step([{k: shard_of(g[d], MODEL_SPECS[k], m) for k, g in grads.items()}
                             for d in range(4)])
            for k in params:
                np.testing.assert_allclose(shard_of(np.asarray(out[k]), MODEL_SPECS[k], m),
                                           want[k], rtol=2e-4, atol=2e-5, err_msg=f"{t} {k}")
        # Each device sends its shard's payload over "data": w1 (12 x 16), w2 (16 x 10)
        # -> oriented (10 x 16); b1 (16,) dense.
        shard_bits = (12 * 16 + 16 * 10 + 16) * 32 if t in (0, 1, 4) else \
            ((12 + 3 * 16) + (10 + 3 * 16) + 16) * 32
        assert lore_jax.communication(state)["bits_sent"] - before == shard_bits
    # In the HLO: the f32 all-reduces are these payloads; one all-reduce of int32 flags
    # agrees on "finite" (the output's, the new memory's) across the model shards.
    cols = lore_jax.hlo_collectives(text)
    flags = [c for c in cols if {d for d, _ in c["shapes"]} == {"s32"}]
    assert len(flags) == 1 and all(c["op"] == "all-reduce" for c in cols)
    assert all(shape == () for _, shape in flags[0]["shapes"])


def test_model_sharded_full_rank_greedylore_trains_like_the_dense_mean(mesh2):
    """Full rank, every matrix compressed: lossless, so the same losses as a dense mean."""
    def loss(p, batch):
        x, y = batch
        h = jnp.tanh(x @ p["w1"] + p["b1"])
        return jnp.mean((jax.lax.psum(h @ p["w2"], "model") - y) ** 2)

    rng = np.random.default_rng(3)
    batches = [(rng.standard_normal((32, 12)).astype(np.float32),
                rng.standard_normal((32, 10)).astype(np.float32)) for _ in range(12)]
    losses = {}
    for name, first in {
        "dense": lore_jax.compressed_mean(C.identity(), error_feedback=None),
        "greedylore": lore_jax.greedylore(16, update_interval=4, min_compression_rate=0),
    }.items():
        train = lore_jax.data_parallel(loss, optax.chain(first, optax.adam(1e-2)), mesh2)
        params = sharded_params(mesh2)
        state = train.init(params)
        losses[name] = []
        for b in batches:
            params, state, value = train.step(params, state, b)
            losses[name].append(float(value))
        assert params["w1"].sharding.spec == P(None, "model")
    np.testing.assert_allclose(losses["greedylore"], losses["dense"], rtol=2e-4)
    assert losses["dense"][-1] < losses["dense"][0]


def test_model_sharded_nan_on_one_shard_keeps_every_shard_state(mesh2):
    params = sharded_params(mesh2)
    for tx in (lore_jax.greedylore(3, update_interval=3, min_compression_rate=1.0),
               lore_jax.compressed_mean(C.powersgd(2))):
        state = lore_jax.sharded_init(tx, params, mesh2)
        step = sharded_step(tx, mesh2, state)
        grads = {k: np.ones((4, *v.shape), np.float32) for k, v in params.items()}
        grads["w1"][2, 0, -1] = np.nan           # data row 2, the last column: model shard 1
        placed = {k: jax.device_put(v, NamedSharding(mesh2, P("data", *MODEL_SPECS[k])))
                  for k, v in grads.items()}
        _, new = step(placed, state)
        assert int(new.nonfinite_steps) == 1 and int(new.count) == 0
        counters = {f: getattr(state, f) for f in ("nonfinite_steps", "bits_sent", "bits_dense")}
        for a, b in zip(jax.tree.leaves(new._replace(**counters)), jax.tree.leaves(state),
                        strict=True):                # every shard's state as it was
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_parameters_sharded_over_the_data_axis_are_refused(mesh2):
    w = jax.device_put(jnp.zeros((8, 16)), NamedSharding(mesh2, P("data", None)))
    with pytest.raises(ValueError, match=r"\['w'\] is sharded.*over the data axis 'data'"):
        lore_jax.sharded_init(lore_jax.greedylore(2), {"w": w}, mesh2)


@pytest.mark.parametrize("make", [
    lambda: lore_jax.greedylore(2, update_interval=2),
    lambda: lore_jax.compressed_mean(C.powersgd(2)),
], ids=["greedylore", "powersgd"])
def test_model_sharded_dense_leaves_beside_replicated_matrices(mesh2, make):
    """Only the (dense, size-gated) shards vary over "model"; the compressed matrix is
    replicated: the step still agrees on finiteness over "model" and trains."""
    specs = {"w1": P(None, "model"), "w2": P("model", None), "w3": P()}
    rng = np.random.default_rng(4)
    params = {k: jax.device_put(jnp.asarray(rng.standard_normal(s) / 4, jnp.float32),
                                NamedSharding(mesh2, specs[k]))
              for k, s in {"w1": (12, 4), "w2": (4, 10), "w3": (10, 10)}.items()}

    def loss(p, batch):
        x, y = batch
        h = jax.lax.psum(jnp.tanh(x @ p["w1"]) @ p["w2"], "model")
        return jnp.mean((h @ p["w3"] - y) ** 2)

    train = lore_jax.data_parallel(loss, optax.chain(make(), optax.adam(1e-2)), mesh2)
    state = train.init(params)
    batch = (rng.standard_normal((32, 12)).astype(np.float32),
             rng.standard_normal((32, 10)).astype(np.float32))
    losses = []
    for _ in range(4):
        params, state, value = train.step(params, state, batch)
        losses.append(float(value))
    assert int(state[0].count) == 4 and losses[-1] < losses[0]
