"""Gradient accumulation that communicates once per optimizer step.

``optax.MultiSteps`` runs its inner transformation on *every* micro-step and then
selects the result, so a compressing transform inside it runs its collectives on every
micro-batch (and under ``jax.shard_map`` it does not even trace: its ``cond`` branches
disagree on which values vary over the data axis). :func:`multi_steps` is the drop-in
replacement for data-parallel chains: each device sums its own local gradients in a
per-device buffer, and only the ``k``-th call runs the inner chain, on the mean of the
``k`` micro-batch gradients, inside one branch of a ``lax.cond`` whose predicate is the
replicated micro-step counter, so every device takes the same branch and the other
``k - 1`` calls send nothing: only the accumulated gradient is compressed, and steps are
counted once per optimizer update.

When the whole batch of an optimizer step is at hand, accumulating inside the step
before the transform is simpler and faster: :func:`lore_jax.data_parallel` with
``micro_batches=k`` scans over the micro-batches and calls the transform once.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lore_jax import collectives
from lore_jax.compressors.base import work_dtype


class MultiStepsState(NamedTuple):
    """State of :func:`multi_steps`."""

    mini_step: jax.Array
    """int32 scalar: micro-batches accumulated since the last optimizer step (replicated)."""
    acc_grads: Any
    """Per-device sums of the local gradients since the last optimizer step: params-shaped
    leaves with a leading axis of length 1, float32 or wider."""
    inner_state: Any
    """The inner transformation's state."""

    PER_DEVICE_FIELDS = ("acc_grads",)


def multi_steps(inner: optax.GradientTransformation, every_k_steps: int, *,
                axis_name: collectives.AxisName = "data") -> optax.GradientTransformationExtraArgs:
    """Accumulates ``every_k_steps`` local gradients, then runs ``inner`` once on their mean.

    Calls ``1 .. k - 1`` of each cycle add the device's local gradient to its buffer and
    return zero updates, communicating nothing; call ``k`` passes the mean of the ``k``
    local gradients to ``inner`` (e.g. ``optax.chain(lore_jax.greedylore(...),
    optax.adam(...))``), which compresses, all-reduces and updates once, and resets the
    buffer. Every lore_jax transform inside counts one step and its bits once per ``k``
    calls. ``optax.MultiSteps``, which this replaces, runs ``inner`` on every call and
    keeps one result in ``k``: its collectives run every time while the bit counters
    count one in ``k`` (:func:`lore_jax.state_specs`, :func:`lore_jax.sharded_init` and
    :func:`lore_jax.data_parallel` refuse it around a lore_jax mean; under ``jax.pmap``
    nothing can check it, nor ``optax.apply_if_finite`` around the chain, which hangs
    there when one device's gradient is not finite, nor ``axis_name=None``, with which
    every device applies its own gradient).

    Args:
      inner: the chain to run once per optimizer step; it must start with a lore_jax
        transform (or another mean over the data axis).
      every_k_steps: ``k >= 1`` micro-batches per optimizer step.
      axis_name: the data axis ``inner`` averages over (the zero updates of the
        accumulating calls are typed like ``inner``'s mean: replicated over it).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is a
      :class:`MultiStepsState` (the buffer is per device: use
      :func:`lore_jax.sharded_init` and :func:`lore_jax.state_specs`).

    Raises:
      ValueError: naming ``every_k_steps`` or ``inner`` when invalid.

    Example:
      >>> import jax.numpy as jnp, optax, lore_jax
      >>> tx = lore_jax.multi_steps(optax.sgd(1.0), every_k_steps=2)
      >>> state = tx.init({"w": jnp.zeros(2)})
      >>> u1, state = tx.update({"w": jnp.array([1.0, 2.0])}, state)
      >>> u2, state = tx.update({"w": jnp.array([3.0, 4.0])}, state)
      >>> u1["w"], u2["w"]
      (Array([0., 0.], dtype=float32), Array([-2., -3.], dtype=float32))
    """
    if (isinstance(every_k_steps, bool) or not isinstance(every_k_steps, (int, np.integer))
            or every_k_steps < 1):
        raise ValueError(
            f"every_k_steps must be an integer >= 1 (micro-batches per optimizer step), got "
            f"{every_k_steps!r}."
        )
    if not hasattr(inner, "init") or not hasattr(inner, "update"):
        raise ValueError(
            f"inner must be an optax GradientTransformation, got {type(inner).__name__}."
        )
    k = int(every_k_steps)
    collectives.check_axis_name(axis_name, "multi_steps")
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        def buffer(p):
            zeros = jnp.zeros((1,) + jnp.shape(p), work_dtype(jnp.result_type(p)))
            return collectives.vary_like(zeros, p)

        return MultiStepsState(mini_step=jnp.zeros([], jnp.int32),
                               acc_grads=jax.tree.map(buffer, params),
                               inner_state=inner.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        collectives.check_per_device_state(state, axis_name, "multi_steps")
        acc = jax.tree.map(lambda a, g: a[0] + g.astype(a.dtype), state.acc_grads, updates)
        last = state.mini_step + 1 >= k

        def apply(_):
            mean = jax.tree.map(lambda a, g: (a / k).astype(g.dtype), acc, updates)
            out, inner_state = inner.update(mean, state.inner_state, params, **extra_args)
            inner_state = collectives.match_varying(inner_state, state.inner_state)
            return out, inner_state, jax.tree.map(jnp.zeros_like, acc)

        def accumulate(_):
            def zeros(g):   # typed like the mean: varying over model axes, not the data axis
                axes = collectives.mesh_order(collectives.varying_axes(g) - {axis_name})
                return collectives.vary(jnp.zeros(g.shape, g.dtype), axes)

            return jax.tree.map(zeros, updates), state.inner_state, acc

        out, inner_state, acc = jax.lax.cond(last, apply, accumulate, None)
        new_state = MultiStepsState(
            mini_step=jnp.where(last, 0, state.mini_step + 1).astype(jnp.int32),
            acc_grads=jax.tree.map(lambda a: a[None], acc),
            inner_state=inner_state,
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
