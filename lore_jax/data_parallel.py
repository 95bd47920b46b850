"""The data-parallel training step, built from a loss so that it cannot send dense gradients.

Inside ``jax.shard_map`` the parameters are replicated over the data axis, and
``jax.grad`` with respect to replicated values returns the gradient *summed* over the
axis: the transpose of their implicit broadcast is a ``psum``, a dense all-reduce of
every gradient that runs before any compressor sees it. :func:`per_device` gives the
device its own (varying) copy of the parameters, so that ``jax.grad`` returns this
device's local gradient; :func:`data_parallel` builds the whole step around it::

    train = lore_jax.data_parallel(loss_fn, tx, mesh)
    opt_state = train.init(params)
    params, opt_state, loss = train.step(params, opt_state, batch)
    test_loss = train.evaluate(params, test_batch)

The step: local gradients of ``loss_fn`` on the device's shard of the batch (optionally
accumulated over micro-batches) -> ``tx.update`` (the lore_jax transform's compressed
mean, then the base optimizer) -> ``optax.apply_updates``; the loss (and ``aux``) is
averaged over the data axis in one all-reduce of one buffer. ``evaluate`` is the same
loss without the update. The step is jitted, donates the parameters and the state, and
lays everything
out on the mesh: the batch is sharded ``P(axis_name)`` on its leading axis, the
parameters keep their sharding (replicated, or sharded over other mesh axes), the
state follows :func:`lore_jax.state_specs`.

On a mesh of several CPU devices in one process (simulated devices), the step waits for
its result before it returns: XLA:CPU runs the devices' collectives on a shared thread
pool, and several multi-device steps queued at once can leave a collective waiting for a
device whose work cannot get a thread (a deadlock seen on 2 cores). On accelerators the
step returns at once, as jitted functions do.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lore_jax import _xla, collectives, layout
from lore_jax.diloco import local_params


def per_device(tree: Any, axis_name: Hashable = "data") -> Any:
    """This device's own copy of replicated values: differentiate with respect to it.

    ``jax.lax.pcast(x, axis_name, to="varying")`` on every leaf (parameters, or an
    ``nnx.Module``): the values are unchanged, but JAX now types them as differing
    between devices, so ``jax.grad`` with respect to them returns this device's local
    gradient instead of the gradient summed over ``axis_name``. Call it inside
    ``jax.shard_map``; under ``jax.pmap`` gradients are local already and it is not
    needed.

    Example:
      >>> # inside jax.shard_map(..., mesh=mesh) with a "data" axis:
      >>> # grads = jax.grad(loss_fn)(lore_jax.per_device(params), batch)
    """
    collectives.axis_size(axis_name)
    return jax.tree.map(lambda x: collectives.vary(x, (axis_name,)), tree)


class DataParallel(NamedTuple):
    """The pair of functions :func:`data_parallel` returns (optax style).

    Attributes:
      init: ``init(params) -> opt_state``, the state laid out on the mesh
        (:func:`lore_jax.sharded_init`).
      step: ``step(params, opt_state, batch) -> (params, opt_state, loss)`` (with
        ``has_aux``: ``(params, opt_state, loss, aux)``).
      lower: ``lower(params, opt_state, batch) -> jax.stages.Lowered``, the jitted step
        lowered for these inputs (``.compile().as_text()`` is its HLO, whose collectives
        :func:`lore_jax.hlo_collectives` lists; the step reuses what ``.compile()``
        compiled, and the compiled step takes the inputs placed on the mesh).
      evaluate: ``evaluate(params, batch) -> loss`` (with ``has_aux``: ``(loss, aux)``),
        ``loss_fn`` on each device's shard averaged over the data axis, with no gradient
        and no update.
    """

    init: Callable[[Any], Any]
    step: Callable[..., tuple]
    lower: Callable[..., Any]
    evaluate: Callable[..., Any]


def _local_gradients(loss_fn, params, batch, axis_name, has_aux, micro_batches):
    """``((loss, aux), grads)`` of this device's shard, averaged over its micro-batches.

    The micro-batch sums are kept in float32 (or wider) and cast back at the end.
    """
    value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)
    local = per_device(params, axis_name)
    if micro_batches == 1:
        return value_and_grad(local, batch)

    def split(x):
        return x.reshape((micro_batches, x.shape[0] // micro_batches) + x.shape[1:])

    def add(total, micro):
        return jax.tree.map(lambda t, m: t + m.astype(t.dtype), total,
                            value_and_grad(local, micro)), None

    micro = jax.tree.map(split, batch)
    first = value_and_grad(local, jax.tree.map(lambda x: x[0], micro))
    wide = jax.tree.map(lambda t: t.astype(jnp.promote_types(t.dtype, jnp.float32)), first)
    total, _ = jax.lax.scan(add, wide, jax.tree.map(lambda x: x[1:], micro))
    return jax.tree.map(lambda t, f: (t / micro_batches).astype(f.dtype), total, first)


def _mean_over(tree: Any, axis_name: Hashable) -> Any:
    """The mean over the axis of every leaf, in one all-reduce of one buffer.

    A collective of several operands is several operations on some backends (Gloo), each
    with its own messages; the loss and metrics are a few scalars.
    """
    flat, unravel = ravel_pytree(tree)
    return unravel(jax.lax.pmean(flat, axis_name))


def _batch_size(batch: Any) -> int:
    sizes = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(batch)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"batch leaves must share a leading (example) axis to shard over the data axis; "
            f"got leading sizes {sorted(sizes, key=str)}."
        )
    return sizes.pop()


def _layout_of(tree: Any) -> tuple:
    """A hashable key of a tree's layout: its structure and its leaves' shardings."""
    return jax.tree.structure(tree), tuple(getattr(x, "sharding", None)
                                           for x in jax.tree.leaves(tree))


def _place(tree: Any, specs: Any, mesh: jax.sharding.Mesh, copy: bool = True) -> Any:
    """Each leaf as a global array with ``NamedSharding(mesh, spec)`` (no copy if it is).

    Host arrays are taken as the global value, which every process holds in full (the
    same convention as :func:`lore_jax.layout.global_array`). With ``copy``, arrays
    placed elsewhere and host arrays are copied, never aliased (on CPU a device array
    may share a host array's memory): the step donates what it is given, and the
    caller's own arrays must survive that.
    """
    def put(x, spec):
        sharding = NamedSharding(mesh, spec)
        if isinstance(x, jax.Array):
            if x.sharding == sharding:
                return x
            # device_put may alias the source buffer in the new array's shard, even with
            # may_alias=False (jax 0.10, one device to a replicated sharding): copy first.
            return jax.device_put(jnp.array(x, copy=True), sharding)
        return layout.global_array(np.array(x, copy=True) if copy else x, mesh, spec)

    return jax.tree.map(put, tree, specs, is_leaf=lambda s: isinstance(s, P))


def data_parallel(
    loss_fn: Callable[..., Any],
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    *,
    axis_name: Hashable = "data",
    has_aux: bool = False,
    micro_batches: int = 1,
    donate: bool = True,
    compiler_options: dict[str, Any] | None = None,
) -> DataParallel:
    """A jitted data-parallel training step that compresses the gradients it sends.

    ``loss_fn(params, batch)`` is the mean loss of one device's shard of the batch (a
    scalar; with ``has_aux``, ``(loss, aux)``). On every device the step computes the
    gradient with respect to :func:`per_device` parameters (its own local gradient),
    passes it to ``tx`` (which must start with the mean over ``axis_name``: a lore_jax
    transform, e.g. ``optax.chain(lore_jax.greedylore(4), optax.adam(1e-3))``) and
    applies the update, identical on every device. With ``micro_batches=k`` each device
    splits its shard into ``k`` micro-batches, averages their gradients in a
    ``lax.scan`` and calls ``tx`` once, so the compressed gradients are sent once per
    optimizer step whatever ``k`` is (where ``optax.MultiSteps`` around a compressing
    transform would communicate on every micro-step; docs: "Gradient accumulation").

    Args:
      loss_fn: ``(params, batch) -> loss`` (or ``(loss, aux)``), pure and traceable.
      tx: the optimizer chain.
      mesh: the device mesh; ``axis_name`` is its data axis. Parameters may be sharded
        over its other axes (tensor parallelism): place them with ``NamedSharding``
        before ``init``; ``loss_fn`` then sees each device's shards and runs its own
        collectives over those axes.
      axis_name: the data axis.
      has_aux: ``loss_fn`` returns ``(loss, aux)``; ``aux`` (float leaves) is averaged
        over the devices and micro-batches like the loss.
      micro_batches: ``k >= 1`` gradient-accumulation micro-batches per device and step.
      donate: donate the parameters and the state to the step (their buffers are
        reused for the outputs, so arrays passed in already placed on the mesh are
        invalid afterwards, as with any donating ``jax.jit``; others are copied first).
        ``False`` lets one input be stepped from again and again (timing one phase).
      compiler_options: XLA options for the step's and the evaluation's compilation
        (``jax.jit``'s ``compiler_options``).

    Returns:
      A :class:`DataParallel` ``(init, step, lower, evaluate)``.
      ``step(params, opt_state, batch)`` takes the *global* batch (a pytree of arrays
      whose leading axis, divisible by ``N * micro_batches``, is sharded over
      ``axis_name``; host arrays are placed, every process of a ``jax.distributed`` job
      holding the whole global batch; global ``jax.Array`` s already sharded over the
      axis are used as they are) and returns ``(params, opt_state, loss)`` with the loss
      averaged over the global batch (with ``has_aux``, ``(params, opt_state, loss,
      aux)``). ``evaluate(params, batch)`` returns that loss
      (and ``aux``) without updating; its batch needs a leading axis divisible by ``N``.
      To evaluate a set that does not split evenly, pad it and give ``loss_fn``
      per-example weights: with ``aux`` holding the weight total of the shard divided by
      its size, ``loss / aux["weight"]`` is the weighted mean over the global batch.

    Raises:
      ValueError: naming the argument, for bad arguments or a batch that does not split.

    Example:
      >>> import jax, jax.numpy as jnp, optax, lore_jax
      >>> mesh = jax.make_mesh((jax.device_count(),), ("data",))
      >>> def loss_fn(params, batch):
      ...     x, y = batch
      ...     return jnp.mean((x @ params["w"] - y) ** 2)
      >>> tx = optax.chain(lore_jax.greedylore(2), optax.sgd(0.1))
      >>> train = lore_jax.data_parallel(loss_fn, tx, mesh)
      >>> params = {"w": jnp.zeros((16, 8))}
      >>> opt_state = train.init(params)
      >>> batch = (jnp.ones((8 * jax.device_count(), 16)), jnp.ones((8 * jax.device_count(), 8)))
      >>> params, opt_state, loss = train.step(params, opt_state, batch)
      >>> test_loss = train.evaluate(params, batch)
    """
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be a function (params, batch) -> loss, got {loss_fn!r}.")
    if (isinstance(micro_batches, bool) or not isinstance(micro_batches, (int, np.integer))
            or micro_batches < 1):
        raise ValueError(f"micro_batches must be an integer >= 1, got {micro_batches!r}.")
    layout.check_mesh_axis(mesh, axis_name)
    n = mesh.shape[axis_name]
    k = int(micro_batches)
    wait = _xla.waits_for_each_step(mesh)
    compiled: dict[Any, Callable] = {}   # one jitted step per set of specs
    specs_cache: dict[Any, tuple] = {}   # the specs and step of each layout seen
    evaluators: dict[Any, tuple] = {}    # the specs and jitted evaluation of each layout

    def local_step(params, opt_state, batch):
        at = local_params(opt_state, params)   # params, or a device's own under diloco
        value, grads = _local_gradients(loss_fn, at, batch, axis_name, has_aux, k)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, _mean_over(value, axis_name)

    def local_evaluate(params, batch):
        return _mean_over(loss_fn(params, batch), axis_name)

    def build(param_specs, state_specs):
        sharded = jax.shard_map(local_step, mesh=mesh,
                                in_specs=(param_specs, state_specs, P(axis_name)),
                                out_specs=(param_specs, state_specs, P()))
        return jax.jit(sharded, donate_argnums=(0, 1) if donate else (),
                       compiler_options=compiler_options)

    def init(params):
        return layout.sharded_init(tx, params, mesh, axis_name)

    def specs_for(params, opt_state):
        """The in/out specs of (params, opt_state) and the jitted step built for them.

        Reading the specs walks the whole state, so they are kept per layout: the trees'
        structures and their leaves' shardings (a first call with unplaced arrays and the
        later calls with the step's outputs are two layouts of the same specs).
        """
        layout_key = (_layout_of(params), _layout_of(opt_state))
        if layout_key not in specs_cache:
            param_specs = layout.param_specs_of(params, mesh, axis_name)
            state_specs = layout.state_specs(opt_state, axis_name)
            jax.tree_util.tree_map_with_path(
                lambda path, x, spec: layout.check_rows(path, x, spec, mesh),
                opt_state, state_specs)
            spec_key = (layout_key[0][0], layout_key[1][0],
                        tuple(jax.tree.leaves((param_specs, state_specs),
                                              is_leaf=lambda s: isinstance(s, P))))
            if spec_key not in compiled:
                compiled[spec_key] = build(param_specs, state_specs)
            specs_cache[layout_key] = (param_specs, state_specs, compiled[spec_key])
        return specs_cache[layout_key]

    def place_batch(batch, split):
        size = _batch_size(batch)
        if size % (n * split):
            into = f"{n} devices x {split} micro-batches" if split == k else f"{n} devices"
            raise ValueError(f"the global batch has {size} examples, which does not split "
                             f"into {into}; use a multiple of {n * split}.")
        return _place(batch, jax.tree.map(lambda _: P(axis_name), batch), mesh, copy=False)

    def prepare(params, opt_state, batch):
        """The jitted step for this layout, and the inputs placed on the mesh."""
        param_specs, state_specs, fn = specs_for(params, opt_state)
        return fn, (_place(params, param_specs, mesh, donate),
                    _place(opt_state, state_specs, mesh, donate), place_batch(batch, k))

    def step(params, opt_state, batch):
        fn, args = prepare(params, opt_state, batch)
        params, opt_state, value = fn(*args)
        if wait:
            jax.block_until_ready(value)
        if has_aux:
            loss, aux = value
            return params, opt_state, loss, aux
        return params, opt_state, value

    def lower(params, opt_state, batch):
        fn, args = prepare(params, opt_state, batch)
        return fn.lower(*args)

    def evaluator(params):
        """The parameters' specs and the jitted evaluation, kept per layout."""
        layout_key = _layout_of(params)
        if layout_key not in evaluators:
            specs = layout.param_specs_of(params, mesh, axis_name)
            sharded = jax.shard_map(local_evaluate, mesh=mesh,
                                    in_specs=(specs, P(axis_name)), out_specs=P())
            evaluators[layout_key] = (specs, jax.jit(sharded,
                                                     compiler_options=compiler_options))
        return evaluators[layout_key]

    def evaluate(params, batch):
        specs, fn = evaluator(params)
        value = fn(_place(params, specs, mesh, copy=False), place_batch(batch, 1))
        if wait:
            jax.block_until_ready(value)
        return value

    return DataParallel(init, step, lower, evaluate)
