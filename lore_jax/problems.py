"""Test problems with exact constants: sharded least squares and l2-regularized logistic regression.

Generated data only (no downloads): a dense design with a prescribed condition number and a
sparse "bag-of-words" design with a prescribed number of non-zeros per row, split row-wise
into ``m`` shards (workers). Every problem carries the constants the calculators of
:mod:`lore_jax.theory` need, computed exactly in float64 NumPy: ``L``, ``mu``, the per-shard
``L_i`` and ``L_max``, ``x*``, ``f*``, the heterogeneity ``sigma*^2`` and the data's support
statistics (lore_jax spec §2 and §3.4, ``docs/spec.md``).

Convention (spec §2, the paper's eq. (1)): the **sum** convention ``f(x) = sum_{i=1}^m
f_i(x)``, with the regularizer split evenly over the shards:

* least squares: ``f_i(x) = 1/2 ||A_i x - b_i||^2 + reg / (2m) ||x||^2``, so ``L =
  lambda_max(A^T A) + reg``, ``mu = lambda_min(A^T A) + reg``, ``L_i = lambda_max(A_i^T A_i)
  + reg / m``;
* logistic regression (labels ``y in {-1, +1}``): ``f_i(x) = sum_{j in shard i} log(1 +
  exp(-y_j a_j^T x)) + reg / (2m) ||x||^2``, so ``L = lambda_max(A^T A) / 4 + reg``, ``mu =
  reg`` (the global constant; the curvature near ``x*`` is larger), ``L_i =
  lambda_max(A_i^T A_i) / 4 + reg / m``.

:meth:`Problem.constants` converts to the averaged convention ``f_bar = f / m``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import numpy as np

__all__ = [
    "Problem",
    "ProblemConstants",
    "SupportStats",
    "dense_design",
    "least_squares",
    "logistic_regression",
    "make_least_squares",
    "make_logistic_regression",
    "sparse_design",
]


class SupportStats(NamedTuple):
    """Sparsity of the design, which bounds the support of linear-model gradients (spec §3.4).

    For ``f_i(x) = sum_j l(a_j^T x)``, ``grad f_i`` (without the regularizer) lies in the union
    of the supports of shard ``i``'s rows, so ``shard_support[i]`` bounds ``nnz(grad f_i)``.

    Attributes:
      density: ``nnz(A) / (n d)``.
      row_nnz_mean: mean non-zeros per row.
      row_nnz_max: max non-zeros per row.
      shard_support: per shard, the size of the union of its rows' supports, shape ``(m,)``.
      shard_support_max: ``max(shard_support)``.
      column_frequency_max: the largest fraction of rows that share one coordinate.
    """

    density: float
    row_nnz_mean: float
    row_nnz_max: int
    shard_support: np.ndarray
    shard_support_max: int
    column_frequency_max: float


class ProblemConstants(NamedTuple):
    """The constants of a problem in one convention (inputs of :mod:`lore_jax.theory`).

    Attributes:
      L: smoothness of ``f`` (sum) or ``f_bar = f / m`` (average).
      mu: strong convexity of the same function.
      L_i: per-shard smoothness of the ``f_i``, shape ``(m,)`` (same in both conventions).
      L_max: ``max_i L_i``.
      sigma_star_sq: ``sum_i ||grad f_i(x*)||^2`` (same in both conventions).
      f_star: the optimal value of ``f`` (sum) or ``f_bar`` (average).
      convention: ``"sum"`` or ``"average"``.
    """

    L: float
    mu: float
    L_i: np.ndarray
    L_max: float
    sigma_star_sq: float
    f_star: float
    convention: str


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """A sharded finite-sum problem ``f = sum_i f_i`` with its exact constants (sum convention).

    Build one with :func:`make_least_squares` / :func:`make_logistic_regression` (generated
    data) or :func:`least_squares` / :func:`logistic_regression` (your data). Every method
    accepts ``x`` of shape ``(..., d)`` (leading axes are batches of iterates, e.g. seeds).

    Attributes:
      kind: ``"least_squares"`` or ``"logistic"``.
      A: the design, shape ``(n, d)``, float64.
      b: targets (least squares) or labels in ``{-1, +1}`` (logistic), shape ``(n,)``.
      reg: the l2 weight ``lambda >= 0`` of the whole objective.
      shard_bounds: ``(start, stop)`` row ranges of the ``m`` shards.
      L: ``lambda_max`` of the Hessian bound of ``f``.
      mu: strong convexity of ``f``.
      L_i: smoothness of each ``f_i``, shape ``(m,)``.
      L_max: ``max_i L_i``.
      x_star: the minimizer, shape ``(d,)``.
      f_star: ``f(x*)``.
      sigma_star_sq: ``sum_i ||grad f_i(x*)||^2``, zero iff every shard is optimal at ``x*``.
      support: :class:`SupportStats` of the design.
    """

    kind: str
    A: np.ndarray = dataclasses.field(repr=False)
    b: np.ndarray = dataclasses.field(repr=False)
    reg: float
    shard_bounds: tuple[tuple[int, int], ...] = dataclasses.field(repr=False)
    L: float
    mu: float
    L_i: np.ndarray = dataclasses.field(repr=False)
    L_max: float
    x_star: np.ndarray = dataclasses.field(repr=False)
    f_star: float
    sigma_star_sq: float
    support: SupportStats = dataclasses.field(repr=False)

    @property
    def num_shards(self) -> int:
        """``m``, the number of shards (workers)."""
        return len(self.shard_bounds)

    @property
    def dim(self) -> int:
        """``d``, the number of parameters."""
        return self.A.shape[1]

    @property
    def kappa(self) -> float:
        """``L / mu``."""
        return self.L / self.mu

    def shard(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``(A_i, b_i)`` of shard ``i``."""
        start, stop = self.shard_bounds[i]
        return self.A[start:stop], self.b[start:stop]

    def stacked_shards(self) -> tuple[np.ndarray, np.ndarray]:
        """``(A_s, b_s)`` of shapes ``(m, n/m, d)`` and ``(m, n/m)``, for ``jax.shard_map``.

        Raises:
          ValueError: when the shards have different sizes (``n`` not divisible by ``m``).
        """
        sizes = {stop - start for start, stop in self.shard_bounds}
        if len(sizes) != 1:
            raise ValueError(
                f"shards have different sizes {sorted(sizes)}; build the problem with a number "
                f"of rows divisible by num_shards to stack them."
            )
        m = self.num_shards
        return self.A.reshape(m, -1, self.dim), self.b.reshape(m, -1)

    # ------------------------------------------------------------------ values and gradients

    def _data_loss(self, A: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
        z = x @ A.T
        if self.kind == "least_squares":
            return 0.5 * np.sum((z - b) ** 2, axis=-1)
        return np.sum(np.logaddexp(0.0, -b * z), axis=-1)

    def _data_grad(self, A: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
        z = x @ A.T
        if self.kind == "least_squares":
            return (z - b) @ A
        return (-b * _sigmoid(-b * z)) @ A

    def loss(self, x: np.ndarray) -> np.ndarray:
        """``f(x)``, shape ``x.shape[:-1]``."""
        x = np.asarray(x, np.float64)
        return self._data_loss(self.A, self.b, x) + 0.5 * self.reg * np.sum(x * x, axis=-1)

    def grad(self, x: np.ndarray) -> np.ndarray:
        """``grad f(x)``, shape of ``x``."""
        x = np.asarray(x, np.float64)
        return self._data_grad(self.A, self.b, x) + self.reg * x

    def local_losses(self, x: np.ndarray) -> np.ndarray:
        """``f_i(x)`` for every shard, shape ``x.shape[:-1] + (m,)``."""
        x = np.asarray(x, np.float64)
        r = 0.5 * self.reg / self.num_shards * np.sum(x * x, axis=-1)
        return np.stack([self._data_loss(*self.shard(i), x) + r
                         for i in range(self.num_shards)], axis=-1)

    def local_grads(self, x: np.ndarray) -> np.ndarray:
        """``grad f_i(x)`` for every shard, shape ``x.shape[:-1] + (m, d)``."""
        x = np.asarray(x, np.float64)
        r = self.reg / self.num_shards * x
        return np.stack([self._data_grad(*self.shard(i), x) + r
                         for i in range(self.num_shards)], axis=-2)

    def hessian_bound(self) -> np.ndarray:
        """``H`` with ``grad^2 f(x) <= H`` everywhere (exact Hessian for least squares)."""
        gram = self.A.T @ self.A
        if self.kind == "logistic":
            gram = gram / 4.0
        return gram + self.reg * np.eye(self.dim)

    def block_smoothness(self, num_blocks: int) -> np.ndarray:
        """Per-block smoothness ``L_j = lambda_max(H[j, j])`` for ``num_blocks`` contiguous blocks.

        The blocks are ``np.array_split(range(d), num_blocks)``; ``max`` of the result is the
        ``L_blk`` of :func:`lore_jax.theory.compressed_bcd`.
        """
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, (int, np.integer)) or not (
                1 <= num_blocks <= self.dim):
            raise ValueError(f"num_blocks must be an int in [1, d={self.dim}], got {num_blocks!r}.")
        H = self.hessian_bound()
        return np.array([np.linalg.eigvalsh(H[np.ix_(blk, blk)])[-1]
                         for blk in np.array_split(np.arange(self.dim), num_blocks)])

    def constants(self, convention: Literal["sum", "average"] = "sum") -> ProblemConstants:
        """The constants in the sum convention (default) or for ``f_bar = f / m``.

        In the averaged convention ``L``, ``mu`` and ``f*`` are divided by ``m``; ``L_i``,
        ``L_max`` and ``sigma*^2`` (the sum over shards) are unchanged, as
        :func:`lore_jax.theory.dcgd` expects.
        """
        if convention not in ("sum", "average"):
            raise ValueError(f"convention must be 'sum' or 'average', got {convention!r}.")
        s = self.num_shards if convention == "average" else 1
        return ProblemConstants(self.L / s, self.mu / s, self.L_i, self.L_max,
                                self.sigma_star_sq, self.f_star / s, convention)


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * t))


# ----------------------------------------------------------------------------- designs


def _rng(seed: int | np.random.Generator) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def dense_design(
    n: int,
    d: int,
    *,
    kappa: float = 10.0,
    top_eigenvalue: float = 1.0,
    seed: int | np.random.Generator = 0,
) -> np.ndarray:
    """A dense ``(n, d)`` design whose Gram matrix ``A^T A`` has condition number ``kappa``.

    ``A = U diag(s) V^T`` with random orthonormal ``U`` (``n x d``) and ``V`` (``d x d``) and
    singular values ``s_j^2 = top_eigenvalue * kappa^(-j/(d-1))``, so the eigenvalues of
    ``A^T A`` are geometrically spaced in ``[top_eigenvalue / kappa, top_eigenvalue]``.

    Args:
      n: rows, ``n >= d``.
      d: columns, ``>= 1``.
      kappa: ``lambda_max / lambda_min`` of ``A^T A``, ``>= 1`` (default 10.0).
      top_eigenvalue: ``lambda_max(A^T A)`` (default 1.0).
      seed: an int seed or a ``numpy.random.Generator``.

    Returns:
      ``A``, float64 of shape ``(n, d)``.

    Example:
      >>> A = dense_design(50, 5, kappa=100.0)
      >>> round(float(np.linalg.cond(A.T @ A)), 6)
      100.0
    """
    if d < 1 or n < d:
        raise ValueError(f"dense_design needs n >= d >= 1, got n={n}, d={d}.")
    if not kappa >= 1:
        raise ValueError(f"kappa must be >= 1, got {kappa!r}.")
    if not top_eigenvalue > 0:
        raise ValueError(f"top_eigenvalue must be > 0, got {top_eigenvalue!r}.")
    rng = _rng(seed)
    U, _ = np.linalg.qr(rng.standard_normal((n, d)))
    V, _ = np.linalg.qr(rng.standard_normal((d, d)))
    exps = np.arange(d) / max(d - 1, 1)
    s = np.sqrt(top_eigenvalue * kappa ** (-exps))
    return (U * s) @ V.T


def sparse_design(
    n: int,
    d: int,
    *,
    nnz_per_row: int,
    zipf: float = 1.0,
    seed: int | np.random.Generator = 0,
) -> np.ndarray:
    """A sparse "bag-of-words" ``(n, d)`` design with exactly ``nnz_per_row`` non-zeros per row.

    Each row draws ``nnz_per_row`` distinct "words" (columns) with Zipf probabilities ``p_j
    propto (j + 1)^(-zipf)``, gives each a count ``1 + Poisson(1)``, takes ``log(1 + count)``
    (tf weighting) and normalizes the row to unit l2 norm. Stored dense (float64).

    Args:
      n: rows, ``>= 1``.
      d: vocabulary size, ``>= nnz_per_row``.
      nnz_per_row: non-zeros per row, in ``[1, d]``.
      zipf: the Zipf exponent of word popularity (default 1.0; 0 is uniform).
      seed: an int seed or a ``numpy.random.Generator``.

    Returns:
      ``A``, float64 of shape ``(n, d)``, rows of unit norm.

    Example:
      >>> A = sparse_design(20, 100, nnz_per_row=5)
      >>> sorted(set((A != 0).sum(axis=1).tolist()))
      [5]
    """
    if n < 1 or not 1 <= nnz_per_row <= d:
        raise ValueError(
            f"sparse_design needs n >= 1 and 1 <= nnz_per_row <= d, got n={n}, d={d}, "
            f"nnz_per_row={nnz_per_row}."
        )
    rng = _rng(seed)
    p = (np.arange(1, d + 1, dtype=np.float64)) ** (-float(zipf))
    p /= p.sum()
    A = np.zeros((n, d))
    for row in range(n):
        cols = rng.choice(d, size=nnz_per_row, replace=False, p=p)
        A[row, cols] = np.log1p(1.0 + rng.poisson(1.0, size=nnz_per_row))
    return A / np.linalg.norm(A, axis=1, keepdims=True)


# ----------------------------------------------------------------------------- problems


def _shard_bounds(n: int, m: int) -> tuple[tuple[int, int], ...]:
    if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not 1 <= m <= n:
        raise ValueError(f"num_shards must be an int in [1, n={n}], got {m!r}.")
    edges = np.cumsum([0] + [len(c) for c in np.array_split(np.arange(n), m)])
    return tuple((int(edges[i]), int(edges[i + 1])) for i in range(m))


def _support(A: np.ndarray, bounds: tuple[tuple[int, int], ...]) -> SupportStats:
    mask = A != 0
    row_nnz = mask.sum(axis=1)
    shard_support = np.array([int(mask[a:b].any(axis=0).sum()) for a, b in bounds])
    return SupportStats(
        density=float(mask.mean()),
        row_nnz_mean=float(row_nnz.mean()),
        row_nnz_max=int(row_nnz.max()),
        shard_support=shard_support,
        shard_support_max=int(shard_support.max()),
        column_frequency_max=float(mask.mean(axis=0).max()),
    )


def _check_data(A: np.ndarray, b: np.ndarray, reg: float) -> tuple[np.ndarray, np.ndarray, float]:
    A = np.asarray(A, np.float64)
    b = np.asarray(b, np.float64)
    if A.ndim != 2 or b.shape != A.shape[:1]:
        raise ValueError(f"A must be (n, d) and b (n,), got A {A.shape} and b {b.shape}.")
    if not np.all(np.isfinite(A)) or not np.all(np.isfinite(b)):
        raise ValueError("A and b must be finite.")
    reg = float(reg)
    if not reg >= 0:
        raise ValueError(f"reg must be >= 0, got {reg!r}.")
    return A, b, reg


def _finish(kind: str, A: np.ndarray, b: np.ndarray, reg: float, num_shards: int,
            x_star: np.ndarray, curvature: float) -> Problem:
    bounds = _shard_bounds(A.shape[0], num_shards)
    eig = np.linalg.eigvalsh(A.T @ A)
    L_i = np.array([np.linalg.eigvalsh(A[a:c].T @ A[a:c])[-1] * curvature + reg / num_shards
                    for a, c in bounds])
    mu = float(eig[0]) + reg if kind == "least_squares" else reg
    problem = Problem(kind=kind, A=A, b=b, reg=reg, shard_bounds=bounds,
                      L=float(eig[-1]) * curvature + reg, mu=mu, L_i=L_i,
                      L_max=float(L_i.max()), x_star=x_star, f_star=0.0, sigma_star_sq=0.0,
                      support=_support(A, bounds))
    local = problem.local_grads(x_star)
    return dataclasses.replace(problem, f_star=float(problem.loss(x_star)),
                               sigma_star_sq=float(np.sum(local * local)))


def least_squares(
    A: np.ndarray,
    b: np.ndarray,
    num_shards: int,
    *,
    reg: float = 0.0,
) -> Problem:
    """Sharded least squares ``f(x) = 1/2 ||A x - b||^2 + reg/2 ||x||^2 = sum_i f_i(x)``.

    Rows are split into ``num_shards`` contiguous shards (``np.array_split``). ``L`` and
    ``mu`` are the extreme eigenvalues of ``A^T A + reg I``, ``L_i = lambda_max(A_i^T A_i) +
    reg / m`` and ``x*`` solves the normal equations (sum convention; see the module doc).

    Args:
      A: design, shape ``(n, d)``.
      b: targets, shape ``(n,)``.
      num_shards: ``m``, in ``[1, n]``.
      reg: l2 weight ``>= 0`` (default 0.0).

    Returns:
      A :class:`Problem`.

    Raises:
      ValueError: when the problem is not strongly convex (``mu <= 1e-12 L``); pass
        ``reg > 0`` or more rows than columns.

    Example:
      >>> rng = np.random.default_rng(0)
      >>> p = least_squares(rng.standard_normal((40, 4)), rng.standard_normal(40), 4)
      >>> bool(np.allclose(p.grad(p.x_star), 0.0, atol=1e-10))
      True
    """
    A, b, reg = _check_data(A, b, reg)
    H = A.T @ A + reg * np.eye(A.shape[1])
    eig = np.linalg.eigvalsh(H)
    if eig[0] <= 1e-12 * eig[-1]:
        raise ValueError(
            f"least squares with lambda_min(A^T A + reg I)={eig[0]!r} is not strongly convex; "
            f"pass reg > 0 or a full-column-rank A."
        )
    x_star = np.linalg.solve(H, A.T @ b)
    return _finish("least_squares", A, b, reg, num_shards, x_star, curvature=1.0)


def logistic_regression(
    A: np.ndarray,
    y: np.ndarray,
    num_shards: int,
    *,
    reg: float,
) -> Problem:
    """Sharded l2-regularized logistic regression on labels ``y in {-1, +1}``.

    ``f(x) = sum_j log(1 + exp(-y_j a_j^T x)) + reg/2 ||x||^2 = sum_i f_i(x)`` (sum
    convention), with ``L = lambda_max(A^T A)/4 + reg``, ``mu = reg`` and ``L_i =
    lambda_max(A_i^T A_i)/4 + reg / m``; ``x*`` by damped Newton to ``||grad f(x*)|| <=
    1e-12 (1 + ||A^T y||)``.

    Args:
      A: design, shape ``(n, d)``.
      y: labels in ``{-1, +1}``, shape ``(n,)``.
      num_shards: ``m``, in ``[1, n]``.
      reg: l2 weight, ``> 0`` (required for strong convexity).

    Returns:
      A :class:`Problem`.

    Example:
      >>> rng = np.random.default_rng(0)
      >>> A = rng.standard_normal((40, 4)); y = np.sign(rng.standard_normal(40))
      >>> p = logistic_regression(A, y, 4, reg=0.1)
      >>> bool(np.linalg.norm(p.grad(p.x_star)) < 1e-9)
      True
    """
    A, y, reg = _check_data(A, y, reg)
    if not reg > 0:
        raise ValueError(f"reg must be > 0 for logistic regression, got {reg!r}.")
    if not np.all(np.abs(y) == 1):
        raise ValueError("y must hold labels in {-1, +1}.")
    x = np.zeros(A.shape[1])

    def f(x):
        return np.sum(np.logaddexp(0.0, -y * (A @ x))) + 0.5 * reg * x @ x

    tol = 1e-12 * (1.0 + np.linalg.norm(A.T @ y))
    for _ in range(100):
        z = y * (A @ x)
        g = -(y * _sigmoid(-z)) @ A + reg * x
        if np.linalg.norm(g) <= tol:
            break
        s = _sigmoid(z)
        H = (A.T * (s * (1 - s))) @ A + reg * np.eye(A.shape[1])
        step, t, f0 = np.linalg.solve(H, g), 1.0, f(x)
        while f(x - t * step) > f0 - 0.25 * t * (g @ step) and t > 1e-10:
            t *= 0.5
        x = x - t * step
    else:
        raise RuntimeError("Newton's method did not converge for logistic_regression.")
    return _finish("logistic", A, y, reg, num_shards, x, curvature=0.25)


def _design(n: int, d: int, design: str, kappa: float, nnz_per_row: int | None,
            rng: np.random.Generator) -> np.ndarray:
    if design == "dense":
        return dense_design(n, d, kappa=kappa, seed=rng)
    if design == "sparse":
        if nnz_per_row is None:
            raise ValueError("design='sparse' needs nnz_per_row.")
        return sparse_design(n, d, nnz_per_row=nnz_per_row, seed=rng)
    raise ValueError(f"design must be 'dense' or 'sparse', got {design!r}.")


def make_least_squares(
    n: int,
    d: int,
    num_shards: int,
    *,
    design: Literal["dense", "sparse"] = "dense",
    kappa: float = 10.0,
    nnz_per_row: int | None = None,
    noise: float = 0.1,
    reg: float = 0.0,
    seed: int = 0,
) -> Problem:
    """Generated sharded least squares ``b = A x_true + noise``.

    With ``noise > 0`` the shards disagree at ``x*`` (``sigma*^2 > 0``, heterogeneous); with
    ``noise = 0`` and ``reg = 0`` every shard is solved by ``x_true`` (``sigma*^2 = 0``). With
    the dense design, ``reg = 0`` gives exactly ``L / mu = kappa``.

    Args:
      n: rows (samples); ``n >= d`` for the dense design.
      d: parameters.
      num_shards: ``m`` workers.
      design: ``"dense"`` (:func:`dense_design`, default) or ``"sparse"``
        (:func:`sparse_design`).
      kappa: condition number of ``A^T A`` for the dense design (default 10.0).
      nnz_per_row: non-zeros per row for the sparse design.
      noise: standard deviation of the additive target noise (default 0.1).
      reg: l2 weight (default 0.0).
      seed: random seed (default 0).

    Returns:
      A :class:`Problem` (sum convention).

    Example:
      >>> p = make_least_squares(200, 40, 4, kappa=20.0)
      >>> round(p.kappa, 6)
      20.0
    """
    rng = np.random.default_rng(seed)
    A = _design(n, d, design, kappa, nnz_per_row, rng)
    x_true = rng.standard_normal(d)
    b = A @ x_true + noise * rng.standard_normal(n)
    return least_squares(A, b, num_shards, reg=reg)


def make_logistic_regression(
    n: int,
    d: int,
    num_shards: int,
    *,
    design: Literal["dense", "sparse"] = "dense",
    kappa: float = 10.0,
    nnz_per_row: int | None = None,
    reg: float = 0.01,
    seed: int = 0,
) -> Problem:
    """Generated sharded l2-regularized logistic regression.

    Labels are drawn as ``y_j = +1`` with probability ``sigmoid(a_j^T x_true)`` for a Gaussian
    ``x_true`` scaled so that the margins are of order one, so the data are not separable.

    Args:
      n: rows (samples).
      d: parameters.
      num_shards: ``m`` workers.
      design: ``"dense"`` (default) or ``"sparse"``.
      kappa: condition number of ``A^T A`` for the dense design (default 10.0).
      nnz_per_row: non-zeros per row for the sparse design.
      reg: l2 weight, ``> 0`` (default 0.01).
      seed: random seed (default 0).

    Returns:
      A :class:`Problem` (sum convention).

    Example:
      >>> p = make_logistic_regression(100, 10, 4, reg=0.01)
      >>> p.kind, round(p.mu, 6)
      ('logistic', 0.01)
    """
    rng = np.random.default_rng(seed)
    A = _design(n, d, design, kappa, nnz_per_row, rng)
    x_true = rng.standard_normal(d)
    margins = A @ x_true
    x_true = x_true * (2.0 / max(np.std(margins), 1e-12))
    y = np.where(rng.random(n) < _sigmoid(A @ x_true), 1.0, -1.0)
    return logistic_regression(A, y, num_shards, reg=reg)
