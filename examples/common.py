"""Shared setup of the E1-E8 examples: 8 simulated devices, sharded problems, one run loop.

Every example reproduces one claim of section 6.2 of the lore_jax compressed-gradients spec
on generated data. The ``m = 8`` workers of the spec are 8 devices (simulated CPU devices
unless real ones exist); worker ``i`` is device ``i`` and holds shard ``i`` of the problem.
One step on device ``i``::

    g_i = grad f_i(x)                          (its shard, or a mini-batch of it)
    u   = compressed_mean(Q)(g_i)              (= (1/m) sum_i Q_i(g_i), identical everywhere)
    x   = x - lr * u                           (optax.sgd)

The problems use the spec's *sum* convention ``f = sum_i f_i`` (:mod:`lore_jax.problems`),
and the calculators of :mod:`lore_jax.theory` return the step ``gamma`` of
``x+ = x - gamma sum_i Q_i(g_i)``; since ``compressed_mean`` averages, the sgd learning rate
is ``lr = m * gamma`` (:func:`sum_step`). For a linear compressor with a shared seed
(``random_k(k, shared_seed=True)``) every device keeps the same coordinates, so the mean
of the compressed gradients is the compression of the mean gradient: the run is exactly the
spec's server-side compressed gradient descent (A1, A5, A7) on 8 devices.

Every step size, rate and floor comes from :mod:`lore_jax.theory`: constants **derived** in
the lore_jax spec, consistent with the framework of Khirirat, Feyzmahdavian and Johansson
("Distributed learning with compressed gradients", arXiv:1806.06573, 2018); none is
quoted from the paper.

Steps run in chunks: one jitted ``shard_map`` call scans ``chunk`` steps and returns the
iterates; the loop blocks on each chunk (the CPU runtime's in-process collectives can
deadlock when many calls are queued on a few cores). Suboptimality is evaluated in float64
NumPy from the recorded float32 iterates; bits are read from the transforms' exact
counters (:func:`lore_jax.communication`) and summed over the ``m`` workers.
"""

from __future__ import annotations

import os

_FLAG = "--xla_force_host_platform_device_count"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=8").strip()

import argparse
import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import lore_jax
from lore_jax import collectives
from lore_jax.problems import Problem

AXIS = "data"
NUM_WORKERS = 8
DEFAULT_OUT = "results/examples"
PROVENANCE = (
    "Step sizes, rates and floors: lore_jax.theory, constants derived in the lore_jax spec "
    "(sections 3-5), consistent with the framework of Khirirat, Feyzmahdavian and Johansson "
    "(arXiv:1806.06573, 2018); not quoted from the paper."
)
DERIVED = "constants derived, not quoted from the paper"
COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
"""The problems are tiny, so compiling dominates the run time; XLA's cheapest backend
optimization level compiles markedly faster (by about a third to a half here)."""

LocalStep = Callable[..., tuple[jax.Array, Any, jax.Array]]
"""``(x, state, A_i, b_i, key) -> (x, state, bits)`` inside ``shard_map``; ``bits`` is the
uplink of the step summed over workers (a replicated int32 scalar)."""


# ----------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None, description: str) -> argparse.Namespace:
    """``--quick`` (tiny problem, few iterations), ``--out DIR``, ``--seed N``."""
    parser = argparse.ArgumentParser(description=description.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny problem and few iterations (a smoke run, ~10-20 s)")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"directory for the PNG and JSON (default {DEFAULT_OUT})")
    parser.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------- devices, data


def make_mesh(num_workers: int = NUM_WORKERS) -> jax.sharding.Mesh:
    """A one-axis ``"data"`` mesh of ``num_workers`` devices (worker ``i`` = device ``i``):
    the default backend's if it has enough, else the simulated CPU devices."""
    devices = jax.devices()
    if len(devices) < num_workers:
        devices = jax.devices("cpu")
    if len(devices) < num_workers:
        raise RuntimeError(
            f"the examples need {num_workers} devices, found {len(devices)}; run them as "
            f"scripts (they set XLA_FLAGS={_FLAG}=8 before importing JAX) or set that flag "
            f"yourself before JAX is imported."
        )
    return jax.make_mesh((num_workers,), (AXIS,), devices=devices[:num_workers])


def num_devices(mesh: jax.sharding.Mesh) -> int:
    return int(mesh.devices.size)


def put(tree: Any, mesh: jax.sharding.Mesh, spec: P | None = None) -> Any:
    """``device_put`` with a ``NamedSharding`` (``jax.make_mesh`` axes are Explicit);
    replicated unless ``spec`` is given."""
    return jax.device_put(tree, NamedSharding(mesh, P() if spec is None else spec))


def shard_problem(problem: Problem, mesh: jax.sharding.Mesh) -> tuple[jax.Array, jax.Array]:
    """The problem's shards ``(A_s, b_s)``, shapes ``(m, n/m, d)`` and ``(m, n/m)``, float32,
    row ``i`` on device ``i``."""
    if problem.num_shards != num_devices(mesh):
        raise ValueError(f"the problem has {problem.num_shards} shards for "
                         f"{num_devices(mesh)} devices; build it with num_shards = devices.")
    A, b = problem.stacked_shards()
    return (put(jnp.asarray(A, jnp.float32), mesh, P(AXIS)),
            put(jnp.asarray(b, jnp.float32), mesh, P(AXIS)))


def sum_step(gamma: float, m: int = NUM_WORKERS) -> float:
    """The sgd learning rate that applies ``x+ = x - gamma sum_i Q_i(g_i)`` after the mean."""
    return m * gamma


# ----------------------------------------------------------------------------- local gradients


def _data_gradient(problem: Problem) -> Callable[..., jax.Array]:
    logistic = problem.kind == "logistic"

    def grad(x, A, b):
        z = A @ x
        return A.T @ (-b * jax.nn.sigmoid(-b * z) if logistic else z - b)

    return grad


def full_gradient(problem: Problem) -> Callable[..., jax.Array]:
    """``grad f_i(x)`` of the device's shard (sum convention, regularizer split over shards)."""
    data, reg = _data_gradient(problem), problem.reg / problem.num_shards

    def grad(x, A, b, key):
        del key
        return data(x, A, b) + reg * x

    return grad


def minibatch_gradient(problem: Problem, batch: int) -> Callable[..., jax.Array]:
    """An unbiased estimate of ``grad f_i(x)``: ``(r / B) sum_{j in S} grad f_ij(x)`` over a
    uniform ``B``-subset ``S`` of the shard's ``r`` rows, drawn per step and per device."""
    data, reg = _data_gradient(problem), problem.reg / problem.num_shards
    rows = problem.stacked_shards()[0].shape[1]
    if not 1 <= batch <= rows:
        raise ValueError(f"batch must be in [1, {rows}], got {batch}.")

    def grad(x, A, b, key):
        key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))
        idx = jax.random.choice(key, rows, (batch,), replace=False)
        return (rows / batch) * data(x, A[idx], b[idx]) + reg * x

    return grad


# ----------------------------------------------------------------------------- transforms


def sgd() -> optax.GradientTransformation:
    """``optax.sgd`` with its learning rate in the state, so one compiled step serves every
    step size of a sweep (:meth:`Runner.run` sets it)."""
    return optax.inject_hyperparams(optax.sgd)(learning_rate=0.0)


def compressed_sgd(compressor, *, error_feedback=None, before=(), axis_name=AXIS):
    """``chain(*before, compressed_mean(compressor), sgd())``: DCGD (A4) with the default
    ``error_feedback=None``, its error-compensated form with ``"ef14"`` / ``"ef21"``."""
    return optax.chain(
        *before,
        lore_jax.compressed_mean(compressor, axis_name=axis_name, error_feedback=error_feedback),
        sgd())


def _is_hyperparams(node: Any) -> bool:
    """An ``optax.inject_hyperparams`` state (its class name differs across optax versions)."""
    return isinstance(getattr(node, "hyperparams", None), dict) and hasattr(node, "_replace")


def _is_lore_state(node: Any) -> bool:
    return hasattr(type(node), "PER_DEVICE_FIELDS") and hasattr(node, "_fields")


def _lore_states(state: Any, field: str) -> list[Any]:
    return collectives.find_states(state, lambda n: _is_lore_state(n) and field in n._fields)


def bits_sent(state: Any) -> jax.Array:
    """The low words of every ``bits_sent`` counter in ``state``, summed (int32).

    Differences of two readings give a step's bits exactly (modulo 2**32, far above one
    step's message)."""
    words = [s.bits_sent[1] for s in _lore_states(state, "bits_sent")]
    return sum(words, jnp.zeros((), jnp.uint32)).astype(jnp.int32)


def gradient_step(tx: optax.GradientTransformation, grad: Callable[..., jax.Array], *,
                  server_side: bool = False) -> LocalStep:
    """One step of ``tx`` on the local gradient; bits = ``m x`` the device's ``bits_sent``.

    ``server_side``: the devices first all-reduce their gradients (an exact ``psum``, the
    uplink of ``32 d`` bits per worker) and ``tx`` (built with ``axis_name=None``)
    compresses the aggregate ``grad f(x)``; every device computes the same ``Q(grad f)``,
    the server's one broadcast message. That is the spec's A1-A3 form ``x+ = x - gamma
    Q(grad f(x))``; its bits are ``m 32 d`` up plus ``b(Q)`` down.
    """

    def step(x, state, A, b, key):
        g = grad(x, A, b, key)
        m = jax.lax.axis_size(AXIS)
        if server_side:
            g = jax.lax.psum(g, AXIS)
        before = bits_sent(state)
        updates, state = tx.update(g, state, x)
        sent = bits_sent(state) - before
        bits = sent + m * 32 * x.size if server_side else m * sent
        return optax.apply_updates(x, updates), state, bits

    return step


# ----------------------------------------------------------------------------- runs


@dataclasses.dataclass
class Curve:
    """One run: iterates and cumulative bits at iterations ``0..K`` (float64 NumPy).

    Attributes:
      x: iterates, ``(K + 1, d)``.
      bits: cumulative uplink bits summed over workers, ``(K + 1,)``.
      gap: ``f(x_k) - f*``, ``(K + 1,)`` (``inf`` after a divergence).
      dist_sq: ``||x_k - x*||^2``, ``(K + 1,)``.
      diverged: the run left every bounded region and was stopped.
      seconds: wall-clock seconds of the run (compilation included on a first call).
    """

    x: np.ndarray
    bits: np.ndarray
    gap: np.ndarray
    dist_sq: np.ndarray
    diverged: bool
    seconds: float

    @property
    def steps(self) -> int:
        return len(self.gap) - 1


@functools.lru_cache(maxsize=64)
def _hessian(problem: Problem) -> np.ndarray:
    return problem.hessian_bound()


def suboptimality(problem: Problem, X: np.ndarray) -> np.ndarray:
    """``f(x) - f*`` in float64 (the exact quadratic form for least squares)."""
    X = np.asarray(X, np.float64)
    if problem.kind == "least_squares":
        D = X - problem.x_star
        return 0.5 * np.einsum("...d,de,...e->...", D, _hessian(problem), D)
    return problem.loss(X) - problem.f_star


class Runner:
    """Runs ``tx`` on a sharded problem, one compiled chunk of steps reused for every run.

    Args:
      problem: a :class:`lore_jax.problems.Problem` with one shard per device.
      tx: the transformation (its sgd learning rate is set per run).
      mesh: the devices (:func:`make_mesh`).
      step: the per-device step (default :func:`gradient_step` of ``tx`` on the full local
        gradient).
      chunk: steps per compiled call.
      params: the parameter template (default ``zeros(d)``, float32).
    """

    def __init__(self, problem: Problem, tx: optax.GradientTransformation,
                 mesh: jax.sharding.Mesh, step: LocalStep | None = None, *, chunk: int = 250,
                 params: Any = None):
        self.problem, self.tx, self.mesh, self.chunk = problem, tx, mesh, int(chunk)
        self.local_step = step or gradient_step(tx, full_gradient(problem))
        self.data = shard_problem(problem, mesh)
        self.params = jnp.zeros((problem.dim,), jnp.float32) if params is None else params
        self.template = lore_jax.sharded_init(tx, self.params, mesh)
        self.specs = lore_jax.state_specs(self.template, AXIS)
        chunk_len, local_step = self.chunk, self.local_step

        def run_chunk(x, state, A, b, key, k0):
            A, b = A[0], b[0]

            def body(carry, k):
                x, state = carry
                x_new, new, bits = local_step(x, state, A, b, jax.random.fold_in(key, k))
                return (x_new, collectives.match_varying(new, state)), (x_new, bits)

            (x, state), (xs, bits) = jax.lax.scan(body, (x, state), k0 + jnp.arange(chunk_len))
            return x, state, xs, bits

        self._run_chunk = jax.jit(jax.shard_map(
            run_chunk, mesh=mesh, in_specs=(P(), self.specs, P(AXIS), P(AXIS), P(), P()),
            out_specs=(P(), self.specs, P(), P())), compiler_options=COMPILER_OPTIONS)

    def with_problem(self, problem: Problem) -> Runner:
        """The same compiled step on another problem of the same shapes and kind (the step
        reads the problem's data as an argument; its regularizer must be the same)."""
        if (problem.kind, problem.reg, problem.A.shape) != (
                self.problem.kind, self.problem.reg, self.problem.A.shape):
            raise ValueError("with_problem needs the same kind, regularizer and shapes.")
        other = object.__new__(Runner)
        other.__dict__.update(self.__dict__)
        other.problem, other.data = problem, shard_problem(problem, self.mesh)
        return other

    def init(self, seed: int, lr: float) -> Any:
        """The state with every transform's key derived from ``seed`` and the sgd step ``lr``."""
        counter = iter(range(1_000))

        def reseed(node):
            if _is_lore_state(node) and "key" in node._fields:
                key = jax.random.fold_in(jax.random.PRNGKey(seed), next(counter))
                return node._replace(key=put(key, self.mesh))
            if _is_hyperparams(node):
                lr_value = put(jnp.asarray(lr, node.hyperparams["learning_rate"].dtype),
                               self.mesh)
                return node._replace(hyperparams={**node.hyperparams,
                                                  "learning_rate": lr_value})
            return node

        return jax.tree.map(
            reseed, self.template,
            is_leaf=lambda n: _is_hyperparams(n) or _is_lore_state(n))

    def run(self, steps: int, *, lr: float, seed: int = 0, x0: np.ndarray | None = None,
            stop_below: float | None = None, blowup: float = 1e10) -> Curve:
        """Runs ``steps`` iterations (fewer if the gap falls below ``stop_below`` or grows
        beyond ``blowup`` times its initial value: a divergence)."""
        p = self.problem
        x0 = np.zeros(p.dim) if x0 is None else np.asarray(x0, np.float64)
        x = put(jnp.asarray(x0, jnp.float32), self.mesh)
        state = self.init(seed, lr)
        key = put(jax.random.fold_in(jax.random.PRNGKey(seed), 7919), self.mesh)
        gap0 = float(suboptimality(p, x0))
        xs, bits, diverged, done = [x0[None]], [np.zeros(1)], False, 0
        start = time.perf_counter()
        while done < steps:
            x, state, X, B = jax.block_until_ready(
                self._run_chunk(x, state, *self.data, key, put(jnp.int32(done), self.mesh)))
            X = np.asarray(X, np.float64)[: steps - done]
            xs.append(X)
            bits.append(np.asarray(B, np.float64)[: steps - done])
            done += len(X)
            gap = suboptimality(p, X[-1])
            if not np.all(np.isfinite(X)) or not gap <= blowup * max(gap0, 1e-300):
                diverged = True
                break
            if stop_below is not None and gap <= stop_below:
                break
        X = np.concatenate(xs)
        gaps = suboptimality(p, X)
        dist = np.sum((X - p.x_star) ** 2, axis=-1)
        if diverged:
            bad = ~np.isfinite(gaps) | ~np.isfinite(dist)
            gaps[bad], dist[bad] = np.inf, np.inf
        return Curve(x=X, bits=np.cumsum(np.concatenate(bits)), gap=gaps, dist_sq=dist,
                     diverged=diverged, seconds=time.perf_counter() - start)

    def runs(self, steps: int, *, lr: float, seeds: Sequence[int], **kwargs) -> list[Curve]:
        return [self.run(steps, lr=lr, seed=s, **kwargs) for s in seeds]


# ----------------------------------------------------------------------------- measurements


def mean_se(curves: Sequence[Curve], attr: str = "gap") -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error over runs (``se = 0`` for one run), truncated to the shortest."""
    n = min(len(getattr(c, attr)) for c in curves)
    values = np.stack([getattr(c, attr)[:n] for c in curves])
    se = values.std(axis=0, ddof=1) / math.sqrt(len(curves)) if len(curves) > 1 else 0 * values[0]
    return values.mean(axis=0), se


def first_below(values: np.ndarray, target: float) -> int | None:
    """The first index with ``values <= target``, or ``None``."""
    hit = np.flatnonzero(np.asarray(values) <= target)
    return int(hit[0]) if hit.size else None


def below_bound(mean: np.ndarray, se: np.ndarray, bound: np.ndarray,
                rtol: float = 1e-6) -> tuple[bool, float]:
    """Whether ``mean <= bound + 3 se`` at every iteration (with a float32 allowance
    ``rtol * bound[0]``); returns it and ``max(mean / bound)``."""
    ok = bool(np.all(mean <= bound + 3.0 * se + rtol * bound[0]))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(bound > rtol * bound[0], mean / bound, np.nan)
    return ok, float(np.nanmax(ratio))


def fitted_rate(values: np.ndarray, start: int, stop: int) -> float:
    """The per-iteration factor ``r`` of a least-squares fit ``log values ~ a + k log r``."""
    k = np.arange(start, stop)
    v = np.log(np.maximum(values[start:stop], 1e-300))
    return float(np.exp(np.polyfit(k, v, 1)[0]))


# ----------------------------------------------------------------------------- reports


def sample_points(n: int, max_points: int = 300) -> np.ndarray:
    """About ``max_points`` indices of ``0..n-1``: log-spaced and uniform, first and last."""
    if n <= max_points:
        return np.arange(n)
    log = np.unique(np.geomspace(1, n - 1, max_points // 2).astype(int))
    lin = np.linspace(0, n - 1, max_points // 2).astype(int)
    return np.unique(np.concatenate([[0], log, lin, [n - 1]]))


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    return value


class Report:
    """Claims (verdicts computed from measured curves), observations, curves and a figure."""

    def __init__(self, experiment: str, title: str, args: argparse.Namespace, **config: Any):
        self.experiment, self.title, self.args = experiment, title, args
        self.config = {"quick": bool(args.quick), "seed": args.seed,
                       "workers": NUM_WORKERS, **config}
        self.claims: list[dict[str, Any]] = []
        self.observations: dict[str, Any] = {}
        self.curves: list[dict[str, Any]] = []
        self.start = time.perf_counter()

    def claim(self, statement: str, ok: bool, **evidence: Any) -> bool:
        """Records a verdict and prints ``E4: statement: OK (evidence)``."""
        ok = bool(ok)
        self.claims.append({"claim": statement, "ok": ok, "evidence": _clean(evidence)})
        detail = ", ".join(f"{k}={_fmt(v)}" for k, v in evidence.items())
        print(f"{self.experiment}: {statement}: {'OK' if ok else 'NOT REPRODUCED'}"
              + (f" ({detail})" if detail else ""), flush=True)
        return ok

    def observe(self, name: str, value: Any) -> None:
        self.observations[name] = _clean(value)

    def add_curve(self, label: str, curve: Curve | None = None, *, group: str = "",
                  gap: np.ndarray | None = None, bits: np.ndarray | None = None,
                  bound: np.ndarray | None = None, quantity: str = "f(x_k) - f*",
                  **meta: Any) -> dict[str, Any]:
        """Stores a (sub-sampled) curve: values vs iterations and vs cumulative bits."""
        values = curve.gap if gap is None else np.asarray(gap, np.float64)
        bits = curve.bits if bits is None else np.asarray(bits, np.float64)
        idx = sample_points(len(values))
        entry = {"label": label, "group": group, "quantity": quantity,
                 "iterations": idx, "values": values[idx], "bits": bits[idx], **meta}
        if bound is not None:
            entry["bound"] = np.asarray(bound, np.float64)[idx]
        self.curves.append(_clean(entry))
        return entry

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.claims)

    def write(self, fig: matplotlib.figure.Figure, name: str) -> dict[str, str]:
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        png, js = out / f"{name}.png", out / f"{name}.json"
        fig.savefig(png, dpi=110)
        plt.close(fig)
        payload = {
            "experiment": self.experiment, "title": self.title, "provenance": PROVENANCE,
            "config": _clean(self.config), "claims": self.claims, "all_ok": self.ok,
            "observations": self.observations, "curves": self.curves,
            "seconds": round(time.perf_counter() - self.start, 2),
        }
        js.write_text(json.dumps(payload, indent=1, allow_nan=False))
        verdict = "all claims reproduced" if self.ok else "SOME CLAIMS NOT REPRODUCED"
        print(f"{self.experiment}: {verdict}; wrote {png} and {js} "
              f"({payload['seconds']:.1f} s)", flush=True)
        return {"png": str(png), "json": str(js)}


def _fmt(value: Any) -> str:
    """Short text of a number, list or dict (3 significant digits)."""
    if isinstance(value, (float, np.floating)):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple, np.ndarray)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


# ----------------------------------------------------------------------------- figures


def figure(title: str, rows: int = 1, cols: int = 2, size: tuple[float, float] = (5.2, 3.8)):
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows),
                             squeeze=False, layout="constrained")
    fig.suptitle(title, fontsize=10)
    return fig, axes


def plot_pair(ax_iter, ax_bits, values: np.ndarray, bits: np.ndarray, label: str, *,
              bound: np.ndarray | None = None, color=None, style: str = "-") -> None:
    """Suboptimality vs iterations (left) and vs cumulative bits (right), bound dashed."""
    idx = sample_points(len(values), 600)   # enough for the eye, quick to render
    values, bits = np.asarray(values)[idx], np.asarray(bits)[idx]
    bound = None if bound is None else np.asarray(bound)[idx]
    k = idx
    finite = np.isfinite(values)
    (line,) = ax_iter.semilogy(k[finite], values[finite], style, color=color, label=label, lw=1.3)
    ax_bits.semilogy(bits[finite], values[finite], style, color=line.get_color(), label=label,
                     lw=1.3)
    if bound is not None:  # hidden where it falls far below the measured curve
        shown = values[finite & (values > 0)]
        low = shown.min() / 100 if shown.size else 0.0
        bound = np.where(np.asarray(bound) >= low, bound, np.nan)
        ax_iter.semilogy(k, bound, "--", color=line.get_color(), lw=0.9, alpha=0.8)
        ax_bits.semilogy(bits, bound, "--", color=line.get_color(), lw=0.9, alpha=0.8)


def label_pair(ax_iter, ax_bits, ylabel: str = "f(x_k) - f*", note: str = "dashed: theory bound"):
    ax_iter.set_xlabel("iteration k")
    ax_bits.set_xlabel("cumulative uplink bits (all workers)")
    for ax in (ax_iter, ax_bits):
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.25)
    ax_iter.legend(fontsize=7, title=note, title_fontsize=7)
