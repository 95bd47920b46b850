"""Tests of the compressors: declared constants by Monte Carlo, NumPy references, exact bits.

Every unbiased compressor is checked against an independent closed form of its second
moment E||Q(v)||^2 (so a wrong probability or scale fails), for unbiasedness with
per-coordinate z-scores from the Monte Carlo standard error, and against its declared
alpha. Deterministic compressors are compared with NumPy references. Bit counts are
hand-written from the spec's section 4 table.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lore_jax import compressors as C

SHAPE = (8, 32)            # d = 256; oriented (a, b) = (8, 32)
D, A, B = 256, 8, 32
DRAWS = 4000
Z = 6.0                    # z-score bound per coordinate (fixed seeds: deterministic)


def _inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    sparse = np.zeros(D)
    sparse[rng.choice(D, 16, replace=False)] = rng.standard_normal(16)
    return {
        "gaussian": rng.standard_normal(D).reshape(SHAPE),
        "cauchy": rng.standard_cauchy(D).reshape(SHAPE),
        "student_t3": rng.standard_t(3, D).reshape(SHAPE),
        "sparse": sparse.reshape(SHAPE),
    }


INPUTS = _inputs()
KINDS = list(INPUTS)


def _draws(comp: C.Compressor) -> np.ndarray:
    """``(len(INPUTS), DRAWS, *SHAPE)`` reconstructions, one jit per compressor."""
    x = jnp.asarray(np.stack([INPUTS[k] for k in KINDS]), jnp.float32)
    keys = jax.random.split(jax.random.key(42), DRAWS)

    def roundtrip(key, v):
        return comp.decompress(*comp.compress(key, v))

    f = jax.jit(jax.vmap(jax.vmap(roundtrip, (0, None)), (None, 0)))
    return np.asarray(f(keys, x), np.float64)


_CACHE: dict[str, np.ndarray] = {}


def draws(comp: C.Compressor) -> np.ndarray:
    if comp.name not in _CACHE:
        _CACHE[comp.name] = _draws(comp)
    return _CACHE[comp.name]


# ------------------------------------------- exact per-coordinate second moments (NumPy)
# Each returns E[Q(v)_i^2] per coordinate, written from the compressor's definition.


def _dither_moment(v: np.ndarray, s: int, norm: str, bucket: int | None) -> np.ndarray:
    """s-level dithering: v_i^2 + (n/s)^2 f (1 - f), f = frac(s |v_i| / n), per bucket."""
    flat = v.reshape(-1)
    bucket = bucket or flat.size
    out = np.zeros_like(flat)
    for start in range(0, flat.size, bucket):
        vb = flat[start:start + bucket]
        n = np.linalg.norm(vb) if norm == "l2" else np.max(np.abs(vb))
        if n == 0:
            continue
        t = s * np.abs(vb) / n
        f = t - np.floor(t)
        out[start:start + bucket] = vb**2 + (n / s) ** 2 * f * (1 - f)
    return out.reshape(v.shape)


def _bernoulli_moment(v: np.ndarray, probs: np.ndarray) -> np.ndarray:
    return np.where(v != 0, v**2 / np.where(v != 0, probs, 1.0), 0.0)


def _magnitude_probs(v: np.ndarray, p: float) -> np.ndarray:
    return np.minimum(1.0, p * v.size * np.abs(v) / np.sum(np.abs(v)))


UNBIASED = [
    (C.identity(), lambda v: v**2),
    (C.bernoulli(0.25), lambda v: v**2 / 0.25),
    (C.bernoulli(0.25, shared_seed=True), lambda v: v**2 / 0.25),
    (C.bernoulli(0.25, magnitude=True),
     lambda v: _bernoulli_moment(v, _magnitude_probs(v, 0.25))),
    (C.random_k(32), lambda v: D / 32 * v**2),
    (C.random_k(32, shared_seed=True), lambda v: D / 32 * v**2),
    (C.terngrad(), lambda v: np.max(np.abs(v)) * np.abs(v)),
    (C.qsgd(1), lambda v: _dither_moment(v, 1, "l2", None)),
    (C.qsgd(4, bucket_size=64), lambda v: _dither_moment(v, 4, "l2", 64)),
    (C.stochastic_rounding(4), lambda v: _dither_moment(v, 7, "linf", None)),
    # Only the total is closed-form here: E||Q||^2 = (a/r) ||M||^2.
    (C.random_projection(2, unbiased=True), lambda v: np.float64(A / 2 * np.sum(v**2))),
]


@pytest.mark.parametrize("comp,moment", UNBIASED, ids=[c.name for c, _ in UNBIASED])
def test_unbiased_monte_carlo(comp, moment):
    assert comp.kind == "unbiased"
    q = draws(comp)
    for i, kind in enumerate(KINDS):
        v = INPUTS[kind].astype(np.float32).astype(np.float64)
        qi = q[i]
        exact = np.asarray(moment(v))
        # E Q(v) = v, coordinate by coordinate, within Z standard errors (from the exact
        # variance where it is known: a rare event never drawn has a zero sample variance).
        var = exact - v**2 if exact.shape == v.shape else qi.var(0)
        tol = Z * np.sqrt(np.maximum(var, 0) / DRAWS) + 1e-5 * (np.abs(v) + np.abs(v).max() * 1e-3)
        assert np.all(np.abs(qi.mean(0) - v) <= tol), (kind, np.max(np.abs(qi.mean(0) - v) / tol))
        # E||Q(v)||^2 equals the closed form, within Z standard errors.
        sq = np.sum(qi**2, axis=(1, 2))
        total = float(np.sum(exact))
        assert abs(sq.mean() - total) <= Z * sq.std() / math.sqrt(DRAWS) + 1e-5 * total, kind
        # ... and the declared alpha bounds it, both the shape's and the refined one.
        norm2 = np.sum(v**2)
        assert total <= comp.alpha(SHAPE) * norm2 * (1 + 1e-6), kind
        assert total <= float(comp.alpha(jnp.asarray(v, jnp.float32))) * norm2 * (1 + 1e-5), kind
        assert comp.omega(SHAPE) == pytest.approx(comp.alpha(SHAPE) - 1)


def test_declared_alphas():
    """The spec's constants, written out (section 4)."""
    assert C.bernoulli(0.2).alpha(SHAPE) == pytest.approx(5.0)
    assert C.bernoulli(0.2, magnitude=True).alpha(SHAPE) == pytest.approx(6.0)
    assert C.random_k(32).alpha(SHAPE) == D / 32
    assert C.terngrad().alpha(SHAPE) == pytest.approx((1 + 16) / 2)
    assert C.terngrad().alpha(jnp.asarray(INPUTS["sparse"])) == pytest.approx((1 + 4) / 2)
    assert C.qsgd(4).alpha(SHAPE) == pytest.approx(1 + min(D / 64, 16 / 4))
    assert C.qsgd(4, bucket_size=64).alpha(SHAPE) == pytest.approx(1 + min(64 / 64, 8 / 4))
    assert C.stochastic_rounding(4).alpha(SHAPE) == pytest.approx(1 + min(D / 196, 16 / 7))
    assert C.random_projection(2, unbiased=True).alpha(SHAPE) == A / 2
    assert C.top_k(32).delta(SHAPE) == 32 / D
    assert C.scaled_sign().delta(SHAPE) == 1 / D
    assert C.random_projection(2).delta(SHAPE) == 2 / A
    assert C.greedy_svd(2).delta(SHAPE) == 2 / A
    assert C.grid_rounding(0.1).epsilon(SHAPE) == pytest.approx(16 * 0.1 / 2)
    assert C.as_contraction(C.random_k(32)).delta(SHAPE) == 32 / D
    with pytest.raises(ValueError, match="alpha"):
        C.top_k(2).alpha(SHAPE)
    with pytest.raises(ValueError, match="delta"):
        C.sign().delta(SHAPE)


CONTRACTIVE_MC = [
    (C.random_projection(2), 2 / A),
    (C.as_contraction(C.random_k(32)), 32 / D),
]


@pytest.mark.parametrize("comp,delta", CONTRACTIVE_MC, ids=[c.name for c, _ in CONTRACTIVE_MC])
def test_contraction_in_expectation(comp, delta):
    """E||Q(v) - v||^2 <= (1 - delta)||v||^2; both are exact equalities here."""
    assert comp.kind == "contractive" and comp.delta(SHAPE) == pytest.approx(delta)
    q = draws(comp)
    for i, kind in enumerate(KINDS):
        v = INPUTS[kind]
        err = np.sum((q[i] - v) ** 2, axis=(1, 2))
        bound = (1 - delta) * np.sum(v**2)
        assert abs(err.mean() - bound) <= Z * err.std() / math.sqrt(DRAWS) + 1e-5 * bound, kind


# ------------------------------------------------------- deterministic: NumPy references


def _run(comp, v, state=None):
    payload, ctx = comp.compress(jax.random.key(0), jnp.asarray(v, jnp.float32), state)
    return np.asarray(comp.decompress(payload, ctx), np.float64)


def _run_all(comp) -> dict[str, np.ndarray]:
    """Reconstructions of every input, one compilation."""
    x = jnp.asarray(np.stack([INPUTS[k] for k in KINDS]), jnp.float32)
    out = jax.jit(jax.vmap(lambda v: comp.decompress(*comp.compress(None, v))))(x)
    return dict(zip(KINDS, np.asarray(out, np.float64), strict=True))


def _np_top_k(v, k):
    flat = v.reshape(-1)
    idx = np.argsort(-np.abs(flat), kind="stable")[:k]
    out = np.zeros_like(flat)
    out[idx] = flat[idx]
    return out.reshape(v.shape)


def _inputs64():
    return {k: v.astype(np.float32).astype(np.float64) for k, v in INPUTS.items()}


def test_top_k_sign_and_scaled_sign_match_numpy():
    top, sgn, ss = _run_all(C.top_k(32)), _run_all(C.sign()), _run_all(C.scaled_sign())
    for kind, v in _inputs64().items():
        norm2 = np.sum(v**2)
        np.testing.assert_allclose(top[kind], _np_top_k(v, 32), rtol=1e-6)
        delta = float(C.top_k(32).delta(jnp.asarray(v, jnp.float32)))
        assert delta == pytest.approx(min(1.0, 32 / np.count_nonzero(v)))
        assert np.sum((top[kind] - v) ** 2) <= (1 - delta) * norm2 + 1e-6 * norm2

        np.testing.assert_array_equal(sgn[kind], np.where(v < 0, -1.0, 1.0))

        want = np.abs(v).mean() * np.where(v < 0, -1.0, 1.0)
        np.testing.assert_allclose(ss[kind], want, rtol=1e-5)
        delta = float(C.scaled_sign().delta(jnp.asarray(v, jnp.float32)))
        assert delta == pytest.approx(np.sum(np.abs(v)) ** 2 / (D * norm2), rel=1e-5)
        assert np.sum((ss[kind] - v) ** 2) == pytest.approx((1 - delta) * norm2, rel=1e-4)


def test_greedy_svd_is_the_best_rank_r_approximation():
    got = _run_all(C.greedy_svd(2))
    for kind, v in _inputs64().items():
        u, s, vt = np.linalg.svd(v, full_matrices=False)
        np.testing.assert_allclose(got[kind], (u[:, :2] * s[:2]) @ vt[:2],
                                   atol=1e-4 * np.abs(v).max())
        assert np.sum((got[kind] - v) ** 2) <= (1 - 2 / A) * np.sum(v**2) * (1 + 1e-5)


@pytest.mark.parametrize("step", [0.05, 0.5])
def test_grid_rounding_is_within_epsilon(step):
    comp = C.grid_rounding(step)
    got = _run_all(comp)
    for kind, v in _inputs64().items():
        np.testing.assert_allclose(got[kind], step * np.round(v / step), atol=1e-6)
        eps = comp.epsilon(jnp.asarray(v, jnp.float32))
        assert np.linalg.norm(got[kind] - v) <= eps * (1 + 1e-6)
        assert eps <= comp.epsilon(SHAPE)


def test_bounded_grid_rounding_clips():
    got = _run_all(C.grid_rounding(0.25, max_abs=1.0))
    for kind, v in _inputs64().items():
        np.testing.assert_allclose(got[kind], 0.25 * np.clip(np.round(v / 0.25), -4, 4),
                                   atol=1e-6)
        inside = np.abs(v) <= 1.0 + 0.125
        assert np.all(np.abs(got[kind] - v)[inside] <= 0.125 + 1e-6)


def test_powersgd_matches_numpy_power_iteration():
    v = INPUTS["gaussian"]
    for iters in (1, 2):
        comp = C.powersgd(2, iters=iters)
        q0 = comp.init(jax.random.key(1), SHAPE, jnp.float32)
        assert q0.shape == (B, 2)
        got = _run(comp, v, q0)
        m, q = v.astype(np.float32).astype(np.float64), np.asarray(q0, np.float64)
        for it in range(iters):
            p_hat = np.linalg.qr(m @ q)[0]
            if it < iters - 1:
                q = m.T @ p_hat
        want = p_hat @ (m.T @ p_hat).T
        np.testing.assert_allclose(got, want, atol=1e-4)
        # A projection: never expansive.
        assert np.sum((got - m) ** 2) <= np.sum(m**2)


def test_terngrad_clip_is_unbiased_for_the_clipped_vector():
    comp = C.terngrad(clip=2.5)
    assert comp.kind == "none" and comp.constant is None
    q = draws(comp)
    for i, kind in enumerate(KINDS):
        v = INPUTS[kind].astype(np.float32).astype(np.float64)
        c = 2.5 * v.std()
        target = np.clip(v, -c, c)
        var = np.abs(target) * (np.abs(target).max() - np.abs(target))  # ternary variance
        tol = Z * np.sqrt(var / DRAWS) + 1e-5 * np.abs(target).max()
        assert np.all(np.abs(q[i].mean(0) - target) <= tol), kind
        assert np.allclose(np.abs(q[i]).max(axis=(1, 2)), np.abs(target).max(), rtol=1e-5)


def test_lowrank_compressors_send_vectors_and_small_matrices_dense():
    for comp in (C.powersgd(4), C.random_projection(4), C.greedy_svd(4)):
        for shape in [(16,), (), (4, 4), (3, 40)]:
            x = jnp.arange(math.prod(shape), dtype=jnp.float32).reshape(shape)
            state = comp.init(jax.random.key(0), shape, jnp.float32)
            assert state is None
            np.testing.assert_array_equal(_run(comp, x, state), np.asarray(x))
            assert comp.bits(shape) == 32 * math.prod(shape)


# ------------------------------------------------------------------------------- bits


def ceil_log2(n: int) -> int:
    return math.ceil(math.log2(n)) if n > 1 else 0


def _ab(shape):
    rows, cols = math.prod(shape[:-1]), shape[-1]
    return min(rows, cols), max(rows, cols)


# (compressor, spec "bits (fixed)" hand count from (shape, d, w) with w the dtype's bits
# for leaves sent dense, the seed bits it counts but does not send, packed arrays).
def _sparse_bits(k, per_entry, extra=0):
    def count(shape, d, w):
        return w * d if d <= k else k * per_entry(d) + extra
    return count


def _sparse_seed(k):
    return lambda shape, d: 32 if d > k else 0


def _lowrank_bits(floats, seed=0):
    def count(shape, d, w):
        if len(shape) < 2:
            return w * d
        a, b = _ab(shape)
        if 2 >= a or 2 * floats(a, b) >= a * b:
            return w * d
        return 32 * 2 * floats(a, b) + seed
    return count


def _no_seed(shape, d):
    return 0


BITS = [
    (C.identity(), lambda s, d, w: w * d, _no_seed, 0),
    (C.random_k(5), _sparse_bits(5, lambda d: 32 + ceil_log2(d)), _no_seed, 1),
    (C.random_k(5, shared_seed=True), _sparse_bits(5, lambda d: 32, 32), _sparse_seed(5), 0),
    (C.top_k(5), _sparse_bits(5, lambda d: 32 + ceil_log2(d)), _no_seed, 1),
    (C.sign(), lambda s, d, w: d, _no_seed, 1),
    (C.scaled_sign(), lambda s, d, w: d + 32, _no_seed, 1),
    (C.terngrad(), lambda s, d, w: 32 + 2 * d, _no_seed, 1),
    (C.qsgd(3), lambda s, d, w: 32 + d * (1 + ceil_log2(4)), _no_seed, 1),
    (C.qsgd(5, bucket_size=16), lambda s, d, w: 32 * math.ceil(d / 16) + d * (1 + 3),
     _no_seed, 1),
    (C.stochastic_rounding(6), lambda s, d, w: 6 * d + 32, _no_seed, 1),
    (C.grid_rounding(0.25, max_abs=2.0), lambda s, d, w: d * ceil_log2(4.0 / 0.25 + 1),
     _no_seed, 1),
    (C.grid_rounding(0.1), lambda s, d, w: 32 * d, _no_seed, 0),
    (C.powersgd(2), _lowrank_bits(lambda a, b: a + b), _no_seed, 0),
    (C.powersgd(2, iters=3), _lowrank_bits(lambda a, b: 3 * (a + b)), _no_seed, 0),
    (C.random_projection(2), _lowrank_bits(lambda a, b: b, seed=32),
     lambda shape, d: 32 if _lowrank_bits(lambda a, b: b)(shape, d, 0) else 0, 0),
    (C.greedy_svd(2), _lowrank_bits(lambda a, b: a + b), _no_seed, 0),
]
SHAPES = [(8, 32), (7,), (3, 5, 6), (), (40, 9), (5, 3)]


def _abstract_payload(comp, shape, dtype=jnp.float32):
    x = jax.ShapeDtypeStruct(shape, dtype)
    state = comp.init(jax.random.key(0), shape, dtype)
    return jax.eval_shape(lambda k, x: comp.compress(k, x, state), jax.random.key(0), x)


def _buffer_bits(payload) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize * 8 for x in jax.tree.leaves(payload))


@pytest.mark.parametrize("comp,spec,seed,packed", BITS, ids=[c[0].name for c in BITS])
def test_bits_equal_spec_formula(comp, spec, seed, packed):
    for shape in SHAPES:
        d = math.prod(shape)
        assert comp.bits(shape) == spec(shape, d, 32), shape
        assert comp.bits(shape, jnp.bfloat16) == spec(shape, d, 16), shape
        # payload_bits (what compressed_mean counts) is the spec's count without the
        # seed, plus under 32 bits of word padding per packed array ...
        payload, ctx = _abstract_payload(comp, shape)
        sent = comp.payload_bits(payload, ctx)
        padding = sent - (comp.bits(shape) - seed(shape, d))
        assert 0 <= padding < max(32 * packed, 1), (shape, padding)
        # ... and the size of the buffers it sends (PowerSGD: one per round, the
        # payload being the last, (b, r)).
        if comp.name.startswith("powersgd") and ctx.shared is not None:
            assert _buffer_bits(payload) == 32 * 2 * _ab(shape)[1], shape
        else:
            assert sent == _buffer_bits(payload), shape


def test_bernoulli_bits_are_counted_from_the_message():
    x = jnp.asarray(INPUTS["sparse"], jnp.float32)
    for comp in (C.bernoulli(0.5), C.bernoulli(0.5, magnitude=True)):
        payload, ctx = comp.compress(jax.random.key(3), x)
        q = np.asarray(comp.decompress(payload, ctx))
        assert comp.bits(SHAPE) is None
        assert int(comp.payload_bits(payload, ctx)) == np.count_nonzero(q) * (32 + 8)
        assert 0 < np.count_nonzero(q) < 16
    comp = C.bernoulli(0.5, shared_seed=True)
    payload, ctx = comp.compress(jax.random.key(3), x)
    kept = np.asarray(ctx.shared)
    assert int(comp.payload_bits(payload, ctx)) == 32 * kept.sum()  # + 32 for the seed
    assert 64 < kept.sum() < 192


@settings(max_examples=15, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=0, max_size=3).map(tuple),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
)
def test_shapes_dtypes_and_bits_property(shape, dtype):
    """Every compressor returns the input's shape and dtype, and its bits follow the
    spec formula for any shape and dtype (checked abstractly, without compiling)."""
    x = jax.ShapeDtypeStruct(shape, dtype)
    w = jnp.dtype(dtype).itemsize * 8
    for comp, spec, _, _ in BITS + [(C.bernoulli(0.3), lambda s, d, w: None, None, None)]:
        payload, ctx = _abstract_payload(comp, shape, dtype)
        out = jax.eval_shape(comp.decompress, payload, ctx)
        assert (out.shape, out.dtype) == (x.shape, x.dtype), comp.name
        assert comp.bits(shape, dtype) == spec(shape, math.prod(shape), w), comp.name


_VALUES = st.lists(st.floats(-1e3, 1e3, width=32), min_size=D, max_size=D)


@functools.cache
def _roundtrip(comp_name: str, k: int | None = None):
    comp = C.top_k(k) if comp_name == "top_k" else C.scaled_sign()
    return jax.jit(lambda v: comp.decompress(*comp.compress(None, v)))


@settings(max_examples=20, deadline=None)
@given(values=_VALUES, k=st.sampled_from([1, 7, 100]))
def test_contraction_property(values, k):
    """top-k and scaled sign contract any input by their declared delta."""
    v = jnp.asarray(np.asarray(values, np.float32).reshape(SHAPE))
    norm2 = float(jnp.sum(v.astype(jnp.float32) ** 2))
    for comp, out in ((C.top_k(k), _roundtrip("top_k", k)(v)),
                      (C.scaled_sign(), _roundtrip("scaled_sign")(v))):
        delta = float(comp.delta(v))
        assert comp.delta(SHAPE) <= delta <= 1.0
        assert float(jnp.sum((out - v) ** 2)) <= (1 - delta) * norm2 * (1 + 1e-4) + 1e-30


# -------------------------------------------------------------------- packing, errors


def test_pack_bits_roundtrip_and_layout():
    rng = np.random.default_rng(0)
    widths = [1, 2, 3, 5, 8, 9, 13, 17, 31, 32]
    n = 97
    codes = [rng.integers(0, 2**w, n, dtype=np.uint64).astype(np.uint32) for w in widths]

    @jax.jit
    def roundtrip(codes):
        packed = [C.pack_bits(c, w) for c, w in zip(codes, widths, strict=True)]
        return packed, [C.unpack_bits(p, w, n) for p, w in zip(packed, widths, strict=True)]

    packed, unpacked = roundtrip([jnp.asarray(c) for c in codes])
    for c, w, p, u in zip(codes, widths, packed, unpacked, strict=True):
        assert p.shape == (math.ceil(n * w / 32),) and p.dtype == jnp.uint32
        np.testing.assert_array_equal(np.asarray(u), c)
        # Little-endian bit stream: code i sits at bits [i w, (i + 1) w).
        stream = np.unpackbits(np.asarray(p).view(np.uint8), bitorder="little")
        want = ((c[:, None].astype(np.uint64) >> np.arange(w, dtype=np.uint64)) & 1)
        np.testing.assert_array_equal(stream[: n * w], want.reshape(-1))
    assert C.pack_bits(jnp.zeros(5, jnp.uint32), 0).shape == (0,)
    assert [C.index_bits(d) for d in (1, 2, 3, 4, 5, 256, 257)] == [0, 1, 2, 2, 3, 8, 9]


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: C.top_k(0), "k must be an integer >= 1"),
        (lambda: C.random_k(2.5), "k must be an integer"),
        (lambda: C.bernoulli(0.0), r"p must be a probability in \(0, 1\]"),
        (lambda: C.bernoulli(1.5), r"p must be a probability"),
        (lambda: C.bernoulli(0.5, magnitude=True, shared_seed=True), "magnitude"),
        (lambda: C.qsgd(0), "levels must be an integer >= 1"),
        (lambda: C.qsgd(2, bucket_size=0), "bucket_size"),
        (lambda: C.stochastic_rounding(1), "bits must be an integer >= 2"),
        (lambda: C.stochastic_rounding(40), "bits must be <= 32"),
        (lambda: C.grid_rounding(0.0), "step must be a positive number"),
        (lambda: C.grid_rounding(0.1, max_abs=-1.0), "max_abs"),
        (lambda: C.terngrad(clip=0), "clip"),
        (lambda: C.powersgd(0), "rank"),
        (lambda: C.powersgd(2, iters=0), "iters"),
        (lambda: C.random_projection(-1), "rank"),
        (lambda: C.greedy_svd(True), "rank"),
        (lambda: C.as_contraction(C.top_k(2)), "unbiased"),
    ],
)
def test_bad_parameters_raise_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("make", [C.top_k, C.random_k])
def test_sparsifiers_take_k_or_a_fraction_of_each_leaf(make):
    q = make(fraction=0.25)
    assert q.bits((16,)) == make(4).bits((16,))
    assert q.bits((100,)) == make(25).bits((100,))
    assert q.bits((2,)) == make(1).bits((2,))   # at least one entry
    for bad in ({}, {"k": 2, "fraction": 0.1}, {"fraction": 0.0}, {"fraction": 1.5}):
        with pytest.raises(ValueError, match="k|fraction"):
            make(**bad)
