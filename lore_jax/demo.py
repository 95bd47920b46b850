"""DeMo: decoupled momentum optimization, as a data-parallel optax transform.

Runs inside ``jax.shard_map`` (or ``jax.pmap``) on each device's local gradients. Every
device keeps its own momentum, sends only its fastest-moving components (the largest
coefficients of a chunked DCT of the momentum), removes what it sent from its
momentum, and steps by the sign of the average of what all devices sent. DeMo is the
whole optimizer (it returns ``-learning_rate * sign(...)``), used on its own::

    tx = lore_jax.demo(1e-3, axis_name="data")

The algorithm, line by line against the functions below, is in :func:`demo`'s docstring.

References:
  Peng, Quesnelle, Kingma. "DeMo: Decoupled Momentum Optimization". ICLR 2026
  (arXiv:2411.19870). Reference implementation: github.com/bloc97/DeMo, ``demo.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lore_jax import accounting, collectives
from lore_jax.compressors.base import work_dtype
from lore_jax.compressors.packing import pack_bits, unpack_bits


class DemoState(NamedTuple):
    """State of :func:`demo`."""

    count: jax.Array
    """int32 step counter (replicated); a learning-rate schedule reads it."""
    momentum: Any
    """Per-device momentum ``m_i`` (the part not yet sent): params-shaped leaves with a
    leading axis of length 1, float32 or wider."""
    bits_sent: jax.Array
    """uint32[2] bits this device put into the all-gather so far."""
    bits_dense: jax.Array
    """uint32[2] bits a dense all-reduce of the same gradients would have sent."""

    PER_DEVICE_FIELDS = ("momentum",)


class _Chunks(NamedTuple):
    """How one leaf is cut: its ``rows x cols`` matrix view in ``h x w`` chunks, ``k``
    coefficients kept per chunk."""

    rows: int
    cols: int
    h: int
    w: int
    k: int

    @property
    def count(self) -> int:
        """Chunks in the leaf."""
        return (self.rows // self.h) * (self.cols // self.w)

    @property
    def size(self) -> int:
        """Coefficients in a chunk."""
        return self.h * self.w


def chunk_size(n: int, target: int) -> int:
    """The largest divisor of ``n`` not above ``target`` (the chunk of a dimension ``n``)."""
    return max(d for d in range(1, min(n, target) + 1) if n % d == 0)


def _chunks(shape: tuple[int, ...], chunk: int, topk: int) -> _Chunks:
    rows = int(np.prod(shape[:-1], dtype=np.int64))
    cols = shape[-1] if shape else 1
    h, w = chunk_size(rows, chunk), chunk_size(cols, chunk)
    return _Chunks(rows, cols, h, w, min(topk, h * w))


@functools.cache
def dct_basis(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix ``D`` (``n x n``, float64): ``DCT(x) = D x`` and,
    as ``D`` is orthogonal, ``IDCT(c) = D^T c``."""
    k, j = np.arange(n)[:, None], np.arange(n)[None, :]
    d = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * j + 1) * k / (2 * n))
    d[0] /= np.sqrt(2.0)
    return d


def index_dtype(size: int) -> np.dtype:
    """The narrowest unsigned integer that holds an index into ``size`` coefficients."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"a chunk of {size} coefficients needs more than 32-bit indices.")


def _bases(c: _Chunks, dtype: Any) -> tuple[jax.Array, jax.Array]:
    return jnp.asarray(dct_basis(c.h), dtype), jnp.asarray(dct_basis(c.w), dtype)


def _encode(m: jax.Array, c: _Chunks) -> jax.Array:
    """``DCT`` of every chunk: ``(chunks, h w)`` coefficients of a momentum leaf."""
    dh, dw = _bases(c, m.dtype)
    x = m.reshape(c.rows // c.h, c.h, c.cols // c.w, c.w)
    coeffs = jnp.einsum("yhxw,bh,dw->yxbd", x, dh, dw, precision=jax.lax.Precision.HIGHEST)
    return coeffs.reshape(c.count, c.size)


def _decode(coeffs: jax.Array, c: _Chunks, shape: tuple[int, ...]) -> jax.Array:
    """``IDCT`` of every chunk's coefficients ``(chunks, h w)``, back to the leaf's shape."""
    dh, dw = _bases(c, coeffs.dtype)
    y = coeffs.reshape(c.rows // c.h, c.cols // c.w, c.h, c.w)
    x = jnp.einsum("yxbd,bh,dw->yhxw", y, dh, dw, precision=jax.lax.Precision.HIGHEST)
    return x.reshape(shape)


def _scatter(total: jax.Array, idx: jax.Array, values: jax.Array) -> jax.Array:
    """``total`` plus ``values`` at the positions ``idx`` of each chunk (row). An index
    occurs once per row, so each entry takes at most one addition: the result does not
    depend on the order in which a backend applies a scatter."""
    rows = jnp.arange(idx.shape[0])[:, None]
    return total.at[rows, idx].add(values, unique_indices=True)


# ----------------------------------------------------------------------------- phases


def _accumulate(m: jax.Array, g: jax.Array, decay: float, lr: jax.Array) -> jax.Array:
    """``m_i = beta m_i + lr g_i``, in the momentum's dtype."""
    return decay * m + lr * g.astype(m.dtype)


def _compress(m: jax.Array, c: _Chunks) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(idx, values, m)``: each chunk's ``k`` largest DCT coefficients (``(chunks, k)``,
    ties to the lower index) and the momentum without them (``m - IDCT(C on J)``)."""
    coeffs = _encode(m, c)
    _, idx = jax.lax.top_k(jnp.abs(coeffs), c.k)
    values = jnp.take_along_axis(coeffs, idx, axis=1)
    sent = _decode(_scatter(jnp.zeros_like(coeffs), idx, values), c, m.shape)
    return idx, values, m - sent


def _payload(idx: jax.Array, values: jax.Array, c: _Chunks, sign_only: bool
             ) -> tuple[jax.Array, jax.Array]:
    """What a device sends for one leaf: indices in the narrowest unsigned integer, and
    the values, or with ``sign_only`` their signs packed one bit each (``v >= 0`` as
    ``+1``: one bit cannot carry a zero)."""
    idx = idx.astype(index_dtype(c.size))
    if sign_only:
        return idx, pack_bits((values.reshape(-1) < 0).astype(jnp.uint32), 1)
    return idx, values


def _unpayload(gathered: tuple[jax.Array, jax.Array], c: _Chunks, sign_only: bool,
               dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Every device's ``(idx, values)`` of one leaf, ``(N, chunks, k)`` each."""
    idx, values = gathered
    if sign_only:
        bits = jax.vmap(lambda w: unpack_bits(w, 1, c.count * c.k))(values)
        values = (1.0 - 2.0 * bits.astype(dtype)).reshape(idx.shape)
    return idx.astype(jnp.int32), values.astype(dtype)


def _exchange(payloads: list, axis_name: collectives.AxisName, count: jax.Array) -> list:
    """One all-gather of every leaf's payload (packed into one buffer): each leaf's comes
    back with a leading axis of ``N``, devices in axis order, the same on every device."""
    return collectives.all_gather_packed(payloads, axis_name, count)


def _average(idx: jax.Array, values: jax.Array, c: _Chunks) -> jax.Array:
    """``Cbar``: each coefficient the mean over the devices that sent it (0 where none
    did), ``(chunks, h w)``. Devices are added one after another in axis order, so every
    device forms the same sums bit for bit."""
    def add(carry, sent):
        total, senders = carry
        i, v = sent
        return (_scatter(total, i, v), _scatter(senders, i, jnp.ones_like(i))), None

    shape = (c.count, c.size)
    zeros = collectives.vary_like((jnp.zeros(shape, values.dtype), jnp.zeros(shape, jnp.int32)),
                                  values)   # a model-sharded leaf's sums vary as its values
    (total, senders), _ = jax.lax.scan(add, zeros, (idx, values))
    return jnp.where(senders > 0, total / jnp.maximum(senders, 1).astype(total.dtype), 0)


def _descend(decoded: jax.Array, p: jax.Array | None, lr: jax.Array,
             weight_decay: float, dtype: Any) -> jax.Array:
    """``-lr sign(IDCT(Cbar))``, minus ``lr weight_decay p`` (decoupled weight decay)."""
    u = -lr * jnp.sign(decoded)
    if weight_decay:
        u = u - lr * weight_decay * p.astype(u.dtype)
    return u.astype(dtype)


def _bits(c: _Chunks, value_bits: int) -> int:
    """Bits one device sends for one leaf: per kept coefficient its index and value."""
    return c.count * c.k * (index_dtype(c.size).itemsize * 8 + value_bits)


# ----------------------------------------------------------------------------- the transform


def _check_options(learning_rate, compression_decay, compression_topk, compression_chunk,
                   weight_decay, sign_only) -> None:
    """Raises a ValueError naming the first bad argument of :func:`demo`."""
    def is_int(v):
        return not isinstance(v, bool) and isinstance(v, (int, np.integer))

    def is_number(v):
        return not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating))

    if not callable(learning_rate) and not (is_number(learning_rate) and learning_rate > 0):
        raise ValueError(
            f"learning_rate must be a number > 0 or an optax schedule (step -> rate), got "
            f"{learning_rate!r}."
        )
    if not (is_number(compression_decay) and 0 <= compression_decay < 1):
        raise ValueError(
            f"compression_decay must be a number in [0, 1) (the momentum's decay; DeMo's "
            f"default is 0.999), got {compression_decay!r}."
        )
    if not is_int(compression_topk) or compression_topk < 1:
        raise ValueError(
            f"compression_topk must be an integer >= 1 (coefficients sent per chunk), got "
            f"{compression_topk!r}."
        )
    if not is_int(compression_chunk) or compression_chunk < 1:
        raise ValueError(
            f"compression_chunk must be an integer >= 1 (the largest chunk side; each "
            f"dimension is cut at its largest divisor not above it), got "
            f"{compression_chunk!r}."
        )
    if not (is_number(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}.")
    if not isinstance(sign_only, bool):
        raise ValueError(f"sign_only must be True or False, got {sign_only!r}.")


def _check_state_fits(updates: Any, momentum: Any) -> None:
    """Raises a ValueError naming the first gradient leaf the state was not made for."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
    try:
        moms = treedef.flatten_up_to(momentum)
    except ValueError as e:
        raise ValueError(
            f"demo: the gradients' structure {treedef} is not the one the state was "
            f"initialised with ({e}). Initialise the optimizer with parameters of the same "
            f"structure as the gradients."
        ) from None
    for (path, g), m in zip(leaves, moms, strict=True):
        if np.shape(m) != (1,) + np.shape(g):
            raise ValueError(
                f"demo: the gradient leaf {jax.tree_util.keystr(path)} has shape "
                f"{np.shape(g)} but its momentum in the state has shape {np.shape(m)} (the "
                f"state holds (1, *shape) per device). Initialise the optimizer with "
                f"parameters shaped like the gradients."
            )


def demo(
    learning_rate: optax.ScalarOrSchedule,
    *,
    compression_decay: float = 0.999,
    compression_topk: int = 32,
    compression_chunk: int = 64,
    weight_decay: float = 0.0,
    sign_only: bool = False,
    axis_name: Hashable | None = "data",
) -> optax.GradientTransformationExtraArgs:
    """DeMo: per-device momentum, its top DCT coefficients all-gathered, sign descent.

    Every device accumulates its local gradients into its own momentum, sends the
    ``compression_topk`` largest DCT coefficients of each chunk of it and removes them
    from it; the update is the sign of the inverse DCT of the coefficients averaged
    over the devices that sent each.

    For one leaf on device ``i`` at step ``t``, with ``lr = learning_rate(t)``, ``beta =
    compression_decay`` and ``k = compression_topk``, each line in the function named
    right, in the order of the reference implementation (``bloc97/DeMo``, ``demo.py``):

    .. code-block:: text

        u    = -lr * weight_decay * p                  decoupled weight decay     _descend
        m_i  = beta * m_i + lr * g_i                   local momentum             _accumulate
        C_i  = DCT(m_i)                                chunked DCT-II, per chunk  _encode
        J_i  = top_k |C_i|                             k coefficients per chunk   _compress
        m_i  = m_i - IDCT(C_i on J_i)                  what is sent leaves m_i    _compress
        gather (J_j, C_j on J_j) from every device j   one all-gather             _exchange
        Cbar = sum_{j: q in J_j} C_j[q] / #{j: q in J_j}   mean over the senders  _average
        u    = u - lr * sign(IDCT(Cbar))               sign descent               _descend

    The DCT is the orthonormal DCT-II of each ``h x w`` chunk of the leaf's matrix view
    ``(prod(shape[:-1]), shape[-1])`` (a vector is one row, a scalar a ``1 x 1`` matrix);
    a dimension's chunk size is its largest divisor not above ``compression_chunk``. With
    ``sign_only=True`` a device sends ``sign(C_j[q])`` (one bit) instead of ``C_j[q]``.

    Bits: a device sends, per leaf, ``chunks * k * (index bits + value bits)`` with
    ``k = min(compression_topk, h w)``: indices as the narrowest unsigned integer that
    holds ``h w`` (8 bits up to 256 coefficients a chunk, 16 up to 65536), values 32 bits
    (float32), or 1 with ``sign_only`` (packed into 32-bit words; the count leaves out
    the last word's padding). ``bits_dense`` counts what a dense all-reduce of the
    gradients would send. This is an all-gather: each device *receives* ``N - 1`` times
    what it sends, which grows with the number of devices while a dense all-reduce's
    traffic stays below twice the gradient (:mod:`lore_jax.accounting`).

    Wrappers: DeMo is the whole optimizer; ``optax.apply_if_finite`` or
    ``optax.MultiSteps`` around it decide per device or per call around its all-gather
    (accumulate with :func:`lore_jax.multi_steps`). :func:`lore_jax.state_specs`,
    :func:`lore_jax.sharded_init` and :func:`lore_jax.data_parallel` refuse both; under
    ``jax.pmap`` nothing can check: ``apply_if_finite`` around it hangs when one device's
    gradient is not finite, ``MultiSteps`` gathers on every micro-step while counting
    one in ``k``, and ``axis_name=None`` lets every device apply its own update.

    Args:
      learning_rate: ``lr > 0``, or an optax schedule ``step -> lr``; it scales both the
        gradient entering the momentum and the sign step.
      compression_decay: ``beta`` in ``[0, 1)``, the momentum's decay (default 0.999).
      compression_topk: ``k >= 1`` coefficients sent per chunk (clipped to the chunk's
        ``h w``); default 32.
      compression_chunk: the largest chunk side, default 64: a dimension of size ``n`` is
        cut in chunks of its largest divisor not above it. A leaf is chunked as its
        matrix view ``(prod(shape[:-1]), shape[-1])``; a vector as one row.
      weight_decay: decoupled weight decay (default 0): the update also holds
        ``-lr * weight_decay * params``; ``update`` then needs ``params``.
      sign_only: send only the sign of each kept coefficient (1 bit) instead of its
        float32 value; the momentum still loses the coefficient's value.
      axis_name: the data axis of the enclosing ``shard_map`` / ``pmap`` (default
        ``"data"``); ``None`` runs on one device (N = 1) with no collectives.

    Returns:
      An ``optax.GradientTransformationExtraArgs``. ``update(updates, state, params=None)``
      takes the device's local gradients (any float dtype and shape) and returns the
      update (add it to the parameters, ``optax.apply_updates``) with their structure and
      dtypes, bit for bit the same on every device. The state is a :class:`DemoState`;
      :func:`lore_jax.communication` reads its bit counters.

    Raises:
      ValueError / TypeError naming the parameter, at construction for bad arguments,
      and at trace time for an unbound ``axis_name``, gradients that are not this
      device's own (already summed over the axis), non-float gradients, gradients that
      do not match the state, or ``weight_decay`` without ``params``.

    References:
      Peng, Quesnelle, Kingma. "DeMo: Decoupled Momentum Optimization". ICLR 2026
      (arXiv:2411.19870); reference implementation github.com/bloc97/DeMo.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lore_jax
      >>> tx = lore_jax.demo(1e-3, compression_topk=4, compression_chunk=8, axis_name=None)
      >>> params = {"w": jnp.ones((16, 12)), "b": jnp.zeros(12)}
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, state, params)
      >>> updates["w"][0, :3]
      Array([-0.001, -0.001, -0.001], dtype=float32)
      >>> lore_jax.communication(state)
      {'bits_sent': 960, 'bits_dense': 6528}
    """
    _check_options(learning_rate, compression_decay, compression_topk, compression_chunk,
                   weight_decay, sign_only)
    collectives.check_axis_name(axis_name, "demo")
    decay, topk, chunk = float(compression_decay), int(compression_topk), int(compression_chunk)
    weight_decay = float(weight_decay)

    def init_fn(params):
        def zeros(x):
            x = jnp.asarray(x)
            m = jnp.zeros((1,) + x.shape, work_dtype(x.dtype))
            return collectives.vary_like(m, x, exclude=axis_name)

        return DemoState(count=jnp.zeros([], jnp.int32), momentum=jax.tree.map(zeros, params),
                         bits_sent=accounting.zero_counter(),
                         bits_dense=accounting.zero_counter())

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        collectives.check_floating(updates, "demo")
        collectives.check_local_gradients(updates, axis_name, "demo")
        collectives.check_per_device_state(state, axis_name, "demo")
        _check_state_fits(updates, state.momentum)
        if weight_decay and params is None:
            raise ValueError(
                "demo: weight_decay > 0 needs the parameters: call update(updates, state, "
                "params)."
            )
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        grads, treedef = jax.tree.flatten(updates)
        plans = [_chunks(np.shape(g), chunk, topk) for g in grads]
        sent, momentum = [], []
        for g, m, c in zip(grads, treedef.flatten_up_to(state.momentum), plans, strict=True):
            idx, values, m = _compress(_accumulate(m[0], g, decay, lr), c)
            sent.append(_payload(idx, values, c, sign_only))
            momentum.append(m[None])
        gathered = _exchange(sent, axis_name, state.count)
        ps = treedef.flatten_up_to(params) if weight_decay else [None] * len(grads)
        outs = []
        for g, m, c, got, p in zip(grads, momentum, plans, gathered, ps, strict=True):
            idx, values = _unpayload(got, c, sign_only, m.dtype)
            decoded = _decode(_average(idx, values, c), c, g.shape)
            outs.append(_descend(decoded, p, lr, weight_decay, g.dtype))
        bits = sum(_bits(c, 1 if sign_only else jnp.dtype(m.dtype).itemsize * 8)
                   for c, m in zip(plans, momentum, strict=True))
        new_state = DemoState(
            count=optax.safe_increment(state.count),
            momentum=treedef.unflatten(momentum),
            bits_sent=accounting.add_bits(state.bits_sent, bits),
            bits_dense=accounting.add_bits(state.bits_dense, sum(
                accounting.bits_of(np.shape(g), jnp.result_type(g)) for g in grads)),
        )
        return treedef.unflatten(outs), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
