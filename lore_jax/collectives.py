"""Distributed plumbing: the data axis, means over it, and what the gradients vary over.

Every lore_jax transform runs *inside* ``jax.shard_map`` (or ``jax.pmap``) with a
named data axis, sees its device's local gradients and returns the mean over the
axis. Inside ``shard_map`` (with ``check_vma=True``, the default) JAX types every value
with the mesh axes it *varies* over; :func:`varying_axes` reads that type, and
:func:`check_local_gradients` uses it to refuse gradients that are already reduced
over the data axis (the gradient with respect to replicated parameters is summed over
the axis by the transpose of their implicit broadcast, so it would be sent densely
before the compressor ever saw it, and averaged into ``N`` times the mean).

How the transforms' state is laid out on a mesh (``state_specs``, ``sharded_init``) is
in :mod:`lore_jax.layout`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lore_jax import _xla

AxisName = Hashable | None


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


def is_bound(axis_name: Hashable) -> bool:
    """Whether ``axis_name`` is bound here (inside ``jax.shard_map`` / ``jax.pmap`` over it)."""
    try:
        jax.lax.axis_size(axis_name)
    except (NameError, KeyError, AssertionError, ValueError):
        return False
    return True


def check_axis(axis_name: AxisName) -> int:
    """Validates ``axis_name`` at trace time; returns the axis size."""
    return axis_size(axis_name)


def check_axis_name(axis_name: Any, transform: str) -> AxisName:
    """Validates a transform's ``axis_name`` argument at construction (outside ``jit``)."""
    try:
        hash(axis_name)
    except TypeError:
        raise ValueError(
            f"{transform}: axis_name must be the name of the data axis of the enclosing "
            f"jax.shard_map / jax.pmap (e.g. 'data'), or None for one device; got "
            f"{axis_name!r}."
        ) from None
    return axis_name


# ------------------------------------------------------------------- varying axes


def varying_axes(x: Any) -> frozenset:
    """The manual mesh axes a traced value varies over inside ``jax.shard_map``.

    Empty outside ``shard_map``, under ``jax.pmap``, and under ``check_vma=False``
    (where JAX does not track it).
    """
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
    return frozenset(vma or ())


def tracks_varying(axis_name: Hashable) -> bool:
    """Whether the enclosing ``shard_map`` types values by the axes they vary over.

    True inside ``jax.shard_map(..., check_vma=True)`` (the default), where the device
    index itself varies over the axis; False under ``jax.pmap`` and ``check_vma=False``.
    """
    return axis_name in varying_axes(jax.lax.axis_index(axis_name))


def mesh_order(axes: frozenset | set, mesh_axes: Sequence[Hashable] | None = None) -> tuple:
    """``axes`` as a tuple, in the mesh's axis order when it is known (else sorted by name)."""
    if mesh_axes is None:
        mesh = jax.sharding.get_abstract_mesh()
        mesh_axes = tuple(getattr(mesh, "axis_names", ()) or ())
    known = [a for a in mesh_axes if a in axes]
    return tuple(known) + tuple(sorted((a for a in axes if a not in known), key=str))


def vary(x: jax.Array, axes: Sequence[Hashable]) -> jax.Array:
    """``x`` marked as varying over ``axes`` (those it does not vary over already)."""
    missing = tuple(a for a in axes if a not in varying_axes(x))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def vary_like(tree: Any, ref: jax.Array, exclude: Hashable | None = None) -> Any:
    """Every leaf of ``tree`` marked as varying over the axes ``ref`` varies over.

    Used by ``init`` functions so that state that follows a model-sharded parameter is
    typed as varying over the parameter's mesh axes from the start (``exclude``: the
    data axis, over which the state's layout is decided by its type instead).
    """
    axes = mesh_order(varying_axes(ref) - {exclude})
    return jax.tree.map(lambda x: vary(x, axes), tree) if axes else tree


def model_axes(tree: Any, axis_name: AxisName) -> tuple:
    """The mesh axes other than ``axis_name`` that some leaf of ``tree`` varies over.

    Non-empty for model-sharded parameters (tensor parallelism, FSDP on its own axis).
    """
    return mesh_order(set().union(*(varying_axes(x) for x in jax.tree.leaves(tree)))
                      - {axis_name})


def agree(flag: jax.Array, axes: tuple) -> jax.Array:
    """A boolean that holds on every device of ``axes`` iff it holds on all of them.

    One ``pmin`` of an int32 over ``axes`` (nothing when there are none): how the shards
    of a model-sharded step agree that it was finite, so replicated counters stay so.
    """
    if not axes:
        return flag
    return jax.lax.pmin(flag.astype(jnp.int32), axes).astype(bool)


def match_varying(new: Any, like: Any) -> Any:
    """Leaves of ``new`` marked as varying over every axis the matching leaf of ``like`` does.

    For the branches of a ``lax.cond`` (or a scan carry): a per-device state field that one
    branch computes from replicated values only comes out replicated, while the branch that
    keeps the old state returns it varying; both must have the same type.
    """
    return jax.tree.map(lambda n, o: vary(n, mesh_order(varying_axes(o))), new, like)


def check_local_gradients(updates: Any, axis_name: AxisName, transform: str) -> None:
    """Refuses, at trace time, gradients that cannot be this device's local gradients.

    * ``axis_name`` set, inside ``shard_map`` with ``check_vma=True``: every leaf must
      vary over ``axis_name``. A leaf that does not was already reduced over the axis
      (``jax.grad`` with respect to replicated parameters returns the gradient summed
      over it) or is identical on every device; compressing it would send the dense
      all-reduce first and return ``N`` times the mean.
    * ``axis_name=None`` inside ``shard_map``: no leaf may vary over a mesh axis, else
      every device would apply its own, unaveraged gradient.

    A leaf that does not vary although the caller differentiated :func:`per_device`
    parameters was replaced by a wrapper around the transform: ``optax.MultiSteps``
    passes its accumulator, built from zeros and the same on every device (the message
    names it; :func:`lore_jax.state_specs` refuses such a state before anything runs).

    Under ``jax.pmap`` and ``check_vma=False`` JAX does not track what values vary over
    (and ``jax.grad`` returns local gradients there), so nothing is checked; nor is
    ``axis_name=None`` under ``jax.pmap``, where every device then applies its own
    gradient: the one misuse of the axis lore_jax cannot see.

    Raises:
      ValueError: naming the first offending leaf, what it varies over and the fix.
    """
    leaves = jax.tree_util.tree_flatten_with_path(updates)[0]
    if axis_name is None:
        for path, leaf in leaves:
            axes = varying_axes(leaf)
            if axes:
                raise ValueError(
                    f"{transform} was built with axis_name=None (one device, no averaging), "
                    f"but its gradient leaf {jax.tree_util.keystr(path)} varies over the mesh "
                    f"axes {sorted(axes, key=str)} of the enclosing jax.shard_map, so every "
                    f"device would apply its own unaveraged gradient. Pass the data axis, "
                    f"e.g. axis_name={sorted(axes, key=str)[0]!r}."
                )
        return
    axis_size(axis_name)
    if not tracks_varying(axis_name):
        return
    for path, leaf in leaves:
        if axis_name not in varying_axes(leaf):
            raise ValueError(
                f"{transform} got the gradient leaf {jax.tree_util.keystr(path)} (shape "
                f"{np.shape(leaf)}) that does not vary over axis {axis_name!r}: it was already "
                f"summed over {axis_name!r} or is identical on every device. Inside "
                f"jax.shard_map, jax.grad with respect to replicated parameters returns the "
                f"gradient summed over the axis (a dense all-reduce before compression, and "
                f"an update N times the mean). Differentiate with respect to "
                f"lore_jax.per_device(params, {axis_name!r}) (i.e. jax.lax.pcast(params, "
                f"{axis_name!r}, to='varying')), or build the step with "
                f"lore_jax.data_parallel(loss_fn, tx, mesh). If the gradients do come from "
                f"per_device, a wrapper around {transform} replaced them: optax.MultiSteps "
                f"passes its accumulator, which is the same on every device (and would run "
                f"the collectives on every micro-step). Accumulate with "
                f"lore_jax.multi_steps(tx, every_k_steps=k), or with "
                f"lore_jax.data_parallel(loss_fn, tx, mesh, micro_batches=k)."
            )


def check_per_device_state(state: Any, axis_name: AxisName, transform: str) -> None:
    """Refuses, at trace time, per-device state fields that are not this device's own.

    Inside the mapped function every leaf of a field named in the state's
    ``PER_DEVICE_FIELDS`` holds one row, this device's (a leading axis of length 1), and
    inside ``jax.shard_map`` with ``check_vma=True`` it varies over ``axis_name``. A leaf
    with more rows, or none, was passed whole to every device (``in_specs=P()`` for a
    state laid out over the axis; a ``jax.pmap`` state not made by the same ``pmap``). A
    leaf that does not vary came in as ``P()``: a state made outside ``shard_map``
    (``tx.init``, ``nnx.Optimizer``) has one row for all devices until
    :func:`lore_jax.shard_state` lays it out. Outside any mapping (``axis_name`` not
    bound) only the rows are checked.

    Under ``check_vma=False`` a one-row state passed as ``P()`` cannot be told from a laid
    out one, and is not refused.

    Raises:
      ValueError: naming the field, its shape and the lore_jax helper that lays it out.
    """
    checks_varying = axis_name is not None and is_bound(axis_name) and tracks_varying(axis_name)
    for field in type(state).PER_DEVICE_FIELDS:
        for path, leaf in jax.tree_util.tree_flatten_with_path(get_field(state, field))[0]:
            where, shape = f"{field}{jax.tree_util.keystr(path)}", np.shape(leaf)
            if shape[:1] != (1,):
                raise ValueError(
                    f"{transform}: its state's per-device field {where} has shape {shape} "
                    f"inside the mapped function, where it must hold this device's own row "
                    f"(a leading axis of length 1): the state was passed whole to every "
                    f"device. Under jax.shard_map, pass lore_jax.state_specs(opt_state) as "
                    f"the state's in_specs and out_specs (P({axis_name!r}) for this field); "
                    f"under jax.pmap, make the state with the same pmap "
                    f"(jax.pmap(tx.init, axis_name={axis_name!r}) on stacked parameters)."
                )
            if checks_varying and axis_name not in varying_axes(leaf):
                raise ValueError(
                    f"{transform}: its state's per-device field {where} (shape {shape}) is "
                    f"the same on every device: it came into jax.shard_map as P(), the "
                    f"layout of a state made outside shard_map (tx.init, nnx.Optimizer), "
                    f"which has one row for all devices. Lay the state out with "
                    f"lore_jax.shard_state(opt_state, mesh) (or make it with "
                    f"lore_jax.sharded_init(tx, params, mesh)) and pass "
                    f"lore_jax.state_specs(opt_state) as its in_specs and out_specs."
                )

def all_finite(tree: Any) -> jax.Array:
    """Whether every entry of every leaf is finite: a scalar bool."""
    leaves = jax.tree.leaves(tree)
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves] or [True]))


def pmean(tree: Any, axis_name: AxisName, count: jax.Array | None = None) -> Any:
    """Mean over the data axis: the leaves packed into flat buffers, one SUM all-reduce
    per buffer, then division by N.

    Packing (:func:`_packed`) makes a whole model's round one all-reduce (one per dtype,
    at most :data:`PACK_BUCKET_BYTES` each): a collective of many operands runs as one
    operation per operand on some backends, each with its own messages and frames
    (Gloo, the CPU backend's collectives between processes). Inputs must be per-device
    (varying) values: a replicated input would be summed N times. With
    ``axis_name=None`` this is the identity.

    Args:
      tree: the per-device values.
      axis_name: the data axis.
      count: the step count (a replicated int32 scalar, never negative); with it the
        leaves are cut back out at offsets XLA cannot fold
        (:func:`lore_jax._xla.opaque_ints`), so that same-size leaves share one kernel.

    Example:
      >>> # inside jax.shard_map(..., mesh=mesh) over axis "data":
      >>> # means = pmean({"w": grad_w, "b": grad_b}, "data")
    """
    if axis_name is None:
        return tree
    n = axis_size(axis_name)
    return _packed(tree, lambda flat: jax.lax.psum(flat, axis_name)
                   / jnp.asarray(n, flat.dtype), count)


#: Largest flat buffer (bytes) that :func:`pmean` and :func:`all_gather_packed` copy
#: leaves into; larger leaves are sent as they are. Bounds the memory of the copy; above
#: a few megabytes an operation's fixed cost on the wire is negligible.
PACK_BUCKET_BYTES = 32 << 20


def _buckets(leaves: list[Any]) -> list[list[int]]:
    """Indices of ``leaves`` in buckets of one dtype and one set of varying axes, in
    order, each at most :data:`PACK_BUCKET_BYTES` (a larger leaf alone)."""
    open_: dict[tuple, list[int]] = {}
    sizes: dict[tuple, int] = {}
    out: list[list[int]] = []
    for i, x in enumerate(leaves):
        key = (jnp.dtype(x.dtype), varying_axes(x))
        nbytes = int(np.prod(np.shape(x), dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
        if key not in open_ or sizes[key] + nbytes > PACK_BUCKET_BYTES:
            open_[key], sizes[key] = [], 0
            out.append(open_[key])
        open_[key].append(i)
        sizes[key] += nbytes
    return out


def _packed(tree: Any, collective: Callable[[jax.Array], jax.Array],
            count: jax.Array | None = None) -> Any:
    """``collective`` applied to the leaves packed into flat buffers (:func:`_buckets`);
    its result keeps any leading axes it adds (an all-gather's ``N``) in front of every
    leaf's shape. With the step ``count`` the leaves are cut back out at offsets XLA
    cannot fold (:func:`lore_jax._xla.opaque_ints`)."""
    leaves, treedef = jax.tree.flatten(tree)
    out: list[Any] = [None] * len(leaves)
    for members in _buckets(leaves):
        if len(members) == 1:
            x = leaves[members[0]]
            flat = collective(jnp.ravel(x))
            out[members[0]] = flat.reshape(flat.shape[:-1] + np.shape(x))
            continue
        flat = collective(jnp.concatenate([jnp.ravel(leaves[i]) for i in members]))
        sizes = [leaves[i].size for i in members]
        starts = np.cumsum([0] + sizes[:-1])
        if count is not None:
            starts = _xla.opaque_ints(starts, count)
        for i, start, size in zip(members, starts, sizes, strict=True):
            part = jax.lax.dynamic_slice_in_dim(flat, start, size, axis=flat.ndim - 1)
            out[i] = part.reshape(part.shape[:-1] + leaves[i].shape)
    return treedef.unflatten(out)


def all_gather_packed(tree: Any, axis_name: AxisName, count: jax.Array | None = None
                      ) -> Any:
    """:func:`all_gather` with the leaves packed as in :func:`pmean`, whatever their
    dtypes: an all-gather moves bits without arithmetic, so every leaf travels as its
    bytes (``bitcast_convert_type`` to ``uint8``) in one buffer, and a step's payloads of
    several dtypes (values and packed indices) are one all-gather.

    Returns every leaf with a leading axis of N, identical on every device.
    """
    if axis_name is None:
        return jax.tree.map(lambda x: x[None], tree)
    leaves, treedef = jax.tree.flatten(tree)
    as_bytes = _packed([_to_bytes(x) for x in leaves],
                       lambda flat: all_gather(flat, axis_name), count)
    return treedef.unflatten([_from_bytes(b, x) for b, x in zip(as_bytes, leaves,
                                                                 strict=True)])


def _to_bytes(x: jax.Array) -> jax.Array:
    """``x``'s bytes, ``uint8`` of shape ``x.shape + (itemsize,)`` (booleans as 0/1)."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    out = jax.lax.bitcast_convert_type(x, jnp.uint8)
    return out if out.ndim > x.ndim else out[..., None]


def _from_bytes(b: jax.Array, like: jax.Array) -> jax.Array:
    """The inverse of :func:`_to_bytes` for ``b`` with extra leading axes (``(N, ...)``)."""
    dtype = jnp.result_type(like)
    if dtype == jnp.bool_:
        return b[..., 0].astype(jnp.bool_)
    if jnp.dtype(dtype).itemsize == 1:
        b = b[..., 0]
    return jax.lax.bitcast_convert_type(b, dtype)


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


# --------------------------------------------------------------- state containers


def field_names(node: Any) -> tuple | None:
    """The field names of a state node: a NamedTuple's fields or a mapping's keys.

    Mappings cover the containers that keep the names but lose the type, such as
    ``flax.nnx.State`` (an ``nnx.Optimizer``'s state after ``nnx.split``) and the nested
    dicts a checkpoint restores without a target. ``None`` for anything else.
    """
    if hasattr(node, "_fields") and isinstance(node, tuple):
        return tuple(node._fields)
    if hasattr(node, "keys") and hasattr(node, "__getitem__") and not hasattr(node, "shape"):
        try:
            return tuple(node.keys())
        except TypeError:
            return None
    return None


def path_keys(path: Sequence[Any]) -> tuple:
    """A ``jax.tree_util`` key path as plain names and indices, whatever the containers.

    ``GetAttrKey('error')``, ``DictKey('error')`` and ``SequenceKey(0)`` become ``'error'``
    and ``0``, so a NamedTuple state and its ``nnx.State`` copy (or a dict of the same
    names) give the same keys. The trailing ``.value`` of an ``nnx.Variable`` is dropped.
    """
    keys = []
    for k in path:
        for attr in ("name", "key", "idx"):
            if hasattr(k, attr):
                keys.append(getattr(k, attr))
                break
        else:
            keys.append(k)
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and keys[-1] == "value":
        keys.pop()
    return tuple(keys)


def get_field(node: Any, name: str) -> Any:
    """Field ``name`` of a NamedTuple or mapping state node."""
    return node[name] if not hasattr(node, "_fields") else getattr(node, name)


def is_state(node: Any) -> bool:
    """Whether ``node`` is a typed lore_jax state (its class declares ``PER_DEVICE_FIELDS``)."""
    return hasattr(type(node), "PER_DEVICE_FIELDS") and hasattr(node, "_fields")


def find_states(tree: Any, predicate: Callable[[Any], bool] | None = None) -> list[Any]:
    """Every node of ``tree`` for which ``predicate`` holds (default: :func:`is_state`).

    Outermost first, in tree order; the search does not descend into a matching node.
    """
    predicate = predicate or is_state
    found: list[Any] = []

    def visit(node):
        if predicate(node):
            found.append(node)
        return node

    jax.tree.map(visit, tree, is_leaf=predicate)
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
