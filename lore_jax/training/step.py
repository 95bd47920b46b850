"""The data-parallel training and evaluation steps: ``jax.shard_map`` over a device mesh.

Layout on the mesh (one axis, ``"data"`` by default, of size N):

* the global batch is sharded ``P("data")``: each device sees ``batch / N`` examples;
* the parameters are replicated, ``P()``;
* the optimizer state follows :func:`lore_jax.state_specs`: per-device error-feedback
  buffers ``P("data")`` (global shape ``(N, ...)``), everything else ``P()``.

Inside the mapped function each device computes the loss and gradients of its shard
(with respect to a per-device copy of the parameters, so that no collective happens
before the optimizer's own), and the optimizer chain (which must start with a mean over
the axis, e.g. :func:`lore_jax.training.optimizers.dense_mean` or
:func:`lore_jax.greedylore`) turns them into one update, identical on every device.
The step is pure and jitted; metrics are means over the global batch, replicated.

Example:
  >>> import jax, optax
  >>> from lore_jax.training import step as step_lib
  >>> # mesh = jax.make_mesh((8,), ("data",)); tx = optax.chain(dense_mean("data"), ...)
  >>> # train_step = step_lib.make_train_step(apply, "classification", tx, mesh, specs)
  >>> # params, opt_state, metrics = train_step(params, opt_state, x, y)
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

from lore_jax import layout
from lore_jax.data_parallel import per_device
from lore_jax.layout import global_array

Metrics = dict[str, jax.Array]
ApplyFn = Callable[[Any, jax.Array], jax.Array]


def loss_and_metrics(kind: str, outputs: jax.Array, targets: jax.Array,
                     weights: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
    """Sums of the loss (and accuracy) over examples, with their weight total.

    Args:
      kind: ``"classification"`` (``outputs (b, classes)``, ``targets (b,)`` int),
        ``"regression"`` (``outputs`` and ``targets`` ``(b, d)``, squared error summed
        over ``d``) or ``"language_model"`` (``(b, t, vocab)`` logits, ``(b, t)`` tokens;
        an example's loss is its mean over ``t``).
      weights: ``(b,)`` per-example weights (1 real, 0 padding); ``None`` means ones.

    Returns:
      ``(loss_sum, {"loss": loss_sum, "accuracy": correct_sum, "count": weight_sum})``;
      the accuracy entry is absent for regression.
    """
    if weights is None:
        weights = jnp.ones(outputs.shape[:1], jnp.float32)
    metrics: Metrics = {}
    if kind == "regression":
        per_example = jnp.sum((outputs - targets) ** 2, axis=-1)
    else:
        per_token = optax.softmax_cross_entropy_with_integer_labels(outputs, targets)
        correct = (jnp.argmax(outputs, -1) == targets).astype(jnp.float32)
        if kind == "language_model":
            per_token, correct = per_token.mean(-1), correct.mean(-1)
        per_example = per_token
        metrics["accuracy"] = jnp.sum(correct * weights)
    loss_sum = jnp.sum(per_example * weights)
    metrics["loss"] = loss_sum
    metrics["count"] = jnp.sum(weights)
    return loss_sum, metrics


def _psum_scalars(metrics: Metrics, axis_name: Hashable) -> Metrics:
    """The sums over the axis of float32 scalars, in one all-reduce of one buffer (a
    collective of several operands is several operations on some backends)."""
    names = sorted(metrics)
    summed = jax.lax.psum(jnp.stack([metrics[k].astype(jnp.float32) for k in names]),
                          axis_name)
    return {k: summed[i] for i, k in enumerate(names)}


def make_train_step(
    apply_fn: ApplyFn,
    kind: str,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    opt_state_specs: Any,
    axis_name: Hashable = "data",
) -> Callable[[Any, Any, jax.Array, jax.Array], tuple[Any, Any, Metrics]]:
    """Builds the jitted ``train_step(params, opt_state, x, y)``.

    Args:
      apply_fn: pure ``apply(params, x) -> outputs`` (see :func:`models.split`).
      kind: the loss, as in :func:`loss_and_metrics`.
      tx: an optax chain that averages gradients over ``axis_name`` first.
      mesh: the device mesh, with an axis ``axis_name``.
      opt_state_specs: ``lore_jax.state_specs(opt_state, axis_name)``.
      axis_name: the data axis.

    Returns:
      ``train_step(params, opt_state, x, y) -> (params, opt_state, metrics)``: ``x`` and
      ``y`` are global batches sharded ``P(axis_name)`` (leading size divisible by N);
      ``metrics`` holds ``loss`` (mean over the global batch) and ``accuracy`` (for
      classification and language models), replicated scalars. ``params`` and
      ``opt_state`` are donated.
    """

    def local_step(params, opt_state, x, y):
        def objective(p):
            loss_sum, metrics = loss_and_metrics(kind, apply_fn(p, x), y)
            return loss_sum / x.shape[0], metrics

        # Differentiate with respect to a per-device ("varying") copy of the parameters:
        # the gradient with respect to the replicated parameters themselves would be the
        # transpose of their implicit broadcast, a dense psum over the axis, which would
        # send the full gradient before the compressor ever sees it.
        local = per_device(params, axis_name)
        (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(local)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        totals = _psum_scalars(metrics, axis_name)
        count = totals.pop("count")
        return params, opt_state, {k: v / count for k, v in totals.items()}

    sharded = jax.shard_map(
        local_step, mesh=mesh,
        in_specs=(P(), opt_state_specs, P(axis_name), P(axis_name)),
        out_specs=(P(), opt_state_specs, P()),
    )
    return jax.jit(sharded, donate_argnums=(0, 1))


def make_eval_step(
    apply_fn: ApplyFn, kind: str, mesh: jax.sharding.Mesh, axis_name: Hashable = "data",
) -> Callable[[Any, jax.Array, jax.Array, jax.Array], Metrics]:
    """Builds the jitted ``eval_step(params, x, y, weights) -> sums``.

    The batch is sharded ``P(axis_name)``; ``weights`` (1 for real examples, 0 for
    padding) let a test set of any size be split into equal chunks. Returns replicated
    sums ``{"loss", "accuracy"?, "count"}`` over the global chunk; see :func:`evaluate`.
    """

    def local_eval(params, x, y, w):
        _, metrics = loss_and_metrics(kind, apply_fn(params, x), y, w)
        return _psum_scalars(metrics, axis_name)

    sharded = jax.shard_map(local_eval, mesh=mesh,
                            in_specs=(P(), P(axis_name), P(axis_name), P(axis_name)),
                            out_specs=P())
    return jax.jit(sharded)


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Every leaf of a host pytree as a replicated global array (``P()``).

    Leaves are copied first: on CPU a device array may alias host memory, and the
    training step donates (overwrites) its parameters.
    """
    return jax.tree.map(lambda x: global_array(np.array(x, copy=True), mesh, P()), tree)


def with_shardings(tree: Any, specs: Any, mesh: jax.sharding.Mesh) -> Any:
    """``jax.ShapeDtypeStruct`` leaves carrying ``NamedSharding(mesh, spec)`` layouts."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
        tree, specs, is_leaf=lambda x: isinstance(x, P))


def evaluate(
    eval_step: Callable[..., Metrics], params: Any, x: np.ndarray, y: np.ndarray,
    mesh: jax.sharding.Mesh, axis_name: Hashable = "data", chunk: int = 1024,
) -> dict[str, float]:
    """Mean loss (and accuracy) of ``params`` on a host dataset, in padded chunks.

    Args:
      eval_step: from :func:`make_eval_step`.
      x, y: the whole evaluation set (host arrays, ``n`` rows).
      chunk: examples per call, rounded up to a multiple of the axis size.

    Returns:
      ``{"loss": ..., "accuracy": ...}`` as Python floats (no accuracy for regression).
    """
    n_dev = mesh.shape[axis_name]
    chunk = -(-min(chunk, len(x)) // n_dev) * n_dev
    sums: dict[str, float] = {}
    for start in range(0, len(x), chunk):
        xb, yb = x[start:start + chunk], y[start:start + chunk]
        pad = chunk - len(xb)
        w = np.concatenate([np.ones(len(xb), np.float32), np.zeros(pad, np.float32)])
        if pad:
            xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.zeros((pad, *yb.shape[1:]), yb.dtype)])
        out = eval_step(params, *(global_array(a, mesh, P(axis_name)) for a in (xb, yb, w)))
        for k, v in jax.device_get(out).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    count = sums.pop("count")
    return {k: v / count for k, v in sums.items()}


def init_optimizer(tx: optax.GradientTransformation, params: Any, mesh: jax.sharding.Mesh,
                   axis_name: Hashable = "data") -> tuple[Any, Any]:
    """The optimizer state laid out on the mesh, and its ``shard_map`` specs.

    Returns:
      ``(opt_state, specs)``: per-device buffers as ``(N, ...)`` arrays sharded
      ``P(axis_name)``, the rest replicated (:func:`lore_jax.sharded_init`).
    """
    opt_state = layout.sharded_init(tx, params, mesh, axis_name)
    return opt_state, layout.state_specs(opt_state, axis_name)
