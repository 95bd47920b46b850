"""Low-rank subspace math shared by GreedyLore and the low-rank compressors.

All functions act on *batches* of oriented matrices: an ``(a, b)`` view of a gradient
with ``a = min(m, n) <= b = max(m, n)``, stacked along a leading axis of length ``k``
(same-shape matrices are handled with one batched SVD / matmul). Everything runs in
float32 (SVD and QR refuse bfloat16, and bfloat16 bases lose orthonormality).

Notation (GreedyLore spec, section 1): ``U`` is a complete ``a x a`` orthonormal basis
(columns ``u_j``), ``Z = U^T H`` the coordinates of ``H`` in it, ``J`` the ``r`` selected
directions, ``P = U[:, J]``, ``R = P^T H = Z[J, :]`` and the reconstruction ``P R``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp


class MatrixView(NamedTuple):
    """How a leaf of shape ``shape`` is seen as an oriented ``(a, b)`` matrix.

    Leaves with ``ndim > 2`` (conv kernels, Flax layout ``(..., in, out)``) are flattened to
    ``(prod(shape[:-1]), shape[-1])``; ``transpose`` is set when that matrix has more rows
    than columns, so that the projection acts along the smaller side ``a``.
    """

    shape: tuple[int, ...]
    rows: int
    cols: int
    transpose: bool

    @property
    def a(self) -> int:
        return min(self.rows, self.cols)

    @property
    def b(self) -> int:
        return max(self.rows, self.cols)


def matrix_view(shape: Sequence[int]) -> MatrixView | None:
    """The oriented matrix view of a leaf, or ``None`` for scalars and vectors."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        return None
    rows, cols = math.prod(shape[:-1]), shape[-1]
    return MatrixView(shape, rows, cols, rows > cols)


def orient(x: jax.Array, view: MatrixView) -> jax.Array:
    """Leaf -> its ``(a, b)`` float32 view (reshape, then transpose if tall)."""
    m = x.reshape(view.rows, view.cols).astype(jnp.float32)
    return m.T if view.transpose else m


def unorient(m: jax.Array, view: MatrixView, dtype: jnp.dtype) -> jax.Array:
    """Inverse of :func:`orient`, cast back to the leaf's dtype."""
    m = m.T if view.transpose else m
    return m.reshape(view.shape).astype(dtype)


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


def subspace_iteration_basis(
    h: jax.Array, u_prev: jax.Array, rank: int, iters: int = 1, oversample: int = 8
) -> tuple[jax.Array, jax.Array]:
    """Fast approximate refresh: block power iteration warm-started from the old basis.

    The leading ``p = min(a, rank + oversample)`` columns of ``u_prev`` (the previous
    top directions) are refined by ``iters`` steps of ``Q <- qr(H H^T Q)``, followed by a
    Rayleigh-Ritz rotation (an eigendecomposition of the small ``p x p`` Gram matrix
    ``(Q^T H)(Q^T H)^T``) that orders them by captured energy: the new block ``T``.

    The rest of the basis is completed without an ``O(a^3)`` factorization. In the old
    basis's coordinates the new block is ``C = U_prev^T T`` (``a x p``, orthonormal
    columns); rotate its columns, ``C' = C O``, so that its top ``p x p`` block ``C1'`` is
    symmetric positive semidefinite (``O`` from the SVD of ``C_1``). The block reflector
    ``F = I - (E + C') (I + C1')^{-1} (E + C')^T``, ``E = [I_p; 0]``, is symmetric and
    orthogonal and maps ``E`` to ``-C'``, so its last ``a - p`` columns span the complement
    of ``C``, and ``U_prev F[:, p:]`` completes ``T``. ``I + C1'`` has eigenvalues in
    ``[1, 2]`` whatever ``T`` is, so the completion is orthogonal to ``T`` to rounding even
    when ``T`` meets the old trailing span (a low-rank or zero gradient); it equals the old
    trailing columns when ``span(T) = span(U_prev[:, :p])`` and moves by ``O(||C_2||)``
    under slow drift. A complete basis keeps the greedy selection contractive.

    Cost ``O(iters * a * b * p + a^2 * p)`` against ``O(a^2 b)`` (with a much larger
    constant) for a full SVD.

    Args:
      h: ``(..., a, b)`` float32 matrix to approximate.
      u_prev: ``(..., a, a)`` previous complete basis (columns sorted by importance).
      rank: the transform's rank ``r``.
      iters: power iterations.
      oversample: extra columns refined beyond ``r``.

    Returns:
      ``(U, S)`` as :func:`svd_basis`, where only the first ``p`` entries of ``S`` are
      estimates (the rest are zero).
    """
    h = h.astype(jnp.float32)
    u_prev = u_prev.astype(jnp.float32)
    a = h.shape[-2]
    p = min(a, rank + oversample)
    q = u_prev[..., :p]
    for _ in range(iters):
        y = h @ (jnp.swapaxes(h, -1, -2) @ q)
        q, _ = jnp.linalg.qr(y)
    small = jnp.swapaxes(q, -1, -2) @ h                      # (..., p, b)
    evals, w = jnp.linalg.eigh(small @ jnp.swapaxes(small, -1, -2))  # ascending
    w, evals = w[..., ::-1], evals[..., ::-1]
    s = jnp.sqrt(jnp.maximum(evals, 0.0))
    top = q @ w                                              # (..., a, p) Ritz vectors
    if p < a:
        c = jnp.swapaxes(u_prev, -1, -2) @ top               # (..., a, p) = C
        left, sig, right_t = jnp.linalg.svd(c[..., :p, :])  # C_1 = A diag(sig) B^T
        c_rot = c @ (jnp.swapaxes(right_t, -1, -2) @ jnp.swapaxes(left, -1, -2))  # C' = C B A^T
        m_inv = (left / (1.0 + sig)[..., None, :]) @ jnp.swapaxes(left, -1, -2)  # (I + C1')^-1
        w = u_prev[..., :p] + u_prev @ c_rot                 # U_prev (E + C')
        rest = u_prev[..., p:] - (w @ m_inv) @ jnp.swapaxes(c_rot[..., p:, :], -1, -2)
        u = jnp.concatenate([top, rest], axis=-1)
        s = jnp.concatenate([s, jnp.zeros(s.shape[:-1] + (a - p,), s.dtype)], axis=-1)
    else:
        u = top
    return fix_signs(u), s


def coordinates(u: jax.Array, h: jax.Array) -> jax.Array:
    """``Z = U^T H``: ``(..., a, a) x (..., a, b) -> (..., a, b)``."""
    return jnp.einsum("...xj,...xb->...jb", u, h)


def probe_scores(z: jax.Array, probes: jax.Array) -> jax.Array:
    """Signed Gaussian-probe scores ``lam[p, ..., j] = <Z[..., j, :], v[p, ..., j, :]>``.

    Args:
      z: ``(..., a, b)`` coordinates.
      probes: ``(num_probes, ..., a, b)`` standard normal probes.

    Returns:
      ``(num_probes, ..., a)``. Average these over devices *before* squaring (spec
      pitfall 3): ``E[mean(lam)^2] = ||u_j^T H_bar||^2``.
    """
    return jnp.sum(z[None] * probes, axis=-1)


def shared_probe_scores(u: jax.Array, h: jax.Array, probes: jax.Array) -> jax.Array:
    """Signed scores from one probe shared by all directions: ``lam = U^T (H v)``.

    ``lam[p, ..., j] = u_j^T H v_p``, at O(ab + a^2) per probe instead of the O(a^2 b) of
    ``Z = U^T H``. Each score has the law of :func:`probe_scores`'s,
    ``N(0, ||u_j^T H||^2)``; the scores of different directions are correlated through
    ``Z Z^T`` (independent when ``U`` diagonalises ``H H^T``).

    Args:
      u: ``(..., a, a)`` orthonormal basis (columns).
      h: ``(..., a, b)`` matrices.
      probes: ``(num_probes, ..., b)`` standard normal probes.

    Returns:
      ``(num_probes, ..., a)``; as for :func:`probe_scores`, average over devices before
      squaring.
    """
    # Written as (H V)^T U with the probes as columns: XLA:CPU runs this form several
    # times faster than the equivalent einsum (a transposed matrix-vector product there
    # takes a slow path); the result is the same.
    hv = h @ jnp.moveaxis(probes, 0, -1)                        # (..., a, num_probes)
    return jnp.moveaxis(jnp.swapaxes(hv, -1, -2) @ u, -2, 0)    # (num_probes, ..., a)


def greedy_select(scores: jax.Array, rank: int) -> jax.Array:
    """Indices of the ``rank`` largest scores along the last axis (ties: lower index).

    ``jax.lax.top_k`` is stable, so every device selects the same ``J`` from the same
    replicated scores (spec pitfall 4).
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
    ``u``, ``||C(h) - h||^2 <= (1 - rank / a) ||h||^2`` (spec section 2.2).
    """
    z = coordinates(u, h)
    idx = greedy_select(jnp.sum(z * z, axis=-1), rank)
    return reconstruct(take_columns(u, idx), take_rows(z, idx))
