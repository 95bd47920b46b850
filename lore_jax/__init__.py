"""lore_jax: communication-efficient data-parallel training for JAX.

Transforms (optax ``GradientTransformation``\\ s that run inside ``jax.shard_map`` or
``jax.pmap`` on each device's local gradients and return the compressed mean):

* :func:`greedylore`: GreedyLore greedy low-rank compression with error feedback.
* :func:`compressed_mean`: any compressor of :mod:`lore_jax.compressors` as a
  data-parallel mean with EF14 / EF21 error feedback.
* :func:`demo`: DeMo, per-device momentum whose top DCT coefficients are all-gathered,
  with sign descent (the whole optimizer).
* :func:`diloco`: infrequent synchronisation (DiLoCo): local inner steps, then an outer
  step on the pseudo-gradient averaged through any of the means above.
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

import importlib
import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lore_jax import cluster, compressors, problems, theory
    from lore_jax.accounting import communication, hlo_collectives
    from lore_jax.accumulate import MultiStepsState, multi_steps
    from lore_jax.compressed_mean import CompressedMeanState, compressed_mean
    from lore_jax.data_parallel import DataParallel, data_parallel, per_device
    from lore_jax.demo import DemoState, demo
    from lore_jax.diloco import DilocoState, diloco, local_params
    from lore_jax.flax_views import flax_dimension_numbers
    from lore_jax.greedylore import GREEDYLORE_PAPER, GreedyLoreBasis, greedylore
    from lore_jax.layout import shard_state, sharded_init, state_specs
    from lore_jax.staleness import ReuseLastState, StaleState, reuse_last, stale
    from lore_jax.subspace import DimensionNumbers

# Public names and the modules that define them, imported on first use: a process that
# only needs the command line's parent side or the cluster launcher does not pay for
# importing JAX (about 1.5 s), which the processes of a multi-process job each would.
_EXPORTS = {
    "communication": "accounting", "hlo_collectives": "accounting",
    "MultiStepsState": "accumulate", "multi_steps": "accumulate",
    "CompressedMeanState": "compressed_mean", "compressed_mean": "compressed_mean",
    "DataParallel": "data_parallel", "data_parallel": "data_parallel",
    "per_device": "data_parallel", "DemoState": "demo", "demo": "demo",
    "DilocoState": "diloco", "diloco": "diloco", "local_params": "diloco",
    "flax_dimension_numbers": "flax_views",
    "GREEDYLORE_PAPER": "greedylore", "GreedyLoreBasis": "greedylore",
    "greedylore": "greedylore", "shard_state": "layout", "sharded_init": "layout",
    "state_specs": "layout", "ReuseLastState": "staleness", "StaleState": "staleness",
    "reuse_last": "staleness", "stale": "staleness", "DimensionNumbers": "subspace",
}


class _Package(types.ModuleType):
    """``lore_jax`` itself: importing a submodule whose name is also a public function
    (``lore_jax.greedylore``, ``lore_jax.data_parallel``, ``lore_jax.compressed_mean``,
    ``lore_jax.demo``, ``lore_jax.diloco``)
    must not replace the function by the module, as Python's import system would when
    it binds the new submodule on its package."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"lore_jax.{_EXPORTS[name]}"), name)
    else:
        try:
            value = importlib.import_module(f"lore_jax.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"lore_jax.{name}":
                raise
            raise AttributeError(f"module 'lore_jax' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"

__all__ = [
    "cluster",
    "CompressedMeanState",
    "DataParallel",
    "DemoState",
    "DilocoState",
    "DimensionNumbers",
    "GreedyLoreBasis",
    "MultiStepsState",
    "ReuseLastState",
    "StaleState",
    "communication",
    "compressed_mean",
    "compressors",
    "data_parallel",
    "demo",
    "diloco",
    "flax_dimension_numbers",
    "greedylore",
    "GREEDYLORE_PAPER",
    "hlo_collectives",
    "local_params",
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
