"""Sparsifiers: Bernoulli sparsification, random-k and top-k (spec §4, rows 1, 2, 8).

"Spec" is the lore_jax spec, the documentation's Spec page (``docs/spec.md``).

Each sends a subset of the entries of ``v = x.reshape(-1)`` (``d`` entries). Index
variants send the kept values with their indices, packed at ``ceil(log2 d)`` bits each;
shared-seed variants draw the subset from the replicated key, so only values travel and
the compressor is linear (devices keep the same entries, payloads are all-reduced).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lore_jax.compressors import base, packing
from lore_jax.compressors.base import Compressor


def _scatter(values: jax.Array, idx: jax.Array, d: int) -> jax.Array:
    return jnp.zeros((d,), values.dtype).at[idx].set(values)


def _entries(k: int | None, fraction: float | None):
    """``d -> k``: the entries a sparsifier keeps of a leaf of ``d`` entries (``k``, or
    ``max(1, round(fraction * d))``), after checking that exactly one is given."""
    if (k is None) == (fraction is None):
        raise ValueError(f"give exactly one of k (entries per leaf) and fraction (of each "
                         f"leaf's entries); got k={k!r}, fraction={fraction!r}.")
    if k is not None:
        base.check_int("k", k)
        return lambda d: k
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}.")
    return lambda d: max(1, int(round(fraction * d)))


def _describe(k: int | None, fraction: float | None) -> str:
    return f"k={k}" if k is not None else f"fraction={fraction:g}"


def _sparse(name: str, kind: str, linear: bool, k_of, select, scale: bool, constant):
    """A sparsifier keeping ``k = k_of(d)`` entries chosen by ``select(key, v, k) -> idx``.

    ``linear`` (shared seed): ``idx`` stays in the context and only values are sent;
    otherwise the payload is ``(values, packed indices)``. ``scale`` multiplies the values
    by ``d / k`` (unbiased random-k). Leaves with ``d <= k`` are sent dense (identity).
    """

    def compress(key, x, state=None, mean=None):
        del state, mean
        d = x.size
        k = k_of(d)
        if d <= k:
            return base.DENSE.compress(key, x)
        v = base.flat(x)
        idx = select(key, v, k)
        values = v[idx] * (d / k) if scale else v[idx]
        if linear:
            return values, base.context(x, idx)
        return (values, packing.pack_bits(idx, packing.index_bits(d))), base.context(x)

    def decompress(payload, ctx):
        d = base.size(ctx.shape)
        k = k_of(d)
        if d <= k:
            return base.DENSE.decompress(payload, ctx)
        if linear:
            return base.restore(_scatter(payload, ctx.shared, d), ctx)
        values, words = payload
        idx = packing.unpack_bits(words, packing.index_bits(d), k).astype(jnp.int32)
        return base.restore(_scatter(values, idx, d), ctx)

    def bits(shape, dtype=jnp.float32):
        d = base.size(shape)
        k = k_of(d)
        if d <= k:
            return base.DENSE.bits(shape, dtype)
        return 32 * k + 32 if linear else k * (32 + packing.index_bits(d))

    return Compressor(
        name=name, kind=kind, linear=linear, compress=compress, decompress=decompress,
        bits=bits, constant=lambda shape, v: constant(shape, v, k_of(base.size(shape))),
    )


def random_k(k: int | None = None, *, fraction: float | None = None,
             shared_seed: bool = False) -> Compressor:
    """Random-k sparsification: ``k`` uniformly chosen entries, scaled by ``d / k``.

    ``Q(v) = (d/k) sum_{i in S} v_i e_i`` with ``S`` a uniform ``k``-subset of ``[d]``:
    unbiased with ``E||Q(v)||^2 = (d/k) ||v||^2`` exactly, so ``alpha = d / k`` (derived
    in the lore_jax spec, consistent with the framework of Khirirat et al. 2018; not
    quoted from the paper). Leaves with ``d <= k`` are sent dense (``alpha = 1``).

    Bits (spec §4, row 2): ``k (32 + ceil(log2 d))`` with indices; ``32 k + 32``
    with a shared seed (the values and the seed; under :func:`lore_jax.compressed_mean`
    the seed comes from the replicated key and is not sent); the dense leaf when
    ``d <= k``.

    Args:
      k: entries kept per leaf, ``>= 1``.
      fraction: instead of ``k``, the share of each leaf's entries to keep: ``k =
        max(1, round(fraction * d))`` for a leaf of ``d`` entries.
      shared_seed: draw ``S`` from the shared key. Every device then keeps the same
        entries, so the compressor is linear and its payloads are all-reduced; the
        compression noise is shared rather than independent across devices.

    Returns:
      A :class:`Compressor` (kind ``"unbiased"``; linear iff ``shared_seed``).

    References:
      Stich, Cordonnier, Jaggi, "Sparsified SGD with memory", NeurIPS 2018.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from lore_jax import compressors
      >>> q = compressors.random_k(4)
      >>> payload, ctx = q.compress(jax.random.key(0), jnp.arange(16.0))
      >>> q.bits((16,)), q.alpha((16,))
      (144, 4.0)
    """
    k_of = _entries(k, fraction)

    def select(key, v, k):
        return jax.lax.top_k(jax.random.uniform(key, v.shape), k)[1]

    def constant(shape, v, k):
        d = base.size(shape)
        return d / k if d > k else 1.0

    name = f"random_k({_describe(k, fraction)}{', shared_seed' if shared_seed else ''})"
    return _sparse(name, "unbiased", shared_seed, k_of, select, True, constant)


def top_k(k: int | None = None, *, fraction: float | None = None) -> Compressor:
    """Top-k sparsification: keeps the ``k`` entries of largest magnitude.

    ``Q(v) = sum_{i in S} v_i e_i`` with ``S`` the ``k`` largest ``|v_i|`` (ties: lower
    index). The dropped tail holds at most ``1 - k/d`` of the energy, so it is a
    contraction with ``delta = k / d``; for an array with ``nnz`` non-zeros,
    ``delta = min(1, k / nnz)`` (derived in the lore_jax spec, consistent with the
    framework of Khirirat et al. 2018; not quoted from that paper).

    Bits (spec §4, row 8): ``k (32 + ceil(log2 d))``; the dense leaf when ``d <= k``.

    Args:
      k: entries kept per leaf, ``>= 1``.
      fraction: instead of ``k``, the share of each leaf's entries to keep: ``k =
        max(1, round(fraction * d))`` for a leaf of ``d`` entries (``fraction=0.01``:
        1% of every layer).

    Returns:
      A :class:`Compressor` (kind ``"contractive"``, not linear: payloads are
      all-gathered).

    References:
      Stich, Cordonnier, Jaggi, "Sparsified SGD with memory", NeurIPS 2018; Aji and
      Heafield, "Sparse communication for distributed gradient descent", EMNLP 2017.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from lore_jax import compressors
      >>> q = compressors.top_k(2)
      >>> payload, ctx = q.compress(None, jnp.array([0.1, -3.0, 2.0, 0.5]))
      >>> q.decompress(payload, ctx)
      Array([ 0., -3.,  2.,  0.], dtype=float32)
      >>> compressors.top_k(fraction=0.25).bits((16,))   # 4 entries, 4-bit indices
      144
    """
    k_of = _entries(k, fraction)

    def select(key, v, k):
        del key
        return jax.lax.top_k(jnp.abs(v), k)[1]

    def constant(shape, v, k):
        d = base.size(shape)
        if d <= k:
            return 1.0
        if v is None:
            return k / d
        return jnp.minimum(1.0, k / jnp.maximum(base.nnz(v, d), 1))

    return _sparse(f"top_k({_describe(k, fraction)})", "contractive", False, k_of, select,
                   False, constant)


def bernoulli(p: float, *, magnitude: bool = False, shared_seed: bool = False) -> Compressor:
    """Bernoulli (random) sparsification: keeps entry ``i`` with probability ``p_i``.

    ``Q(v)_i = Z_i v_i / p_i`` with independent ``Z_i ~ Bernoulli(p_i)``: unbiased with
    ``E||Q(v)||^2 = sum_i v_i^2 / p_i``. Uniform ``p_i = p`` gives ``alpha = 1/p``
    exactly. The magnitude-based choice ``p_i = min(1, p d |v_i| / ||v||_1)`` (Wangni et
    al.'s shape, expected ``nnz(Q(v)) <= p d``) gives
    ``E||Q(v)||^2 <= ||v||^2 + ||v||_1^2 / (p d)``, so ``alpha = 1 + nnz / (p d)``
    (both derived in the lore_jax spec, consistent with the framework of Khirirat et al.
    2018; not quoted from the paper).

    Bits (spec §4, row 1): data dependent, ``nnz(Q(v)) (32 + ceil(log2 d))`` with
    indices, ``32 m + 32`` with a shared-seed mask of ``m`` kept entries. ``bits`` returns
    ``None``; ``payload_bits`` returns the traced count (without the shared seed, which
    :func:`lore_jax.compressed_mean` derives from the replicated key). XLA collectives have
    static shapes, so the values travel in a dense ``d``-entry buffer; the count is what
    a variable-length transport would send.

    Args:
      p: keep probability (uniform) or target density (magnitude), in ``(0, 1]``.
      magnitude: use magnitude-based probabilities.
      shared_seed: draw the mask from the shared key (uniform ``p`` only); the compressor
        is then linear and its payloads are all-reduced.

    Returns:
      A :class:`Compressor` (kind ``"unbiased"``; linear iff ``shared_seed``).

    References:
      Wangni, Wang, Liu, Zhang, "Gradient sparsification for communication-efficient
      distributed optimization", NeurIPS 2018.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from lore_jax import compressors
      >>> q = compressors.bernoulli(0.25)
      >>> payload, ctx = q.compress(jax.random.key(0), jnp.ones(8))
      >>> q.alpha((8,))
      4.0
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
        raise ValueError(f"p must be a probability in (0, 1], got {p!r}.")
    if magnitude and shared_seed:
        raise ValueError(
            "bernoulli(magnitude=True, shared_seed=True) is not possible: magnitude-based "
            "probabilities depend on each device's values, so receivers cannot rebuild the "
            "mask from a seed. Use shared_seed with uniform p, or magnitude with indices."
        )
    p = float(p)

    def compress(key, x, state=None, mean=None):
        del state, mean
        v, d = base.flat(x), x.size
        if magnitude:
            l1 = jnp.sum(jnp.abs(v))
            probs = jnp.minimum(1.0, p * d * jnp.abs(v) / jnp.where(l1 > 0, l1, 1.0))
        else:
            probs = jnp.full_like(v, p)
        mask = jax.random.uniform(key, v.shape, v.dtype) < probs
        values = jnp.where(mask, v / jnp.where(mask, probs, 1.0), 0.0)
        return values, base.context(x, mask if shared_seed else None)

    def decompress(payload, ctx):
        return base.restore(payload, ctx)

    def bits(shape, dtype=jnp.float32):
        del shape, dtype
        return None

    def payload_bits(payload, ctx):
        if shared_seed:
            return 32 * jnp.count_nonzero(ctx.shared)
        d = base.size(ctx.shape)
        return (32 + packing.index_bits(d)) * jnp.count_nonzero(payload)

    def constant(shape, v):
        if not magnitude:
            return 1.0 / p
        d = base.size(shape)
        return 1.0 + base.nnz(v, d) / (p * d)

    name = f"bernoulli(p={p}{', magnitude' if magnitude else ''}"
    name += ", shared_seed)" if shared_seed else ")"
    return Compressor(
        name=name, kind="unbiased", linear=shared_seed, compress=compress,
        decompress=decompress, bits=bits, constant=constant, payload_bits=payload_bits,
    )
