"""Bounded-delay transforms that simulate asynchronous workers inside an optax chain.

Two semantics of a parameter server that works with stale messages (lore_jax spec
§5.5-§5.6, ``docs/spec.md``, the setting of Khirirat, Feyzmahdavian and Johansson,
"Distributed learning with compressed gradients", arXiv:1806.06573):

* :func:`stale` (A5, *delayed gradient*): at step ``k`` the device contributes the update
  it received ``tau_k`` steps ago, ``0 <= tau_k <= max_delay``. Placed **before** a
  compressor, the delayed gradient is compressed afresh every step::

      tx = optax.chain(lore_jax.stale(8, axis_name="data"),
                       lore_jax.compressed_mean(compressor, axis_name="data"),
                       optax.sgd(lr))

  so the server applies ``mean_i Q_i(grad f_i(x_{k - tau_i(k)}))`` (with ``axis_name=None``
  on one device: ``Q(grad f(x_{k - tau_k}))``, spec §5.5).
* :func:`reuse_last` (A6, *reuse the last stored message*): the device contributes the
  update it received at its last *report*; between reports the server reuses that stored
  message. Placed **after** a worker-local compression and before the mean over devices,
  the stored compressed message is reused as is, never re-sampled (spec §5.6).

In both, ``updates`` are the device's local updates and the delay of a step is recorded in
the state (``delay``) for logging. Before ``max_delay`` steps have passed, a delay never
reaches back before step 0: the delay is clipped to ``k`` (the oldest available update is
used, which is the convention ``x_j = x_0`` for ``j < 0``); nothing is ever read
from an empty slot, so the first step returns its input unchanged.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lore_jax import collectives

__all__ = ["ReuseLastState", "StaleState", "reuse_last", "stale"]

Schedule = Literal["fixed", "random"]
_SCHEDULES = ("fixed", "random")


class StaleState(NamedTuple):
    """State of :func:`stale`."""

    count: jax.Array
    """int32 scalar: steps taken (the index ``k`` of the next step), replicated."""
    buffer: Any
    """Pytree like the params, leaves ``(1, max_delay + 1, *shape)`` per device: ring buffer."""
    delay: jax.Array
    """int32 ``(1,)`` per device: the delay ``tau_k`` used at the latest step."""
    key: jax.Array
    """uint32[2] PRNG key of the random schedule, replicated (never split)."""

    PER_DEVICE_FIELDS = ("buffer", "delay")


class ReuseLastState(NamedTuple):
    """State of :func:`reuse_last`."""

    count: jax.Array
    """int32 scalar: steps taken, replicated."""
    message: Any
    """Pytree like the params, leaves ``(1, *shape)`` per device: the last reported update."""
    delay: jax.Array
    """int32 ``(1,)`` per device: age of the message returned at the latest step."""
    deadline: jax.Array
    """int32 ``(1,)`` per device: the device reports when the message would get older."""
    key: jax.Array
    """uint32[2] PRNG key of the random schedule, replicated (never split)."""

    PER_DEVICE_FIELDS = ("message", "delay", "deadline")


def _check_arguments(max_delay: Any, schedule: Any, key: Any) -> tuple[int, str, jax.Array]:
    """Validates the shared arguments (outside jit); returns ``(tau, schedule, key)``."""
    if isinstance(max_delay, bool) or not isinstance(max_delay, (int, np.integer)):
        raise TypeError(
            f"max_delay must be a non-negative integer (steps), got {max_delay!r} "
            f"({type(max_delay).__name__})."
        )
    if max_delay < 0:
        raise ValueError(f"max_delay must be >= 0 (0 means no delay), got {max_delay!r}.")
    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not supported; use 'fixed' or 'random'.")
    return int(max_delay), schedule, collectives.as_key(key)


def _device_key(key: jax.Array, count: jax.Array, axis_name: Hashable | None) -> jax.Array:
    """The key of this step and device: ``fold_in(fold_in(key, k), axis_index)``."""
    step_key = jax.random.fold_in(key, count)
    if axis_name is None:
        return step_key
    return jax.random.fold_in(step_key, jax.lax.axis_index(axis_name))


def stale(
    max_delay: int,
    *,
    schedule: Schedule = "fixed",
    axis_name: Hashable | None = None,
    key: Any = None,
) -> optax.GradientTransformation:
    """Delays updates by ``tau_k`` steps, ``0 <= tau_k <= max_delay`` (bounded asynchrony).

    Simulates the parameter server of A5 (spec §5.5), ``x_{k+1} = x_k - gamma Q(grad f(x_{k -
    tau_k}))``: step ``k`` stores its input ``u_k`` in a ring buffer of the last ``max_delay
    + 1`` inputs and returns ``u_{k - tau_k}``. Schedules:

    * ``"fixed"``: ``tau_k = min(k, max_delay)``, the worst case once the buffer is full
      (before that, the oldest stored input ``u_0``);
    * ``"random"``: ``tau_k = min(k, t)`` with ``t`` uniform in ``{0, ..., max_delay}``,
      drawn independently per step and, when ``axis_name`` is set, per device from
      ``fold_in(fold_in(key, k), axis_index(axis_name))``.

    Put it before a compressor so that the delayed gradient is compressed afresh each step
    (A5, spec §5.5); see :func:`lore_jax.theory.stale_cgd` for the admissible step. Memory:
    ``max_delay + 1`` copies of the updates per device.

    Args:
      max_delay: ``tau >= 0``, the delay bound (0: identity).
      schedule: ``"fixed"`` (default) or ``"random"``.
      axis_name: the data axis of the enclosing ``shard_map`` / ``pmap``, for per-device
        random delays; ``None`` (default) draws one delay (single device, or identical
        delays on every device). The transform itself never communicates.
      key: int seed or ``jax.random.PRNGKey`` for ``"random"`` (default seed 0).

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`StaleState`; the buffer
      and delay are per-device fields (leading axis 1), see
      :func:`lore_jax.state_specs`.

    Raises:
      TypeError / ValueError naming ``max_delay``, ``schedule`` or ``key`` when invalid.

    References:
      Khirirat, Feyzmahdavian, Johansson, "Distributed learning with compressed gradients",
      arXiv:1806.06573; lore_jax spec §5.5.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = stale(2)
      >>> state = tx.init(jnp.zeros(()))
      >>> outs = []
      >>> for k in range(5):
      ...     out, state = tx.update(jnp.float32(k), state)
      ...     outs.append(int(out))
      >>> outs
      [0, 0, 0, 1, 2]
    """
    tau, schedule, base_key = _check_arguments(max_delay, schedule, key)
    size = tau + 1

    def init_fn(params):
        buffer = jax.tree.map(lambda p: collectives.vary_like(
            jnp.zeros((1, size) + jnp.shape(p), jnp.asarray(p).dtype), p), params)
        return StaleState(count=jnp.zeros([], jnp.int32), buffer=buffer,
                          delay=jnp.zeros((1,), jnp.int32), key=base_key)

    def update_fn(updates, state, params=None):
        del params
        if axis_name is not None:
            collectives.check_axis(axis_name)
        collectives.check_per_device_state(state, axis_name, "stale")
        k = state.count
        if schedule == "fixed":
            delay = jnp.minimum(k, tau)
        else:
            draw = jax.random.randint(_device_key(state.key, k, axis_name), (), 0, size)
            delay = jnp.minimum(k, draw)
        write, read = k % size, (k - delay) % size
        buffer = jax.tree.map(lambda b, u: b.at[0, write].set(u.astype(b.dtype)),
                              state.buffer, updates)
        out = jax.tree.map(lambda b, u: b[0, read].astype(u.dtype), buffer, updates)
        return out, StaleState(count=optax.safe_increment(k), buffer=buffer,
                               delay=delay.astype(jnp.int32)[None], key=state.key)

    return optax.GradientTransformation(init_fn, update_fn)


def reuse_last(
    max_delay: int,
    *,
    schedule: Schedule = "fixed",
    axis_name: Hashable | None = None,
    key: Any = None,
) -> optax.GradientTransformation:
    """Returns the last *reported* update; a device reports at least every ``max_delay + 1`` steps.

    Simulates the message table of A6 (spec §5.6) (asynchronous compressed incremental
    aggregated gradient): the server keeps each worker's last message ``g_i = Q_i(grad
    f_i(x_{k - tau_i(k)}))`` and reuses it until the worker reports again, so the
    compression noise is *not* fresh. Every device reports at step 0; afterwards a device
    reports (stores its current input and returns it, delay 0) when its stored message would
    otherwise become older than its *deadline*, and returns the stored message otherwise
    (delay = its age). Deadlines, always ``<= max_delay``:

    * ``"fixed"``: ``max_delay``, with the first deadline staggered to ``max_delay - (i mod
      (max_delay + 1))`` on device ``i`` (``axis_index``), so that with ``m = max_delay + 1``
      devices exactly one reports per step after the first (a round robin, as in IAG);
    * ``"random"``: after each report, uniform in ``{0, ..., max_delay}``, drawn per step
      and per device from ``fold_in(fold_in(key, k), axis_index(axis_name))``.

    Place it after a worker-local compressor and before the mean over devices, so that the
    stored message is the compressed one. Memory: one copy of the updates per device.

    Args:
      max_delay: ``tau >= 0``, the largest age of a returned message (0: identity).
      schedule: ``"fixed"`` (default, round robin) or ``"random"``.
      axis_name: the data axis of the enclosing ``shard_map`` / ``pmap``, for per-device
        schedules; ``None`` (default) behaves as device 0. It never communicates.
      key: int seed or ``jax.random.PRNGKey`` for ``"random"`` (default seed 0).

    Returns:
      An ``optax.GradientTransformation`` whose state is a :class:`ReuseLastState`.

    Raises:
      TypeError / ValueError naming ``max_delay``, ``schedule`` or ``key`` when invalid.

    References:
      Khirirat, Feyzmahdavian, Johansson, arXiv:1806.06573; Aytekin, Feyzmahdavian,
      Johansson, asynchronous incremental aggregated gradient on a parameter server (2016);
      lore_jax spec §5.6.

    Example:
      >>> import jax.numpy as jnp
      >>> tx = reuse_last(2)
      >>> state = tx.init(jnp.zeros(()))
      >>> outs = []
      >>> for k in range(7):
      ...     out, state = tx.update(jnp.float32(k), state)
      ...     outs.append(int(out))
      >>> outs
      [0, 0, 0, 3, 3, 3, 6]
    """
    tau, schedule, base_key = _check_arguments(max_delay, schedule, key)

    def init_fn(params):
        message = jax.tree.map(lambda p: collectives.vary_like(
            jnp.zeros((1,) + jnp.shape(p), jnp.asarray(p).dtype), p), params)
        zero = jnp.zeros((1,), jnp.int32)
        return ReuseLastState(count=jnp.zeros([], jnp.int32), message=message, delay=zero,
                              deadline=zero, key=base_key)

    def update_fn(updates, state, params=None):
        del params
        if axis_name is not None:
            collectives.check_axis(axis_name)
        collectives.check_per_device_state(state, axis_name, "reuse_last")
        k = state.count
        age = state.delay[0] + 1
        report = (k == 0) | (age > state.deadline[0])
        if schedule == "fixed":
            device = 0 if axis_name is None else jax.lax.axis_index(axis_name)
            deadline = jnp.where(k == 0, tau - device % (tau + 1), tau)
        else:
            deadline = jax.random.randint(_device_key(state.key, k, axis_name), (), 0, tau + 1)
        deadline = jnp.where(report, deadline, state.deadline[0])
        message = jax.tree.map(
            lambda m, u: jnp.where(report, u.astype(m.dtype)[None], m), state.message, updates)
        out = jax.tree.map(lambda m, u: m[0].astype(u.dtype), message, updates)
        new_state = ReuseLastState(
            count=optax.safe_increment(k), message=message,
            delay=jnp.where(report, 0, age).astype(jnp.int32)[None],
            deadline=deadline.astype(jnp.int32)[None], key=state.key)
        return out, new_state

    return optax.GradientTransformation(init_fn, update_fn)
