"""Tests of the collective helpers: the finiteness flag and the packed rounds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import put
from jax.sharding import PartitionSpec as P

from lore_jax import collectives
from lore_jax.accounting import hlo_collectives

N = 8


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, None])
def test_all_finite_flags_exactly_the_non_finite_entries(bad):
    rng = np.random.default_rng(0)
    tree = {"w": rng.standard_normal((5, 7)).astype(np.float32),
            # 3e38 each: their sum overflows float32, which must not count as non-finite
            "big": np.full((4,), 3e38, np.float32),
            "half": jnp.asarray(rng.standard_normal(6), jnp.bfloat16)}
    if bad is not None:
        tree["w"][2, 3] = bad
    want = all(bool(np.all(np.isfinite(np.asarray(x, np.float32))))
               for x in jax.tree.leaves(tree))
    assert bool(jax.jit(collectives.all_finite)(tree)) == want == (bad is None)
    tree["half"] = tree["half"].at[1].set(jnp.inf)
    assert not bool(jax.jit(collectives.all_finite)(tree))
    assert bool(collectives.all_finite({}))


@pytest.mark.parametrize("name", ["pmean_packed", "all_gather_packed"])
def test_packed_collectives_are_one_op_per_dtype_and_equal_numpy(mesh, name):
    rng = np.random.default_rng(1)
    shapes = [(3, 4), (5,), (2, 2, 2), ()]
    xs = [rng.standard_normal((N,) + s).astype(np.float32) for s in shapes]
    xs.append(rng.standard_normal((N, 6)).astype(np.float32).astype(jnp.bfloat16))
    fn = getattr(collectives, name)

    def body(*leaves):
        out = fn([x[0] for x in leaves], "data")
        return tuple(out)

    out_specs = tuple(P() for _ in xs)
    step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=tuple(P("data") for _ in xs),
                                 out_specs=out_specs))
    xs = put(xs, mesh)
    got = step(*xs)
    for x, g in zip(xs, got, strict=True):
        want = np.mean(np.asarray(x, np.float32), axis=0) if name == "pmean_packed" \
            else np.asarray(x, np.float32)
        tol = 1e-2 if x.dtype == jnp.bfloat16 else 1e-6
        np.testing.assert_allclose(np.asarray(g, np.float32), want, rtol=tol, atol=tol)
    cols = hlo_collectives(step.lower(*xs).compile().as_text())
    kind = "all-reduce" if name == "pmean_packed" else "all-gather"
    assert {c["op"] for c in cols} == {kind}
    # One flat buffer of the float32 leaves (12 + 5 + 8 + 1 entries), one of bfloat16
    # (XLA may put both into one tuple-shaped op, and XLA:CPU widens the bfloat16 one).
    lead = () if name == "pmean_packed" else (N,)
    assert sorted(dims for c in cols for _, dims in c["shapes"]) == [lead + (6,),
                                                                     lead + (26,)]


def test_pmean_packed_returns_the_buffers_its_means_are_cut_from(mesh):
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((N,) + s).astype(np.float32) for s in [(3, 4), (5,), ()]]
    xs.append(rng.standard_normal((N, 6)).astype(np.float32).astype(jnp.bfloat16))

    def body(*leaves):
        means, buffers = collectives.pmean_packed([x[0] for x in leaves], "data",
                                                  with_buffers=True)
        return tuple(means), tuple(buffers)

    step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=tuple(P("data") for _ in xs),
                                 out_specs=P()))
    means, buffers = step(*put(xs, mesh))
    # One buffer per dtype, in order of first appearance: float32 (12 + 5 + 1), bfloat16.
    assert [(b.dtype, b.shape) for b in buffers] == [(jnp.float32, (18,)),
                                                     (jnp.bfloat16, (6,))]
    want = np.concatenate([np.mean(x, axis=0).ravel() for x in xs[:3]])
    np.testing.assert_allclose(buffers[0], want, rtol=1e-6, atol=1e-6)
    for m, x in zip(means, xs, strict=True):
        np.testing.assert_allclose(np.asarray(m, np.float32),
                                   np.mean(np.asarray(x, np.float32), axis=0), rtol=1e-2,
                                   atol=1e-2)
    # Without an axis the means are the leaves and so are the buffers.
    tree = [jnp.ones(2), jnp.zeros(())]
    out, bufs = collectives.pmean_packed(tree, None, with_buffers=True)
    assert out is tree and len(bufs) == 2
