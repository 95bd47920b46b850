"""Data-parallel training with lore_jax: data, models, the shard_map step, checkpoints.

The pieces, in the order a run uses them:

* :mod:`~lore_jax.training.data`: datasets with no download, file loaders, batching with
  a restorable position;
* :mod:`~lore_jax.training.models`: Flax NNX MLP, CNN and character transformer;
* :mod:`~lore_jax.training.optimizers`: ``mean over devices (dense or compressed) ->
  base optimizer`` chains;
* :mod:`~lore_jax.training.step`: the jitted ``shard_map`` train and evaluation steps;
* :mod:`~lore_jax.training.checkpoint`: orbax checkpoints of the whole run;
* :mod:`~lore_jax.training.loop` and :mod:`~lore_jax.training.compare`: a run, and a
  comparison of compressors.

Example:
  >>> from lore_jax.training import TrainConfig, train
  >>> config = TrainConfig(task="digits", compressor="greedylore", steps=100)
  >>> result = train(config)  # doctest: +SKIP
"""

from lore_jax.training.errors import TrainingError
from lore_jax.training.loop import Preempted, RunResult, TrainConfig, make_mesh, train

__all__ = ["Preempted", "RunResult", "TrainConfig", "TrainingError", "make_mesh", "train"]
