"""Data-parallel training with lore_jax: data, models, optimizers, checkpoints, the loop.

The pieces, in the order a run uses them:

* :mod:`~lore_jax.training.data`: datasets with no download, file loaders, batching with
  a restorable position;
* :mod:`~lore_jax.training.models`: Flax NNX MLP, CNN and character transformer;
* :mod:`~lore_jax.training.tasks`: the named tasks, and the loss of each kind of task;
* :mod:`~lore_jax.training.optimizers`: ``mean over devices (dense or compressed) ->
  base optimizer`` chains, trained by :func:`lore_jax.data_parallel`;
* :mod:`~lore_jax.training.checkpoint`: orbax checkpoints of the whole run;
* :mod:`~lore_jax.training.loop` and :mod:`~lore_jax.training.compare`: a run, and a
  comparison of compressors.

Example:
  >>> from lore_jax.training import TrainConfig, train
  >>> config = TrainConfig(task="digits", compressor="greedylore", steps=100)
  >>> result = train(config)  # doctest: +SKIP
"""

import importlib
from typing import TYPE_CHECKING

from lore_jax.training.errors import TrainingError

if TYPE_CHECKING:
    from lore_jax.training.loop import Preempted, RunResult, TrainConfig, make_mesh, train

_FROM_LOOP = ("Preempted", "RunResult", "TrainConfig", "make_mesh", "train")


def __getattr__(name: str):
    # Imported on first use, so that the command line's supervising parent process,
    # which imports only :mod:`~lore_jax.training.faults`, does not import JAX.
    if name in _FROM_LOOP:
        value = getattr(importlib.import_module("lore_jax.training.loop"), name)
    else:
        try:
            value = importlib.import_module(f"lore_jax.training.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"lore_jax.training.{name}":
                raise
            raise AttributeError(f"module 'lore_jax.training' has no attribute "
                                 f"{name!r}") from None
    globals()[name] = value
    return value

__all__ = ["Preempted", "RunResult", "TrainConfig", "TrainingError", "make_mesh", "train"]
