"""lore_jax: communication-efficient data-parallel training for JAX.

Transforms (optax ``GradientTransformation``\\ s that run inside ``jax.shard_map`` or
``jax.pmap`` on each device's local gradients and return the compressed mean):

* :func:`greedylore`: GreedyLore greedy low-rank compression with error feedback.
* :func:`compressed_mean`: any compressor of :mod:`lore_jax.compressors` as a
  data-parallel mean with EF14 / EF21 error feedback.
* :func:`stale`, :func:`reuse_last`: bounded-delay (asynchronous) gradients.

Plumbing: :func:`state_specs` and :func:`sharded_init` lay optimizer state out on a mesh;
:func:`communication` reads the exact bit counters; :func:`hlo_collectives` reads what a
compiled step really sends. Theory: :mod:`lore_jax.theory` (step sizes and complexity,
derived constants) and :mod:`lore_jax.problems` (test problems with exact constants).
"""

from lore_jax import compressors, problems, theory
from lore_jax.accounting import communication, hlo_collectives
from lore_jax.collectives import sharded_init, state_specs
from lore_jax.compressed_mean import CompressedMeanState, compressed_mean
from lore_jax.greedylore import GreedyLoreState, greedylore
from lore_jax.staleness import ReuseLastState, StaleState, reuse_last, stale

__version__ = "0.1.0"

__all__ = [
    "CompressedMeanState",
    "GreedyLoreState",
    "ReuseLastState",
    "StaleState",
    "communication",
    "compressed_mean",
    "compressors",
    "greedylore",
    "hlo_collectives",
    "problems",
    "reuse_last",
    "sharded_init",
    "stale",
    "state_specs",
    "theory",
]
