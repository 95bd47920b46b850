"""Infrequent synchronisation (DiLoCo) with a compressed pseudo-gradient, as an optax transform.

Every device trains its own copy of the parameters with an inner optimizer for ``H``
steps, without communicating; then the devices average their *pseudo-gradients* (how
far each moved from the shared parameters) through any lore_jax mean, dense or
compressed, and an outer optimizer steps the shared parameters; every device restarts
from them. Communication happens once every ``H`` steps, and what is sent can itself be
compressed (GreedyLore, PowerSGD, top-k with error feedback, ...)::

    tx = lore_jax.diloco(optax.adam(3e-3), optax.sgd(0.7, momentum=0.9, nesterov=True),
                         sync_every=25, mean=lore_jax.greedylore(4))
    train = lore_jax.data_parallel(loss_fn, tx, mesh)

The parameters a training step holds are the *shared* ones (the model to evaluate and
checkpoint); each device's own copy lives in the state, and the gradient is taken there
(:func:`local_params`, which :func:`lore_jax.data_parallel` calls).

References:
  Douillard et al. "DiLoCo: Distributed Low-Communication Training of Language Models"
  (2023), Algorithm 1. Sarfi et al. "SparseLoCo" (2025): error feedback on the
  compressed pseudo-gradient in place of the outer momentum.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lore_jax import accounting, collectives


class DilocoState(NamedTuple):
    """State of :func:`diloco`."""

    count: jax.Array
    """int32 inner steps taken (replicated); a round ends when it reaches a multiple of
    ``sync_every``."""
    local: Any
    """Per device: this device's parameters, params-shaped leaves with a leading axis of
    length 1."""
    inner_state: Any
    """Per device: the inner optimizer's state, each leaf with a leading axis of length 1."""
    outer_state: Any
    """The outer optimizer's state (replicated)."""
    mean_state: Any
    """The state of the mean the pseudo-gradients go through (its own layout)."""
    bits_sent: jax.Array
    """uint32[2] bits this device sent: the mean's own counters, summed."""
    bits_dense: jax.Array
    """uint32[2] bits dense data parallelism would have sent: one all-reduce of the
    gradients per inner step."""
    nonfinite_steps: jax.Array
    """Per device, int32 ``(1,)``: inner steps this device skipped because they made its
    parameters non-finite."""

    PER_DEVICE_FIELDS = ("local", "inner_state", "nonfinite_steps")


def _counts_bits(node: Any) -> bool:
    return {"bits_sent", "bits_dense"} <= set(collectives.field_names(node) or ())


def _mean_bits(mean_state: Any) -> jax.Array:
    """The bits the mean's states have sent, one ``uint32[2]`` counter."""
    total = accounting.zero_counter()
    for s in collectives.find_states(mean_state, _counts_bits):
        total = accounting.add_bits(total, collectives.get_field(s, "bits_sent"))
    return total


def _is_diloco(node: Any) -> bool:
    if isinstance(node, DilocoState):
        return True
    names = collectives.field_names(node)
    return (names is not None and not hasattr(node, "_fields")
            and {"local", "inner_state", "outer_state", "mean_state"} <= set(names))


def local_params(opt_state: Any, params: Any) -> Any:
    """The parameters this device's gradient is taken at: its own copy under :func:`diloco`.

    Inside ``jax.shard_map`` / ``jax.pmap``: when ``opt_state`` holds a
    :class:`DilocoState`, this device's parameters from it (the leading axis of length 1
    dropped); otherwise ``params`` unchanged. A hand-written step differentiates there::

        grads = jax.grad(loss_fn)(lore_jax.per_device(
            lore_jax.local_params(opt_state, params)), batch)

    Raises:
      ValueError: ``opt_state`` holds more than one :class:`DilocoState`.
    """
    found = collectives.find_states(opt_state, _is_diloco)
    if not found:
        return params
    if len(found) > 1:
        raise ValueError(
            f"opt_state holds {len(found)} diloco states; a step trains one set of local "
            f"parameters. Use one lore_jax.diloco as the whole optimizer."
        )
    local = collectives.get_field(found[0], "local")
    return jax.tree.map(lambda x: x[0], local)


# --------------------------------------------------------------------------- phases


def _inner_step(inner: optax.GradientTransformation, grads: Any, local: Any,
                inner_state: Any) -> tuple[Any, Any, jax.Array]:
    """Algorithm 1, inner loop: ``theta_i <- theta_i + InnerOpt(g_i)``, on this device.

    A step that would make this device's parameters non-finite is skipped on it (its
    parameters and inner state stay); returns ``(local, inner_state, skipped)``.
    """
    updates, new_inner = inner.update(grads, inner_state, local)
    new_local = optax.apply_updates(local, updates)
    finite = collectives.all_finite(new_local)
    pick = lambda new, old: jnp.where(finite, new, old)   # noqa: E731
    return (jax.tree.map(pick, new_local, local), jax.tree.map(pick, new_inner, inner_state),
            jnp.logical_not(finite))


def _pseudo_gradient(params: Any, local: Any) -> Any:
    """Algorithm 1, line 12: ``Delta_i = theta - theta_i``, this device's pseudo-gradient."""
    return jax.tree.map(lambda p, q: (p - q).astype(q.dtype), params, local)


def _outer_step(outer: optax.GradientTransformation, mean: optax.GradientTransformation,
                params: Any, local: Any, outer_state: Any, mean_state: Any
                ) -> tuple[Any, Any, Any]:
    """Algorithm 1, lines 12-14: ``Delta = mean_i(Delta_i)`` through ``mean`` (compressed
    or not), ``theta <- theta + OuterOpt(Delta)``. A round whose mean is not finite leaves
    ``theta`` and the outer state as they were. Returns ``(updates, outer_state,
    mean_state)``, the updates identical on every device."""
    delta, mean_state = mean.update(_pseudo_gradient(params, local), mean_state, params)
    updates, new_outer = outer.update(delta, outer_state, params)
    finite = collectives.all_finite(updates)
    updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
    outer_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_outer, outer_state)
    return updates, outer_state, mean_state


def _restart(params: Any, updates: Any, local: Any) -> Any:
    """Algorithm 1, line 4: every device restarts from the new shared parameters."""
    new = optax.apply_updates(params, updates)
    return jax.tree.map(lambda n, q: collectives.match_varying(n.astype(q.dtype), q), new, local)


# --------------------------------------------------------------------------- transform


def _check_options(inner: Any, outer: Any, sync_every: Any, mean: Any) -> None:
    for name, tx in (("inner", inner), ("outer", outer), ("mean", mean)):
        if tx is not None and not (hasattr(tx, "init") and hasattr(tx, "update")):
            raise TypeError(
                f"diloco: {name} must be an optax GradientTransformation (init, update), got "
                f"{tx!r}; e.g. inner=optax.adam(3e-3), outer=optax.sgd(0.7, momentum=0.9, "
                f"nesterov=True), mean=lore_jax.greedylore(4)."
            )
    if (isinstance(sync_every, bool) or not isinstance(sync_every, (int, np.integer))
            or sync_every < 1):
        raise ValueError(
            f"diloco: sync_every must be an integer >= 1 (inner steps per round), got "
            f"{sync_every!r}; sync_every=1 averages every step."
        )


def diloco(
    inner: optax.GradientTransformation,
    outer: optax.GradientTransformation,
    *,
    sync_every: int,
    mean: optax.GradientTransformation | None = None,
    axis_name: Hashable | None = "data",
) -> optax.GradientTransformationExtraArgs:
    """DiLoCo: ``sync_every`` local inner steps, then an outer step on the mean pseudo-gradient.

    Algorithm 1 of Douillard et al. (2023), each line in the function named right; on
    device ``i``, with shared parameters ``theta`` and ``H = sync_every``:

    .. code-block:: text

        theta_i = theta                                 every device starts equal
        for H steps:                                    no communication
            theta_i = theta_i + InnerOpt(g_i(theta_i))                 _inner_step
        Delta_i = theta - theta_i                       pseudo-gradient  _pseudo_gradient
        Delta   = mean(Delta_i over devices)            through ``mean`` _outer_step
        theta   = theta + OuterOpt(Delta)                                _outer_step
        theta_i = theta                                                  _restart

    ``mean`` is any lore_jax mean: ``compressed_mean(identity(), error_feedback=None)``
    (default, DiLoCo itself), ``greedylore(r)``, ``compressed_mean(powersgd(r))``,
    ``compressed_mean(top_k(...))``, each with its error feedback, whose memory then
    carries what a round's message left out into the next round. With
    ``outer=optax.sgd(1.0)`` and a mean with error feedback this is SparseLoCo's recipe:
    the error memory takes the outer momentum's place. The inner optimizer's state is
    kept across rounds (per device), as in DiLoCo.

    The transform is the whole optimizer: ``update(grads, state, params)`` takes the
    gradients at this device's own parameters (:func:`local_params` of the state; the
    caller differentiates there) and the shared ``params``, and returns the update of
    the shared parameters: zero between rounds, the outer step at the end of one,
    identical on every device. Communication: the mean's, once every ``H`` steps; the
    state's ``bits_dense`` counts a dense all-reduce every step, so
    :func:`lore_jax.communication` gives the compression against dense data parallelism.

    Wrappers: ``optax.apply_if_finite`` or ``optax.MultiSteps`` around it decide per
    device or per call around the round's collectives; :func:`lore_jax.state_specs`,
    :func:`lore_jax.sharded_init` and :func:`lore_jax.data_parallel` refuse both (put
    ``apply_if_finite`` around ``outer``; accumulate with :func:`lore_jax.multi_steps`).
    Under ``jax.pmap`` nothing can check: ``apply_if_finite`` around it hangs when one
    device's update is not finite at a round, ``MultiSteps`` runs rounds it then
    discards, and ``axis_name=None`` lets every device keep its own parameters.

    Args:
      inner: the optimizer of each device's local steps (e.g. ``optax.adam(3e-3)``); its
        count, and so its schedule, advances every step.
      outer: the optimizer of the shared parameters on the mean pseudo-gradient (DiLoCo:
        ``optax.sgd(0.7, momentum=0.9, nesterov=True)``); it steps once per round.
      sync_every: ``H >= 1`` inner steps per round.
      mean: the data-parallel mean of the pseudo-gradients over ``axis_name`` (default:
        the dense mean).
      axis_name: the data axis (``None``: one device, the mean must then be built with
        ``axis_name=None`` too).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs ``params``; the
      state is a :class:`DilocoState`.

    Raises:
      TypeError / ValueError naming the argument, at construction; ``ValueError`` at
      trace time when ``params`` is missing.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lore_jax
      >>> tx = lore_jax.diloco(optax.sgd(0.25), optax.sgd(1.0), sync_every=2,
      ...     mean=lore_jax.compressed_mean(lore_jax.compressors.identity(),
      ...                                   error_feedback=None, axis_name=None),
      ...     axis_name=None)
      >>> params = {"w": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.ones(3)}
      >>> updates, state = tx.update(grads, state, params)   # an inner step: no update
      >>> updates["w"]
      Array([0., 0., 0.], dtype=float32)
      >>> updates, state = tx.update(grads, state, params)   # the round ends
      >>> updates["w"]
      Array([-0.5, -0.5, -0.5], dtype=float32)
    """
    _check_options(inner, outer, sync_every, mean)
    collectives.check_axis_name(axis_name, "diloco")
    if mean is None:
        from lore_jax import compressors
        from lore_jax.compressed_mean import compressed_mean
        mean = compressed_mean(compressors.identity(), error_feedback=None,
                               axis_name=axis_name)
    h = int(sync_every)
    per_device = lambda tree: jax.tree.map(lambda x: jnp.asarray(x)[None], tree)  # noqa: E731
    this_device = lambda tree: jax.tree.map(lambda x: x[0], tree)  # noqa: E731

    def init_fn(params):
        return DilocoState(
            count=jnp.zeros([], jnp.int32), local=per_device(params),
            inner_state=per_device(inner.init(params)), outer_state=outer.init(params),
            mean_state=mean.init(params), bits_sent=accounting.zero_counter(),
            bits_dense=accounting.zero_counter(), nonfinite_steps=jnp.zeros((1,), jnp.int32))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(
                "diloco: update needs the shared parameters: call update(grads, state, "
                "params) (optax.apply_updates(params, updates) then gives the new shared "
                "parameters)."
            )
        collectives.check_floating(updates, "diloco")
        collectives.check_local_gradients(updates, axis_name, "diloco")
        collectives.check_per_device_state(state, axis_name, "diloco")
        local, inner_state, skipped = _inner_step(
            inner, updates, this_device(state.local), this_device(state.inner_state))
        count = optax.safe_increment(state.count)

        def round_(local, outer_state, mean_state):
            out, outer_state, mean_state = _outer_step(outer, mean, params, local,
                                                       outer_state, mean_state)
            return out, _restart(params, out, local), outer_state, mean_state

        def no_round(local, outer_state, mean_state):
            return jax.tree.map(jnp.zeros_like, params), local, outer_state, mean_state

        out, local, outer_state, mean_state = jax.lax.cond(
            count % h == 0, round_, no_round, local, state.outer_state, state.mean_state)
        new_state = DilocoState(
            count=count, local=per_device(local), inner_state=per_device(inner_state),
            outer_state=outer_state, mean_state=mean_state,
            bits_sent=_mean_bits(mean_state),
            bits_dense=accounting.add_bits(state.bits_dense, sum(
                accounting.bits_of(np.shape(g), jnp.result_type(g))
                for g in jax.tree.leaves(updates))),
            nonfinite_steps=state.nonfinite_steps + skipped.astype(jnp.int32))
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
