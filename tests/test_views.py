"""Which axes of an N-D leaf form the matrix: optax's dimension numbers, Flax defaults."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import init_and_step, put

import lore_jax
from lore_jax import compressors as C
from lore_jax import subspace
from lore_jax.subspace import DimensionNumbers

N = 8


@pytest.mark.parametrize(
    "shape, dims, matrices",
    [
        # attention query (in, heads, head_dim): the in x (heads * head_dim) map
        ((12, 3, 4), DimensionNumbers(0, (1, 2)), lambda x: x.reshape(1, 12, 12)),
        # attention out (heads, head_dim, out)
        ((3, 4, 12), DimensionNumbers((0, 1), 2), lambda x: x.reshape(1, 12, 12)),
        # conv (kh, kw, in, out) with the default rule
        ((3, 3, 2, 5), None, lambda x: x.reshape(1, 18, 5)),
        # a stack of layers (layers, in, out): one matrix per layer
        ((3, 6, 10), DimensionNumbers(1, 2), lambda x: x),
        # axes out of order, negative axes
        ((5, 2, 7), DimensionNumbers(-1, (0,)), lambda x: np.transpose(x, (1, 2, 0))),
    ],
)
def test_views_cut_the_leaf_like_numpy(shape, dims, matrices):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    view = subspace.matrix_view(shape, dims)
    want = matrices(x)
    np.testing.assert_array_equal(subspace.arrange(jnp.asarray(x), view), want)
    oriented = subspace.to_matrices(jnp.asarray(x), view)     # projected along the smaller side
    expect = np.swapaxes(want, -1, -2) if want.shape[-2] > want.shape[-1] else want
    np.testing.assert_array_equal(oriented, expect)
    np.testing.assert_array_equal(subspace.from_matrices(oriented, view, x.dtype), x)


class Model(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(4, 64, decode=False, rngs=rngs)
        self.general = nnx.LinearGeneral(64, (4, 16), rngs=rngs)
        self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.embed = nnx.Embed(100, 64, rngs=rngs)
        self.dense = nnx.Linear(64, 32, rngs=rngs)
        self.norm = nnx.LayerNorm(64, rngs=rngs)


def shapes_of(params, dims=None) -> dict:
    views = subspace.resolve_views(params, dims)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return {p: None if v is None else (v.batch, v.rows, v.cols)
            for p, v in zip(paths, views, strict=True)}


def test_default_views_are_right_for_flax_modules():
    model = Model(nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    exact = {
        "['attn']['query']['kernel']": (1, 64, 64), "['attn']['key']['kernel']": (1, 64, 64),
        "['attn']['value']['kernel']": (1, 64, 64), "['attn']['out']['kernel']": (1, 64, 64),
        "['conv']['kernel']": (1, 27, 8), "['embed']['embedding']": (1, 100, 64),
        "['dense']['kernel']": (1, 64, 32), "['general']['kernel']": (1, 64, 64),
    }
    for path, shape in shapes_of(params, lore_jax.flax_dimension_numbers(model)).items():
        assert shape == exact.get(path), path    # biases, per-head biases, scales: None
    defaults = shapes_of(params)
    for path, shape in defaults.items():
        if path != "['general']['kernel']":      # a general LinearGeneral needs the module
            assert shape == exact.get(path), path
    assert defaults["['attn']['query']['bias']"] is None        # (4, 16): not a matrix


def grads_like(params, seed):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal((N, *v.shape)).astype(np.float32) for k, v in params.items()}


def run(tx, params, grads, mesh, steps):
    state, step = init_and_step(tx, params, mesh)
    outs = []
    for g in grads[:steps]:
        out, state = step(put(g, mesh), state)
        outs.append(out)
    return outs, state


@pytest.mark.parametrize("make_tx", [
    lambda: lore_jax.greedylore(2, update_interval=3, min_compression_rate=0),
    lambda: lore_jax.compressed_mean(C.powersgd(2)),
    lambda: lore_jax.compressed_mean(C.random_projection(2)),
], ids=["greedylore", "powersgd", "random_projection"])
def test_attention_kernels_are_compressed_as_their_linear_maps(mesh, make_tx):
    """An attention projection (in, heads, head_dim) with its (heads, head_dim) bias gives
    the same steps as the equivalent 2-D kernel and 1-D bias."""
    attn = {"bias": jnp.zeros((4, 16)), "kernel": jnp.zeros((64, 4, 16))}
    flat = {"bias": jnp.zeros(64), "kernel": jnp.zeros((64, 64))}
    grads = [grads_like(attn, seed) for seed in range(5)]
    flat_grads = [{k: v.reshape(N, *flat[k].shape) for k, v in g.items()} for g in grads]
    outs, state = run(make_tx(), {"query": attn}, [{"query": g} for g in grads], mesh, 5)
    ref, ref_state = run(make_tx(), {"query": flat}, [{"query": g} for g in flat_grads], mesh, 5)
    for out, want in zip(outs, ref, strict=True):
        for k in attn:
            np.testing.assert_allclose(np.asarray(out["query"][k]).reshape(flat[k].shape),
                                       want["query"][k], rtol=2e-5, atol=1e-6)
    assert lore_jax.communication(state) == lore_jax.communication(ref_state)


def test_batch_axes_compress_each_slice_as_its_own_matrix(mesh):
    stacked = {"layers": jnp.zeros((3, 8, 24))}
    separate = {f"l{i}": jnp.zeros((8, 24)) for i in range(3)}
    grads = [grads_like(stacked, seed) for seed in range(5)]
    sep_grads = [{f"l{i}": g["layers"][:, i] for i in range(3)} for g in grads]
    dims = DimensionNumbers(reduction_axis=1, output_axis=2)
    tx = lore_jax.greedylore(2, update_interval=3, weight_dimension_numbers=dims)
    outs, state = run(tx, stacked, grads, mesh, 5)
    ref, ref_state = run(lore_jax.greedylore(2, update_interval=3), separate, sep_grads, mesh, 5)
    for out, want in zip(outs, ref, strict=True):
        for i in range(3):
            np.testing.assert_allclose(out["layers"][i], want[f"l{i}"], rtol=2e-5, atol=1e-6)
    # one group of three 8 x 16 matrices; range tracking keeps r + 1 = 3 Ritz vectors each
    assert [s.basis.shape for s in state.compressor_state] == [(3, 8, 3)]
    assert lore_jax.communication(state) == lore_jax.communication(ref_state)
    # PowerSGD: one warm start per matrix, the three in one group
    cstate = lore_jax.compressed_mean(C.powersgd(2), weight_dimension_numbers=dims).init(
        stacked).compressor_state
    assert [q.shape for q in cstate] == [(3, 24, 2)]


def test_optax_dimension_numbers_and_per_leaf_trees_are_accepted():
    params = {"q": jnp.zeros((64, 4, 16)), "b": jnp.zeros((4, 16))}
    galore = optax.contrib.GaLoreDimensionNumbers(0, (1, 2))
    assert shapes_of(params, {"q": galore, "b": None}) == {"['b']": None, "['q']": (1, 64, 64)}
    muon = optax.contrib.MuonDimensionNumbers(0, (1, 2))
    assert shapes_of(params, lambda p: {"q": muon, "b": None})["['q']"] == (1, 64, 64)
    assert shapes_of(params, DimensionNumbers(0, 1)) == {"['b']": (1, 4, 16),
                                                         "['q']": (16, 64, 4)}


@pytest.mark.parametrize("dims, match", [
    ({"q": DimensionNumbers(0, 0), "b": None}, r"leaf \['q'\].*disjoint"),
    ({"q": DimensionNumbers(0, 5), "b": None}, r"leaf \['q'\].*output_axis=5"),
    ({"q": DimensionNumbers(0, (1, 2))}, r"no entry for the leaf \['b'\]"),
    ({"q": None, "b": DimensionNumbers(0, 1), "v": DimensionNumbers()}, None),
])
def test_bad_dimension_numbers_name_the_leaf(dims, match):
    params = {"q": jnp.zeros((64, 4, 16)), "b": jnp.zeros(16)}
    tx = lore_jax.greedylore(2, axis_name=None, weight_dimension_numbers=dims)
    with pytest.raises(ValueError, match=match or r"leaf \['b'\].*not a matrix"):
        tx.init(params)
