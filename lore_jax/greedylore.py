"""GreedyLore: greedy low-rank gradient compression with error feedback.

Runs inside ``jax.shard_map`` (or ``jax.pmap``) on each device's local gradients: each
weight matrix is sent as its ``r`` best directions in a shared orthonormal basis, and the
mean gradient rebuilt from them (the same on every device) goes to the base optimizer::

    tx = optax.chain(lore_jax.greedylore(4, axis_name="data"), optax.adam(1e-3))

``tracking="range"`` (default): the basis follows the gradient every compressed step by a
warm-started randomized range finder, and a group of ``k`` same-shape matrices shares its
``k r`` best directions. ``tracking="off"`` (``**GREEDYLORE_PAPER``): the paper's
algorithm exactly. For one ``a x b`` matrix on device ``i`` at step ``t`` (0-based), with
the function implementing each line (Chen et al. 2025, Algorithms 2-3, eqs. (9)-(10)):

.. code-block:: text

    H_i = g_i + E_i                                  EF14              compressed_mean
    t < t0:               out = mean_i H_i           dense warm-up     _dense_phase
    (t - t0) % tau == 0:  U = svd(mean_i H_i).U      exact refresh     _refresh_phase
                          out = mean_i H_i,  E_i = 0 (range: Q = Hbar^T U[:, :r])
    otherwise:                                                         _paper_step
      score   lam_j = mean_i <(U^T H_i)[j], v_j>     all-reduce #1: p a floats
      select  J = top_r(lam_j ** 2)                  square after averaging
      send    R = mean_i U_J^T H_i                   all-reduce #2: r b floats
      rebuild out = U_J R,  E_i = H_i - U_J U_J^T H_i
    range, otherwise:                                                  _range_step
      score   Y = mean_i H_i W,  W = [qr(Q), v']     all-reduce #1: a (r + p) floats
              U, sigma = svd(Y)                      Ritz vectors: the candidates
      select  J = top_{k r}(sigma ** 2) over the group's k matrices
      send    R = mean_i U_J^T H_i                   all-reduce #2: r b floats
      rebuild out = U_J R + (I - U_J U_J^T) Y W^+   (E_i likewise),  Q = R^T

``tau`` is ``update_interval`` (range tracking: only the first refresh, unless given).
Derivations and design choices: ``docs/greedylore_derivations.md``.

References:
  Chen, He, Li, Jia, Yuan. "Greedy Low-Rank Gradient Compression for Distributed
  Learning with Convergence Guarantees". arXiv:2507.08784 (v4, IEEE TSP), 2025.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from typing import Any, Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lore_jax import accounting, collectives, subspace
from lore_jax import error_feedback as ef
from lore_jax.compressed_mean import pipeline
from lore_jax.compressors.base import Compressor, MatrixGroups

Tracking = Literal["range", "off"]

#: Values of :func:`greedylore`'s ``tracking`` argument.
TRACKING_KINDS: tuple[str, ...] = get_args(Tracking)


class GreedyLoreBasis(NamedTuple):
    """GreedyLore's state of a group of ``k`` same-shape oriented ``a x b`` matrices
    (replicated), one per group in :class:`lore_jax.CompressedMeanState`'s
    ``compressor_state``, in the order of the groups' first leaves."""

    basis: jax.Array
    """float32 ``(k, a, a)``: complete orthonormal bases (columns); with
    ``tracking="range"`` the last step's ``c = min(a, r + p)`` Ritz vectors ``(k, a, c)``."""
    factor: jax.Array | None
    """float32 ``(k, b, r)``: range tracking's factors ``Q``; ``None`` with ``tracking="off"``."""


class _Group(NamedTuple):
    """A stack of ``k`` same-shape oriented ``a x b`` matrices, ``rank`` directions each."""

    a: int
    b: int
    rank: int
    k: int


class _Config(NamedTuple):
    """The static settings the phase functions read (see :func:`greedylore`'s arguments)."""

    mode: ef.ErrorFeedback
    axis_name: Hashable | None
    warmup_steps: int
    update_interval: int      # 0: only the first refresh
    num_probes: int
    tracking: str


class _Phase(NamedTuple):
    """What a phase returns, per group: local and mean reconstructions, the new bases and
    the new tracking factors."""

    c_local: list[jax.Array]
    c_bar: list[jax.Array]
    basis: tuple[jax.Array, ...]
    factor: tuple[jax.Array, ...]


_WARMUP, _REFRESH, _COMPRESSED = 0, 1, 2


def _phase_index(cfg: _Config, t: jax.Array) -> jax.Array:
    """The branch step ``t`` runs: warm-up, refresh or compressed."""
    since = t - cfg.warmup_steps
    in_cycle = since % cfg.update_interval if cfg.update_interval else since
    return jnp.where(since < 0, _WARMUP, jnp.where(in_cycle == 0, _REFRESH, _COMPRESSED))


# ----------------------------------------------------------------------------- phases


def _dense_phase(cfg: _Config, xs: list[jax.Array], basis: tuple, factor: tuple) -> _Phase:
    """Warm-up, ``t < t0``: ``out = mean_i H_i``, the identity compressor (EF resets)."""
    return _Phase(xs, collectives.pmean(xs, cfg.axis_name), basis, factor)


def _refresh_phase(cfg: _Config, groups: list[_Group], xs: list[jax.Array], basis: tuple,
                   factor: tuple) -> _Phase:
    """Refresh, ``(t - t0) % tau == 0``: ``Hbar = mean_i H_i``, ``U = svd(Hbar).U`` in
    float32, ``out = Hbar`` (a dense step, so the EF14 memory resets); range tracking
    keeps ``U``'s leading columns and the warm start ``Q = Hbar^T U[:, :r]``."""
    c_bar = collectives.pmean(xs, cfg.axis_name)
    basis = tuple(subspace.per_matrix(_exact_basis, h)[..., :u.shape[-1]]
                  for h, u in zip(c_bar, basis, strict=True))
    if cfg.tracking == "range":
        factor = tuple(jnp.swapaxes(h, -1, -2) @ u[..., :g.rank]
                       for g, h, u in zip(groups, c_bar, basis, strict=True))
    return _Phase(xs, c_bar, basis, factor)


def _paper_step(cfg: _Config, groups: list[_Group], xs: list[jax.Array], basis: tuple,
                key: jax.Array) -> _Phase:
    """The paper's compressed step (``tracking="off"``), every group at once.

    Score each direction of the frozen basis by independent Gaussian probes averaged
    over devices (eq. (9)), select the ``r`` highest squared scores per matrix, send
    their coordinates and rebuild (eq. (10)).
    """
    # score: lam[p, j] = <Z_i[j], v_pj>, Z_i = U^T H_i computed once for scores and R
    zs = [subspace.coordinates(u, x) for u, x in zip(basis, xs, strict=True)]
    vs = _draw_probes(cfg, key, [z.shape for z in zs])
    lams = collectives.pmean([subspace.probe_scores(z, v) for z, v in zip(zs, vs, strict=True)],
                             cfg.axis_name)                              # all-reduce #1
    scores = [jnp.mean(lam * lam, axis=0) for lam in lams]              # square after mean
    # select: J = top_r(score), (k, r) per matrix
    sels = [subspace.greedy_select(s, g.rank) for g, s in zip(groups, scores, strict=True)]
    # send: R_i = Z_i[J], R = mean_i R_i
    rs = [subspace.take_rows(z, j) for z, j in zip(zs, sels, strict=True)]
    r_bar = collectives.pmean(rs, cfg.axis_name)                         # all-reduce #2
    # reconstruct: U_J R_i (for the error feedback) and U_J R
    us = [subspace.take_columns(u, j) for u, j in zip(basis, sels, strict=True)]
    c_local = [subspace.reconstruct(u, r) for u, r in zip(us, rs, strict=True)]
    c_bar = [subspace.reconstruct(u, r) for u, r in zip(us, r_bar, strict=True)]
    return _Phase(c_local, c_bar, basis, ())


def _range_step(cfg: _Config, groups: list[_Group], xs: list[jax.Array], factor: tuple,
                key: jax.Array) -> _Phase:
    """Range tracking's compressed step, every group at once.

    Score: one round of a randomized range finder warm-started from the last step's
    factor, ``Y = Hbar W`` with ``W = [qr(Q), v']``; the left singular vectors of ``Y``
    (Ritz vectors) are the candidates, scored by their exact energies in ``span(W)``.
    Select a group's ``k r`` best, send their coordinates, rebuild with the part of
    ``Hbar W W^+`` the rows sent miss, and keep ``Q = R^T`` for the next step.
    """
    # score: Y = mean_i H_i W, then its Ritz vectors U and energies sigma^2
    q_hats = [subspace.per_matrix(subspace.orthonormal_columns, q) for q in factor]
    vs = _draw_probes(cfg, key, [x.shape[:-2] + x.shape[-1:] for x in xs])
    ws = [jnp.concatenate([q, jnp.moveaxis(_outside(v, q), 0, -1)], axis=-1)
          for v, q in zip(vs, q_hats, strict=True)]
    sends = [x @ w for x, w in zip(xs, ws, strict=True)]                 # H_i W
    ys = collectives.pmean(sends, cfg.axis_name)                         # all-reduce #1
    us, sigmas = zip(*(subspace.per_matrix(_ritz, y) for y in ys), strict=True)
    scores = [jnp.square(s) for s in sigmas]                             # (k, c)
    # select: the group's k r best, flat indices m c + j
    sels = [subspace.greedy_select(s.reshape(-1), g.k * g.rank)
            for g, s in zip(groups, scores, strict=True)]
    # send: R_i = U_J^T H_i, the rows at those indices
    rs = [_rows_at(subspace.coordinates(u, x), j) for u, x, j in zip(us, xs, sels, strict=True)]
    r_bar = collectives.pmean(rs, cfg.axis_name)                         # all-reduce #2
    # reconstruct: U_J R + (I - U_J U_J^T) Y W^+, locally from H_i W and R_i
    pinvs = [_pseudo_inverse(w, q.shape[-1]) for w, q in zip(ws, q_hats, strict=True)]
    c_local = [_with_columns(u, r, j, y, w, p) for u, r, j, y, w, p in zip(
        us, rs, sels, sends, ws, pinvs, strict=True)]
    c_bar = [_with_columns(u, r, j, y, w, p) for u, r, j, y, w, p in zip(
        us, r_bar, sels, ys, ws, pinvs, strict=True)]
    factor = tuple(_next_factor(g, u, r, j, s, q) for g, u, r, j, s, q in zip(
        groups, us, r_bar, sels, scores, factor, strict=True))
    return _Phase(c_local, c_bar, tuple(us), factor)


# ----------------------------------------------------------------------------- helpers


def _exact_basis(h: jax.Array) -> jax.Array:
    return subspace.svd_basis(h)[0]


def _ritz(y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The ``c = min(a, r + p)`` left singular vectors of ``Y`` ``(a, r + p)`` and their
    singular values."""
    left, sigma, _ = jnp.linalg.svd(y, full_matrices=False)
    return left, sigma


def probe_key(key: jax.Array, t: jax.Array | int) -> jax.Array:
    """Step ``t``'s probe key: ``jax.random.fold_in(key, t)`` (threefry, JAX's default).

    ``key`` is the transform's raw ``uint32[2]`` key, replicated, so every device draws
    the same probes. The draw is portable: the same values on every backend and under
    ``jax.vmap``, at no measurable compile or step cost against XLA's ``RngBitGenerator``
    (``docs/greedylore_derivations.md``, "Probes").

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lore_jax.greedylore import probe_key
      >>> jax.random.normal(probe_key(jnp.zeros(2, jnp.uint32), 3), (4,)).shape
      (4,)
    """
    return jax.random.fold_in(key, t)


def _draw_probes(cfg: _Config, key: jax.Array, shapes: list[tuple[int, ...]]
                 ) -> list[jax.Array]:
    """This step's probes of every group, ``(num_probes, *shape)`` for each of ``shapes``
    (groups in order): one ``normal(key, (n,))``, ``n = num_probes sum_g prod(shape_g)``,
    cut into the groups' blocks in order. One draw for the whole model: a draw per group
    compiles to kernels of its own."""
    sizes = [cfg.num_probes * int(np.prod(s)) for s in shapes]
    flat = jax.random.normal(key, (sum(sizes),), jnp.float32)
    starts = np.cumsum([0] + sizes[:-1])
    return [flat[int(i):int(i) + n].reshape((cfg.num_probes,) + tuple(s))
            for i, n, s in zip(starts, sizes, shapes, strict=True)]


def _outside(v: jax.Array, q_hat: jax.Array) -> jax.Array:
    """Probe columns ``v`` ``(p, k, b)`` with their component in ``span(Q_hat)`` removed:
    ``v (I - Q_hat Q_hat^T)``, ``Q_hat`` ``(k, b, r)`` orthonormal."""
    w = v[..., None, :]
    return (w - (w @ q_hat) @ jnp.swapaxes(q_hat, -1, -2))[..., 0, :]


def _rows_at(z: jax.Array, sel: jax.Array) -> jax.Array:
    """``(k r, b)``: the rows of ``z`` ``(k, c, b)`` at the flat indices ``sel`` ``(k r,)``."""
    return jnp.take(z.reshape(-1, z.shape[-1]), sel, axis=0, mode="clip")


def _scatter_rows(u: jax.Array, r: jax.Array, sel: jax.Array) -> jax.Array:
    """``(k c, b)``: the rows ``r`` at the flat indices ``sel`` over the ``c`` candidate
    columns of ``u`` ``(k, a, c)``, zero elsewhere."""
    k, c = u.shape[0], u.shape[-1]
    return jnp.zeros((k * c, r.shape[-1]), r.dtype).at[sel].set(r, mode="drop")


def _pseudo_inverse(w: jax.Array, rank: int) -> jax.Array:
    """``W^+`` ``(k, r + p, b)`` of range tracking's columns ``W = [Q_hat, V']``.

    ``Q_hat`` (the leading ``rank`` columns) is orthonormal and ``V'`` (the ``p`` probe
    columns) lies outside ``span(Q_hat)``, so ``W^T W = diag(I, V'^T V')`` and ``W^+ =
    [Q_hat^T; (V'^T V' + ridge I)^{-1} V'^T]``: no factorization, and for the default
    ``p = 1`` a division. The ridge, ``1e-6`` times the largest squared column norm of
    ``W`` (at least 1), gives a zero probe column (no room outside ``span(Q_hat)``,
    ``b = r``) a zero row and leaves the in-span rows exact.
    """
    q_hat, v = w[..., :rank], w[..., rank:]
    vt = jnp.swapaxes(v, -1, -2)
    gram = vt @ v                                                    # (k, p, p)
    diag = jnp.diagonal(gram, axis1=-2, axis2=-1)
    ridge = 1e-6 * jnp.maximum(jnp.max(diag, axis=-1), 1.0)
    if v.shape[-1] == 1:
        v_pinv = vt / (diag + ridge[..., None])[..., None]
    else:
        gram = gram + ridge[..., None, None] * jnp.eye(v.shape[-1], dtype=v.dtype)
        v_pinv = subspace.per_matrix(jnp.linalg.inv, gram) @ vt
    return jnp.concatenate([jnp.swapaxes(q_hat, -1, -2), v_pinv], axis=-2)


def _with_columns(u: jax.Array, r: jax.Array, sel: jax.Array, y: jax.Array, w: jax.Array,
                  w_pinv: jax.Array) -> jax.Array:
    """``U_J R + (I - U_J U_J^T) H P_W`` ``(k, a, b)`` from ``R = U_J^T H`` and ``Y = H W``:
    the rows sent plus the part of ``H``'s projection onto ``span(W)`` they miss. With
    ``P_W = W W^+`` and ``U_J R = U S`` (``S``: the rows sent at their candidates' places,
    zero elsewhere) it is ``[U, Y] [S - (S W) W^+; W^+]``: one product of ``a x b`` size."""
    s_ = _scatter_rows(u, r, sel).reshape(u.shape[0], u.shape[-1], r.shape[-1])
    rows = jnp.concatenate([s_ - (s_ @ w) @ w_pinv, w_pinv], axis=-2)
    return jnp.concatenate([u, y], axis=-1) @ rows


def _next_factor(group: _Group, u: jax.Array, r_bar: jax.Array, sel: jax.Array,
                 score: jax.Array, q_prev: jax.Array) -> jax.Array:
    """The next step's factor ``Q`` ``(k, b, r)``: ``R^T``, the averaged payload
    (PowerSGD's warm start), per matrix the rows of its ``r`` best-scored directions, and
    the previous column where such a row was not sent (the group gave it to another)."""
    k, c = group.k, u.shape[-1]
    best = subspace.greedy_select(score, group.rank) + (jnp.arange(k) * c)[:, None]  # (k, r)
    rows = _scatter_rows(u, r_bar, sel)[best]                                      # (k, r, b)
    sent = jnp.zeros((k * c,), bool).at[sel].set(True, mode="drop")[best]
    return jnp.swapaxes(jnp.where(sent[..., None], rows, jnp.swapaxes(q_prev, -1, -2)), -1, -2)


def _phase_bits(cfg: _Config, groups: list[_Group]) -> tuple[int, int, int]:
    """Per-device payload bits of the groups in each branch of the phase switch
    (warm-up, refresh, compressed); the pipeline counts the dense leaves."""
    dense = sum(g.k * g.a * g.b * 32 for g in groups)
    p = cfg.num_probes
    first = (lambda g: p * g.a) if cfg.tracking == "off" else (lambda g: (g.rank + p) * g.a)
    return dense, dense, sum(g.k * (first(g) + g.rank * g.b) * 32 for g in groups)


def _schedule(cfg: _Config, rank: int, key: jax.Array, rate: float) -> Compressor:
    """GreedyLore as a compressor of :func:`lore_jax.compressed_mean`'s pipeline: its
    phase schedule (warm-up, refresh, compressed) over all same-shape stacks at once.

    The pipeline gives it the error-feedback inputs ``H_i`` stacked per oriented shape
    ``(k, a, b)`` (groups in the order of their first leaf, matrices in leaf order), the
    stacked :class:`GreedyLoreBasis` states and the step count. Each step runs one phase
    (``jax.lax.switch``) and all-reduces its rounds itself, since the payload's shape
    changes with the phase; it returns the local and mean reconstructions.
    """
    tracks = cfg.tracking == "range"

    def view(shape):   # the size gate: min(r, a) b rate < a b
        v = subspace.matrix_view(shape)
        if v is None or not min(rank, v.a) * v.b * rate < v.a * v.b:
            return None
        return v

    def init(key_, shape, dtype):
        del key_, dtype
        v = view(shape)
        if v is None:
            return None
        r = min(rank, v.a)
        if not tracks:
            return GreedyLoreBasis(jnp.eye(v.a, dtype=jnp.float32), None)
        return GreedyLoreBasis(jnp.eye(v.a, min(v.a, r + cfg.num_probes), dtype=jnp.float32),
                               jnp.zeros((v.b, r), jnp.float32))

    def communicate(ms, states, count):
        groups = [_Group(m.shape[-2], m.shape[-1], min(rank, m.shape[-2]), m.shape[0])
                  for m in ms]
        if not groups:
            return [], [], [], 0
        step_key = probe_key(key, count)
        step = ((lambda b, f: _range_step(cfg, groups, ms, f, step_key)) if tracks else
                (lambda b, f: _paper_step(cfg, groups, ms, b, step_key)))
        branches = [lambda b, f: _dense_phase(cfg, ms, b, f),
                    lambda b, f: _refresh_phase(cfg, groups, ms, b, f), step]
        factor = tuple(s.factor for s in states) if tracks else ()
        phase = _phase_index(cfg, count)
        out = jax.lax.switch(phase, branches, tuple(s.basis for s in states), factor)
        factors = out.factor if tracks else (None,) * len(groups)
        new = [GreedyLoreBasis(u, q) for u, q in zip(out.basis, factors, strict=True)]
        return (out.c_local, out.c_bar, new,
                accounting.choose_bits(_phase_bits(cfg, groups), phase))

    def whole_model_only(*args, **kwargs):
        del args, kwargs
        raise TypeError(
            "GreedyLore's compressor runs a phase schedule over a whole model at once; "
            "use lore_jax.greedylore(rank, ...), which sends it through compressed_mean's "
            "pipeline, rather than compressing one leaf."
        )

    def bits(shape, dtype=jnp.float32):   # one matrix's compressed step
        v = view(shape)
        if v is None:
            return accounting.bits_of(shape, dtype)
        return _phase_bits(cfg, [_Group(v.a, v.b, min(rank, v.a), 1)])[_COMPRESSED]

    return Compressor(
        name=f"greedylore(r={rank})", kind="contractive", linear=True,
        compress=whole_model_only, decompress=whole_model_only, bits=bits, init=init,
        matrix=True, groups=MatrixGroups(view=view, compress=None, decompress=None,
                                         bits=None, communicate=communicate),
    )


# ----------------------------------------------------------------------------- the transform


#: The paper's settings (Chen et al. 2025): ``greedylore(r, **GREEDYLORE_PAPER)``.
#: ``tracking="off"`` alone gives the same, since ``update_interval`` follows ``tracking``.
GREEDYLORE_PAPER: dict[str, Any] = {
    "tracking": "off", "update_interval": 200, "num_probes": 1, "warmup_steps": 0,
    "error_feedback": "ef14",
}

#: Arguments :func:`greedylore` no longer takes, and what took their place.
_REMOVED = {
    "probes": "the probes follow `tracking`: 'range' draws p = num_probes fresh columns "
              "for its range finder, 'off' one independent probe per basis direction "
              "(the paper's)",
    "allocation": "the allocation follows `tracking`: 'range' lets a group of same-shape "
                  "matrices share its k r best directions, 'off' keeps r per matrix "
                  "(the paper's)",
    "refresh": "every refresh is an exact SVD",
    "refresh_iters": "every refresh is an exact SVD",
    "track_every": "tracking='range' tracks on every compressed step",
}


def _reject_removed(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, raising a TypeError that says what replaced a removed argument."""
    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        for name in _REMOVED.keys() & kwargs.keys():
            raise TypeError(f"greedylore: {name}= was removed; {_REMOVED[name]}.")
        return fn(*args, **kwargs)

    return checked


def _check_options(rank, tracking, update_interval, warmup_steps, num_probes,
                   min_compression_rate) -> None:
    """Raises a ValueError naming the first bad argument of :func:`greedylore`."""
    def is_int(v):
        return not isinstance(v, bool) and isinstance(v, (int, np.integer))

    if not is_int(rank) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}.")
    if tracking not in TRACKING_KINDS:
        hint = " ('power' was removed: 'range' tracks better)" if tracking == "power" else ""
        raise ValueError(
            f"tracking={tracking!r} is not supported{hint}; use 'range' (the default: the "
            f"basis follows the gradient every step) or 'off' (the paper's algorithm)."
        )
    if update_interval is not None and (not is_int(update_interval) or update_interval < 1):
        raise ValueError(
            f"update_interval must be an integer >= 1 (steps between basis refreshes) or "
            f"None (the mode's default), got {update_interval!r}."
        )
    if not is_int(warmup_steps) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}.")
    if not is_int(num_probes) or num_probes < 1:
        raise ValueError(f"num_probes must be an integer >= 1, got {num_probes!r}.")
    if not (isinstance(min_compression_rate, (int, float)) and min_compression_rate >= 0):
        raise ValueError(
            f"min_compression_rate must be a number >= 0, got {min_compression_rate!r}."
        )


@_reject_removed
def greedylore(
    rank: int,
    *,
    tracking: Tracking = "range",
    update_interval: int | None = None,
    warmup_steps: int = 0,
    num_probes: int = 1,
    error_feedback: ef.ErrorFeedback = "ef14",
    min_compression_rate: float = 2.0,
    dense: Any | Callable[[Any], Any] | None = None,
    weight_dimension_numbers: Any = None,
    key: Any = None,
    axis_name: Hashable | None = "data",
) -> optax.GradientTransformationExtraArgs:
    """GreedyLore gradient compression: mean of greedy top-r projections, with EF.

    Wrappers: put ``optax.apply_if_finite`` after it, around the base optimizer, and
    accumulate with :func:`lore_jax.multi_steps`, not ``optax.MultiSteps``;
    :func:`lore_jax.state_specs`, :func:`lore_jax.sharded_init` and
    :func:`lore_jax.data_parallel` refuse either wrapper around it. Under ``jax.pmap``
    nothing can check: ``optax.apply_if_finite`` around it hangs when one device's
    gradient is not finite, ``optax.MultiSteps`` runs its collectives on every micro-step
    while counting one in ``k``, and ``axis_name=None`` lets every device apply its own
    gradient.

    Args:
      rank: ``r >= 1``, directions kept per matrix (clipped to ``a = min(m, n)``).
      tracking: ``"range"`` (the default: every compressed step moves the basis by a
        warm-started randomized range finder of ``r + p`` columns and scores its
        directions exactly; same-shape matrices share their ``k r`` directions) or
        ``"off"`` (the paper's algorithm: the basis changes only at refreshes,
        independent probes, ``r`` directions per matrix).
      update_interval: ``tau >= 1``, steps between exact SVD refreshes of the basis;
        ``None`` (the default): 200 (the paper's) with ``tracking="off"``, only the first
        compressed step with ``tracking="range"``.
      warmup_steps: ``t0 >= 0`` dense steps before compression starts.
      num_probes: ``p >= 1``, Gaussian probes per basis direction with
        ``tracking="off"`` (1 in the paper; their squared scores are averaged), fresh
        range-finder columns with ``tracking="range"``.
      error_feedback: ``"ef14"`` (default, the paper's), ``"ef21"`` or ``None``.
      min_compression_rate: size gate; a matrix is compressed iff
        ``min(r, a) * b * rate < a * b``, otherwise it is all-reduced densely.
      dense: optax-style mask, a pytree of bools like the parameters (or a callable
        ``params -> mask``); ``True`` keeps a leaf dense (embeddings, output heads).
      weight_dimension_numbers: which axes of each leaf form the matrix, optax's
        convention (:class:`lore_jax.DimensionNumbers`; optax's ``GaLoreDimensionNumbers``
        and ``MuonDimensionNumbers`` work too): one for every leaf of 2 or more
        dimensions, a pytree of them like the parameters (``None`` keeps a leaf dense),
        or a callable ``params -> pytree``. Default: the Flax conventions of
        :func:`lore_jax.subspace.default_dimension_numbers`.
      key: int seed or ``jax.random.PRNGKey`` for the shared probes (default seed 0).
      axis_name: the data axis of the enclosing ``shard_map`` / ``pmap`` (default
        ``"data"``); ``None`` runs on one device (N = 1) with no collectives.

    Returns:
      An ``optax.GradientTransformationExtraArgs``. ``update(updates, state, params=None)``
      takes the device's local gradients (any float dtype; leaves of any shape) and returns
      the mean compressed gradient with the same structure and dtypes, identical on all
      devices.

    Raises:
      ValueError / TypeError naming the parameter, at construction for bad or removed
      arguments, and at trace time for an unbound ``axis_name``, gradients that are not
      this device's own (already summed over the axis), non-float gradients, gradients
      that do not match the parameters the state was initialised with, or per-device
      state that is not this device's own row (a state not laid out by
      :func:`lore_jax.shard_state` / :func:`lore_jax.sharded_init`).

    Example:
      >>> import jax, jax.numpy as jnp, optax, lore_jax
      >>> tx = optax.chain(lore_jax.greedylore(2, update_interval=10, axis_name=None),
      ...                  optax.sgd(0.1))
      >>> params = {"w": jnp.ones((8, 16)), "b": jnp.zeros(16)}
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, state, params)
    """
    _check_options(rank, tracking, update_interval, warmup_steps, num_probes,
                   min_compression_rate)
    if update_interval is None:
        update_interval = 200 if tracking == "off" else 0
    mode = ef.validate(error_feedback)
    collectives.check_axis_name(axis_name, "greedylore")
    base_key = collectives.as_key(key)
    cfg = _Config(mode, axis_name, int(warmup_steps), int(update_interval), int(num_probes),
                  tracking)
    schedule = _schedule(cfg, int(rank), base_key, float(min_compression_rate))
    return pipeline(schedule, axis_name=axis_name, error_feedback=mode,
                    key=base_key, weight_dimension_numbers=weight_dimension_numbers,
                    batch_by_shape=True, dense=dense, transform="greedylore")
