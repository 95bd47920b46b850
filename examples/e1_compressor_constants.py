"""E1: every compressor's declared constant and bit count, measured.

Spec section 6.2, E1 (sections 3-4): for each compressor of :mod:`lore_jax.compressors`, on
Gaussian, heavy-tailed (Cauchy) and sparse (16 non-zeros) inputs of ``d = 256`` entries (a
16 x 16 leaf, so that the low-rank compressors see a matrix), Monte Carlo over 4000
independent keys:

* unbiased (``alpha``): ``E Q(v) = v`` (the statistic ``||mean Q - v||^2 / (tr Cov / N)``,
  about 1 for an unbiased compressor, must stay below 9) and ``E||Q(v)||^2 / ||v||^2 <=
  alpha(v)``, the declared constant refined by the input's ``nnz`` (section 3.4);
* contractive (``delta``): ``E||Q(v) - v||^2 / ||v||^2 <= 1 - delta(v)``;
* absolute (``epsilon``): ``max ||Q(v) - v|| <= epsilon``;
* ``"none"`` (sign, PowerSGD): the ratio is reported, nothing is claimed.

Means are compared with their bound plus three standard errors. Bits: one step of
:func:`lore_jax.compressed_mean` per compressor on 8 devices (all in one compiled
``shard_map``, each device with its own Gaussian leaf); the bits each device put into
collectives must equal the spec's fixed-length count ``bits(shape)`` up to the word padding
of packed codes (less than 32 bits more per packed array) and the 32-bit seed that
shared-seed schemes count but never send; for Bernoulli sparsification (a data-dependent
length) the count is checked on one device against ``nnz(Q(v)) (32 + ceil(log2 d))``.

E1 is not an optimization run: its figure shows measured / declared constants and bits, not
suboptimality curves. Constants are derived in the lore_jax spec, not quoted from the paper.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `examples` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import lore_jax
from examples import common
from lore_jax import compressors as C
from lore_jax.accounting import counter_value


def inputs(side: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    d = side * side
    sparse = np.zeros(d)
    sparse[rng.choice(d, 16, replace=False)] = rng.standard_normal(16)
    return {"gaussian": rng.standard_normal(d).reshape(side, side),
            "cauchy": rng.standard_cauchy(d).reshape(side, side),
            "sparse": sparse.reshape(side, side)}


def all_compressors(d: int, quick: bool) -> list[C.Compressor]:
    k, s = d // 8, math.isqrt(d)
    out = [C.random_k(k), C.top_k(k), C.qsgd(s), C.grid_rounding(0.05), C.bernoulli(0.25)]
    if not quick:   # --quick: one or more compressor of each class
        out += [C.identity(), C.terngrad(), C.scaled_sign(),
                C.random_k(k, shared_seed=True), C.bernoulli(0.25, shared_seed=True),
                C.bernoulli(0.25, magnitude=True), C.qsgd(1), C.qsgd(4, bucket_size=64),
                C.stochastic_rounding(8), C.terngrad(clip=2.5), C.sign(),
                C.grid_rounding(0.05, max_abs=4.0), C.powersgd(2), C.random_projection(2),
                C.random_projection(2, unbiased=True), C.greedy_svd(2),
                C.as_contraction(C.random_k(k))]
    return out


def monte_carlo(comps: list[C.Compressor], X: np.ndarray, draws: int,
                seed: int) -> list[np.ndarray]:
    """Per compressor, ``(len(X), draws, *shape)`` reconstructions ``Q(v)`` (one jit)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), draws)

    def all_draws(keys, X):
        out = []
        for comp in comps:
            def roundtrip(key, v, comp=comp):
                return comp.decompress(*comp.compress(key, v))

            out.append(jax.vmap(jax.vmap(roundtrip, (0, None)), (None, 0))(keys, X))
        return out

    f = jax.jit(all_draws, compiler_options=common.COMPILER_OPTIONS)
    return [np.asarray(q, np.float64) for q in f(keys, jnp.asarray(X, jnp.float32))]


def check(comp: C.Compressor, v: np.ndarray, Q: np.ndarray) -> dict:
    """Measured statistics of ``Q`` (``draws x shape``) against the declared constant."""
    n = len(Q)
    v = v.astype(np.float32).astype(np.float64)   # the input the compressor saw
    flat, vv = Q.reshape(n, -1), v.reshape(-1)
    norm2 = float(vv @ vv)
    out: dict = {"kind": comp.kind}
    if comp.kind == "unbiased":
        second = np.sum(flat * flat, axis=1) / norm2
        alpha = float(comp.alpha(jnp.asarray(v, jnp.float32)))
        trace = float(np.sum(flat.var(axis=0, ddof=1)))
        bias2 = float(np.sum((flat.mean(axis=0) - vv) ** 2))
        # Exact (variance-free) compressors must reproduce v to float32 precision.
        bias_stat = bias2 / (trace / n) if trace > 1e-12 * norm2 else (
            0.0 if bias2 <= 1e-10 * norm2 else math.inf)
        out.update(declared=alpha, measured=float(second.mean()),
                   se=float(second.std(ddof=1) / math.sqrt(n)), bias_stat=bias_stat,
                   ok=bool(second.mean() <= alpha + 3 * second.std(ddof=1) / math.sqrt(n)
                           + 1e-5 * alpha and bias_stat <= 9.0))
    elif comp.kind == "contractive":
        err = np.sum((flat - vv) ** 2, axis=1) / norm2
        delta = float(comp.delta(jnp.asarray(v, jnp.float32)))
        se = float(err.std(ddof=1) / math.sqrt(n))
        out.update(declared=1.0 - delta, measured=float(err.mean()), se=se,
                   ok=bool(err.mean() <= 1.0 - delta + 3 * se + 1e-5))
    elif comp.kind == "absolute":
        err = np.sqrt(np.sum((flat - vv) ** 2, axis=1))
        eps = float(comp.epsilon(jnp.asarray(v, jnp.float32)))
        in_range = True
        if "max_abs=None" not in comp.name:   # the bound needs ||v||_inf inside the grid
            in_range = bool(np.abs(vv).max() <= 4.0)
        out.update(declared=eps, measured=float(err.max()), se=0.0,
                   ok=bool(err.max() <= eps * (1 + 1e-5)) if in_range else None,
                   note=None if in_range else "input outside the grid's range: no bound")
    else:
        err = np.sum((flat - vv) ** 2, axis=1) / norm2
        out.update(declared=None, measured=float(err.mean()), se=0.0, ok=None,
                   note="no class: ||Q(v) - v||^2 / ||v||^2 reported")
    return out


def _ratio(stat: dict) -> float:
    """measured / declared for the figure (NaN when not judged; exact bounds of 0 give 0)."""
    if stat["ok"] is None:
        return float("nan")
    if stat["declared"] == 0:   # e.g. top-k of a vector with at most k non-zeros: exact
        return 0.0 if stat["measured"] <= 1e-12 else float("inf")
    return stat["measured"] / stat["declared"]


def bits_on_devices(comps: list[C.Compressor], v: np.ndarray, mesh) -> list[int]:
    """Bits each device sent in one ``compressed_mean`` step, per compressor (one compile)."""
    txs = [lore_jax.compressed_mean(c, axis_name=common.AXIS, error_feedback=None) for c in comps]
    params = common.put(jnp.zeros(v.shape[1:], jnp.float32), mesh)

    def init(p):
        return [tx.init(p) for tx in txs]

    # lore_jax.sharded_init for all the transforms at once (one compilation).
    specs = lore_jax.state_specs(jax.eval_shape(init, params), common.AXIS)
    states = jax.jit(jax.shard_map(init, mesh=mesh, in_specs=(P(),), out_specs=specs),
                     compiler_options=common.COMPILER_OPTIONS)(params)

    def step(g, states):
        return [tx.update(g[0], s)[1].bits_sent for tx, s in zip(txs, states, strict=True)]

    f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(common.AXIS), specs),
                              out_specs=[P()] * len(txs)), compiler_options=common.COMPILER_OPTIONS)
    out = f(common.put(jnp.asarray(v, jnp.float32), mesh, P(common.AXIS)), states)
    return [counter_value(c) for c in out]


def main(argv: Sequence[str] | None = None) -> bool:
    args = common.parse_args(argv, __doc__)
    quick = args.quick
    side = 8 if quick else 16
    d = side * side
    draws = 500 if quick else 4000
    report = common.Report("E1", "compressor constants and bits", args, d=d, draws=draws)
    vectors = inputs(side, args.seed)
    names = list(vectors)
    X = np.stack([vectors[k] for k in names])
    comps = all_compressors(d, quick)
    table = {}
    for comp, Q in zip(comps, monte_carlo(comps, X, draws, args.seed), strict=True):
        table[comp.name] = {name: check(comp, X[i], Q[i]) for i, name in enumerate(names)}
    # Bits: 8 devices, each with its own Gaussian leaf.
    mesh = common.make_mesh()
    rng = np.random.default_rng(args.seed + 1)
    G = rng.standard_normal((common.NUM_WORKERS, side, side))
    fixed = [c for c in comps if c.bits((side, side)) is not None]
    measured = bits_on_devices(fixed, G, mesh)
    bits = {}
    for comp, got in zip(fixed, measured, strict=True):
        spec = comp.bits((side, side))
        packed = sum(1 for leaf in jax.tree.leaves(comp.compress(
            jax.random.PRNGKey(0), jnp.asarray(G[0], jnp.float32))[0])
            if leaf.dtype == jnp.uint32)
        seed = 32 if "shared_seed" in comp.name or "projection" in comp.name else 0
        bits[comp.name] = {"spec": spec, "measured": got, "dense": 32 * d,
                           "ok": -seed <= got - spec and (
                               got - spec < 32 * packed if packed else got <= spec)}
    for comp in (c for c in comps if c.bits((side, side)) is None):   # Bernoulli
        payload, ctx = comp.compress(jax.random.PRNGKey(3), jnp.asarray(G[0], jnp.float32))
        nnz = int(np.count_nonzero(np.asarray(comp.decompress(payload, ctx))))
        per = 32 if "shared_seed" in comp.name else 32 + math.ceil(math.log2(d))
        got = int(comp.payload_bits(payload, ctx))
        bits[comp.name] = {"spec": nnz * per, "measured": got, "dense": 32 * d,
                           "ok": got == nnz * per}
    report.observe("constants", table)
    report.observe("bits", bits)
    for kind, word in [("unbiased", "E Q(v) = v and E||Q(v)||^2 <= alpha(v) ||v||^2"),
                       ("contractive", "E||Q(v) - v||^2 <= (1 - delta(v)) ||v||^2"),
                       ("absolute", "||Q(v) - v|| <= epsilon")]:
        rows = {c: r for c, r in table.items() if next(iter(r.values()))["kind"] == kind}
        checked = {c: {n: s["measured"] / s["declared"] if s["declared"] else None
                       for n, s in r.items() if s["ok"] is not None} for c, r in rows.items()}
        report.claim(f"{kind}: {word} for every compressor and input ({len(rows)} compressors)",
                     all(s["ok"] for r in rows.values() for s in r.values()
                         if s["ok"] is not None),
                     worst_measured_over_declared=max(
                         (x for r in checked.values() for x in r.values() if x is not None),
                         default=None))
    report.claim("measured bits = the spec's formula (up to word padding and the unsent seed)",
                 all(b["ok"] for b in bits.values()),
                 mismatches=[k for k, b in bits.items() if not b["ok"]])

    fig, axes = common.figure(f"E1: measured vs declared compressor constants (d={d}, "
                              f"{draws} draws; {common.DERIVED})", cols=2, size=(7.5, 5.5))
    ax = axes[0][0]
    labels = list(table)
    xs = np.arange(len(labels))
    for j, name in enumerate(names):
        ratios = [_ratio(table[c][name]) for c in labels]
        ax.bar(xs + (j - 1) * 0.27, ratios, 0.27, label=name)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylim(0, 1.25)
    ax.set_xticks(xs, labels, rotation=60, ha="right", fontsize=6)
    ax.set_ylabel("measured / declared (<= 1: bound holds)")
    ax.set_title("alpha: E||Q||^2/||v||^2; delta: E||Q-v||^2/||v||^2 vs 1-delta; eps: max "
                 "||Q-v||", fontsize=7)
    ax.legend(fontsize=7)
    ax = axes[0][1]
    labels = list(bits)
    xs = np.arange(len(labels))
    ax.bar(xs - 0.2, [bits[c]["spec"] for c in labels], 0.4, label="spec formula")
    ax.bar(xs + 0.2, [bits[c]["measured"] for c in labels], 0.4, label="measured (collectives)")
    ax.axhline(32 * d, color="k", lw=0.8, ls="--", label="fp32 (32 d)")
    ax.set_yscale("log")
    ax.set_xticks(xs, labels, rotation=60, ha="right", fontsize=6)
    ax.set_ylabel("bits per message")
    ax.legend(fontsize=7)
    report.write(fig, "e1_compressor_constants")
    return report.ok


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
