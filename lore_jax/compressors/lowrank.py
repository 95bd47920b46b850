"""Low-rank compressors: PowerSGD, random projection and greedy SVD selection.

They act on a leaf's oriented ``(a, b)`` matrix view (``a = min, b = max`` of its two sides;
see :func:`lore_jax.subspace.matrix_view`) and project along the smaller side ``a``.
Scalars and vectors, and matrices for which the low-rank payload would not be smaller
than the dense leaf, are sent dense (the identity compressor).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lore_jax import subspace
from lore_jax.compressors import base
from lore_jax.compressors.base import Compressor


def _view(shape, rank: int, floats_per_rank) -> subspace.MatrixView | None:
    """The matrix view of a leaf that is compressed, or ``None`` when it is sent dense.

    A leaf is compressed when ``rank < a`` and its payload, ``rank * floats_per_rank(a, b)``
    floats, is smaller than the ``a b`` floats of the dense leaf.
    """
    view = subspace.matrix_view(shape)
    if view is None or rank >= view.a or rank * floats_per_rank(view.a, view.b) >= view.a * view.b:
        return None
    return view


def _first(tree):
    return jax.tree.map(lambda t: t[0], tree)


def _lowrank(name, kind, linear, rank, floats_per_rank, compress_groups, decompress_group,
             constant, seed_bits=0, init=None, next_state=None):
    """Wraps the stack-level functions into a :class:`Compressor` with the dense fallback.

    ``compress_groups(keys, ms, states, mean)`` and ``decompress_group(payload, shared)``
    act on stacks of oriented matrices (:class:`lore_jax.compressors.base.MatrixGroups`);
    one leaf is compressed as a stack of one.
    """

    def view_of(shape):
        return _view(shape, rank, floats_per_rank)

    def compress(key, x, state=None, mean=None):
        view = view_of(x.shape)
        if view is None:
            return base.DENSE.compress(key, x)
        each = (lambda xs: xs) if mean is None else (lambda xs: [mean(t) for t in xs])
        keys = None if key is None else [jnp.stack([key])]
        states = [None if state is None else jax.tree.map(lambda t: t[None], state)]
        payloads, shared = compress_groups(keys, [subspace.orient(x, view)[None]], states, each)
        return _first(payloads[0]), base.context(x, _first(shared[0]))

    def decompress(payload, ctx):
        view = view_of(ctx.shape)
        if view is None:
            return base.DENSE.decompress(payload, ctx)
        stacked = jax.tree.map(lambda t: t[None], (payload, ctx.shared))
        return subspace.unorient(decompress_group(*stacked)[0], view, ctx.dtype)

    def matrix_bits(a, b):
        return 32 * rank * floats_per_rank(a, b)

    def bits(shape, dtype=jnp.float32):
        view = view_of(shape)
        if view is None:
            return base.DENSE.bits(shape, dtype)
        return matrix_bits(view.a, view.b) + seed_bits

    def payload_bits(payload, ctx):
        view = view_of(ctx.shape)
        if view is None:
            return base.tree_bits(payload)
        return matrix_bits(view.a, view.b)

    def constant_fn(shape, v):
        if view_of(shape) is None:
            return 1.0
        return constant(subspace.matrix_view(shape))

    extra = {}
    if init is not None:
        def init_fn(key, shape, dtype):
            view = view_of(shape)
            return None if view is None else init(key, view.a, view.b)

        def next_state_fn(state, mean_payload, ctx):
            if view_of(ctx.shape) is None:
                return state
            return next_state(state, mean_payload)

        extra = {"init": init_fn, "next_state": next_state_fn}
    groups = base.MatrixGroups(view=view_of, compress=compress_groups,
                               decompress=decompress_group, bits=matrix_bits,
                               next_state=next_state)
    return Compressor(
        name=name, kind=kind, linear=linear, compress=compress, decompress=decompress,
        bits=bits, payload_bits=payload_bits, constant=constant_fn, matrix=True,
        groups=groups, **extra,
    )


def _orthonormal(p: jax.Array) -> jax.Array:
    """The Q factors of a stack ``(k, a, r)`` (one LAPACK call per matrix on CPU)."""
    return subspace.per_matrix(subspace.orthonormal_columns, p)


def _t(m: jax.Array) -> jax.Array:
    return jnp.swapaxes(m, -1, -2)


def _transposed_factors(ms: list[jax.Array], p_hats: list[jax.Array]) -> list[jax.Array]:
    """``Q_i^T = P_hat^T M_i``, ``(k, r, b)`` per stack: XLA:CPU runs this form about 5x
    faster than ``Q_i = M_i^T P_hat`` (whose transposed ``a x b`` operand takes a slow
    path); the values are the same."""
    return [_t(p) @ m for m, p in zip(ms, p_hats, strict=True)]


def powersgd(rank: int, iters: int = 1) -> Compressor:
    """PowerSGD: rank-``r`` power iteration on the mean gradient, warm-started.

    With ``M_i`` the oriented ``(a, b)`` matrix on device ``i`` and ``Q`` the replicated
    ``(b, r)`` warm start (the previous step's averaged factor): ``P = mean_i(M_i Q)``
    (all-reduce #1), ``P_hat = orthonormalize(P)``, ``Q_i = M_i^T P_hat`` (the payload,
    all-reduce #2, sent as the ``(r, b)`` matrix ``Q_i^T = P_hat^T M_i``), reconstruction
    ``P_hat mean_i(Q_i)^T``. Each extra iteration repeats
    ``Q = mean_i(M_i^T P_hat)`` and the ``P`` step. The local reconstruction
    ``P_hat Q_i^T = P_hat P_hat^T M_i`` is linear in ``M_i`` for the shared ``P_hat``, so
    error feedback uses it and payloads are all-reduced. It is a projection (never
    expansive) but has no contraction constant: a warm start orthogonal to the
    gradient's row space captures nothing, so it declares kind ``"none"``; use it with
    error feedback, as Vogels et al. do.

    Bits: ``32 r (a + b) * iters`` per matrix (all rounds); dense leaves as the identity
    (``32 d`` for float32).

    Args:
      rank: ``r >= 1``.
      iters: power iterations per step, ``>= 1``.

    Returns:
      A :class:`Compressor` (kind ``"none"``, linear, with state: the ``(b, r)`` float32
      warm start ``Q`` per compressed leaf, initialised from a standard normal).

    References:
      Vogels, Karimireddy, Jaggi, "PowerSGD: Practical low-rank gradient compression for
      distributed optimization", NeurIPS 2019.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from lore_jax import compressors
      >>> q = compressors.powersgd(rank=2)
      >>> state = q.init(jax.random.key(0), (8, 16), jnp.float32)
      >>> payload, ctx = q.compress(None, jnp.ones((8, 16)), state)
      >>> q.decompress(payload, ctx).shape, q.bits((8, 16))
      ((8, 16), 1536)
    """
    base.check_int("rank", rank)
    base.check_int("iters", iters)

    def floats(a, b):
        return (a + b) * iters

    def init(key, a, b):
        return jax.random.normal(key, (b, rank), jnp.float32)

    def compress_groups(keys, ms, states, mean):
        qs = [jax.vmap(lambda k, m=m: init(k, *m.shape[1:]))(ks) if q is None else q
              for ks, m, q in zip(keys or [None] * len(ms), ms, states, strict=True)]
        for it in range(iters):
            p_hats = [_orthonormal(p) for p in mean([m @ q for m, q in zip(ms, qs, strict=True)])]
            if it < iters - 1:
                qs = [_t(q_t) for q_t in mean(_transposed_factors(ms, p_hats))]
        return _transposed_factors(ms, p_hats), p_hats

    def decompress_group(q_t, p_hat):
        return p_hat @ q_t

    return _lowrank(
        f"powersgd(rank={rank}, iters={iters})", "none", True, rank, floats, compress_groups,
        decompress_group, None, init=init,
        next_state=lambda state, mean_payload: _t(mean_payload),
    )


def random_projection(rank: int, *, unbiased: bool = False) -> Compressor:
    """Projection onto a random ``r``-dimensional subspace drawn from the shared key.

    ``P`` (``a x r``, orthonormal) is the Q factor of a Gaussian matrix, so its span is
    uniform (Haar) and ``E[P P^T] = (r/a) I``. The payload is ``R = P^T M`` (``r x b``), the
    reconstruction ``P R``. Every device draws the same ``P``, so it is linear and
    all-reduced. Without scaling (GoLore's projection) ``E||P P^T M - M||^2 = (1 - r/a)
    ||M||^2``: a contraction in expectation with ``delta = r / a``. With ``unbiased`` the
    reconstruction is scaled by ``a / r``: unbiased with ``alpha = a / r`` exactly (both
    follow from ``E[P P^T] = (r/a) I``, in the framework of Khirirat et al. 2018). A new
    subspace is drawn at every call (every step under
    :func:`lore_jax.compressed_mean`).

    Bits: ``32 r b + 32`` per matrix (the factor and the seed; the seed comes from the
    replicated key and is not sent); dense leaves as the identity
    (``32 d`` for float32).

    Args:
      rank: ``r >= 1``.
      unbiased: scale by ``a / r``.

    Returns:
      A :class:`Compressor` (kind ``"contractive"``, or ``"unbiased"``; linear).

    References:
      He, Huang, Yuan, "Subspace optimization for large language models with convergence
      guarantees" (GoLore), ICML 2025.

    Examples:
      >>> from lore_jax import compressors
      >>> q = compressors.random_projection(rank=2)
      >>> q.bits((8, 16)), q.delta((8, 16))
      (1056, 0.25)
    """
    base.check_int("rank", rank)

    def floats(a, b):
        return b

    def compress_groups(keys, ms, states, mean):
        del states, mean
        ps = [_orthonormal(jax.vmap(lambda k, a=m.shape[1]: jax.random.normal(
            k, (a, rank), jnp.float32))(ks)) for ks, m in zip(keys, ms, strict=True)]
        return [_t(p) @ m for p, m in zip(ps, ms, strict=True)], ps

    def decompress_group(r, p):
        out = p @ r
        return out * (p.shape[-2] / rank) if unbiased else out

    def constant(view):
        return view.a / rank if unbiased else rank / view.a

    kind = "unbiased" if unbiased else "contractive"
    name = f"random_projection(rank={rank}{', unbiased' if unbiased else ''})"
    return _lowrank(name, kind, True, rank, floats, compress_groups, decompress_group,
                    constant, seed_bits=32)


def greedy_svd(rank: int) -> Compressor:
    """Greedy SVD selection: the ``r`` highest-energy directions of the local SVD basis.

    ``U`` is the complete left singular basis of the oriented ``M`` (``a x a``), ``Z = U^T M``
    its coordinates; the ``r`` rows of ``Z`` with the largest energy ``||Z_j||^2`` are kept
    (exact greedy selection, :func:`lore_jax.subspace.exact_greedy_project`): payload
    ``P = U[:, J]`` (``a x r``) and ``R = Z[J, :]`` (``r x b``), reconstruction ``P R``, the best
    rank-``r`` approximation. The selected energy is at least ``r/a`` of the total (the
    ``r`` largest of ``a`` row energies hold at least ``r/a`` of their sum), so it is a
    contraction with ``delta = r / a``. The basis is local, so payloads are all-gathered.

    Bits: ``32 r (a + b)`` per matrix; dense leaves as the identity
    (``32 d`` for float32).

    Args:
      rank: ``r >= 1``.

    Returns:
      A :class:`Compressor` (kind ``"contractive"``, not linear).

    References:
      Chen, He, Li, Jia, Yuan, "GreedyLore: Greedy low-rank gradient compression for
      distributed learning with convergence guarantees", arXiv:2507.08784.

    Examples:
      >>> from lore_jax import compressors
      >>> q = compressors.greedy_svd(rank=2)
      >>> q.bits((8, 16)), q.delta((8, 16))
      (1536, 0.25)
    """
    base.check_int("rank", rank)

    def floats(a, b):
        return a + b

    def compress_one(m):
        u, _ = subspace.svd_basis(m)
        z = subspace.coordinates(u, m)
        idx = subspace.greedy_select(jnp.sum(z * z, axis=-1), rank)
        return subspace.take_columns(u, idx), subspace.take_rows(z, idx)

    def compress_groups(keys, ms, states, mean):
        del keys, states, mean
        payloads = [subspace.per_matrix(compress_one, m) for m in ms]
        return payloads, [None] * len(ms)

    def decompress_group(payload, shared):
        del shared
        return subspace.reconstruct(*payload)

    return _lowrank(f"greedy_svd(rank={rank})", "contractive", False, rank, floats,
                    compress_groups, decompress_group, lambda view: rank / view.a)
