"""How lore_jax state is laid out on a device mesh: its specs, its initialisation, placement.

Every lore_jax transform runs inside ``jax.shard_map`` (or ``jax.pmap``) on each device's
local gradients. Its state mixes two kinds of leaves:

* **per-device** leaves (error-feedback memory, the buffers of the bounded-delay
  transforms, accumulated micro-batch gradients), which differ between devices. They
  carry a leading axis of length 1 inside the mapped function, so outside it the global
  array has one row per device and is sharded ``P(axis_name)``;
* **replicated** leaves (bases, step counters, keys, bit counters, and the base
  optimizer's moments), identical on every device and passed as ``P()``.

A state class names its per-device fields in the class attribute ``PER_DEVICE_FIELDS``.
:func:`state_specs` finds them anywhere in an optax state (chains, ``masked``,
``inject_hyperparams``, :func:`lore_jax.multi_steps`), and also where the class is lost
but the field names remain: the ``nnx.State`` of an ``nnx.Optimizer`` after ``nnx.split``,
or the nested dicts of a checkpoint restored without a target.

**Model-sharded parameters.** On a mesh with a second axis (say ``("data", "model")``,
tensor parallelism, or FSDP on an axis of its own), parameters sharded over ``"model"``
have gradients that vary over ``"model"`` too, and lore_jax compresses each device's
shard on its own, communicating over the data axis only. State that follows such a
parameter varies over ``"model"``: per-device leaves are sharded ``P(("data",
"model"))`` on their leading axis, replicated lore_jax leaves (the bases of a model
-sharded matrix group, PowerSGD's warm start) ``P("model")``, and the base optimizer's
moments take their parameter's own spec. :func:`sharded_init` finds this layout by
tracing ``tx.init`` on the parameters' shards, reading what each leaf varies over.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lore_jax import _xla, collectives
from lore_jax.accumulate import MultiStepsState
from lore_jax.compressed_mean import CompressedMeanState
from lore_jax.demo import DemoState
from lore_jax.diloco import DilocoState
from lore_jax.staleness import ReuseLastState, StaleState

#: The lore_jax state classes :func:`state_specs` recognises by their field names alone.
STATE_TYPES: tuple[type, ...] = (CompressedMeanState, StaleState, ReuseLastState,
                                 MultiStepsState, DemoState, DilocoState)


def _is_spec(x: Any) -> bool:
    return isinstance(x, P)


#: The lore_jax states of transforms that communicate over the data axis (those whose
#: collectives an optax wrapper must not skip or repeat).
COMMUNICATING: tuple[type, ...] = (CompressedMeanState, DemoState, DilocoState)


def state_type(node: Any) -> type | None:
    """The lore_jax state class of a state node, or ``None`` if it is no lore_jax state.

    A typed state is its own class. A mapping (``nnx.State``, a dict) is recognised as the
    state of :data:`STATE_TYPES` whose fields its keys are drawn from, when it has at least
    three of them, one a per-device field (fields that hold no array, such as an empty
    tuple, are absent from an ``nnx.State``).
    """
    if collectives.is_state(node):
        return type(node)
    keys = collectives.field_names(node)
    if keys is None or hasattr(node, "_fields") or len(keys) < 3:
        return None
    for cls in STATE_TYPES:
        if set(keys) <= set(cls._fields) and set(keys) & set(cls.PER_DEVICE_FIELDS):
            return cls
    return None


def per_device_fields(node: Any) -> tuple[str, ...] | None:
    """The per-device fields of a state node (those of :func:`state_type` it holds), or
    ``None`` if it is no lore_jax state."""
    cls = state_type(node)
    if cls is None:
        return None
    keys = collectives.field_names(node) or ()
    return tuple(f for f in cls.PER_DEVICE_FIELDS if f in keys)


#: optax wrappers that must not hold a lore_jax transform that communicates, by the
#: fields of their state (a NamedTuple, or the mapping of an ``nnx.State``), with why
#: and what to use instead.
WRAPPERS: dict[str, tuple[frozenset, str]] = {
    "optax.MultiSteps": (
        frozenset(optax.MultiStepsState._fields) - {"skip_state"},
        "MultiSteps runs its inner chain, collectives included, on every micro-step but "
        "keeps the state of only every k-th, so lore_jax.communication would count one in "
        "k of the rounds sent; inside jax.shard_map it passes its accumulator, the same on "
        "every device, in place of the local gradients. Accumulate with "
        "lore_jax.multi_steps(tx, every_k_steps=k), which communicates once per k "
        "micro-steps, or with lore_jax.data_parallel(loss_fn, tx, mesh, micro_batches=k) "
        "when the whole batch is at hand."),
    "optax.apply_if_finite": (
        frozenset(optax.ApplyIfFiniteState._fields),
        "Around the chain it tests each device's local gradient, so a device whose "
        "gradient is not finite skips the collectives the others wait in: under "
        "jax.shard_map the step does not trace, under jax.pmap it hangs. Put it after the "
        "lore_jax transform, around the base optimizer: optax.chain(lore_jax.greedylore("
        "...), optax.apply_if_finite(optax.adam(lr), max_consecutive_errors)), which tests "
        "the mean, the same on every device (the lore_jax transform keeps its own state "
        "on a non-finite step)."),
}


def _wrapper_name(node: Any) -> str | None:
    keys = collectives.field_names(node)
    if keys is None or hasattr(node, "shape"):
        return None
    return next((name for name, (fields, _) in WRAPPERS.items() if fields <= set(keys)),
                None)


def check_wrappers(opt_state: Any) -> None:
    """Refuses an ``optax.MultiSteps`` or ``optax.apply_if_finite`` around a lore_jax
    transform that communicates (:data:`COMMUNICATING`), anywhere in ``opt_state``.

    Either wrapper decides per call, or per device, whether its inner chain's result is
    kept, while the chain's collectives run (or wait) regardless; :data:`WRAPPERS` says
    what goes wrong and what to use instead. Under ``jax.pmap`` no lore_jax function sees
    the whole state, so there nothing refuses them.

    Raises:
      ValueError: naming the wrapper, the wrapped state's path, the cause and the fix.
    """
    wrappers = jax.tree_util.tree_flatten_with_path(
        opt_state, is_leaf=lambda x: _wrapper_name(x) is not None)[0]
    for path, node in wrappers:
        name = _wrapper_name(node)
        if name is None:
            continue
        inner = jax.tree_util.tree_flatten_with_path(
            node, is_leaf=lambda x: state_type(x) in COMMUNICATING)[0]
        for inner_path, state in inner:
            cls = state_type(state)
            if cls in COMMUNICATING:
                where = jax.tree_util.keystr(tuple(path) + tuple(inner_path))
                raise ValueError(
                    f"{name} wraps the lore_jax state opt_state{where} ({cls.__name__}), "
                    f"which communicates over the data axis. {WRAPPERS[name][1]}"
                )


def _per_device_paths(tree: Any) -> list[tuple]:
    """Key paths (:func:`collectives.path_keys`) of every per-device field in ``tree``."""
    found: list[tuple] = []

    def walk(node, prefix):
        fields = per_device_fields(node)
        if fields is not None:
            found.extend(prefix + (f,) for f in fields)
        children = jax.tree_util.tree_flatten_with_path(
            node, is_leaf=lambda x: x is not node)[0]
        if len(children) == 1 and children[0][1] is node:
            return   # an array leaf
        for path, child in children:
            if child is not None:
                walk(child, prefix + collectives.path_keys(path))

    walk(tree, ())
    return found


def _entry_axes(entry: Any) -> tuple:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _trimmed(spec: P) -> P:
    """``spec`` without trailing ``None`` entries (``P('data', None)`` is ``P('data')``)."""
    entries = list(spec)
    while entries and entries[-1] is None:
        entries.pop()
    return P(*entries)


def _placed_spec(leaf: Any, axis_name: Hashable, per_device: bool) -> P | None:
    """The spec a placed leaf already has, if it is a layout of this kind of leaf."""
    sharding = getattr(leaf, "sharding", None)
    if not isinstance(sharding, NamedSharding) or axis_name not in sharding.mesh.axis_names:
        return None
    spec = _trimmed(sharding.spec)
    if per_device:
        return spec if len(spec) and axis_name in _entry_axes(spec[0]) else None
    return None if any(axis_name in _entry_axes(e) for e in spec) else spec


def state_specs(opt_state: Any, axis_name: Hashable = "data") -> Any:
    """PartitionSpecs for ``jax.shard_map`` of any optimizer state holding lore_jax states.

    Per-device fields of lore_jax states get ``P(axis_name)`` (their leading axis is the
    device axis); everything else, including the base optimizer's moments, gets ``P()``.
    A leaf that is already placed on a mesh (a state from :func:`sharded_init`,
    :func:`shard_state` or a checkpoint restored with shardings) keeps the spec it has,
    which is how model-sharded states keep their ``"model"`` entries.

    Args:
      opt_state: an optimizer state, concrete or abstract (``jax.eval_shape(tx.init,
        params)``): an optax state of any nesting, an ``nnx.Optimizer``'s ``opt_state``,
        or the ``nnx.State`` of ``nnx.split((model, optimizer))``.
      axis_name: the mesh axis the data is sharded over.

    Returns:
      A pytree of ``PartitionSpec`` with the structure of ``opt_state``.

    Raises:
      ValueError: ``optax.MultiSteps`` or ``optax.apply_if_finite`` around a lore_jax
        transform that communicates (:func:`check_wrappers`), or a per-device leaf placed
        on a mesh without a row for each device of ``axis_name`` (a state made outside
        ``shard_map`` and replicated by hand: :func:`shard_state` lays it out). An unplaced
        state made by ``tx.init`` outside ``shard_map`` has one row and is given its specs
        (they are those of the state :func:`shard_state` makes of it); passed to
        ``jax.shard_map`` as it is, JAX refuses it ("axis sizes that are not evenly
        divisible"), as lore_jax cannot know the mesh it will meet.

    Example:
      >>> import jax, optax, lore_jax
      >>> tx = optax.chain(lore_jax.greedylore(4), optax.adam(1e-3))
      >>> abstract = jax.eval_shape(tx.init, {"w": jax.numpy.zeros((64, 32))})
      >>> specs = lore_jax.state_specs(abstract, "data")
      >>> specs[0].error, specs[0].count
      ({'w': P('data',)}, P())
    """
    specs = _specs(opt_state, axis_name)

    def rows(path, leaf, spec):
        sharding = getattr(leaf, "sharding", None)
        if len(spec) and isinstance(sharding, NamedSharding):
            placed = _trimmed(sharding.spec)
            if axis_name not in _entry_axes(placed[0] if len(placed) else None):
                check_rows(path, leaf, spec, sharding.mesh)
        return spec

    jax.tree_util.tree_map_with_path(rows, opt_state, specs)
    return specs


def _specs(opt_state: Any, axis_name: Hashable) -> Any:
    """:func:`state_specs` without the check of placed leaves' rows (for
    :func:`shard_state`, which gives a one-row leaf its rows)."""
    check_wrappers(opt_state)
    per_device_paths = _per_device_paths(opt_state)

    def spec(path, leaf):
        keys = collectives.path_keys(path)
        per_device = any(keys[:len(p)] == p for p in per_device_paths)
        placed = _placed_spec(leaf, axis_name, per_device)
        if placed is not None:
            return placed
        return P(axis_name) if per_device else P()

    return jax.tree_util.tree_map_with_path(spec, opt_state)


def check_rows(path: Any, leaf: Any, spec: P, mesh: jax.sharding.Mesh) -> None:
    """Refuses a state leaf whose leading axis does not split into ``spec[0]``'s devices.

    A per-device leaf of a lore_jax state holds a row for each device of the data axis
    (and of any model axis its spec names); one made outside ``shard_map`` has one row.

    Raises:
      ValueError: naming the leaf, its shape, the devices and the helper that lays it out.
    """
    axes = _entry_axes(spec[0]) if len(spec) else ()
    shards = int(np.prod([mesh.shape[a] for a in axes if a in mesh.axis_names]))
    shape = np.shape(leaf)
    if not axes or (shape[:1] and shape[0] % shards == 0):
        return
    made = ("one row for all devices, as tx.init or nnx.Optimizer make it outside "
            "shard_map" if shape[:1] == (1,) else
            f"{shape[0]} rows" if shape else "no leading axis")
    raise ValueError(
        f"opt_state{jax.tree_util.keystr(path)} has shape {shape}: a per-device field of "
        f"a lore_jax state, laid out {spec} with a row for each of the {shards} devices of "
        f"the mesh's axes {axes}, but it has {made}. Lay the state out with "
        f"lore_jax.shard_state(opt_state, mesh), or make it with "
        f"lore_jax.sharded_init(tx, params, mesh) (with lore_jax.data_parallel: "
        f"train.init(params))."
    )


def global_array(x: Any, mesh: jax.sharding.Mesh, spec: P) -> jax.Array:
    """A global ``jax.Array`` from a host array every process holds in full.

    Each process fills only its addressable shards, so this works the same with one
    process or many (``jax.distributed``).
    """
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda i: x[i])


def shard_state(opt_state: Any, mesh: jax.sharding.Mesh, axis_name: Hashable = "data") -> Any:
    """Lays out a state made outside ``shard_map`` (e.g. by ``nnx.Optimizer``) on the mesh.

    ``tx.init`` called outside ``shard_map`` gives each per-device leaf one row (the
    state of one device); this copies it to every device of ``axis_name`` (a global
    ``(N, ...)`` array sharded ``P(axis_name)``) and replicates everything else. Leaves
    that already have ``N`` rows, or are already placed, keep their values. Works in a
    multi-process job (every process must hold the same values, as after the same
    ``init``).

    Args:
      opt_state: any state container :func:`state_specs` takes, e.g. the ``nnx.State``
        of ``nnx.split((model, optimizer))``.
      mesh: the device mesh.
      axis_name: its data axis.

    Returns:
      ``opt_state`` with global arrays; :func:`state_specs` of it are its ``shard_map``
      specs.
    """
    check_mesh_axis(mesh, axis_name)
    n = mesh.shape[axis_name]
    specs = _specs(opt_state, axis_name)

    def place(x, spec):
        host = np.asarray(jax.device_get(x))
        if len(spec) and axis_name in _entry_axes(spec[0]) and host.shape[:1] == (1,):
            host = np.broadcast_to(host, (n,) + host.shape[1:])
        return global_array(host, mesh, spec)

    return jax.tree.map(place, opt_state, specs, is_leaf=_is_spec)


def check_mesh_axis(mesh: jax.sharding.Mesh, axis_name: Hashable) -> None:
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"axis_name={axis_name!r} is not an axis of the mesh (axes: {mesh.axis_names}); "
            f"pass one of them."
        )


def param_specs_of(params: Any, mesh: jax.sharding.Mesh, axis_name: Hashable = "data") -> Any:
    """The spec of each parameter on ``mesh``: its own if it is placed on it, else ``P()``.

    Raises:
      ValueError: a parameter sharded over the data axis itself (the gradient of such a
        shard is already reduced over the axis; shard it over another mesh axis).
    """
    def spec(path, x):
        sharding = getattr(x, "sharding", None)
        s = (_trimmed(sharding.spec) if isinstance(sharding, NamedSharding)
             and tuple(sharding.mesh.axis_names) == tuple(mesh.axis_names) else P())
        if any(axis_name in _entry_axes(e) for e in s):
            raise ValueError(
                f"parameter {jax.tree_util.keystr(path)} is sharded {s}, over the data axis "
                f"{axis_name!r}: the gradient of such a shard is already reduced over the "
                f"data axis, so there is nothing left to compress. Replicate it over "
                f"{axis_name!r} and shard it over another mesh axis (tensor parallelism, or "
                f"FSDP on an axis of its own)."
            )
        return s

    return jax.tree_util.tree_map_with_path(spec, params)


def _init_layout(tx: optax.GradientTransformation, params: Any, mesh: jax.sharding.Mesh,
                 param_specs: Any, axis_name: Hashable) -> Any:
    """The ``out_specs`` of ``tx.init`` run on each device's parameter shards.

    Traces ``tx.init`` inside ``shard_map`` once and reads, for every state leaf, the
    mesh axes it varies over (lore_jax inits mark the state that follows a model-sharded
    parameter; the base optimizer's ``zeros_like`` inherits it) and whether it is a
    per-device field.
    """
    seen: dict[str, Any] = {}

    def probe(p):
        state = tx.init(p)
        flat = jax.tree_util.tree_flatten_with_path(state)[0]
        seen["axes"] = [collectives.varying_axes(x) - {axis_name} for _, x in flat]
        seen["abstract"] = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        seen["params"] = [(collectives.path_keys(q), x.shape, collectives.varying_axes(x))
                          for q, x in jax.tree_util.tree_flatten_with_path(p)[0]]
        return jnp.zeros((), jnp.float32)

    jax.eval_shape(jax.shard_map(probe, mesh=mesh, in_specs=(param_specs,), out_specs=P()),
                   params)
    base = state_specs(seen["abstract"], axis_name)
    flat_specs, treedef = jax.tree.flatten(base, is_leaf=_is_spec)
    flat_state = jax.tree_util.tree_flatten_with_path(seen["abstract"])[0]
    param_table = list(zip(seen["params"], jax.tree.leaves(param_specs, is_leaf=_is_spec),
                           strict=True))
    out = []
    for spec, (path, leaf), axes in zip(flat_specs, flat_state, seen["axes"], strict=True):
        extra = collectives.mesh_order(axes, mesh.axis_names)
        if not extra:
            out.append(spec)
        elif len(spec):                   # per-device: rows over (data, *extra)
            out.append(P((axis_name, *extra)))
        else:
            out.append(_follow_param(collectives.path_keys(path), leaf, axes, param_table)
                       or _stacked(path, leaf, extra))
    return jax.tree.unflatten(treedef, out)


def _follow_param(keys: tuple, leaf: Any, axes: frozenset, param_table: list) -> P | None:
    """The spec of the parameter a state leaf mirrors (path suffix, shard shape, axes)."""
    for (pkeys, shape, paxes), spec in param_table:
        if (leaf.shape == shape and paxes == axes
                and (not pkeys or keys[-len(pkeys):] == pkeys)):
            return spec
    return None


def _stacked(path: Any, leaf: Any, extra: tuple) -> P:
    if not leaf.shape:
        raise ValueError(
            f"state leaf {jax.tree_util.keystr(path)} is a scalar that varies over the mesh "
            f"axes {extra}; a transform's scalar state must be the same on every device."
        )
    return P(extra)


def sharded_init(
    tx: optax.GradientTransformation,
    params: Any,
    mesh: jax.sharding.Mesh,
    axis_name: Hashable = "data",
    param_specs: Any = None,
) -> Any:
    """Initialises ``tx`` inside ``shard_map`` so each device owns its per-device buffers.

    Args:
      tx: any optax transformation (chains with lore_jax transforms included).
      params: the model parameters: replicated, or sharded over mesh axes other than
        ``axis_name`` (placed with ``NamedSharding``, or described by ``param_specs``).
      mesh: the device mesh; ``axis_name`` must be one of its axes.
      axis_name: the data axis.
      param_specs: the parameters' ``PartitionSpec`` s; default: the specs they are
        placed with on ``mesh`` (``P()`` for unplaced leaves).

    Returns:
      The optimizer state as global arrays: per-device leaves of shape ``(N, ...)``
      sharded ``P(axis_name)`` (``P((axis_name, "model"))`` for those following a
      model-sharded parameter), the rest replicated or sharded like their parameter.
      Pass :func:`state_specs` of it as the state's ``in_specs`` / ``out_specs`` of the
      training step.

    Example:
      >>> import jax, optax, lore_jax
      >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
      >>> tx = optax.chain(lore_jax.greedylore(4), optax.adam(1e-3))
      >>> state = lore_jax.sharded_init(tx, {"w": jax.numpy.zeros((64, 32))}, mesh)
      >>> state[0].error["w"].shape[0] == jax.device_count()
      True
    """
    check_mesh_axis(mesh, axis_name)
    if param_specs is None:
        param_specs = param_specs_of(params, mesh, axis_name)
    params = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)),
                          params, param_specs, is_leaf=_is_spec)
    specs = _init_layout(tx, params, mesh, param_specs, axis_name)
    init = jax.shard_map(tx.init, mesh=mesh, in_specs=(param_specs,), out_specs=specs)
    return _xla.run_once(init, params)
