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


@pytest.mark.parametrize("count", [False, True], ids=["constant cuts", "opaque cuts"])
@pytest.mark.parametrize("name", ["pmean", "all_gather_packed"])
def test_packed_collectives_are_one_op_per_buffer_and_equal_numpy(mesh, name, count):
    rng = np.random.default_rng(1)
    shapes = [(3, 4), (5,), (2, 2, 2), (), (5,)]
    xs = [rng.standard_normal((N,) + s).astype(np.float32) for s in shapes]
    xs.append(rng.standard_normal((N, 6)).astype(np.float32).astype(jnp.bfloat16))
    fn = getattr(collectives, name)

    def body(*leaves):
        out = fn([x[0] for x in leaves], "data", jnp.int32(3) if count else None)
        return tuple(out)

    out_specs = tuple(P() for _ in xs)
    step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=tuple(P("data") for _ in xs),
                                 out_specs=out_specs))
    xs = put(xs, mesh)
    got = step(*xs)
    for x, g in zip(xs, got, strict=True):
        want = np.mean(np.asarray(x, np.float32), axis=0) if name == "pmean" \
            else np.asarray(x, np.float32)
        tol = 1e-2 if x.dtype == jnp.bfloat16 else 1e-6
        np.testing.assert_allclose(np.asarray(g, np.float32), want, rtol=tol, atol=tol)
    cols = hlo_collectives(step.lower(*xs).compile().as_text())
    kind = "all-reduce" if name == "pmean" else "all-gather"
    assert {c["op"] for c in cols} == {kind}
    shapes = sorted((dt, dims) for c in cols for dt, dims in c["shapes"])
    if name == "pmean":
        # One flat buffer of the float32 leaves (12 + 5 + 8 + 1 + 5 entries), one of
        # bfloat16 (XLA may put both into one tuple-shaped op, and XLA:CPU widens the
        # bfloat16 one).
        assert [dims for _, dims in shapes] == [(6,), (31,)]
    else:
        # An all-gather moves bytes: every leaf in one uint8 buffer, 31 * 4 + 6 * 2.
        assert shapes == [("u8", (N, 31 * 4 + 6 * 2))]
