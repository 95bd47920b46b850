"""Distributed plumbing: the data axis, means over it, and how lore_jax state is laid out.

Every lore_jax transform runs *inside* ``jax.shard_map`` (or ``jax.pmap``) with a
named data axis, sees its device's local gradients and returns the mean over the
axis. Its state mixes two kinds of leaves:

* **per-device** leaves (error-feedback buffers), which differ between devices. They
  carry a leading axis of length 1 inside the mapped function, so outside it the global
  array has one row per device and is sharded ``P(axis_name)``;
* **replicated** leaves (bases, step counters, keys, bit counters), identical on every
  device and passed as ``P()``.

A state class names its per-device fields in the class attribute ``PER_DEVICE_FIELDS``;
:func:`state_specs` reads it from any optax state tree (chains, masks and wrappers
included), so users never write the specs by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

AxisName = Hashable | None


def _is_lore_state(x: Any) -> bool:
    return hasattr(type(x), "PER_DEVICE_FIELDS") and hasattr(x, "_fields")


def axis_size(axis_name: AxisName) -> int:
    """Number of devices along ``axis_name`` (1 when it is ``None``).

    Raises:
      ValueError: naming ``axis_name`` when the axis is not bound, i.e. the transform is
        called outside ``jax.shard_map`` / ``jax.pmap`` or under a different axis name.
    """
    if axis_name is None:
        return 1
    try:
        return jax.lax.axis_size(axis_name)
    except (NameError, KeyError, AssertionError, ValueError) as e:
        raise ValueError(
            f"axis_name={axis_name!r} is not bound here. Call the transform's update inside "
            f"jax.shard_map(..., mesh=mesh) whose mesh has an axis named {axis_name!r} (or "
            f"jax.pmap(..., axis_name={axis_name!r})), or pass axis_name=None for a "
            f"single device."
        ) from e


def check_axis(axis_name: AxisName) -> int:
    """Validates ``axis_name`` at trace time; returns the axis size."""
    return axis_size(axis_name)


def pmean(tree: Any, axis_name: AxisName) -> Any:
    """Mean over the data axis by one SUM all-reduce per leaf, then division by N.

    Inputs must be per-device (varying) values: a replicated input would be summed N
    times. With ``axis_name=None`` this is the identity.
    """
    if axis_name is None:
        return tree
    n = axis_size(axis_name)
    return jax.tree.map(lambda x: jax.lax.psum(x, axis_name) / jnp.asarray(n, x.dtype), tree)


def all_gather(tree: Any, axis_name: AxisName) -> Any:
    """Stacks every device's leaf along a new leading axis (length N, or 1 without an axis).

    The result is identical on every device (``to='invarying'`` where shard_map checks
    varying-ness), so it can be returned under ``out_specs=P()``.
    """
    if axis_name is None:
        return jax.tree.map(lambda x: x[None], tree)

    def gather(x):
        try:
            return jax.lax.all_gather(x, axis_name, to="invarying")
        except TypeError:  # pmap: no `to=`
            return jax.lax.all_gather(x, axis_name)

    return jax.tree.map(gather, tree)


def state_specs(opt_state: Any, axis_name: Hashable = "data") -> Any:
    """PartitionSpecs for ``jax.shard_map`` of any optax state holding lore_jax states.

    Per-device fields of lore_jax states (their class's ``PER_DEVICE_FIELDS``) get
    ``P(axis_name)`` (their leading axis is the device axis); everything else, including
    the base optimizer's moments, gets ``P()``.

    Args:
      opt_state: an optax state tree, concrete or abstract (``jax.eval_shape(tx.init,
        params)``).
      axis_name: the mesh axis the data is sharded over.

    Returns:
      A pytree of ``PartitionSpec`` with the structure of ``opt_state``.

    Example:
      >>> import jax, optax, lore_jax
      >>> tx = optax.chain(lore_jax.greedylore(4, axis_name="data"), optax.adam(1e-3))
      >>> abstract = jax.eval_shape(tx.init, {"w": jax.numpy.zeros((64, 32))})
      >>> specs = lore_jax.state_specs(abstract, "data")
    """

    def spec(node):
        if _is_lore_state(node):
            per_device = type(node).PER_DEVICE_FIELDS
            return type(node)(**{
                f: jax.tree.map(lambda _, f=f: P(axis_name) if f in per_device else P(),
                                getattr(node, f))
                for f in node._fields
            })
        return P()

    return jax.tree.map(spec, opt_state, is_leaf=_is_lore_state)


def sharded_init(
    tx: optax.GradientTransformation,
    params: Any,
    mesh: jax.sharding.Mesh,
    axis_name: Hashable = "data",
) -> Any:
    """Initialises ``tx`` inside ``shard_map`` so each device owns its per-device buffers.

    Args:
      tx: any optax transformation (chains with lore_jax transforms included).
      params: the model parameters (replicated on every device).
      mesh: the device mesh; ``axis_name`` must be one of its axes.
      axis_name: the data axis.

    Returns:
      The optimizer state as global arrays: per-device leaves of shape ``(N, ...)``
      sharded ``P(axis_name)``, the rest replicated. Pass :func:`state_specs` of it as
      the state's ``in_specs`` / ``out_specs`` of the training step.
    """
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"axis_name={axis_name!r} is not an axis of the mesh (axes: {mesh.axis_names}); "
            f"pass one of them."
        )
    params = jax.device_put(params, NamedSharding(mesh, P()))
    specs = state_specs(jax.eval_shape(tx.init, params), axis_name)
    init = jax.shard_map(tx.init, mesh=mesh, in_specs=(P(),), out_specs=specs)
    return jax.jit(init)(params)


def shard_like(tree: Any, specs: Any, mesh: jax.sharding.Mesh) -> Any:
    """``device_put`` each leaf of ``tree`` with ``NamedSharding(mesh, spec)``."""
    return jax.tree.map(
        lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), tree, specs,
        is_leaf=lambda x: isinstance(x, P),
    )


def find_states(opt_state: Any, predicate: Callable[[Any], bool] | None = None) -> list[Any]:
    """Every lore_jax state inside an optax state tree (in tree order)."""
    pred = predicate or _is_lore_state
    found: list[Any] = []

    def visit(node):
        if pred(node):
            found.append(node)
        return node

    jax.tree.map(visit, opt_state, is_leaf=pred)
    return found


def as_key(key: Any) -> jax.Array:
    """A transform's ``key`` argument as a raw ``uint32[2]`` key (replicated state).

    Accepts ``None`` (seed 0), an int seed, a typed ``jax.random.key`` or a raw
    ``jax.random.PRNGKey``. Raw keys keep optimizer states checkpointable as plain arrays.

    Raises:
      ValueError: naming ``key`` for anything else.
    """
    if key is None:
        return jax.random.PRNGKey(0)
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return jax.random.PRNGKey(int(key))
    try:
        key = jnp.asarray(key)
    except TypeError as e:
        raise ValueError(
            f"key must be an int seed, a jax.random.key or a uint32[2] PRNGKey; got {key!r}."
        ) from e
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    if key.shape != (2,) or key.dtype != jnp.uint32:
        raise ValueError(
            f"key must be an int seed, a jax.random.key or a uint32[2] PRNGKey; got an array "
            f"of shape {key.shape} and dtype {key.dtype}."
        )
    return key


def check_floating(updates: Any, transform: str) -> None:
    """Raises a TypeError naming the first non-float gradient leaf (at trace time)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(updates)[0]:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{transform} got a gradient leaf {jax.tree_util.keystr(path)} of dtype "
                f"{dtype} and shape {np.shape(leaf)}; it averages floating-point gradients "
                f"only. Cast it to a float dtype or leave it out of the gradient tree (e.g. "
                f"with optax.masked)."
            )
