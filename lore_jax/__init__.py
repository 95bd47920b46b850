"""lore_jax: communication-efficient data-parallel training for JAX.

Public API:

* :func:`greedylore`: GreedyLore low-rank gradient compression (an optax transform that
  runs inside ``jax.shard_map`` / ``jax.pmap`` and returns the compressed mean gradient).
* :func:`state_specs`, :func:`sharded_init`: lay out lore_jax optimizer state on a mesh.
* :func:`communication`: cumulative bits sent, against a dense all-reduce.
"""

from lore_jax.accounting import communication, hlo_collectives
from lore_jax.collectives import sharded_init, state_specs
from lore_jax.greedylore import GreedyLoreState, greedylore

__version__ = "0.1.0"

__all__ = [
    "GreedyLoreState",
    "communication",
    "greedylore",
    "hlo_collectives",
    "sharded_init",
    "state_specs",
]
