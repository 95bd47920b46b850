"""lore_jax: communication-efficient data-parallel training for JAX.

Transforms (optax ``GradientTransformation``\\ s that run inside ``jax.shard_map`` or
``jax.pmap`` on each device's local gradients and return the compressed mean):

* :func:`greedylore`: GreedyLore greedy low-rank compression with error feedback.
* :func:`compressed_mean`: any compressor of :mod:`lore_jax.compressors` as a
  data-parallel mean with EF14 / EF21 error feedback.
* :func:`stale`, :func:`reuse_last`: bounded-delay (asynchronous) gradients.

* :func:`multi_steps`: gradient accumulation that communicates once per optimizer step.

The training step: :func:`data_parallel` builds a jitted ``shard_map`` step from a loss
(local gradients, the compressed mean, the base optimizer, micro-batches);
:func:`per_device` gives a hand-written step the device's own copy of the parameters to
differentiate (``jax.grad`` with respect to replicated parameters sums them over the axis).

Plumbing: :func:`state_specs`, :func:`sharded_init` and :func:`shard_state` lay optimizer
state out on a mesh (model-sharded parameters and ``nnx.Optimizer`` states included);
:class:`DimensionNumbers` and :func:`flax_dimension_numbers` say which axes of a leaf form
the matrix; :func:`communication` reads the exact bit counters; :func:`hlo_collectives`
reads what a compiled step really sends. Theory: :mod:`lore_jax.theory` (step sizes and
complexity, derived constants) and :mod:`lore_jax.problems` (test problems with exact
constants).
"""

from lore_jax import compressors, problems, theory
from lore_jax.accounting import communication, hlo_collectives
from lore_jax.accumulate import MultiStepsState, multi_steps
from lore_jax.compressed_mean import CompressedMeanState, compressed_mean
from lore_jax.data_parallel import DataParallel, data_parallel, per_device
from lore_jax.flax_views import flax_dimension_numbers
from lore_jax.greedylore import GREEDYLORE_PAPER, GreedyLoreBasis, greedylore
from lore_jax.layout import shard_state, sharded_init, state_specs
from lore_jax.staleness import ReuseLastState, StaleState, reuse_last, stale
from lore_jax.subspace import DimensionNumbers

__version__ = "0.1.0"

__all__ = [
    "CompressedMeanState",
    "DataParallel",
    "DimensionNumbers",
    "GreedyLoreBasis",
    "MultiStepsState",
    "ReuseLastState",
    "StaleState",
    "communication",
    "compressed_mean",
    "compressors",
    "data_parallel",
    "flax_dimension_numbers",
    "greedylore",
    "GREEDYLORE_PAPER",
    "hlo_collectives",
    "multi_steps",
    "per_device",
    "problems",
    "reuse_last",
    "shard_state",
    "sharded_init",
    "stale",
    "state_specs",
    "theory",
]
