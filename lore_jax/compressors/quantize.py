"""Quantizers: QSGD, TernGrad, b-bit stochastic rounding and grid rounding (spec §4, rows 3-7).

"Spec" is the lore_jax spec, the documentation's Spec page (``docs/spec.md``).

QSGD, TernGrad and stochastic rounding are one scheme, random dithering: per bucket of
``B`` entries a norm ``n`` (``||.||_2`` or ``||.||_inf``) is sent as float32 and each entry
as a sign and a level ``l in {0..s}``, drawn so that ``E[n l / s] = |v_i|``:
``l = floor(s |v_i| / n) + Bernoulli(frac(s |v_i| / n))``. Codes are packed at
``1 + ceil(log2(s + 1))`` bits. Grid rounding is deterministic.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from lore_jax.compressors import base, packing
from lore_jax.compressors.base import Compressor


def _dithering(name: str, levels: int, norm: str, bucket_size: int | None, clip, kind, constant):
    """Random dithering with ``levels`` levels per sign, one ``norm`` per bucket.

    ``clip`` (TernGrad's practical variant) clips entries to ``clip * std(v)`` first.
    """
    width = 1 + packing.code_bits(levels + 1)

    def buckets(d):
        b = d if bucket_size is None else min(bucket_size, d)
        return b, math.ceil(d / b)

    def compress(key, x, state=None, mean=None):
        del state, mean
        v, d = base.flat(x), x.size
        if clip is not None:
            c = clip * jnp.std(v)
            v = jnp.clip(v, -c, c)
        b, nb = buckets(d)
        vb = jnp.pad(v, (0, nb * b - d)).reshape(nb, b)
        if norm == "l2":
            n = jnp.linalg.norm(vb, axis=1)
        else:
            n = jnp.max(jnp.abs(vb), axis=1)
        scaled = levels * jnp.abs(vb) / jnp.where(n > 0, n, 1.0)[:, None]
        low = jnp.floor(scaled)
        up = jax.random.uniform(key, vb.shape, vb.dtype) < scaled - low
        level = jnp.clip(low + up, 0, levels).astype(jnp.uint32)
        code = level * 2 + (vb < 0).astype(jnp.uint32)
        words = packing.pack_bits(code.reshape(-1)[:d], width)
        return (n.astype(jnp.float32), words), base.context(x)

    def decompress(payload, ctx):
        n, words = payload
        d = base.size(ctx.shape)
        b, nb = buckets(d)
        code = packing.unpack_bits(words, width, d)
        level = (code >> 1).astype(n.dtype)
        sign = 1.0 - 2.0 * (code & 1).astype(n.dtype)
        norms = jnp.broadcast_to(n[:, None], (nb, b)).reshape(-1)[:d]
        return base.restore(norms * sign * level / levels, ctx)

    def bits(shape, dtype=jnp.float32):
        del dtype
        d = base.size(shape)
        return 32 * buckets(d)[1] + d * width

    return Compressor(
        name=name, kind=kind, linear=False, compress=compress, decompress=decompress,
        bits=bits, constant=constant,
    )


def _dithering_alpha(n, s: int):
    """``1 + min(n / (4 s^2), sqrt(n) / s)``: the variance bound of s-level dithering."""
    return 1.0 + jnp.minimum(n / (4.0 * s**2), jnp.sqrt(n) / s)


def qsgd(levels: int, bucket_size: int | None = None) -> Compressor:
    """QSGD: l2 random dithering with ``s`` levels and one norm per bucket.

    ``Q_s(v)_i = ||v||_2 sgn(v_i) xi_i`` with ``xi_i in {l/s, (l+1)/s}`` and
    ``P[xi_i = (l+1)/s] = s |v_i| / ||v||_2 - l``, per bucket of ``B`` entries. Unbiased;
    each entry's variance is at most ``min(1/4, s|v_i|/||v||_2) ||v||_2^2 / s^2``, so
    ``alpha = 1 + min(n / (4 s^2), sqrt(n) / s)`` with ``n = min(B, nnz(v))`` (the QSGD
    Lemma 3.1 bound ``min(n/s^2, sqrt(n)/s)`` with the per-coordinate refinement; derived
    in the lore_jax spec, consistent with the framework of Khirirat et al. 2018; not
    quoted from that paper). ``s = 1`` is l2 random dithering.

    Bits (spec §4, row 5): ``32 ceil(d/B) + d (1 + ceil(log2(s + 1)))``.

    Args:
      levels: ``s >= 1``.
      bucket_size: ``B >= 1`` entries per norm; ``None`` (default) is one bucket per leaf.

    Returns:
      A :class:`Compressor` (kind ``"unbiased"``, not linear).

    References:
      Alistarh, Grubic, Li, Tomioka, Vojnovic, "QSGD: Communication-efficient SGD via
      gradient quantization and encoding", NeurIPS 2017.

    Examples:
      >>> from lore_jax import compressors
      >>> q = compressors.qsgd(levels=4, bucket_size=128)
      >>> q.bits((256,)), q.alpha((256,))
      (1088, 3.0)
    """
    base.check_int("levels", levels)
    if bucket_size is not None:
        base.check_int("bucket_size", bucket_size)

    def constant(shape, v):
        n = base.nnz(v, base.size(shape))
        if bucket_size is not None:
            n = jnp.minimum(n, bucket_size)
        return base.scalar(_dithering_alpha(n, levels), v)

    name = f"qsgd(levels={levels}, bucket_size={bucket_size})"
    return _dithering(name, levels, "l2", bucket_size, None, "unbiased", constant)


def terngrad(clip: float | None = None) -> Compressor:
    """TernGrad: ternary l_inf dithering ``||v||_inf sgn(v) * Bernoulli(|v| / ||v||_inf)``.

    ``Q(v)_i = ||v||_inf sgn(v_i) b_i``, ``b_i ~ Bernoulli(|v_i| / ||v||_inf)``. Unbiased with
    ``E||Q(v)||^2 = ||v||_inf ||v||_1`` exactly; by Cauchy-Schwarz that is at most
    ``(1 + sqrt(nnz)) / 2 ||v||^2``, attained, so ``alpha = (1 + sqrt(nnz)) / 2`` (derived in
    the lore_jax spec, consistent with the framework of Khirirat et al. 2018; not quoted
    from that paper). With ``clip`` (the practical variant of Wen et al.: entries clipped
    to ``clip * std(v)`` first, typically 2.5) it is biased and has no declared class.

    Bits (spec §4, row 3): ``32 + 2 d`` (the scale and a 2-bit code per entry).

    Args:
      clip: ``None`` (default, the unbiased analysed version) or the clipping multiple
        of the standard deviation, ``> 0``.

    Returns:
      A :class:`Compressor` (kind ``"unbiased"``, or ``"none"`` with ``clip``; not linear).

    References:
      Wen, Xu, Yan, Wu, Wang, Chen, Li, "TernGrad: Ternary gradients to reduce
      communication in distributed deep learning", NeurIPS 2017.

    Examples:
      >>> from lore_jax import compressors
      >>> q = compressors.terngrad()
      >>> q.bits((16,)), q.alpha((16,))
      (64, 2.5)
    """
    if clip is not None:
        clip = base.check_positive("clip", clip)

    def constant(shape, v):
        return base.scalar((1.0 + jnp.sqrt(base.nnz(v, base.size(shape)))) / 2.0, v)

    if clip is None:
        return _dithering("terngrad()", 1, "linf", None, None, "unbiased", constant)
    return _dithering(f"terngrad(clip={clip})", 1, "linf", None, clip, "none", None)


def stochastic_rounding(bits: int) -> Compressor:
    """Low-precision stochastic rounding to ``b`` bits (sign and ``S = 2^(b-1) - 1`` levels).

    ``Q(v)_i = ||v||_inf sgn(v_i) xi_i``, ``xi_i in {l/S, (l+1)/S}`` rounded at random so
    that ``E Q(v) = v``. Each entry's variance is at most
    ``min(1/4, S|v_i|/||v||_inf) ||v||_inf^2 / S^2``, so
    ``alpha = 1 + min(nnz / (4 S^2), sqrt(nnz) / S)`` (derived in the lore_jax spec,
    consistent with the framework of Khirirat et al. 2018; not quoted from that paper).

    Bits (spec §4, row 6): ``b d + 32``.

    Args:
      bits: ``b >= 2`` bits per entry.

    Returns:
      A :class:`Compressor` (kind ``"unbiased"``, not linear).

    References:
      Zhang, Li, Kara, Alistarh, Liu, Zhang, "ZipML: Training linear models with end-to-end
      low precision, and a little bit of deep learning", ICML 2017.

    Examples:
      >>> from lore_jax import compressors
      >>> q = compressors.stochastic_rounding(bits=8)
      >>> q.bits((100,))
      832
    """
    base.check_int("bits", bits, minimum=2)
    if bits > 32:
        raise ValueError(f"bits must be <= 32, got {bits}.")
    s = 2 ** (bits - 1) - 1

    def constant(shape, v):
        return base.scalar(_dithering_alpha(base.nnz(v, base.size(shape)), s), v)

    return _dithering(f"stochastic_rounding(bits={bits})", s, "linf", None, None, "unbiased",
                      constant)


def grid_rounding(step: float, max_abs: float | None = None) -> Compressor:
    """Deterministic rounding to the grid ``step * Z``.

    ``Q(v)_i = step * round(v_i / step)``: each entry moves by at most ``step / 2``, so
    ``||Q(v) - v|| <= epsilon = sqrt(d) step / 2`` (``sqrt(nnz) step / 2`` for an array with
    ``nnz`` non-zeros, since zeros stay zero): an absolute compressor (derived in the
    lore_jax spec, consistent with the framework of Khirirat et al. 2018; not quoted from
    that paper). With ``max_abs`` the grid is ``{-L..L} * step``, ``L = floor(max_abs /
    step)``, entries beyond it are clipped, and the bound holds for
    ``||v||_inf <= (L + 1/2) step``.

    Bits (spec §4, row 7): ``b d`` with ``b = ceil(log2(2L + 1))`` (the spec's
    ``ceil(log2(range/step + 1))`` with ``range = 2 L step``); ``32 d`` (int32 codes)
    without ``max_abs``.

    Args:
      step: grid step ``Delta > 0``.
      max_abs: the largest representable magnitude, or ``None`` for 32-bit codes.

    Returns:
      A :class:`Compressor` (kind ``"absolute"``, not linear).

    References:
      Khirirat, Magnusson, Johansson, "Convergence bounds for compressed gradient methods
      with memory based error compensation", ICASSP 2019.

    Examples:
      >>> import jax.numpy as jnp
      >>> from lore_jax import compressors
      >>> q = compressors.grid_rounding(0.5, max_abs=2.0)
      >>> payload, ctx = q.compress(None, jnp.array([0.2, -0.9, 3.0]))
      >>> q.decompress(payload, ctx), q.bits((3,))
      (Array([ 0., -1.,  2.], dtype=float32), 12)
    """
    step = base.check_positive("step", step)
    if max_abs is not None:
        max_abs = base.check_positive("max_abs", max_abs)
        half = math.floor(max_abs / step * (1 + 1e-9))  # 0.3 / 0.1 is 2.9999999999999996
        width = packing.code_bits(2 * half + 1)
    int_max = 2**31 - 1

    def compress(key, x, state=None, mean=None):
        del key, state, mean
        v = base.flat(x)
        c = jnp.round(v / step)
        if max_abs is None:
            return jnp.clip(c, -int_max, int_max).astype(jnp.int32), base.context(x)
        code = (jnp.clip(c, -half, half) + half).astype(jnp.uint32)
        return packing.pack_bits(code, width), base.context(x)

    def decompress(payload, ctx):
        dt = base.work_dtype(ctx.dtype)
        if max_abs is None:
            c = payload.astype(dt)
        else:
            code = packing.unpack_bits(payload, width, base.size(ctx.shape))
            c = code.astype(dt) - half
        return base.restore(step * c, ctx)

    def bits(shape, dtype=jnp.float32):
        del dtype
        return base.size(shape) * (32 if max_abs is None else width)

    def constant(shape, v):
        return base.scalar(jnp.sqrt(base.nnz(v, base.size(shape))) * step / 2.0, v)

    return Compressor(
        name=f"grid_rounding(step={step}, max_abs={max_abs})", kind="absolute", linear=False,
        compress=compress, decompress=decompress, bits=bits, constant=constant,
    )
