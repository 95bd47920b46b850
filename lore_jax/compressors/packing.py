"""Fixed-width bit packing of integer codes into ``uint32`` words.

A compressor that sends ``w``-bit codes (signs, quantization levels, indices) packs them
densely: code ``i`` occupies bits ``[i w, (i + 1) w)`` of the little-endian bit stream held
in ``ceil(n w / 32)`` words, so ``n`` codes cost ``32 ceil(n w / 32)`` bits on the wire, at
most 31 bits more than the ``n w`` of the fixed-length count (``docs/spec.md`` §4). A
code may straddle two words; bit fields never overlap, so scattering them with an add is
a bitwise or.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

WORD = 32


def index_bits(d: int) -> int:
    """Bits of one index into ``d`` entries: ``ceil(log2 d)`` (0 when ``d == 1``)."""
    return max(int(d) - 1, 0).bit_length()


def code_bits(levels: int) -> int:
    """Bits of a code taking ``levels`` values: ``ceil(log2 levels)``."""
    return index_bits(levels)


def num_words(n: int, width: int) -> int:
    """``uint32`` words holding ``n`` codes of ``width`` bits."""
    return math.ceil(int(n) * int(width) / WORD)


def _positions(n: int, width: int) -> tuple[jax.Array, jax.Array]:
    # Bit offset i * width, split as i = 32 q + r so that no intermediate exceeds
    # n * width / 32 (int32 stays exact for any array that fits in memory).
    i = jnp.arange(n, dtype=jnp.int32)
    q, r = i // WORD, i % WORD
    word = q * width + (r * width) // WORD
    offset = ((r * width) % WORD).astype(jnp.uint32)
    return word, offset


def pack_bits(codes: jax.Array, width: int) -> jax.Array:
    """Packs non-negative integer codes below ``2**width`` into ``uint32`` words.

    Args:
      codes: ``(n,)`` integer codes, each in ``[0, 2**width)``.
      width: bits per code, ``0 <= width <= 32``.

    Returns:
      ``uint32[ceil(n * width / 32)]``.
    """
    if not 0 <= width <= WORD:
        raise ValueError(f"width must be in [0, 32], got {width}.")
    n = codes.shape[0]
    nw = num_words(n, width)
    if nw == 0:
        return jnp.zeros((0,), jnp.uint32)
    codes = codes.astype(jnp.uint32)
    word, offset = _positions(n, width)
    lo = jnp.left_shift(codes, offset)
    straddles = offset + jnp.uint32(width) > WORD
    hi = jnp.where(straddles, jnp.right_shift(codes, jnp.where(straddles, WORD - offset, 0)), 0)
    words = jnp.zeros((nw + 1,), jnp.uint32).at[word].add(lo).at[word + 1].add(hi)
    return words[:nw]


def unpack_bits(words: jax.Array, width: int, n: int) -> jax.Array:
    """Inverse of :func:`pack_bits`: ``n`` codes of ``width`` bits as ``uint32[n]``."""
    if width == 0:
        return jnp.zeros((n,), jnp.uint32)
    word, offset = _positions(n, width)
    padded = jnp.concatenate([words.astype(jnp.uint32), jnp.zeros((1,), jnp.uint32)])
    lo = jnp.right_shift(padded[word], offset)
    straddles = offset + jnp.uint32(width) > WORD
    hi = jnp.where(
        straddles, jnp.left_shift(padded[word + 1], jnp.where(straddles, WORD - offset, 0)), 0
    )
    mask = jnp.uint32(0xFFFFFFFF if width == WORD else (1 << width) - 1)
    return (lo | hi) & mask
