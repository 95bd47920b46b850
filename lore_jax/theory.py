"""Step sizes, rates and iteration/bit complexities for compressed and stale gradient methods.

One calculator per algorithm of the lore_jax spec (§5 of ``docs/spec.md``, the
documentation's Spec page; "spec §N" below is its section N), for the
framework of Khirirat, Feyzmahdavian and Johansson, "Distributed learning with compressed
gradients" (arXiv:1806.06573): gradient methods whose messages pass through a compressor
``Q`` and may be stale.

* :func:`cgd_unbiased` (A1, §5.1): ``x+ = x - gamma Q(grad f(x))``, Q alpha-unbiased;
* :func:`cgd_contractive` (A2, §5.2): the same with Q a delta-contraction;
* :func:`cgd_absolute` (A3, §5.3): the same with ``||Q(v) - v|| <= eps``;
* :func:`dcgd` (A4, §5.4): ``x+ = x - gamma sum_i Q_i(grad f_i(x))``, worker-side;
* :func:`stale_cgd` (A5, §5.5): ``x+ = x - gamma Q(grad f(x_{k - tau_k}))``, bounded delay;
* :func:`compressed_bcd` (A7, §5.7): ``x+ = x - gamma U_j Q(grad_j f(x))``, random block;
* :func:`compressed_sgd` (A8, §5.8): ``x+ = x - gamma Q(g_k)`` with ``E||g_k||^2 <= 2A (f -
  f*) + C`` (:func:`minibatch_constants` gives ``A, C`` for b-nice sampling);
* :func:`max_delay_lemma_rate`: the bounded-delay sequence lemma (§5.5);
* conversions between ``alpha``, ``omega``, ``delta`` and ``eps`` (§3), and
  :func:`bits_to_accuracy` (§5.9).

Every constant here is **derived** in the spec (proof sketches in §5, checked numerically by
this library's tests), consistent with the paper's framework; none is quoted from the paper,
whose theorem statements were not available. Each result carries that provenance string.

Conventions (spec §2): ``f = sum_i f_i`` over ``m`` workers (the *sum* convention of the
paper's eq. (1)); ``L`` and ``mu`` are the smoothness and strong-convexity (or PL)
constants of the function the method steps on, ``kappa = L / mu``; ``alpha >= 1`` is the
second-moment constant of an unbiased compressor (``E||Q(v)||^2 <= alpha ||v||^2``,
``omega = alpha - 1``), ``delta in (0, 1]`` the constant of a contraction
(``||Q(v) - v||^2 <= (1 - delta) ||v||^2``) and ``eps`` the error of an absolute compressor
(``||Q(v) - v|| <= eps``). :func:`dcgd` also takes the averaged convention
``f = (1/m) sum_i f_i``.

A compressor constant may be passed as a plain float or as any object that declares it as
an attribute (``alpha``, ``omega``, ``delta``, ``eps``; a callable attribute is called with
no argument) and, optionally, a ``kind`` in ``{"unbiased", "contractive", "absolute"}``
that must match the calculator.

All results are :class:`Guarantee` tuples: the recommended step, the admissible range, the
per-iteration contraction factor (or the sublinear coefficient), the floor, and, when a
target accuracy is given, the iterations ``K(eps)`` and bits ``B(eps) = K(eps) (m b_up +
b_down)`` (spec §5.9).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal, NamedTuple

import numpy as np

__all__ = [
    "ExpectedSmoothness",
    "Guarantee",
    "alpha_from_omega",
    "bits_to_accuracy",
    "cgd_absolute",
    "cgd_contractive",
    "cgd_unbiased",
    "compressed_bcd",
    "compressed_sgd",
    "dcgd",
    "delta_from_alpha",
    "delta_from_eps",
    "eps_from_delta",
    "max_delay_lemma_rate",
    "minibatch_constants",
    "omega_from_alpha",
    "stale_cgd",
]

_NOT_QUOTED = "consistent with the paper's framework; not quoted from the paper"


def _provenance(section: str) -> str:
    return f"derived (lore_jax spec §{section}), {_NOT_QUOTED}"


class Guarantee(NamedTuple):
    """A convergence guarantee for one algorithm at one step size.

    For a linear guarantee (``rate`` set) the quantity obeys, at every iteration ``k``,
    ``q_k <= rate**k q_0 + (1 - rate**k) floor`` (in expectation for randomized methods;
    see :meth:`bound`). For a non-convex guarantee (``rate`` is ``None``) it is
    ``min_{k<K} E||grad f(x_k)||^2 <= coefficient (f(x_0) - f_inf) / K``.

    Attributes:
      algorithm: the spec's algorithm and setting, e.g. ``"A5 stale CGD (PL)"``.
      step_size: the step ``gamma`` the other fields refer to (the recommended one unless a
        step was passed in).
      max_step_size: the upper end of the admissible range ``(0, max_step_size]``.
      max_step_admissible: whether ``max_step_size`` itself is admissible (``]`` vs ``)``).
      rate: per-iteration contraction factor of ``quantity``; ``None`` when non-convex.
      floor: the asymptotic floor of ``quantity`` (0.0 when the method is exact).
      coefficient: the constant ``c`` of a non-convex guarantee; ``None`` when linear.
      quantity: what the guarantee bounds, e.g. ``"E f(x_k) - f*"``.
      iterations: ``K(target)``, the iterations sufficient to reach ``target``; ``None``
        when no target was given.
      bits: ``B(target) = K(target) * (num_workers * uplink_bits + downlink_bits)``; ``None``
        unless ``target`` and ``uplink_bits`` were given.
      provenance: where the constants come from.
    """

    algorithm: str
    step_size: float
    max_step_size: float
    max_step_admissible: bool
    rate: float | None
    floor: float
    coefficient: float | None
    quantity: str
    iterations: int | None
    bits: int | float | None
    provenance: str

    @property
    def step_size_range(self) -> tuple[float, float]:
        """The admissible range ``(0, max_step_size)`` (see ``max_step_admissible``)."""
        return (0.0, self.max_step_size)

    def bound(self, k: Any, initial: float) -> np.ndarray | float:
        """The guaranteed value of ``quantity`` after ``k`` iterations.

        Args:
          k: iteration count(s), a scalar or an array of non-negative integers.
          initial: the quantity at ``k = 0`` (``f(x_0) - f*`` for function-value guarantees,
            ``||x_0 - x*||^2`` or ``||x_0 - x*||`` for distance guarantees).

        Returns:
          ``rate**k initial + (1 - rate**k) floor`` for linear guarantees, or
          ``coefficient * initial / k`` (``inf`` at ``k = 0``) for non-convex ones, with the
          shape of ``k``.
        """
        k = np.asarray(k, dtype=np.float64)
        if self.rate is None:
            with np.errstate(divide="ignore"):
                out = np.where(k > 0, self.coefficient * initial / np.maximum(k, 1.0), np.inf)
        else:
            decay = np.power(self.rate, k)
            out = decay * initial + (1.0 - decay) * self.floor
        return float(out) if out.ndim == 0 else out


class ExpectedSmoothness(NamedTuple):
    """Constants of ``E||g(x)||^2 <= 2 A (f(x) - f*) + C`` for a stochastic gradient ``g``.

    Attributes:
      A: the expected-smoothness constant.
      C: the additive (gradient-noise-at-the-optimum) constant.
    """

    A: float
    C: float


# ----------------------------------------------------------------------------- validation


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__}).")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}.")
    return value


def _positive(name: str, value: Any) -> float:
    value = _real(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}.")
    return value


def _nonnegative(name: str, value: Any) -> float:
    value = _real(name, value)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}.")
    return value


def _integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}.")
    return int(value)


def _mu(mu: Any, smoothness: float, smoothness_name: str = "L") -> float:
    mu = _positive("mu", mu)
    if mu > smoothness * (1 + 1e-12):
        raise ValueError(
            f"mu must satisfy 0 < mu <= {smoothness_name}, got mu={mu!r} > "
            f"{smoothness_name}={smoothness!r}; strong convexity cannot exceed smoothness."
        )
    return min(mu, smoothness)


def _declared(value: Any, attr: str, kind: str) -> Any:
    """A compressor constant given as a number or declared by a compressor-like object."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return value
    declared_kind = getattr(value, "kind", None)
    if declared_kind is not None and declared_kind != kind:
        raise ValueError(
            f"{attr}: the compressor {value!r} declares kind={declared_kind!r}, but this "
            f"calculator needs a {kind!r} compressor."
        )
    if hasattr(value, attr):
        constant = getattr(value, attr)
        return constant() if callable(constant) else constant
    if attr == "alpha" and hasattr(value, "omega"):
        omega = value.omega
        return 1.0 + (omega() if callable(omega) else omega)
    raise TypeError(
        f"{attr} must be a number or an object with an {attr!r} attribute, got {value!r}."
    )


def _alpha(alpha: Any, name: str = "alpha") -> float:
    alpha = _real(name, _declared(alpha, "alpha", "unbiased"))
    if alpha < 1:
        raise ValueError(
            f"{name} must be >= 1 (E||Q(v)||^2 <= alpha ||v||^2 with E Q(v) = v forces "
            f"alpha >= 1), got {alpha!r}. If you have omega, pass alpha = 1 + omega."
        )
    return alpha


def _delta(delta: Any) -> float:
    delta = _real("delta", _declared(delta, "delta", "contractive"))
    if not 0 < delta <= 1:
        raise ValueError(f"delta must satisfy 0 < delta <= 1, got {delta!r}.")
    return delta


def _step(step_size: Any, max_step: float, closed: bool, recommended: float) -> float:
    if step_size is None:
        return recommended
    step = _positive("step_size", step_size)
    too_big = step > max_step * (1 + 1e-12) if closed else step >= max_step
    if too_big:
        bracket = "]" if closed else ")"
        raise ValueError(
            f"step_size={step!r} is outside the admissible range (0, {max_step!r}{bracket}; "
            f"the guarantee does not hold there. Use a smaller step or step_size=None for "
            f"the recommended {recommended!r}."
        )
    return min(step, max_step)


class _Budget(NamedTuple):
    """The optional accuracy and message-size inputs shared by every calculator."""

    initial: Any
    target: Any
    uplink_bits: Any
    num_workers: int
    downlink_bits: Any


def _iterations(rate: float | None, floor: float, coefficient: float | None,
                initial: Any, target: Any) -> int | None:
    """K(target): the smallest K with ``rate**K initial + floor <= target`` (using ``rate**K
    <= exp(-(1 - rate) K)``), or with ``coefficient initial / K <= target`` when non-convex."""
    if initial is None and target is None:
        return None
    if initial is None or target is None:
        raise ValueError("pass both initial and target to get iterations, or neither.")
    initial = _nonnegative("initial", initial)
    target = _positive("target", target)
    if rate is None:
        return max(1, math.ceil(coefficient * initial / target))
    if target <= floor:
        raise ValueError(
            f"target={target!r} is not above the guarantee's floor {floor!r}; no number of "
            f"iterations reaches it. Use a smaller step_size or a larger target."
        )
    if initial <= target - floor:
        return 0
    return math.ceil(math.log(initial / (target - floor)) / (1.0 - rate))


def _result(algorithm: str, section: str, step: float, max_step: float, closed: bool,
            quantity: str, budget: _Budget, *, rate: float | None = None, floor: float = 0.0,
            coefficient: float | None = None) -> Guarantee:
    """Completes a guarantee with K(target), B(target) and its provenance."""
    k = _iterations(rate, floor, coefficient, budget.initial, budget.target)
    bits = None
    if k is not None and budget.uplink_bits is not None:
        bits = bits_to_accuracy(k, budget.uplink_bits, num_workers=budget.num_workers,
                                downlink_bits=budget.downlink_bits)
    return Guarantee(algorithm, step, max_step, closed, rate, floor, coefficient, quantity, k,
                     bits, _provenance(section))


_GRAD_SQ = "min_{k<K} E||grad f(x_k)||^2"


def _unbiased_descent(algorithm: str, section: str, L: float, smoothness_name: str,
                      mu: Any, alpha: float, num_blocks: int, step_size: Any,
                      budget: _Budget) -> Guarantee:
    """The guarantee shared by A1 (``num_blocks = 1``) and A7, from the descent lemma
    ``E f(x+) <= f(x) - (gamma / n_b)(1 - alpha L gamma / 2) ||grad f(x)||^2``.

    ``L``, ``alpha`` and ``num_blocks`` are already checked; ``mu`` is checked against ``L``
    (named ``smoothness_name``) in the PL case. The labels are ``algorithm`` followed by
    ``" (non-convex)"`` or ``" (PL)"``.
    """
    max_step = 2.0 / (alpha * L)
    gamma = _step(step_size, max_step, closed=False, recommended=1.0 / (alpha * L))
    descent = gamma * (1.0 - alpha * L * gamma / 2.0) / num_blocks
    if mu is None:
        return _result(f"{algorithm} (non-convex)", section, gamma, max_step, False, _GRAD_SQ,
                       budget, coefficient=1.0 / descent)
    mu = _mu(mu, L, smoothness_name)
    return _result(f"{algorithm} (PL)", section, gamma, max_step, False, "E f(x_k) - f*",
                   budget, rate=1.0 - 2.0 * mu * descent)


# ----------------------------------------------------------------------------- conversions


def omega_from_alpha(alpha: float) -> float:
    """Variance constant ``omega = alpha - 1`` of an ``alpha``-unbiased compressor.

    ``E||Q(v)||^2 <= alpha ||v||^2`` and ``E Q(v) = v`` give ``E||Q(v) - v||^2 <= (alpha - 1)
    ||v||^2`` (spec §3.1). Derived (lore_jax spec §3.1), consistent with the paper's
    framework; not quoted from the paper.

    Args:
      alpha: second-moment constant, ``>= 1``.

    Returns:
      ``omega >= 0``.

    Example:
      >>> omega_from_alpha(4.0)
      3.0
    """
    return _alpha(alpha) - 1.0


def alpha_from_omega(omega: float) -> float:
    """Second-moment constant ``alpha = 1 + omega`` from the variance constant ``omega``.

    Derived (lore_jax spec §3.1), consistent with the paper's framework; not quoted from the
    paper.

    Args:
      omega: variance constant, ``>= 0``.

    Returns:
      ``alpha >= 1``.

    Example:
      >>> alpha_from_omega(3.0)
      4.0
    """
    return 1.0 + _nonnegative("omega", omega)


def delta_from_alpha(alpha: float) -> float:
    """Contraction constant of the scaled compressor ``Q(v) / alpha``: ``delta = 1 / alpha``.

    ``E||Q(v)/alpha - v||^2 = E||Q(v)||^2/alpha^2 - ||v||^2 (2/alpha - 1) <= (1 - 1/alpha)
    ||v||^2`` (spec §3.1, property 3). Derived (lore_jax spec §3.1), consistent with the paper's
    framework; not quoted from the paper.

    Args:
      alpha: second-moment constant of the unbiased compressor, ``>= 1``.

    Returns:
      ``delta = 1 / alpha`` in ``(0, 1]``.

    Example:
      >>> delta_from_alpha(4.0)
      0.25
    """
    return 1.0 / _alpha(alpha)


def eps_from_delta(delta: float) -> float:
    """Relative accuracy ``eps = sqrt(1 - delta)`` of a delta-contraction.

    ``||Q(v) - v||^2 <= (1 - delta) ||v||^2`` is ``||Q(v) - v|| <= eps ||v||`` (spec §3.2).
    Derived (lore_jax spec §3.2), consistent with the paper's framework; not quoted from
    the paper.

    Args:
      delta: contraction constant in ``(0, 1]``.

    Returns:
      ``eps`` in ``[0, 1)``.

    Example:
      >>> eps_from_delta(0.75)
      0.5
    """
    return math.sqrt(1.0 - _delta(delta))


def delta_from_eps(eps: float) -> float:
    """Contraction constant ``delta = 1 - eps**2`` from a relative accuracy ``eps < 1``.

    Derived (lore_jax spec §3.2), consistent with the paper's framework; not quoted from the
    paper.

    Args:
      eps: relative accuracy ``||Q(v) - v|| <= eps ||v||``, in ``[0, 1)``.

    Returns:
      ``delta`` in ``(0, 1]``.

    Example:
      >>> delta_from_eps(0.5)
      0.75
    """
    eps = _nonnegative("eps", eps)
    if eps >= 1:
        raise ValueError(f"eps must be < 1 for a relative compressor to contract, got {eps!r}.")
    return 1.0 - eps * eps


def bits_to_accuracy(
    iterations: int,
    uplink_bits: float,
    *,
    num_workers: int = 1,
    downlink_bits: float = 0,
) -> int | float:
    """Total bits to reach an accuracy: ``B = K (num_workers * uplink_bits + downlink_bits)``.

    Spec §5.9: every iteration each of the ``m`` workers sends one message of ``b_up`` bits
    and the server broadcasts ``b_down`` bits (``32 d`` for a float32 iterate, the
    compressed size for bidirectional compression). In asynchronous runs pass the number
    of workers that actually send per step (one for A5/A6). Derived (lore_jax spec §5.9),
    consistent with the paper's framework; not quoted from the paper.

    Args:
      iterations: ``K(eps) >= 0``.
      uplink_bits: bits of one worker's message, ``>= 0`` (exact int or expected float).
      num_workers: workers sending per iteration (default 1).
      downlink_bits: bits broadcast per iteration (default 0).

    Returns:
      The total, an int when all inputs are ints.

    Example:
      >>> bits_to_accuracy(100, 32 * 10, num_workers=4, downlink_bits=32 * 40)
      256000
    """
    iterations = _integer("iterations", iterations, 0)
    num_workers = _integer("num_workers", num_workers, 1)
    _nonnegative("uplink_bits", uplink_bits)
    _nonnegative("downlink_bits", downlink_bits)
    return iterations * (num_workers * uplink_bits + downlink_bits)


# ----------------------------------------------------------------------------- A1 / A2 / A3


def cgd_unbiased(
    L: float,
    mu: float | None,
    alpha: Any,
    *,
    step_size: float | None = None,
    initial: float | None = None,
    target: float | None = None,
    uplink_bits: float | None = None,
    num_workers: int = 1,
    downlink_bits: float = 0,
) -> Guarantee:
    """A1: compressed gradient descent with an unbiased compressor (spec §5.1).

    ``x_{k+1} = x_k - gamma Q(grad f(x_k))`` with ``E Q(v) = v``, ``E||Q(v)||^2 <= alpha
    ||v||^2``. From ``E f(x+) <= f(x) - gamma (1 - alpha L gamma / 2) ||grad f(x)||^2``:
    admissible ``0 < gamma < 2 / (alpha L)``, recommended ``gamma = 1 / (alpha L)``. Under
    mu-PL, ``E f(x_k) - f* <= rho^k (f(x_0) - f*)`` with ``rho = 1 - 2 mu gamma (1 - alpha L
    gamma / 2)`` (``1 - mu / (alpha L)`` at the recommended step), so ``K(eps) = ceil(alpha
    kappa ln(Delta_0 / eps))``. Non-convex (``mu=None``): ``min_{k<K} E||grad f(x_k)||^2 <=
    (f(x_0) - f_inf) / (gamma (1 - alpha L gamma / 2) K)`` (``2 alpha L Delta_0 / K``).
    Derived (lore_jax spec §5.1), consistent with the paper's framework; not quoted from the
    paper.

    Args:
      L: smoothness of ``f``, ``> 0``.
      mu: PL / strong-convexity constant, ``0 < mu <= L``; ``None`` for the non-convex bound.
      alpha: compressor second moment, ``>= 1`` (or an object declaring ``alpha``/``omega``).
      step_size: the step to analyse; ``None`` (default) takes ``1 / (alpha L)``.
      initial: ``f(x_0) - f*`` (or ``- f_inf``), needed with ``target`` for ``iterations``.
      target: the accuracy ``eps`` of the same quantity.
      uplink_bits: bits of one compressed message, for ``bits``.
      num_workers: messages per iteration (default 1: server-side compression).
      downlink_bits: bits broadcast per iteration (default 0).

    Returns:
      A :class:`Guarantee` bounding ``E f(x_k) - f*`` (or ``min E||grad f||^2``).

    References:
      Khirirat, Feyzmahdavian, Johansson, "Distributed learning with compressed gradients",
      arXiv:1806.06573 (framework); lore_jax spec §5.1 (derivation).

    Example:
      >>> g = cgd_unbiased(L=10.0, mu=1.0, alpha=4.0, initial=1.0, target=1e-6)
      >>> round(g.step_size, 6), round(g.rate, 6), g.iterations
      (0.025, 0.975, 553)
    """
    L = _positive("L", L)
    alpha = _alpha(alpha)
    return _unbiased_descent("A1 CGD, unbiased compressor", "5.1", L, "L", mu, alpha, 1,
                             step_size,
                             _Budget(initial, target, uplink_bits, num_workers, downlink_bits))


def cgd_contractive(
    L: float,
    mu: float | None,
    delta: Any,
    *,
    step_size: float | None = None,
    initial: float | None = None,
    target: float | None = None,
    uplink_bits: float | None = None,
    num_workers: int = 1,
    downlink_bits: float = 0,
) -> Guarantee:
    """A2: compressed gradient descent with a contraction (spec §5.2).

    ``x_{k+1} = x_k - gamma Q(grad f(x_k))`` with ``||Q(v) - v||^2 <= (1 - delta) ||v||^2``
    (deterministic, e.g. top-k with ``delta = k/d``). From ``f(x+) <= f(x) - (gamma delta /
    2) ||grad f||^2 - (gamma / 2)(1 - L gamma) ||Q(grad f)||^2``: admissible ``0 < gamma <=
    1 / L``, recommended ``1 / L``; under mu-PL ``f(x_k) - f* <= (1 - gamma mu delta)^k
    (f(x_0) - f*)``; non-convex ``min_{k<K} ||grad f(x_k)||^2 <= 2 Delta_0 / (gamma delta
    K)``. Derived (lore_jax spec §5.2), consistent with the paper's framework; not quoted
    from the paper.

    Args:
      L: smoothness of ``f``, ``> 0``.
      mu: PL constant, ``0 < mu <= L``; ``None`` for the non-convex bound.
      delta: contraction constant in ``(0, 1]`` (or an object declaring ``delta``); use
        :func:`delta_from_eps` for the relative-accuracy form.
      step_size: the step to analyse; ``None`` (default) takes ``1 / L``.
      initial: ``f(x_0) - f*``, with ``target`` for ``iterations``.
      target: the accuracy ``eps``.
      uplink_bits: bits of one compressed message, for ``bits``.
      num_workers: messages per iteration (default 1).
      downlink_bits: bits broadcast per iteration (default 0).

    Returns:
      A :class:`Guarantee` bounding ``f(x_k) - f*`` at every iteration.

    References:
      Khirirat, Feyzmahdavian, Johansson, arXiv:1806.06573 (framework); lore_jax spec §5.2.

    Example:
      >>> g = cgd_contractive(L=10.0, mu=1.0, delta=0.25)
      >>> g.step_size, g.rate
      (0.1, 0.975)
    """
    L = _positive("L", L)
    delta = _delta(delta)
    gamma = _step(step_size, 1.0 / L, closed=True, recommended=1.0 / L)
    budget = _Budget(initial, target, uplink_bits, num_workers, downlink_bits)
    if mu is None:
        return _result("A2 CGD, contractive compressor (non-convex)", "5.2", gamma, 1.0 / L,
                       True, "min_{k<K} ||grad f(x_k)||^2", budget,
                       coefficient=2.0 / (gamma * delta))
    mu = _mu(mu, L)
    return _result("A2 CGD, contractive compressor (PL)", "5.2", gamma, 1.0 / L, True,
                   "f(x_k) - f*", budget, rate=1.0 - gamma * mu * delta)


def cgd_absolute(
    L: float,
    mu: float,
    eps: Any,
    *,
    quadratic: bool = False,
    step_size: float | None = None,
    initial: float | None = None,
    target: float | None = None,
    uplink_bits: float | None = None,
    num_workers: int = 1,
    downlink_bits: float = 0,
) -> Guarantee:
    """A3: compressed gradient descent with an absolute-error compressor (spec §5.3).

    ``x_{k+1} = x_k - gamma Q(grad f(x_k))`` with ``||Q(v) - v|| <= eps`` (e.g. rounding to a
    grid of step ``Delta``: ``eps = sqrt(d) Delta / 2``). The gradient step contracts,
    ``||x - gamma grad f(x) - x*|| <= rho ||x - x*||``, so ``||x_k - x*|| <= rho^k ||x_0 -
    x*|| + (1 - rho^k) gamma eps / (1 - rho)``: linear convergence to a ball (the "accuracy
    floor"). For ``f`` mu-strongly convex and L-smooth, ``rho = sqrt(1 - 2 gamma mu L / (mu +
    L))`` for ``0 < gamma <= 2 / (mu + L)``; for quadratics (``quadratic=True``) ``rho =
    max(|1 - gamma mu|, |1 - gamma L|)`` for ``0 < gamma < 2 / L``. At the recommended
    ``gamma = 2 / (mu + L)`` both give ``rho = (L - mu)/(L + mu)`` and the floor ``eps / mu``.
    Derived (lore_jax spec §5.3), consistent with the paper's framework; not quoted from the
    paper.

    Args:
      L: smoothness of ``f``, ``> 0``.
      mu: strong convexity, ``0 < mu <= L``.
      eps: absolute compression error, ``>= 0`` (or an object declaring ``eps``).
      quadratic: whether ``f`` is quadratic (default False), which widens the range.
      step_size: the step to analyse; ``None`` (default) takes ``2 / (mu + L)``.
      initial: ``||x_0 - x*||``, with ``target`` for ``iterations``.
      target: the accuracy of ``||x_k - x*||``; it must exceed the floor.
      uplink_bits: bits of one compressed message, for ``bits``.
      num_workers: messages per iteration (default 1).
      downlink_bits: bits broadcast per iteration (default 0).

    Returns:
      A :class:`Guarantee` bounding ``||x_k - x*||`` (not squared) at every iteration.

    References:
      Khirirat, Feyzmahdavian, Johansson, arXiv:1806.06573 (framework); lore_jax spec §5.3.

    Example:
      >>> g = cgd_absolute(L=3.0, mu=1.0, eps=0.1)
      >>> g.step_size, g.rate, round(g.floor, 12)
      (0.5, 0.5, 0.1)
    """
    L = _positive("L", L)
    mu = _mu(mu, L)
    eps = _nonnegative("eps", _declared(eps, "eps", "absolute"))
    recommended = 2.0 / (mu + L)
    if quadratic:
        max_step, closed = 2.0 / L, False
        gamma = _step(step_size, max_step, closed, recommended)
        rate = max(abs(1.0 - gamma * mu), abs(1.0 - gamma * L))
    else:
        max_step, closed = recommended, True
        gamma = _step(step_size, max_step, closed, recommended)
        rate = math.sqrt(max(0.0, 1.0 - 2.0 * gamma * mu * L / (mu + L)))
    setting = "quadratic" if quadratic else "strongly convex"
    budget = _Budget(initial, target, uplink_bits, num_workers, downlink_bits)
    return _result(f"A3 CGD, absolute compressor ({setting})", "5.3", gamma, max_step, closed,
                   "||x_k - x*||", budget, rate=rate, floor=gamma * eps / (1.0 - rate))


# ----------------------------------------------------------------------------- A4


def dcgd(
    L: float,
    mu: float,
    alpha: Any,
    L_max: float,
    sigma_star_sq: float,
    num_workers: int,
    *,
    convention: Literal["sum", "average"] = "sum",
    alpha_server: Any = 1.0,
    step_size: float | None = None,
    initial: float | None = None,
    target: float | None = None,
    uplink_bits: float | None = None,
    downlink_bits: float = 0,
) -> Guarantee:
    """A4: distributed compressed gradient descent, worker-side compression (spec §5.4).

    Sum convention: ``x_{k+1} = x_k - gamma Q_M(sum_i Q_i(grad f_i(x_k)))`` with independent
    alpha-unbiased ``Q_i`` and an optional ``alpha_M``-unbiased server re-compression ``Q_M``
    (``alpha_server=1``: none). With each ``f_i`` convex and ``L_i``-smooth, ``f = sum_i f_i``
    mu-strongly convex, ``omega = alpha - 1`` and ``sigma*^2 = sum_i ||grad f_i(x*)||^2``:
    if ``gamma <= 1 / (alpha_M (L + 2 omega L_max))`` then ``E||x_k - x*||^2 <= (1 - gamma
    mu)^k ||x_0 - x*||^2 + (1 - (1 - gamma mu)^k) 2 gamma alpha_M omega sigma*^2 / mu``.
    The floor vanishes when ``sigma*^2 = 0``. With a ``target`` and no ``step_size`` the
    corollary step ``gamma = min{1/(alpha_M (L + 2 omega L_max)), eps mu / (4 alpha_M omega
    sigma*^2)}`` makes the floor at most ``eps / 2`` and ``K <= ceil(ln(2 ||x_0 - x*||^2 /
    eps) / (gamma mu))``.

    Averaged convention (``convention="average"``): ``x+ = x - gamma (1/m) sum_i Q_i(...)``;
    pass ``L`` and ``mu`` of ``f_bar = (1/m) sum_i f_i``, while ``L_max`` (of the ``f_i``)
    and ``sigma_star_sq`` (the *sum* over workers) keep their meaning. This is the sum
    convention with step ``gamma / m``: ``gamma <= 1 / (alpha_M (L_bar + 2 omega L_max /
    m))``, rate ``1 - gamma mu_bar``, floor ``2 gamma alpha_M omega sigma*^2 / (m^2 mu_bar)``.
    Derived (lore_jax spec §5.4), consistent with the paper's framework; not quoted from the
    paper.

    Args:
      L: smoothness of ``f`` (sum) or ``f_bar`` (average), ``> 0``.
      mu: strong convexity of the same function, ``0 < mu <= L``.
      alpha: worker compressor second moment, ``>= 1`` (max over workers if they differ).
      L_max: ``max_i L_i``, ``> 0``.
      sigma_star_sq: ``sum_i ||grad f_i(x*)||^2``, ``>= 0``.
      num_workers: ``m >= 1``.
      convention: ``"sum"`` (default, the paper's eq. (1)) or ``"average"``.
      alpha_server: server re-compression second moment ``alpha_M >= 1`` (default 1.0).
      step_size: the step to analyse; ``None`` takes the largest admissible step, or the
        corollary step when ``target`` is given.
      initial: ``||x_0 - x*||^2``, with ``target`` for ``iterations``.
      target: the accuracy of ``E||x_k - x*||^2``.
      uplink_bits: bits of one worker's message; ``bits`` counts ``num_workers`` of them
        per iteration.
      downlink_bits: bits broadcast per iteration (default 0).

    Returns:
      A :class:`Guarantee` bounding ``E||x_k - x*||^2``.

    References:
      Khirirat, Feyzmahdavian, Johansson, arXiv:1806.06573 (DCGD); lore_jax spec §5.4.

    Example:
      >>> g = dcgd(L=10.0, mu=1.0, alpha=4.0, L_max=5.0, sigma_star_sq=2.0, num_workers=4)
      >>> round(g.step_size, 6), round(g.floor, 6)
      (0.025, 0.3)
    """
    L = _positive("L", L)
    mu = _mu(mu, L)
    alpha = _alpha(alpha)
    alpha_m = _alpha(alpha_server, "alpha_server")
    L_max = _positive("L_max", L_max)
    sigma_sq = _nonnegative("sigma_star_sq", sigma_star_sq)
    m = _integer("num_workers", num_workers, 1)
    if convention not in ("sum", "average"):
        raise ValueError(f"convention must be 'sum' or 'average', got {convention!r}.")
    # Work in the sum convention; the averaged method is the sum method with step gamma / m.
    scale = m if convention == "average" else 1
    L_sum, mu_sum = L * scale, mu * scale
    omega = alpha - 1.0
    max_step_sum = 1.0 / (alpha_m * (L_sum + 2.0 * omega * L_max))
    recommended_sum = max_step_sum
    if target is not None and step_size is None and omega * sigma_sq > 0:
        eps = _positive("target", target)
        recommended_sum = min(max_step_sum, eps * mu_sum / (4.0 * alpha_m * omega * sigma_sq))
    gamma_sum = _step(step_size, max_step_sum * scale, closed=True,
                      recommended=recommended_sum * scale) / scale
    name = "A4 DCGD" + (", bidirectional" if alpha_m > 1 else "") + f" ({convention})"
    return _result(name, "5.4", gamma_sum * scale, max_step_sum * scale, True,
                   "E||x_k - x*||^2", _Budget(initial, target, uplink_bits, m, downlink_bits),
                   rate=1.0 - gamma_sum * mu_sum,
                   floor=2.0 * gamma_sum * alpha_m * omega * sigma_sq / mu_sum)


# ----------------------------------------------------------------------------- A5


def stale_cgd(
    L: float,
    mu: float | None,
    alpha: Any,
    max_delay: int,
    *,
    step_size: float | None = None,
    initial: float | None = None,
    target: float | None = None,
    uplink_bits: float | None = None,
    num_workers: int = 1,
    downlink_bits: float = 0,
) -> Guarantee:
    """A5: compressed gradient descent with stale gradients, bounded delay (spec §5.5).

    ``x_{k+1} = x_k - gamma Q(grad f(x_{k - tau_k}))``, ``0 <= tau_k <= tau``, with fresh
    compression randomness each step (iterates before ``x_0`` read as ``x_0``). From ``E
    f(x_{k+1}) <= E f(x_k) - (gamma/2) E||grad f(x_k)||^2 - (gamma/2)(1 - alpha L gamma) a_k +
    (alpha L^2 gamma^3 tau / 2) sum_{j=k-tau}^{k-1} a_j`` and a Lyapunov function that
    carries the last ``tau`` terms:

    * PL (``mu`` given): ``gamma <= 1 / (2 L sqrt(alpha) (sqrt(alpha) + tau))`` gives
      ``E f(x_k) - f* <= (1 - gamma mu)^k (f(x_0) - f*)``, hence ``K(eps) = 2 kappa (alpha +
      tau sqrt(alpha)) ln(Delta_0 / eps)`` at the largest step.
    * non-convex (``mu=None``): any ``gamma`` with ``alpha L gamma + alpha L^2 tau^2 gamma^2
      <= 1``, recommended ``1 / (L sqrt(alpha) (sqrt(alpha) + tau))``, gives ``min_{k<K}
      E||grad f(x_k)||^2 <= 2 (f(x_0) - f_inf) / (gamma K)``.

    Compression and delay combine additively (``alpha + tau sqrt(alpha)``). A delay-blind
    step ``1 / (alpha L)`` is unsafe: it diverges for ``tau >= 8`` on the spec's test
    problem. Derived (lore_jax spec §5.5), consistent with the paper's framework; not quoted
    from the paper.

    Args:
      L: smoothness of ``f``, ``> 0``.
      mu: PL constant, ``0 < mu <= L``; ``None`` for the non-convex bound.
      alpha: compressor second moment, ``>= 1`` (``1`` for no compression).
      max_delay: the delay bound ``tau``, an integer ``>= 0``.
      step_size: the step to analyse; ``None`` (default) takes the recommended step.
      initial: ``f(x_0) - f*``, with ``target`` for ``iterations``.
      target: the accuracy ``eps``.
      uplink_bits: bits of one compressed message, for ``bits``.
      num_workers: messages per server step (default 1).
      downlink_bits: bits broadcast per iteration (default 0).

    Returns:
      A :class:`Guarantee` bounding ``E f(x_k) - f*`` (or ``min E||grad f||^2``).

    References:
      Khirirat, Feyzmahdavian, Johansson, arXiv:1806.06573 (framework); lore_jax spec §5.5.

    Example:
      >>> g = stale_cgd(L=1.0, mu=0.1, alpha=4.0, max_delay=8)
      >>> round(g.step_size, 6), round(1 / (1 - g.rate), 1)
      (0.025, 400.0)
    """
    L = _positive("L", L)
    alpha = _alpha(alpha)
    tau = _integer("max_delay", max_delay, 0)
    sa = math.sqrt(alpha)
    budget = _Budget(initial, target, uplink_bits, num_workers, downlink_bits)
    if mu is None:
        if tau == 0:
            max_step = 1.0 / (alpha * L)
        else:  # positive root of alpha L^2 tau^2 g^2 + alpha L g - 1 = 0
            max_step = 2.0 / (alpha * L * (1.0 + math.sqrt(1.0 + 4.0 * tau * tau / alpha)))
        gamma = _step(step_size, max_step, closed=True, recommended=1.0 / (L * sa * (sa + tau)))
        return _result("A5 stale CGD (non-convex)", "5.5", gamma, max_step, True, _GRAD_SQ,
                       budget, coefficient=2.0 / gamma)
    mu = _mu(mu, L)
    max_step = 1.0 / (2.0 * L * sa * (sa + tau))
    gamma = _step(step_size, max_step, closed=True, recommended=max_step)
    return _result("A5 stale CGD (PL)", "5.5", gamma, max_step, True, "E f(x_k) - f*", budget,
                   rate=1.0 - gamma * mu)


def max_delay_lemma_rate(p: float, q: float, tau: int) -> float:
    """Per-step rate of ``V_{k+1} <= p V_k + q max_{k - tau <= s <= k} V_s``: ``(p+q)^(1/(1+tau))``.

    If ``p, q >= 0`` and ``p + q < 1``, every non-negative sequence obeying the recursion
    satisfies ``V_k <= (p + q)^(k / (1 + tau)) V_0`` (a Feyzmahdavian-type lemma). Proof by
    induction with ``r = (p + q)^(1/(1+tau))``: if ``V_s <= r^s V_0`` for ``s <= k``, then
    ``V_{k+1} <= p r^k V_0 + q r^{max(k - tau, 0)} V_0 <= (p + q) r^{max(k - tau, 0)} V_0 <=
    r^{k+1} V_0``. Derived (lore_jax spec §5.5, the alternative analysis tool), consistent
    with the paper's framework; not quoted from the paper.

    Args:
      p: weight of the current term, ``>= 0``.
      q: weight of the delayed maximum, ``>= 0``, with ``p + q < 1``.
      tau: the maximal delay, an integer ``>= 0``.

    Returns:
      The per-step contraction factor ``r`` in ``[0, 1)``.

    References:
      Feyzmahdavian, Aytekin, Johansson, asynchronous-iteration sequence lemmas; lore_jax
      spec §5.5.

    Example:
      >>> round(max_delay_lemma_rate(0.5, 0.25, 1), 6)
      0.866025
    """
    p = _nonnegative("p", p)
    q = _nonnegative("q", q)
    tau = _integer("tau", tau, 0)
    if p + q >= 1:
        raise ValueError(f"p + q must be < 1 for a contraction, got p={p!r}, q={q!r}.")
    return (p + q) ** (1.0 / (1.0 + tau))


# ----------------------------------------------------------------------------- A7 / A8


def compressed_bcd(
    L_block: float,
    mu: float | None,
    alpha: Any,
    num_blocks: int,
    *,
    step_size: float | None = None,
    initial: float | None = None,
    target: float | None = None,
    uplink_bits: float | None = None,
    num_workers: int = 1,
    downlink_bits: float = 0,
) -> Guarantee:
    """A7: compressed randomized block-coordinate descent (spec §5.7).

    ``x_{k+1} = x_k - gamma U_j Q(grad_j f(x_k))`` with ``j`` uniform over ``n_b`` blocks and
    ``Q`` alpha-unbiased. With block smoothness ``L_blk`` (``f(x + U_j h) <= f(x) + <grad_j
    f, h> + L_blk/2 ||h||^2`` for all blocks), ``E f(x+) <= f(x) - (gamma / n_b)(1 - alpha
    L_blk gamma / 2) ||grad f(x)||^2``: admissible ``0 < gamma < 2 / (alpha L_blk)``,
    recommended ``1 / (alpha L_blk)``; under mu-PL ``E f(x_k) - f* <= rho^k (f(x_0) - f*)``
    with ``rho = 1 - 2 mu gamma (1 - alpha L_blk gamma / 2) / n_b`` (``1 - mu / (n_b alpha
    L_blk)`` at the recommended step). Derived (lore_jax spec §5.7), consistent with the
    paper's framework; not quoted from the paper.

    Args:
      L_block: block smoothness ``L_blk = max_j L_j``, ``> 0``.
      mu: PL constant of ``f``, ``0 < mu <= L_block``; ``None`` for the non-convex bound.
      alpha: compressor second moment, ``>= 1`` (``1``: plain randomized BCD).
      num_blocks: ``n_b >= 1``.
      step_size: the step to analyse; ``None`` (default) takes ``1 / (alpha L_blk)``.
      initial: ``f(x_0) - f*``, with ``target`` for ``iterations``.
      target: the accuracy ``eps``.
      uplink_bits: bits of one compressed *block* message, for ``bits``.
      num_workers: messages per iteration (default 1).
      downlink_bits: bits broadcast per iteration (default 0).

    Returns:
      A :class:`Guarantee` bounding ``E f(x_k) - f*`` (or ``min E||grad f||^2``).

    References:
      Khirirat, Feyzmahdavian, Johansson, arXiv:1806.06573 (framework); lore_jax spec §5.7.

    Example:
      >>> g = compressed_bcd(L_block=2.0, mu=0.5, alpha=2.0, num_blocks=4)
      >>> g.step_size, g.rate
      (0.25, 0.96875)
    """
    L_block = _positive("L_block", L_block)
    alpha = _alpha(alpha)
    n_b = _integer("num_blocks", num_blocks, 1)
    return _unbiased_descent("A7 compressed BCD", "5.7", L_block, "L_block", mu, alpha, n_b,
                             step_size,
                             _Budget(initial, target, uplink_bits, num_workers, downlink_bits))


def compressed_sgd(
    A: float,
    C: float,
    mu: float,
    alpha: Any,
    *,
    step_size: float | None = None,
    initial: float | None = None,
    target: float | None = None,
    uplink_bits: float | None = None,
    num_workers: int = 1,
    downlink_bits: float = 0,
) -> Guarantee:
    """A8: compressed stochastic / mini-batch gradient descent, generic theorem (spec §5.8).

    ``x_{k+1} = x_k - gamma Q(g_k)`` with ``E g_k = grad f(x_k)``, ``E||g_k||^2 <= 2 A (f(x_k)
    - f*) + C`` and ``f`` mu-strongly convex. ``E||Q(g)||^2 <= alpha E||g||^2`` gives ``e_{k+1}
    <= (1 - gamma mu) e_k - 2 gamma (1 - gamma alpha A)(f - f*) + gamma^2 alpha C``, so for
    ``0 < gamma <= 1 / (alpha A)``: ``E||x_k - x*||^2 <= (1 - gamma mu)^k ||x_0 - x*||^2 + (1 -
    (1 - gamma mu)^k) gamma alpha C / mu``. See :func:`minibatch_constants` for ``(A, C)`` of
    b-nice sampling. Derived (lore_jax spec §5.8), consistent with the paper's framework;
    not quoted from the paper.

    Args:
      A: expected-smoothness constant, ``> 0``.
      C: gradient-noise constant, ``>= 0``.
      mu: strong convexity of ``f``, ``> 0``.
      alpha: compressor second moment, ``>= 1``.
      step_size: the step to analyse; ``None`` (default) takes ``1 / (alpha A)``.
      initial: ``||x_0 - x*||^2``, with ``target`` for ``iterations``.
      target: the accuracy of ``E||x_k - x*||^2``; it must exceed the floor.
      uplink_bits: bits of one compressed message, for ``bits``.
      num_workers: messages per iteration (default 1).
      downlink_bits: bits broadcast per iteration (default 0).

    Returns:
      A :class:`Guarantee` bounding ``E||x_k - x*||^2``.

    References:
      Khirirat, Feyzmahdavian, Johansson, arXiv:1806.06573 (framework); lore_jax spec §5.8;
      Gower et al., "SGD: general analysis and improved rates", ICML 2019 (expected
      smoothness).

    Example:
      >>> g = compressed_sgd(A=4.0, C=1.0, mu=0.5, alpha=2.0)
      >>> g.step_size, g.rate, g.floor
      (0.125, 0.9375, 0.5)
    """
    A = _positive("A", A)
    C = _nonnegative("C", C)
    mu = _positive("mu", mu)
    alpha = _alpha(alpha)
    max_step = 1.0 / (alpha * A)
    gamma = _step(step_size, max_step, closed=True, recommended=max_step)
    rate = 1.0 - gamma * mu
    if rate < 0:
        raise ValueError(f"mu={mu!r} is inconsistent with A={A!r}: gamma mu > 1.")
    budget = _Budget(initial, target, uplink_bits, num_workers, downlink_bits)
    return _result("A8 compressed SGD", "5.8", gamma, max_step, True, "E||x_k - x*||^2",
                   budget, rate=rate, floor=gamma * alpha * C / mu)


def minibatch_constants(
    L: float,
    L_max: float,
    sigma_star_sq: float,
    num_samples: int,
    batch_size: int,
    *,
    convention: Literal["sum", "average"] = "sum",
) -> ExpectedSmoothness:
    """``(A, C)`` of the b-nice mini-batch gradient, for :func:`compressed_sgd`.

    For ``f = sum_{i=1}^n f_i`` with each ``f_i`` convex and ``L_i``-smooth, sample ``b``
    indices without replacement and take ``g = (n/b) sum_{i in B} grad f_i`` (sum
    convention) or ``(1/b) sum_{i in B} grad f_i`` for ``f_bar = f / n`` (average). With
    ``L_b = (b - 1)/(b (n - 1)) L + (n - b)/(b (n - 1)) L_max`` (``L`` of the sum) and
    ``s_b = (n - b)/(b (n - 1)) sigma*^2 / n``, the expected-smoothness bound ``E||g(x) -
    g(x*)||^2 <= 2 L_b (f_bar(x) - f_bar*)`` and ``E||g||^2 <= 2 E||g - g*||^2 + 2 E||g*||^2``
    give ``A = 2 L_b``, ``C = 2 s_b`` (average) and ``A = 2 n L_b``, ``C = 2 n^2 s_b`` (sum).
    ``b = n`` gives ``A = 2 L`` (sum), ``C = 0``. Derived (lore_jax spec §5.8, after Gower et
    al. 2019's expected smoothness), consistent with the paper's framework; not quoted from
    the paper.

    Args:
      L: smoothness of the *sum* ``f = sum_i f_i``, ``> 0``.
      L_max: ``max_i L_i``, ``> 0``.
      sigma_star_sq: ``sum_i ||grad f_i(x*)||^2``, ``>= 0``.
      num_samples: ``n >= 1``.
      batch_size: ``1 <= b <= n``.
      convention: ``"sum"`` (default) or ``"average"``: which function ``g`` estimates.

    Returns:
      :class:`ExpectedSmoothness` ``(A, C)``.

    References:
      Gower, Loizou, Qian, Sailanbayev, Shulgin, Richtárik, "SGD: general analysis and
      improved rates", ICML 2019 (Prop. 3.8); lore_jax spec §5.8.

    Example:
      >>> minibatch_constants(L=4.0, L_max=1.0, sigma_star_sq=2.0, num_samples=8, batch_size=8)
      ExpectedSmoothness(A=8.0, C=0.0)
    """
    L = _positive("L", L)
    L_max = _positive("L_max", L_max)
    sigma_sq = _nonnegative("sigma_star_sq", sigma_star_sq)
    n = _integer("num_samples", num_samples, 1)
    b = _integer("batch_size", batch_size, 1)
    if b > n:
        raise ValueError(f"batch_size must be <= num_samples={n}, got {b}.")
    if convention not in ("sum", "average"):
        raise ValueError(f"convention must be 'sum' or 'average', got {convention!r}.")
    if n == 1:
        L_b, s_b = L, 0.0
    else:
        L_b = (b - 1) / (b * (n - 1)) * L + (n - b) / (b * (n - 1)) * L_max
        s_b = (n - b) / (b * (n - 1)) * sigma_sq / n
    if convention == "average":
        return ExpectedSmoothness(2.0 * L_b, 2.0 * s_b)
    return ExpectedSmoothness(2.0 * n * L_b, 2.0 * n * n * s_b)
