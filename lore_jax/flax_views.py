"""Matrix views of a Flax NNX model's parameters, read from its modules.

The default views (:func:`lore_jax.subspace.default_dimension_numbers`) go by a
parameter's name and shape, which cannot tell a ``LinearGeneral(64, (4, 16))`` kernel
``(64, 4, 16)`` (a 64 x 64 map) from a 1-D convolution's ``(window, in, out)``;
:func:`flax_dimension_numbers` asks the modules themselves.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lore_jax import collectives
from lore_jax.subspace import DimensionNumbers, default_dimension_numbers


def flax_dimension_numbers(model: Any) -> dict:
    """The matrix of every ``nnx.Param`` of a Flax NNX model, read from its modules.

    ``LinearGeneral`` (and so ``MultiHeadAttention``'s projections): its batch axes,
    ``in_features`` axes as the reduction axes and ``out_features`` axes as the output
    axes; ``Linear``: ``(0, 1)``; ``Conv`` / ``ConvTranspose``: all axes but the last,
    then the last; ``Embed``: ``(0, 1)``; biases, scales and every other parameter: the
    default rule of :func:`lore_jax.subspace.default_dimension_numbers`.

    Args:
      model: an ``nnx.Module``.

    Returns:
      A nested dict like ``nnx.state(model, nnx.Param)``, with a
      :class:`lore_jax.DimensionNumbers` or ``None`` (not a matrix) per parameter, for
      the ``weight_dimension_numbers`` argument of :func:`lore_jax.greedylore` and
      :func:`lore_jax.compressed_mean`.

    Example:
      >>> from flax import nnx
      >>> import lore_jax
      >>> layer = nnx.LinearGeneral(64, (4, 16), rngs=nnx.Rngs(0))
      >>> lore_jax.flax_dimension_numbers(layer)["kernel"]
      DimensionNumbers(reduction_axis=(0,), output_axis=(1, 2))
    """
    exact: dict[tuple, Any] = {}
    for path, node in nnx.iter_graph(model):
        path = tuple(path)
        if isinstance(node, nnx.LinearGeneral):
            nb, ni = len(node.batch_axis), len(node.in_features)
            no = len(node.out_features)
            exact[path + ("kernel",)] = DimensionNumbers(
                tuple(range(nb, nb + ni)), tuple(range(nb + ni, nb + ni + no)))
        elif isinstance(node, (nnx.Linear, nnx.Embed)):
            exact[path + ("kernel",)] = exact[path + ("embedding",)] = DimensionNumbers(0, 1)
        elif isinstance(node, (nnx.Conv, nnx.ConvTranspose)):
            n = len(node.kernel_shape)
            exact[path + ("kernel",)] = DimensionNumbers(tuple(range(n - 1)), n - 1)

    def dims(path, x):
        keys = collectives.path_keys(path)
        return exact[keys] if keys in exact else default_dimension_numbers(keys, jnp.shape(x))

    return jax.tree_util.tree_map_with_path(dims, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
