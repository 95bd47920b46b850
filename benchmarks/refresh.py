"""Exact SVD against the fast warm-started subspace refresh: time, captured energy, training.

GreedyLore refreshes its complete ``a x a`` basis every ``tau`` steps. ``refresh="svd"``
takes a float32 SVD (:func:`lore_jax.subspace.svd_basis`); ``refresh="subspace_iteration"``
refines the previous basis's top ``r + 8`` columns by block power iteration and completes
them (:func:`lore_jax.subspace.subspace_iteration_basis`). Three measurements:

1. **Time** of one jitted refresh of an ``a x b`` matrix, compilation excluded; with
   ``eigh(H H^T)``, the other exact route (spec pitfall 10), for reference.
2. **Captured energy after warm start.** A slowly drifting gradient: ``H_k = U_k S V^T +
   noise``, singular values ``s_j = j^-decay``, the left singular vectors rotated a little
   every refresh period (``U_{k+1} = qf(U_k + theta G_k / sqrt(a))``, ``G_k`` Gaussian) and
   fresh Gaussian noise of relative Frobenius norm ``--noise``. The first basis is an
   exact SVD (as in GreedyLore); each later one is a fast refresh warm-started from the
   previous fast one. Reported: ``||U[:, :r]^T H_k||^2 / (s_1^2 + ... + s_r^2)`` of ``H_k``
   (float64 eigenvalues), the fraction of the exact top-r energy the fast top-r captures,
   minimum over ``--chain`` refreshes; and the same for the stale basis (no refresh), which
   shows how much the drift moved the subspace.
3. **Training.** Short GreedyLore runs (digits MLP and the character transformer, 8
   devices) with both refresh options and a short ``update_interval``, so that many
   refreshes happen; final training and test loss.

Example:
  python -m benchmarks.refresh                        # defaults: a few minutes on 2 cores
  python -m benchmarks.refresh --shapes 1024x4096,2048x8192 --rank 32 --chain 10
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see benchmarks/README.md, "Threads"

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lore_jax
from benchmarks import common
from lore_jax import subspace


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        a, b = (int(v) for v in part.lower().split("x"))
        out.append((min(a, b), max(a, b)))
    return out


# ----------------------------------------------------------------------------- drift


class Drift:
    """The slowly drifting gradient of the module docstring, in float64 NumPy."""

    def __init__(self, a: int, b: int, decay: float, theta: float, noise: float, seed: int):
        self.rng = np.random.default_rng(seed)
        self.a, self.b, self.theta, self.noise = a, b, theta, noise
        self.s = np.arange(1, a + 1, dtype=np.float64) ** -decay
        self.u = np.linalg.qr(self.rng.standard_normal((a, a)))[0]
        self.v = np.linalg.qr(self.rng.standard_normal((b, a)))[0]

    def step(self) -> None:
        g = self.rng.standard_normal((self.a, self.a)) / np.sqrt(self.a)
        self.u = np.linalg.qr(self.u + self.theta * g)[0]

    def sample(self) -> np.ndarray:
        h = (self.u * self.s) @ self.v.T
        if self.noise:
            n = self.rng.standard_normal(h.shape)
            h = h + self.noise * np.linalg.norm(h) / np.linalg.norm(n) * n
        return h


def top_energy(h: np.ndarray, r: int) -> float:
    """Sum of the ``r`` largest squared singular values (float64)."""
    ev = np.linalg.eigvalsh(h @ h.T)
    return float(np.sum(ev[-r:]))


def captured(u: jax.Array, h: np.ndarray, r: int) -> float:
    top = np.asarray(u, np.float64)[0, :, :r]
    return float(np.sum((top.T @ h) ** 2))


# ----------------------------------------------------------------------------- parts


def time_refresh(shapes, rank: int, iters: list[int], repeats: int, svd_repeats: int,
                 seed: int) -> list[dict[str, Any]]:
    rows = []
    for a, b in shapes:
        drift = Drift(a, b, 1.0, 0.05, 0.05, seed)
        h = jnp.asarray(drift.sample()[None], jnp.float32)
        svd = jax.jit(lambda h: subspace.svd_basis(h)[0]).lower(h).compile()
        eigh = jax.jit(lambda h: jnp.linalg.eigh(h @ jnp.swapaxes(h, -1, -2))[1]).lower(
            h).compile()
        t_svd = common.time_call(svd, h, repeats=svd_repeats, warmup=0)
        u0 = svd(h)
        t_eigh = common.time_call(eigh, h, repeats=svd_repeats, warmup=0)
        row = {"a": a, "b": b, "rank": rank, "svd_s": t_svd["min"], "eigh_s": t_eigh["min"],
               "fast_s": {}}
        for it in iters:
            fast = jax.jit(lambda h, u, it=it: subspace.subspace_iteration_basis(
                h, u, rank, it)[0]).lower(h, u0).compile()
            row["fast_s"][it] = common.time_call(fast, h, u0, repeats=repeats, warmup=1)["min"]
        rows.append(row)
        print(f"  timed {a}x{b}: svd {row['svd_s']:.3f}s, fast {row['fast_s']}")
    return rows


def energy_chain(shapes, rank: int, iters: list[int], thetas: list[float], chain: int,
                 decay: float, noise: float, seed: int) -> list[dict[str, Any]]:
    rows = []
    for a, b in shapes:
        fns = {it: jax.jit(lambda h, u, it=it: subspace.subspace_iteration_basis(
            h, u, rank, it)[0]) for it in iters}
        svd = jax.jit(lambda h: subspace.svd_basis(h)[0])
        for theta in thetas:
            drift = Drift(a, b, decay, theta, noise, seed)
            h = drift.sample()
            u_exact0 = svd(jnp.asarray(h[None], jnp.float32))
            bases = dict.fromkeys(iters, u_exact0)
            ratios: dict[int, list[float]] = {it: [] for it in iters}
            stale, orth = [], {it: 0.0 for it in iters}
            for _ in range(chain):
                drift.step()
                h = drift.sample()
                hj = jnp.asarray(h[None], jnp.float32)
                exact = top_energy(h, rank)
                stale.append(captured(u_exact0, h, rank) / exact)
                for it in iters:
                    bases[it] = fns[it](hj, bases[it])
                    ratios[it].append(captured(bases[it], h, rank) / exact)
                    u = np.asarray(bases[it][0], np.float64)
                    orth[it] = max(orth[it], float(np.abs(u.T @ u - np.eye(a)).max()))
            rows.append({"a": a, "b": b, "rank": rank, "theta": theta, "noise": noise,
                         "decay": decay, "chain": chain,
                         "stale_min": min(stale), "fast_min": {it: min(v) for it, v in
                                                               ratios.items()},
                         "fast_mean": {it: float(np.mean(v)) for it, v in ratios.items()},
                         "orthonormality_error": orth})
            print(f"  energy {a}x{b} theta={theta}: stale {min(stale):.4f}, fast "
                  f"{ {it: round(min(v), 5) for it, v in ratios.items()} }")
    return rows


def training(tasks: list[str], steps: int, rank: int, tau: int, iters: int,
             seed: int) -> list[dict[str, Any]]:
    if not common.training_available():
        print("  lore_jax.training is not installed: training comparison skipped.")
        return []
    mesh = common.mesh_of(8)
    settings = {"digits": dict(batch_size=128, lr=1e-3), "charlm": dict(batch_size=32, lr=3e-3)}
    rows = []
    for task in tasks:
        cfg = settings[task]
        for refresh in ("svd", "subspace_iteration"):
            tx = optax.chain(
                lore_jax.greedylore(rank, update_interval=tau, warmup_steps=10,
                                    axis_name=common.AXIS, refresh=refresh,
                                    refresh_iters=iters, key=seed, tracking="off"),
                optax.adam(cfg["lr"]))
            run = common.train_run(task, tx, steps=steps, mesh=mesh,
                                   batch_size=cfg["batch_size"], seed=seed,
                                   eval_every=steps)
            losses = run["losses"]
            rows.append({"task": task, "refresh": refresh, "steps": steps, "tau": tau,
                         "rank": rank, "final_train_loss": float(np.mean(losses[-20:])),
                         "test_loss": run["evals"][-1][1], "train_time_s": run["train_time"],
                         "losses": losses})
            print(f"  trained {task} refresh={refresh}: loss {rows[-1]['final_train_loss']:.4f}")
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--shapes", default="256x1024,768x3072,1024x4096")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--iters", default="1,2", help="power iterations of the fast refresh")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of the fast refresh")
    p.add_argument("--svd-repeats", type=int, default=1, help="timed runs of the exact SVD")
    p.add_argument("--energy-shapes", default="256x1024,1024x4096")
    p.add_argument("--thetas", default="0.05,0.2,0.5", help="drift per refresh period")
    p.add_argument("--decay", type=float, default=1.0, help="singular values j**-decay")
    p.add_argument("--noise", type=float, default=0.05, help="relative noise norm")
    p.add_argument("--chain", type=int, default=5, help="consecutive warm-started refreshes")
    p.add_argument("--tasks", default="digits,charlm")
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--train-rank", type=int, default=4)
    p.add_argument("--train-tau", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip", default="", help="comma list of parts to skip: time,energy,train")
    args = p.parse_args(argv)
    skip = set(args.skip.split(","))
    iters = common.ints(args.iters)
    print(f"refresh: {common.describe_machine()}")

    timing = [] if "time" in skip else time_refresh(
        parse_shapes(args.shapes), args.rank, iters, args.repeats, args.svd_repeats, args.seed)
    energy = [] if "energy" in skip else energy_chain(
        parse_shapes(args.energy_shapes), args.rank, iters,
        [float(t) for t in args.thetas.split(",")], args.chain, args.decay, args.noise,
        args.seed)
    train = [] if "train" in skip else training(
        [t for t in args.tasks.split(",") if t], args.train_steps, args.train_rank,
        args.train_tau, iters[0], args.seed)

    md, targets = [], {}
    if timing:
        cols = ["a x b", "exact SVD s", "eigh(HH^T) s"]
        cols += [f"fast ({it} it) s" for it in iters] + [f"SVD / fast ({it} it)" for it in iters]
        rows = [[f"{r['a']}x{r['b']}", r["svd_s"], r["eigh_s"]]
                + [r["fast_s"][it] for it in iters]
                + [r["svd_s"] / r["fast_s"][it] for it in iters] for r in timing]
        md.append(common.table(f"Refresh time, one matrix, rank {args.rank} (+8 oversampling)",
                               cols, rows, note="min over runs, compilation excluded"))
        big = [r for r in timing if (r["a"], r["b"]) == (1024, 4096)]
        if big:
            targets["fast >= 10x faster than SVD on 1024x4096"] = big[0]["svd_s"] / \
                big[0]["fast_s"][iters[0]] >= 10
    if energy:
        cols = ["a x b", "theta", "stale basis"] + [f"fast ({it} it) min" for it in iters] + \
               [f"fast ({it} it) mean" for it in iters] + ["max |U^T U - I|"]
        rows = [[f"{r['a']}x{r['b']}", r["theta"], r["stale_min"]]
                + [r["fast_min"][it] for it in iters] + [r["fast_mean"][it] for it in iters]
                + [max(r["orthonormality_error"].values())] for r in energy]
        md.append(common.table(
            f"Top-{args.rank} energy captured / exact top-{args.rank} energy after warm start",
            cols, rows, note=f"{args.chain} consecutive refreshes of a drifting gradient "
                             f"(s_j = j^-{args.decay}, noise {args.noise}); min and mean over "
                             f"them. 'stale basis': the first exact basis, never refreshed."))
        big = [r for r in energy if (r["a"], r["b"]) == (1024, 4096)]
        if big:
            targets[">= 99% of exact top-r energy on 1024x4096 (every drift level, "
                    f"{iters[0]} iteration)"] = all(r["fast_min"][iters[0]] >= 0.99 for r in big)
    if train:
        rows = [[r["task"], r["refresh"], r["final_train_loss"], r["test_loss"],
                 r["train_time_s"]] for r in train]
        md.append(common.table(
            f"Training with each refresh ({args.train_steps} steps, rank {args.train_rank}, "
            f"update_interval {args.train_tau}, 8 devices)",
            ["task", "refresh", "train loss (last 20)", "test loss", "train s"], rows))
    lines = [f"- {k}: {'MET' if v else 'NOT MET'}" for k, v in targets.items()]
    print("\n".join(lines))
    md.append("Targets:\n\n" + "\n".join(lines) + "\n")
    payload = {"args": vars(args), "timing": timing, "energy": energy, "training": train,
               "targets": targets}
    common.write_json(args.out, "refresh", payload, "\n".join(md))
    return payload


if __name__ == "__main__":
    main()
