"""The compressor interface, the identity compressor and helpers shared by every family.

A :class:`Compressor` is a bundle of pure functions acting on one gradient leaf ``x``
(any shape, floating dtype; most families see it flattened, ``v = x.reshape(-1)`` with
``d = x.size`` entries, the low-rank ones see its oriented ``(a, b)`` matrix view):

* ``compress(key, x, state=None, mean=None) -> (payload, ctx)``. ``payload`` is the pytree
  of arrays a device sends; ``ctx`` (a :class:`Context`) is what a receiver needs besides
  it: the leaf's static shape and dtype, plus, for ``linear`` compressors, side information
  that every device derives identically (indices drawn from a shared key, a shared
  basis). ``mean`` is the cross-device mean used by compressors that need a collective
  round *inside* compression (PowerSGD); it defaults to the identity (one device).
* ``decompress(payload, ctx) -> x_hat``, the same shape and dtype as ``x``.
* ``bits(shape, dtype) -> int | None``: the fixed-length message size of the lore_jax
  spec (``docs/spec.md`` §4, "bits": float32 = 32 bits, an index = ``ceil(log2 d)``
  bits); ``None`` where the size depends on the data (Bernoulli sparsification).
* ``payload_bits(payload, ctx) -> int | Array``: the bits one device puts into collectives
  for this leaf, i.e. the size of the buffers :func:`lore_jax.compressed_mean` all-reduces
  or all-gathers (inner rounds included). It differs from ``bits`` only by the word padding
  of bit-packed codes (< 32 bits per packed array) and by the 32-bit seed that shared-seed
  schemes count but never send (the seed is derived from the replicated key). Bernoulli
  sparsification, whose message length is random, reports its encoded length (a traced
  integer): XLA collectives have static shapes, so its values travel in a dense buffer.
* ``kind`` and ``constant(shape, v)``: the compressor's class (spec §3) and its
  constant: ``alpha`` (``E||Q(v)||^2 <= alpha ||v||^2``, ``E Q(v) = v``) for ``"unbiased"``,
  ``delta`` (``||Q(v) - v||^2 <= (1 - delta) ||v||^2``) for ``"contractive"``, ``epsilon``
  (``||Q(v) - v|| <= epsilon``) for ``"absolute"``; ``"none"`` has no constant. Query them
  with :meth:`Compressor.alpha` / ``omega`` / ``delta`` / ``epsilon``, passing a shape (the
  worst case over inputs of that shape) or an array (its ``nnz`` and values refine the
  constant, spec §3.4).
* ``linear``: whether the mean over devices of the reconstructions equals the
  reconstruction of the mean payload (shared randomness / shared factors), so that
  :func:`lore_jax.compressed_mean` can ``psum`` payloads; otherwise it all-gathers them.
  A linear compressor receives the replicated key, any other a per-device key.
* ``init(key, shape, dtype) -> state`` and ``next_state(state, mean_payload, ctx)``: the
  replicated compressor state (PowerSGD's warm-start factor); ``None`` for stateless
  compressors. Only linear compressors carry state.
* ``matrix``: whether it compresses matrices (the low-rank families). Such a compressor
  is handed the matrices of each leaf by :func:`lore_jax.compressed_mean`, as the
  transform's ``weight_dimension_numbers`` cut the leaf
  (:func:`lore_jax.subspace.resolve_views`), and leaves that are not matrices (vectors,
  biases) are sent dense; called directly on a leaf, it views an N-D leaf as
  ``(prod(shape[:-1]), shape[-1])``.
* ``groups`` (optional, :class:`MatrixGroups`): a matrix compressor's functions on stacks
  of same-shape matrices, all groups of a model in one call, so that
  :func:`lore_jax.compressed_mean` batches by shape and packs each collective round of
  the whole model into one buffer. The low-rank compressors implement ``compress`` and
  ``decompress`` of one leaf as a stack of one.

All constants are derived in the lore_jax spec (``docs/spec.md``, the documentation's Spec
page), consistent with the framework of Khirirat, Feyzmahdavian and Johansson (2018); they
are not quoted from that paper.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from lore_jax.accounting import bits_of

Kind = Literal["unbiased", "contractive", "absolute", "none"]
KINDS = ("unbiased", "contractive", "absolute", "none")
Shape = tuple[int, ...]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Context:
    """What a receiver needs besides the payload to decompress it.

    Attributes:
      shape: the leaf's shape (static).
      dtype: the leaf's dtype (static).
      shared: arrays identical on every device (shared-seed indices or masks, a shared
        basis), or ``None``.
    """

    shape: Shape = dataclasses.field(metadata={"static": True})
    dtype: Any = dataclasses.field(metadata={"static": True})
    shared: Any = None


def _no_state(key: jax.Array, shape: Shape, dtype: Any) -> None:
    del key, shape, dtype
    return None


def _keep_state(state: Any, mean_payload: Any, ctx: Context) -> Any:
    del mean_payload, ctx
    return state


def _buffer_bits(payload: Any, ctx: Context) -> int:
    del ctx
    return tree_bits(payload)


class MatrixGroups(NamedTuple):
    """A matrix compressor's functions on stacks of same-shape matrices, every group at once.

    :func:`lore_jax.compressed_mean` stacks a model's same-shape matrices into groups
    ``(k, a, b)`` (oriented, float32) and compresses all groups together, so that one
    batched factorization serves a group and each collective round carries every group
    (one all-reduce per round for the whole model).

    Attributes:
      view: ``(shape) -> MatrixView | None``: the oriented view of a ``(rows, cols)``
        matrix, or ``None`` when it is sent dense (the compressor's size gate).
      compress: ``(keys, ms, states, mean) -> (payloads, shared)``: lists with one entry
        per group; ``keys`` ``(k,)`` per-matrix keys (or ``None`` where ``states`` are
        given), ``ms`` ``(k, a, b)``, ``states`` the stacked states (or ``None``);
        ``mean`` averages a list of per-device arrays over devices in one collective.
      decompress: ``(payload, shared) -> (k, a, b)`` for one group.
      bits: ``(a, b) -> int``, the payload bits of one matrix.
      next_state: ``(state, mean_payload) -> state`` for one group (stacked), after the
        all-reduce; ``None`` for stateless compressors.
      communicate: for a compressor that runs every round of a step itself (GreedyLore,
        whose payload changes shape with its phase), ``(ms, states, count) -> (c_local,
        c_bar, states, bits)``: per group the local and mean reconstructions ``(k, a, b)``
        and the new stacked states, and the bits this device sent (a ``uint32[2]``
        increment, :func:`lore_jax.accounting.add_bits`); ``count`` is the transform's
        step count. It replaces ``compress`` -> collective -> ``decompress``, which are
        then ``None``; its ``ms`` are the error-feedback inputs in float32, not rounded
        to the gradient's dtype.
    """

    view: Callable[[Shape], Any]
    compress: Callable[..., tuple[list, list]] | None
    decompress: Callable[[Any, Any], jax.Array] | None
    bits: Callable[[int, int], int] | None
    next_state: Callable[[Any, Any], Any] | None = None
    communicate: Callable[..., tuple[list, list, list, Any]] | None = None


class Compressor(NamedTuple):
    """A gradient compressor: pure functions plus its declared class and constant.

    The module docstring gives each attribute's contract in full.

    Attributes:
      name: readable name with the hyperparameters.
      kind: ``"unbiased"``, ``"contractive"``, ``"absolute"`` or ``"none"``.
      linear: payloads may be averaged before decompression (all-reduce).
      compress: ``(key, x, state=None, mean=None) -> (payload, ctx)``.
      decompress: ``(payload, ctx) -> x_hat``, ``x``'s shape and dtype.
      bits: ``(shape, dtype=float32) -> int | None``, the spec's fixed-length count (§4).
      constant: ``(shape, v | None) -> alpha | delta | epsilon`` (``None`` for ``"none"``).
      payload_bits: ``(payload, ctx) -> int | Array``, the bits sent into collectives
        (default: the size of the payload's arrays).
      init: ``(key, shape, dtype) -> state``, the replicated compressor state.
      next_state: ``(state, mean_payload, ctx) -> state`` after the all-reduce.
      matrix: it compresses matrices (given one matrix, or with ``groups`` stacks of
        same-shape matrices, by the transforms).
      groups: a matrix compressor's :class:`MatrixGroups`, with which
        :func:`lore_jax.compressed_mean` compresses same-shape matrices as one stack and
        every group's round in one collective; ``None``: one matrix at a time.
    """

    name: str
    kind: Kind
    linear: bool
    compress: Callable[..., tuple[Any, Context]]
    decompress: Callable[[Any, Context], jax.Array]
    bits: Callable[..., int | None]
    constant: Callable[[Shape, jax.Array | None], Any] | None = None
    payload_bits: Callable[[Any, Context], int | jax.Array] = _buffer_bits
    init: Callable[[jax.Array, Shape, Any], Any] = _no_state
    next_state: Callable[[Any, Any, Context], Any] = _keep_state
    matrix: bool = False
    groups: MatrixGroups | None = None

    def _constant(self, kind: str, x: Sequence[int] | jax.Array) -> Any:
        if self.kind != kind:
            raise ValueError(
                f"compressor {self.name!r} is {self.kind!r}; its constant is not a {kind} "
                f"constant (unbiased: alpha/omega, contractive: delta, absolute: epsilon)."
            )
        if hasattr(x, "shape") and not isinstance(x, jax.ShapeDtypeStruct):
            return self.constant(tuple(x.shape), jnp.asarray(x))   # an array: refined
        return self.constant(tuple(getattr(x, "shape", x)), None)  # a shape: worst case

    def alpha(self, x: Sequence[int] | jax.Array) -> Any:
        """Second-moment constant: ``E||Q(v)||^2 <= alpha ||v||^2`` (unbiased only)."""
        return self._constant("unbiased", x)

    def omega(self, x: Sequence[int] | jax.Array) -> Any:
        """Variance constant ``omega = alpha - 1``: ``E||Q(v) - v||^2 <= omega ||v||^2``."""
        return self.alpha(x) - 1

    def delta(self, x: Sequence[int] | jax.Array) -> Any:
        """Contraction constant: ``||Q(v) - v||^2 <= (1 - delta) ||v||^2`` (contractive)."""
        return self._constant("contractive", x)

    def epsilon(self, x: Sequence[int] | jax.Array) -> Any:
        """Absolute accuracy: ``||Q(v) - v|| <= epsilon`` (absolute compressors)."""
        return self._constant("absolute", x)


# ----------------------------------------------------------------------------- helpers


def size(shape: Sequence[int]) -> int:
    """Number of entries ``d`` of a leaf of this shape."""
    return math.prod(int(s) for s in shape)


def work_dtype(dtype: Any) -> Any:
    """The dtype compressors compute in: float32, or wider if the leaf is wider."""
    return jnp.promote_types(dtype, jnp.float32)


def flat(x: jax.Array) -> jax.Array:
    """``v = x.reshape(-1)`` in the working dtype."""
    return jnp.reshape(x, (-1,)).astype(work_dtype(x.dtype))


def context(x: jax.Array, shared: Any = None) -> Context:
    """The :class:`Context` of leaf ``x``."""
    return Context(tuple(x.shape), jnp.dtype(x.dtype), shared)


def restore(v: jax.Array, ctx: Context) -> jax.Array:
    """A flat vector back to the leaf's shape and dtype."""
    return jnp.reshape(v, ctx.shape).astype(ctx.dtype)


def tree_bits(payload: Any) -> int:
    """Bits of the arrays in a payload (static: the sum of their buffer sizes)."""
    return sum(bits_of(leaf.shape, leaf.dtype) for leaf in jax.tree.leaves(payload))


def nnz(v: jax.Array | None, d: int) -> Any:
    """``nnz(v)`` for a given array, ``d`` (the worst case) when ``v`` is ``None``."""
    return d if v is None else jnp.count_nonzero(v)


def scalar(value: Any, v: jax.Array | None) -> Any:
    """A constant as a Python float for shape queries (``v is None``), else as an array."""
    return float(value) if v is None else value


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """Validates an integer hyperparameter (outside ``jit``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


def check_positive(name: str, value: Any) -> float:
    """Validates a positive real hyperparameter (outside ``jit``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}.")
    return float(value)


# ---------------------------------------------------------------------------- identity


def identity() -> Compressor:
    """The identity compressor: sends the leaf as it is.

    ``Q(v) = v``: unbiased with ``alpha = 1`` (also a contraction with ``delta = 1``).
    Linear, so :func:`lore_jax.compressed_mean` all-reduces it: a plain data-parallel mean.

    Bits: the dense leaf, ``32 d`` for float32 (``bits_of(shape, dtype)`` in general).

    Returns:
      A :class:`Compressor` (kind ``"unbiased"``, linear).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from lore_jax import compressors
      >>> q = compressors.identity()
      >>> payload, ctx = q.compress(jax.random.key(0), jnp.ones((3, 4)))
      >>> q.decompress(payload, ctx).shape, q.bits((3, 4))
      ((3, 4), 384)
    """

    def compress(key, x, state=None, mean=None):
        del key, state, mean
        return x, context(x)

    def decompress(payload, ctx):
        return jnp.reshape(payload, ctx.shape).astype(ctx.dtype)

    def bits(shape, dtype=jnp.float32):
        return bits_of(shape, dtype)

    return Compressor(
        name="identity", kind="unbiased", linear=True, compress=compress,
        decompress=decompress, bits=bits, constant=lambda shape, v: 1.0,
    )


DENSE = identity()
"""The identity compressor, used by families for the leaves they send dense."""


def as_contraction(compressor: Compressor) -> Compressor:
    """Scales an unbiased compressor into a contraction: ``C(v) = Q(v) / alpha``.

    If ``E Q(v) = v`` and ``E||Q(v)||^2 <= alpha ||v||^2`` then
    ``E||Q(v)/alpha - v||^2 <= (1 - 1/alpha) ||v||^2``: a contraction (in expectation)
    with ``delta = 1/alpha`` (spec §3.1, property 3). ``alpha`` is the worst case
    for the leaf's shape, so the scaling is static and linearity is kept.

    Args:
      compressor: an ``"unbiased"`` compressor.

    Returns:
      A ``"contractive"`` :class:`Compressor` with the same payload and bits.

    Examples:
      >>> from lore_jax import compressors
      >>> c = compressors.as_contraction(compressors.random_k(4))
      >>> c.delta((16,))
      0.25
    """
    if not isinstance(compressor, Compressor) or compressor.kind != "unbiased":
        raise ValueError(
            f"as_contraction needs an unbiased Compressor, got {compressor!r}; contractive, "
            f"absolute and 'none' compressors have no alpha to scale by."
        )

    def decompress(payload, ctx):
        alpha = compressor.constant(ctx.shape, None)
        x = compressor.decompress(payload, ctx)
        return (x.astype(work_dtype(x.dtype)) / alpha).astype(ctx.dtype)

    return compressor._replace(
        name=f"as_contraction({compressor.name})", kind="contractive", decompress=decompress,
        constant=lambda shape, v: 1.0 / compressor.constant(shape, None),
    )
