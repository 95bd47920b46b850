"""Sign compressors: 1-bit sign and scaled sign (spec §4, rows 9 and 10).

"Spec" is the lore_jax spec, the documentation's Spec page (``docs/spec.md``).

The sign of each entry is packed at one bit (``v_i >= 0`` is sent as ``+1``: one bit cannot
carry a zero).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lore_jax.compressors import base, packing
from lore_jax.compressors.base import Compressor


def _pack_signs(v: jax.Array) -> jax.Array:
    return packing.pack_bits((v < 0).astype(jnp.uint32), 1)


def _unpack_signs(words: jax.Array, d: int, dtype) -> jax.Array:
    return 1.0 - 2.0 * packing.unpack_bits(words, 1, d).astype(dtype)


def sign() -> Compressor:
    """1-bit sign compression: ``Q(v) = sign(v)`` (with ``sign(0) = +1``).

    Not in any class: ``||sign(v) - v||`` is not bounded relative to ``||v||`` (spec
    section 4, row 9), so it declares kind ``"none"``; use :func:`scaled_sign` for a
    contraction.

    Bits: ``d`` (one bit per entry, packed into 32-bit words).

    Returns:
      A :class:`Compressor` (kind ``"none"``, not linear: the mean over devices of the
      signs is formed after an all-gather, as in signSGD with averaging).

    References:
      Bernstein, Wang, Azizzadenesheli, Anandkumar, "signSGD: Compressed optimisation for
      non-convex problems", ICML 2018.

    Examples:
      >>> import jax.numpy as jnp
      >>> from lore_jax import compressors
      >>> q = compressors.sign()
      >>> payload, ctx = q.compress(None, jnp.array([0.5, -2.0, 0.0]))
      >>> q.decompress(payload, ctx)
      Array([ 1., -1.,  1.], dtype=float32)
    """

    def compress(key, x, state=None, mean=None):
        del key, state, mean
        return _pack_signs(base.flat(x)), base.context(x)

    def decompress(payload, ctx):
        d = base.size(ctx.shape)
        return base.restore(_unpack_signs(payload, d, base.work_dtype(ctx.dtype)), ctx)

    def bits(shape, dtype=jnp.float32):
        del dtype
        return base.size(shape)

    return Compressor(
        name="sign()", kind="none", linear=False, compress=compress, decompress=decompress,
        bits=bits, constant=None,
    )


def scaled_sign() -> Compressor:
    """Scaled sign: ``Q(v) = (||v||_1 / d) sign(v)``.

    ``||Q(v) - v||^2 = ||v||^2 - ||v||_1^2 / d``, so it is a contraction with the
    data-dependent ``delta(v) = ||v||_1^2 / (d ||v||^2)`` in ``[1/d, 1]`` (about ``2/pi`` for
    Gaussian ``v``); the worst case over a shape is ``1/d`` (derived in the lore_jax spec,
    consistent with the framework of Khirirat et al. 2018; not quoted from that paper).

    Bits (spec §4, row 10): ``d + 32`` (one bit per entry and the scale).

    Returns:
      A :class:`Compressor` (kind ``"contractive"``, not linear).

    References:
      Karimireddy, Rebjock, Stich, Jaggi, "Error feedback fixes SignSGD and other gradient
      compression schemes", ICML 2019.

    Examples:
      >>> import jax.numpy as jnp
      >>> from lore_jax import compressors
      >>> q = compressors.scaled_sign()
      >>> payload, ctx = q.compress(None, jnp.array([1.0, -3.0]))
      >>> q.decompress(payload, ctx), q.delta(jnp.array([1.0, -3.0]))
      (Array([ 2., -2.], dtype=float32), Array(0.8, dtype=float32))
    """

    def compress(key, x, state=None, mean=None):
        del key, state, mean
        v = base.flat(x)
        scale = jnp.mean(jnp.abs(v)).astype(jnp.float32)
        return (scale, _pack_signs(v)), base.context(x)

    def decompress(payload, ctx):
        scale, words = payload
        d = base.size(ctx.shape)
        return base.restore(scale * _unpack_signs(words, d, scale.dtype), ctx)

    def bits(shape, dtype=jnp.float32):
        del dtype
        return base.size(shape) + 32

    def constant(shape, v):
        d = base.size(shape)
        if v is None:
            return 1.0 / d
        v = base.flat(v)
        sq = jnp.sum(v * v)
        return jnp.where(sq > 0, jnp.sum(jnp.abs(v)) ** 2 / (d * jnp.where(sq > 0, sq, 1.0)), 1.0)

    return Compressor(
        name="scaled_sign()", kind="contractive", linear=False, compress=compress,
        decompress=decompress, bits=bits, constant=constant,
    )
