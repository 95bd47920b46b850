"""Gradient compressors: pure ``compress`` / ``decompress`` functions with exact bit counts.

Every compressor is a :class:`Compressor` (see :mod:`lore_jax.compressors.base` for the
contract) built by one of the functions below; :func:`lore_jax.compressed_mean` turns any
of them into a data-parallel mean with error feedback. Kind, constant (``d`` entries,
``(a, b)`` oriented matrix) and how ``compressed_mean`` communicates the payloads:

* :func:`identity`: unbiased, ``alpha = 1``; all-reduce.
* :func:`bernoulli`: unbiased, ``alpha = 1/p`` (magnitude-based: ``1 + nnz/(p d)``);
  all-gather, or all-reduce with a shared seed.
* :func:`random_k`: unbiased, ``alpha = d/k``; all-gather, or all-reduce with a shared seed.
* :func:`top_k`: contractive, ``delta = k/d``; all-gather.
* :func:`sign`: no class; all-gather.
* :func:`scaled_sign`: contractive, ``delta = ||v||_1^2 / (d ||v||^2) >= 1/d``; all-gather.
* :func:`terngrad`: unbiased, ``alpha = (1 + sqrt(d))/2`` (biased with ``clip``); all-gather.
* :func:`qsgd`: unbiased, ``alpha = 1 + min(B/(4 s^2), sqrt(B)/s)``; all-gather.
* :func:`stochastic_rounding`: unbiased, ``alpha = 1 + min(d/(4 S^2), sqrt(d)/S)``;
  all-gather.
* :func:`grid_rounding`: absolute, ``epsilon = sqrt(d) step / 2``; all-gather.
* :func:`powersgd`: no class (a projection); two all-reduces per power iteration.
* :func:`random_projection`: contractive, ``delta = r/a`` (or unbiased, ``alpha = a/r``);
  all-reduce.
* :func:`greedy_svd`: contractive, ``delta = r/a``; all-gather.
* :func:`as_contraction`: ``Q / alpha`` of an unbiased ``Q``, contractive with
  ``delta = 1/alpha``.

The constants are derived in the lore_jax spec (``docs/spec.md``, the documentation's
Spec page, §3-§4), consistent with the framework of
Khirirat, Feyzmahdavian and Johansson (2018); they are not quoted from that paper.
"""

from lore_jax.compressors.base import (
    KINDS,
    Compressor,
    Context,
    MatrixGroups,
    as_contraction,
    identity,
)
from lore_jax.compressors.lowrank import greedy_svd, powersgd, random_projection
from lore_jax.compressors.packing import index_bits, pack_bits, unpack_bits
from lore_jax.compressors.quantize import grid_rounding, qsgd, stochastic_rounding, terngrad
from lore_jax.compressors.sign import scaled_sign, sign
from lore_jax.compressors.sparsify import bernoulli, random_k, top_k

__all__ = [
    "KINDS",
    "Compressor",
    "Context",
    "MatrixGroups",
    "as_contraction",
    "bernoulli",
    "greedy_svd",
    "grid_rounding",
    "identity",
    "index_bits",
    "pack_bits",
    "powersgd",
    "qsgd",
    "random_k",
    "random_projection",
    "scaled_sign",
    "sign",
    "stochastic_rounding",
    "terngrad",
    "top_k",
    "unpack_bits",
]
