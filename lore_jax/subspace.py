"""Low-rank subspace math shared by GreedyLore and the low-rank compressors.

All functions act on *batches* of oriented matrices: an ``(a, b)`` view of a gradient
with ``a = min(m, n) <= b = max(m, n)``, stacked along a leading axis of length ``k``
(same-shape matrices are handled with one batched SVD / matmul). Everything runs in
float32 (SVD and QR refuse bfloat16, and bfloat16 bases lose orthonormality).

Notation (GreedyLore, Chen et al. 2025): ``U`` is a complete ``a x a`` orthonormal basis
(columns ``u_j``), ``Z = U^T H`` the coordinates of ``H`` in it, ``J`` the ``r`` selected
directions, ``P = U[:, J]``, ``R = P^T H = Z[J, :]`` and the reconstruction ``P R``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lore_jax import _xla, collectives

#: ``fn(*stacks)`` on stacks of matrices ``(k, ...)`` (:func:`lore_jax._xla.per_matrix`).
per_matrix = _xla.per_matrix


class DimensionNumbers(NamedTuple):
    """Which axes of an N-D leaf form the matrix: optax's convention (GaLore, Muon).

    The leaf is read as the linear map from its ``reduction_axis`` axes (its inputs: the
    matrix's rows) to its ``output_axis`` axes (its outputs: the columns). Every other
    axis is a *batch* axis: each slice along the batch axes is a matrix of its own (as in
    ``optax.contrib.MuonDimensionNumbers``; e.g. the ``(layers, in, out)`` kernel of a
    scanned stack of layers is ``DimensionNumbers(1, 2)``). Any object with
    ``reduction_axis`` and ``output_axis`` attributes is accepted in its place, so optax's
    ``GaLoreDimensionNumbers`` and ``MuonDimensionNumbers`` work as they are.

    Flax kernels (``nnx`` and ``linen`` alike), which :func:`default_dimension_numbers`
    recognises from the parameter's name and shape:

    * ``Linear`` / ``Dense`` ``(in, out)`` and ``Embed`` ``(vocab, features)``: ``(0, 1)``;
    * ``Conv`` ``(*window, in, out)``: all axes but the last, then the last;
    * ``MultiHeadAttention``: ``query`` / ``key`` / ``value`` ``(in, heads, head_dim)``:
      ``(0, (1, 2))``; ``out`` ``(heads, head_dim, out)``: ``((0, 1), 2)``;
    * ``LinearGeneral`` ``(*in, *out)``: depends on its ``in_features``; see
      :func:`lore_jax.flax_dimension_numbers`, which reads it from the module.

    Example:
      >>> from lore_jax.subspace import DimensionNumbers, matrix_view
      >>> view = matrix_view((64, 4, 16), DimensionNumbers(0, (1, 2)))
      >>> view.rows, view.cols, view.batch
      (64, 64, 1)
    """

    reduction_axis: int | Sequence[int] = 0
    output_axis: int | Sequence[int] = 1


class MatrixView(NamedTuple):
    """How a leaf of shape ``shape`` is seen as ``batch`` oriented ``(a, b)`` matrices.

    The leaf is transposed to ``perm`` (batch axes, then reduction axes, then output
    axes) and reshaped to ``(batch, rows, cols)``; ``transpose`` is set when ``rows >
    cols``, so that the projection acts along the smaller side ``a``.
    """

    shape: tuple[int, ...]
    perm: tuple[int, ...]
    batch: int
    rows: int
    cols: int
    transpose: bool

    @property
    def a(self) -> int:
        return min(self.rows, self.cols)

    @property
    def b(self) -> int:
        return max(self.rows, self.cols)


def is_dimension_numbers(x: Any) -> bool:
    """Whether ``x`` is a dimension-numbers spec (has ``reduction_axis`` and ``output_axis``)."""
    return hasattr(x, "reduction_axis") and hasattr(x, "output_axis")


def _axes(value: Any, ndim: int, field: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    axes = (value,) if isinstance(value, (int, np.integer)) else tuple(value)
    for ax in axes:
        if isinstance(ax, bool) or not isinstance(ax, (int, np.integer)) or not -ndim <= ax < ndim:
            raise ValueError(
                f"{field}={value!r} is not a valid axis (or tuple of axes) of a leaf of shape "
                f"{shape}; use integers in [-{ndim}, {ndim})."
            )
    return tuple(int(ax) % ndim for ax in axes)


def matrix_view(shape: Sequence[int], dims: Any = None) -> MatrixView | None:
    """The oriented matrix view of a leaf of this shape.

    Args:
      shape: the leaf's shape.
      dims: a :class:`DimensionNumbers`; ``None`` takes every axis but the last as the
        reduction axes and the last as the output axis (Flax's ``(..., in, out)`` kernel
        layout; scalars and vectors are not matrices).

    Returns:
      The :class:`MatrixView`, or ``None`` for a scalar or vector without ``dims``.

    Raises:
      ValueError: axes out of range, overlapping, or an empty side.
    """
    shape = tuple(int(s) for s in shape)
    ndim = len(shape)
    if dims is None:
        if ndim < 2:
            return None
        dims = DimensionNumbers(tuple(range(ndim - 1)), ndim - 1)
    if ndim < 2:
        raise ValueError(
            f"dimension numbers {dims} were given for a leaf of shape {shape}, which is not "
            f"a matrix; give None for it (it is then sent dense)."
        )
    red = _axes(dims.reduction_axis, ndim, "reduction_axis", shape)
    out = _axes(dims.output_axis, ndim, "output_axis", shape)
    if not red or not out or set(red) & set(out) or len(set(red + out)) != len(red + out):
        raise ValueError(
            f"dimension numbers {dims} do not split a leaf of shape {shape} into disjoint, "
            f"non-empty reduction and output axes."
        )
    batch_axes = tuple(ax for ax in range(ndim) if ax not in red + out)
    rows = math.prod(shape[ax] for ax in red)
    cols = math.prod(shape[ax] for ax in out)
    batch = math.prod(shape[ax] for ax in batch_axes)
    return MatrixView(shape, batch_axes + red + out, batch, rows, cols, rows > cols)


def default_dimension_numbers(path: Sequence[Any], shape: Sequence[int]) -> DimensionNumbers | None:
    """The matrix a parameter forms by default, from its name and shape (Flax conventions).

    * scalars, vectors and leaves named ``bias`` or ``scale`` (Flax's biases, per-head
      biases ``(heads, head_dim)`` and norm scales): ``None``, not a matrix (sent dense);
    * 2-D leaves: ``(0, 1)``;
    * N-D kernels of the attention projections ``query``, ``key``, ``value``
      ``(in, heads, head_dim)``: ``(0, (1, ..., n-1))``;
    * any other N-D leaf (Conv ``(*window, in, out)``, attention ``out`` ``(heads,
      head_dim, out)``): all axes but the last, then the last.

    Args:
      path: the leaf's key path (``jax.tree_util`` keys or plain names).
      shape: its shape.
    """
    names = [str(k) for k in path]
    n = len(shape)
    if n < 2 or (names and names[-1] in ("bias", "scale")):
        return None
    if n == 2:
        return DimensionNumbers(0, 1)
    if len(names) >= 2 and names[-2] in ("query", "key", "value"):
        return DimensionNumbers(0, tuple(range(1, n)))
    return DimensionNumbers(tuple(range(n - 1)), n - 1)


def resolve_views(tree: Any, weight_dimension_numbers: Any = None) -> list[MatrixView | None]:
    """The matrix view of every leaf of ``tree`` (in ``jax.tree.leaves`` order).

    Args:
      tree: parameters or gradients.
      weight_dimension_numbers: optax's convention. ``None``: the default
        (:func:`default_dimension_numbers`); one :class:`DimensionNumbers`: every leaf with
        at least 2 dimensions; a pytree of them with ``None`` for leaves that are not
        matrices, matched to ``tree`` by key path (a subtree may be given one entry); or a
        callable ``tree -> pytree``.

    Raises:
      ValueError: a leaf the given pytree has no entry for, or bad axes (naming the leaf).
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    dims = weight_dimension_numbers
    if callable(dims) and not is_dimension_numbers(dims):
        dims = dims(tree)
    if dims is None:
        chosen = [default_dimension_numbers(collectives.path_keys(p), np.shape(x))
                  for p, x in flat]
    elif is_dimension_numbers(dims):
        chosen = [dims if np.ndim(x) >= 2 else None for _, x in flat]
    else:
        table = {collectives.path_keys(p): d for p, d in jax.tree_util.tree_flatten_with_path(
            dims, is_leaf=lambda d: d is None or is_dimension_numbers(d))[0]}
        chosen = [_lookup(table, collectives.path_keys(p)) for p, _ in flat]
    views = []
    for (path, x), d in zip(flat, chosen, strict=True):
        try:
            views.append(None if d is None else matrix_view(np.shape(x), d))
        except ValueError as e:
            raise ValueError(f"weight_dimension_numbers for leaf "
                             f"{jax.tree_util.keystr(path)}: {e}") from None
    return views


def _lookup(table: dict, keys: tuple) -> Any:
    for n in range(len(keys), -1, -1):
        if keys[:n] in table:
            return table[keys[:n]]
    raise ValueError(
        f"weight_dimension_numbers has no entry for the leaf {list(keys)}; give it a "
        f"DimensionNumbers, or None to keep it dense (entries it has: "
        f"{[list(k) for k in list(table)[:6]]}...)."
    )


def arrange(x: jax.Array, view: MatrixView) -> jax.Array:
    """Leaf -> ``(batch, rows, cols)``, its matrices in their own dtype (not oriented)."""
    return jnp.transpose(x, view.perm).reshape(view.batch, view.rows, view.cols)


def unarrange(m: jax.Array, view: MatrixView) -> jax.Array:
    """Inverse of :func:`arrange`."""
    permuted = tuple(view.shape[ax] for ax in view.perm)
    return jnp.transpose(m.reshape(permuted), np.argsort(view.perm))


def to_matrices(x: jax.Array, view: MatrixView) -> jax.Array:
    """Leaf -> ``(batch, a, b)`` float32 oriented matrices."""
    m = arrange(x, view).astype(jnp.float32)
    return jnp.swapaxes(m, -1, -2) if view.transpose else m


def from_matrices(m: jax.Array, view: MatrixView, dtype: Any) -> jax.Array:
    """Inverse of :func:`to_matrices`, cast back to the leaf's dtype."""
    m = jnp.swapaxes(m, -1, -2) if view.transpose else m
    return unarrange(m, view).astype(dtype)


def orient(x: jax.Array, view: MatrixView) -> jax.Array:
    """A one-matrix leaf -> its ``(a, b)`` float32 view (reshape, then transpose if tall)."""
    if view.batch != 1:
        raise ValueError(f"orient takes a one-matrix view; {view} holds {view.batch}.")
    return to_matrices(x, view)[0]


def unorient(m: jax.Array, view: MatrixView, dtype: Any) -> jax.Array:
    """Inverse of :func:`orient`, cast back to the leaf's dtype."""
    return from_matrices(m[None], view, dtype)


def fix_signs(u: jax.Array) -> jax.Array:
    """Deterministic sign convention: each column's largest-magnitude entry is positive."""
    idx = jnp.argmax(jnp.abs(u), axis=-2, keepdims=True)
    s = jnp.sign(jnp.take_along_axis(u, idx, axis=-2))
    return u * jnp.where(s == 0, 1.0, s)


def svd_basis(h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Complete left singular basis of each ``(a, b)`` matrix, ``a <= b``.

    Args:
      h: ``(..., a, b)`` float32.

    Returns:
      ``(U, S)``: ``U`` of shape ``(..., a, a)`` with columns ordered by decreasing
      singular value and signs fixed by :func:`fix_signs`; ``S`` of shape ``(..., a)``.
    """
    u, s, _ = jnp.linalg.svd(h.astype(jnp.float32), full_matrices=False)
    return fix_signs(u), s


def orthonormal_columns(y: jax.Array) -> jax.Array:
    """The Q factor of the reduced QR of each ``(a, p)`` matrix, ``p <= a``: ``(..., a, p)``."""
    return jnp.linalg.qr(y.astype(jnp.float32))[0]


def coordinates(u: jax.Array, h: jax.Array) -> jax.Array:
    """``Z = U^T H``: ``(..., a, a) x (..., a, b) -> (..., a, b)``."""
    return jnp.einsum("...xj,...xb->...jb", u, h)


def probe_scores(z: jax.Array, probes: jax.Array) -> jax.Array:
    """Signed Gaussian-probe scores ``lam[p, ..., j] = <Z[..., j, :], v[p, ..., j, :]>``.

    Args:
      z: ``(..., a, b)`` coordinates.
      probes: ``(num_probes, ..., a, b)`` standard normal probes.

    Returns:
      ``(num_probes, ..., a)``. Average these over devices *before* squaring:
      ``E[mean(lam)^2] = ||u_j^T H_bar||^2``.
    """
    return jnp.sum(z[None] * probes, axis=-1)


def greedy_select(scores: jax.Array, rank: int) -> jax.Array:
    """Indices of the ``rank`` largest scores along the last axis (ties: lower index).

    ``jax.lax.top_k`` is stable, so every device selects the same ``J`` from the same
    replicated scores.
    """
    return jax.lax.top_k(scores, rank)[1]


def take_columns(u: jax.Array, idx: jax.Array) -> jax.Array:
    """``P = U[..., :, J]``: ``(..., a, a), (..., r) -> (..., a, r)``."""
    # Indices come from greedy_select, so always in bounds: "clip" skips the bounds
    # masking of the default gather, which dominated its cost.
    return jnp.take_along_axis(u, idx[..., None, :], axis=-1, mode="clip")


def take_rows(z: jax.Array, idx: jax.Array) -> jax.Array:
    """``R = Z[..., J, :]``: ``(..., a, b), (..., r) -> (..., r, b)``."""
    return jnp.take_along_axis(z, idx[..., :, None], axis=-2, mode="clip")


def reconstruct(p: jax.Array, r: jax.Array) -> jax.Array:
    """``P R``: ``(..., a, r) x (..., r, b) -> (..., a, b)``."""
    return jnp.einsum("...ar,...rb->...ab", p, r)


def exact_greedy_project(u: jax.Array, h: jax.Array, rank: int) -> jax.Array:
    """Projection of ``h`` onto its ``rank`` highest-energy directions of the basis ``u``.

    The deterministic (exact-energy) greedy compressor: for any complete orthonormal
    ``u``, ``||C(h) - h||^2 <= (1 - rank / a) ||h||^2`` (the contraction of Chen et al.
    2025's greedy selection, without its probes).
    """
    z = coordinates(u, h)
    idx = greedy_select(jnp.sum(z * z, axis=-1), rank)
    return reconstruct(take_columns(u, idx), take_rows(z, idx))
