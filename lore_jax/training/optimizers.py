"""The optimizers a training run can use: a gradient mean over devices, then a base optimizer.

Every chain built here starts with a transform that turns each device's local gradients
into their mean over the data axis (identical on every device), then hands it to the
base optimizer (Adam or SGD):

* ``dense``: :func:`lore_jax.compressed_mean` with the identity compressor and no error
  feedback, one mean all-reduce of the whole gradient that counts the bits it sends;
* ``greedylore``: :func:`lore_jax.greedylore`;
* ``powersgd`` and ``random``: :func:`lore_jax.compressed_mean` with the PowerSGD and
  random low-rank projection compressors of :mod:`lore_jax.compressors` (all-reduced);
* ``topk``, ``qsgd`` and ``sign``: :func:`lore_jax.compressed_mean` with top-k of a
  ``fraction`` of every leaf, QSGD with ``levels`` levels per bucket of 512 entries, and
  the scaled sign (all-gathered; with error feedback, the last is EF-SignSGD).

With ``sync_every=H`` the same mean averages DiLoCo's pseudo-gradients instead, once
every ``H`` steps (:func:`lore_jax.diloco`): the base optimizer is each device's inner
optimizer, and an outer SGD with Nesterov momentum steps the shared parameters.

Any other optax chain works with :func:`lore_jax.data_parallel` too, as long as it
averages the gradients over the axis before updating.
"""

from __future__ import annotations

from collections.abc import Hashable

import optax

from lore_jax import compressors
from lore_jax.compressed_mean import compressed_mean
from lore_jax.diloco import diloco
from lore_jax.greedylore import greedylore
from lore_jax.training.errors import TrainingError

COMPRESSORS = ("dense", "greedylore", "powersgd", "random", "topk", "qsgd", "sign")
#: QSGD's bucket: one norm per this many entries.
QSGD_BUCKET = 512
OPTIMIZERS = ("adam", "sgd")
#: GreedyLore's basis tracking: ``"range"`` (its default) or ``"off"`` (the paper's).
TRACKING = ("range", "off")
SCHEDULES = ("constant", "cosine")


class CompressorError(TrainingError):
    """An unknown compressor, optimizer or schedule was asked for."""


def learning_rate_schedule(learning_rate: float, schedule: str = "constant",
                           total_steps: int | None = None) -> optax.ScalarOrSchedule:
    """``"constant"``, or ``"cosine"``: decay from ``learning_rate`` to 0 at ``total_steps``."""
    if schedule == "constant":
        return learning_rate
    if schedule == "cosine":
        if not total_steps:
            raise CompressorError("a cosine schedule needs the total number of steps.")
        return optax.cosine_decay_schedule(learning_rate, total_steps)
    raise CompressorError(f"unknown schedule {schedule!r}; choose one of "
                          f"{', '.join(SCHEDULES)}.")


def base_optimizer(name: str, learning_rate: optax.ScalarOrSchedule, momentum: float = 0.9
                   ) -> optax.GradientTransformation:
    """``adam`` or ``sgd`` (with ``momentum``; 0 for plain SGD)."""
    if name == "adam":
        return optax.adam(learning_rate)
    if name == "sgd":
        return optax.sgd(learning_rate, momentum=momentum or None)
    raise CompressorError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}.")


def make_optimizer(
    compressor: str,
    *,
    rank: int = 4,
    optimizer: str = "adam",
    learning_rate: float = 1e-3,
    momentum: float = 0.9,
    schedule: str = "constant",
    total_steps: int | None = None,
    axis_name: Hashable = "data",
    update_interval: int | None = None,
    warmup_steps: int = 0,
    error_feedback: str | None = "ef14",
    seed: int = 0,
    tracking: str = "range",
    fraction: float = 0.01,
    levels: int = 7,
    sync_every: int | None = None,
    outer_learning_rate: float = 0.7,
    outer_momentum: float = 0.9,
) -> optax.GradientTransformation:
    """The optax chain ``mean-over-devices (compressed or not) -> base optimizer``, or DiLoCo.

    Args:
      compressor: one of :data:`COMPRESSORS`.
      rank: rank of the low-rank compressors.
      optimizer: ``"adam"`` or ``"sgd"``.
      learning_rate: the base optimizer's (peak) step size.
      momentum: SGD momentum.
      schedule: ``"constant"`` or ``"cosine"`` (decay to 0 at ``total_steps``).
      total_steps: the run's length, for the cosine schedule.
      axis_name: the mesh axis gradients are averaged over.
      update_interval: GreedyLore's subspace refresh period (steps; ``None``: its default).
      warmup_steps: GreedyLore's dense warm-up steps.
      error_feedback: ``"ef14"``, ``"ef21"`` or ``None`` (the dense mean has none).
      seed: seeds the random compressors' keys.
      tracking: GreedyLore's basis tracking, ``"range"`` or ``"off"`` (the paper's).
      fraction: top-k's share of every leaf's entries.
      levels: QSGD's levels ``s`` (``1 + ceil(log2(s + 1))`` bits per entry).
      sync_every: ``H``: :func:`lore_jax.diloco` with the base optimizer inside, the mean
        on the pseudo-gradients every ``H`` steps; ``None``: the mean every step.
      outer_learning_rate, outer_momentum: DiLoCo's outer SGD (Nesterov momentum; 0:
        none).

    Returns:
      An ``optax.GradientTransformation`` to run inside ``jax.shard_map``.

    Raises:
      CompressorError: an unknown compressor, optimizer or schedule name.
    """
    base = base_optimizer(optimizer, learning_rate_schedule(learning_rate, schedule, total_steps),
                          momentum)
    mean = _mean(compressor, rank=rank, axis_name=axis_name, update_interval=update_interval,
                 warmup_steps=warmup_steps, error_feedback=error_feedback, seed=seed,
                 tracking=tracking, fraction=fraction, levels=levels)
    if sync_every is None:
        return optax.chain(mean, base)
    outer = optax.sgd(outer_learning_rate, momentum=outer_momentum or None,
                      nesterov=bool(outer_momentum))
    try:
        return diloco(base, outer, sync_every=sync_every, mean=mean, axis_name=axis_name)
    except ValueError as e:
        raise CompressorError(str(e).replace("sync_every", "--sync-every")) from None


def _mean(compressor: str, *, rank: int, axis_name: Hashable, update_interval: int | None,
          warmup_steps: int, error_feedback: str | None, seed: int, tracking: str,
          fraction: float, levels: int) -> optax.GradientTransformation:
    """The data-parallel mean of a compressor name (:data:`COMPRESSORS`)."""
    if compressor == "greedylore":
        return greedylore(rank, tracking=tracking, update_interval=update_interval,
                          warmup_steps=warmup_steps, error_feedback=error_feedback, key=seed,
                          axis_name=axis_name)
    factories = {
        "dense": compressors.identity,
        "powersgd": lambda: compressors.powersgd(rank),
        "random": lambda: compressors.random_projection(rank),
        "topk": lambda: compressors.top_k(fraction=fraction),
        "qsgd": lambda: compressors.qsgd(levels, bucket_size=QSGD_BUCKET),
        "sign": compressors.scaled_sign,
    }
    if compressor not in factories:
        raise CompressorError(
            f"unknown compressor {compressor!r}; choose one of {', '.join(COMPRESSORS)}.")
    try:
        q = factories[compressor]()
    except ValueError as e:
        raise CompressorError(f"{compressor}: {e}") from None
    return compressed_mean(q, axis_name=axis_name, key=seed,
                           error_feedback=None if compressor == "dense" else error_feedback)
