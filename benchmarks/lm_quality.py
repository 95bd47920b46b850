"""Held-out quality per bit on the real language-model workload: GreedyLore against PowerSGD.

Trains the ``lm`` task (a byte-level transformer on the Python standard library's source,
held out by file; see :func:`lore_jax.training.data.text_corpus`) at every model size and
rank asked for, with every method, for every seed, from the same initialisation and data
order per seed (Adam, cosine decay, 8 simulated devices):

* ``dense``: the uncompressed mean (one run per size and seed);
* ``powersgd``: PowerSGD (warm-started, one power iteration, EF14);
* ``random``: random low-rank projection (EF14);
* ``greedylore (paper)``: ``greedylore(r, tracking="off")``, the paper's settings;
* ``greedylore``: ``greedylore(r)``, lore_jax's recommended settings.

Reported per (size, rank, method): the held-out loss at the end (mean and spread over the
seeds, on a fixed evenly spaced subset of the held-out windows), the bits one device sent
(the transforms' exact counters, refreshes included), the compression against dense, and
the steps to a held-out target (the first evaluation at or below it). The target of a
size is ``target_factor`` times the dense runs' mean final held-out loss.

Targets it states as met or not:

* recommended GreedyLore's held-out loss <= PowerSGD's, at equal or fewer bits, for every
  size and rank (mean over seeds);
* recommended GreedyLore within 3% of dense's held-out loss at >= 10x fewer bits;
* on ``digits`` (``--digits``), GreedyLore's training loss per bit at or below PowerSGD's
  (their loss curves compared at the same cumulative bits, over the bits both reached).

Finished runs are kept in ``<out>/lm_quality_runs.json`` and skipped when the command is
run again, so a long benchmark can be split or resumed.

Example:
  python -m benchmarks.lm_quality --sizes 64x2,128x2 --ranks 4,8 --seeds 0,1,2
  python -m benchmarks.lm_quality --sizes 64x2 --ranks 4 --seeds 0 --steps 100   # quick
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import optax

import lore_jax
from benchmarks import common

METHODS = ("dense", "powersgd", "random", "greedylore (paper)", "greedylore")


def make_transform(method: str, rank: int, seed: int) -> Any:
    """The mean transform of ``method`` at ``rank`` (keys from ``seed``)."""
    from lore_jax import compressors

    if method == "dense":
        return lore_jax.compressed_mean(compressors.identity(), error_feedback=None)
    if method == "powersgd":
        return lore_jax.compressed_mean(compressors.powersgd(rank), key=seed)
    if method == "random":
        return lore_jax.compressed_mean(compressors.random_projection(rank), key=seed)
    if method == "greedylore (paper)":
        return lore_jax.greedylore(rank, key=seed, **lore_jax.GREEDYLORE_PAPER)
    if method == "greedylore":
        return lore_jax.greedylore(rank, key=seed)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}.")


def parse_size(text: str) -> tuple[int, int]:
    """``"128x4"`` -> (d_model 128, 4 layers)."""
    try:
        d, layers = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a size is D_MODELxLAYERS, e.g. 128x4; got {text!r}.") from None
    return d, layers


def run_one(size: tuple[int, int], rank: int, method: str, seed: int, args) -> dict[str, Any]:
    """One training run; returns its held-out curve, bits and time."""
    d, layers = size
    mesh = common.mesh_of(8)
    schedule = optax.cosine_decay_schedule(args.lr, args.steps)
    tx = optax.chain(make_transform(method, rank, seed), optax.adam(schedule))
    t = time.perf_counter()
    run = common.train_run("lm", tx, steps=args.steps, mesh=mesh, batch_size=args.batch,
                           seed=seed, seq_len=args.seq_len, d_model=d, num_heads=args.heads,
                           num_layers=layers, eval_every=args.eval_every,
                           eval_examples=args.eval_examples)
    return {"evals": run["evals"], "final_test_loss": run["evals"][-1][1],
            "final_train_loss": float(np.mean(run["losses"][-20:])),
            "bits_sent": int(run["bits_sent"][-1]), "bits_dense": int(run["bits_dense"][-1]),
            "num_params": run["num_params"], "wall_s": time.perf_counter() - t}


def steps_to(evals: list[list[float]], target: float) -> int | None:
    """The first evaluated step whose held-out loss is at most ``target``."""
    return next((int(s) for s, loss in evals if loss <= target), None)


def summarize(runs: dict[str, Any], sizes, ranks, seeds, target_factor: float
              ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """One row per (size, rank, method) over the seeds run, and the target of each size."""
    rows, targets = [], {}
    for size in sizes:
        dense = [runs[k] for k in (key(size, 0, "dense", s) for s in seeds) if k in runs]
        if not dense:
            continue
        targets[size] = target_factor * float(np.mean([r["final_test_loss"] for r in dense]))
        for rank in ranks:
            for method in METHODS:
                got = [runs[k] for k in (key(size, 0 if method == "dense" else rank, method, s)
                                         for s in seeds) if k in runs]
                if not got:
                    continue
                losses = np.array([r["final_test_loss"] for r in got])
                reach = [steps_to(r["evals"], targets[size]) for r in got]
                rows.append({
                    "size": size, "rank": rank, "method": method, "seeds": len(got),
                    "test_loss": float(losses.mean()), "test_loss_std": float(losses.std()),
                    "test_loss_min": float(losses.min()), "test_loss_max": float(losses.max()),
                    "bits_sent": float(np.mean([r["bits_sent"] for r in got])),
                    "compression": float(np.mean([r["bits_dense"] / r["bits_sent"]
                                                  for r in got])),
                    "steps_to_target": reach,
                    "wall_s": float(np.mean([r["wall_s"] for r in got]))})
    return rows, targets


def key(size: str, rank: int, method: str, seed: int) -> str:
    return f"{size}|{rank}|{method}|{seed}"


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The lm targets, per (size, rank)."""
    by = {(r["size"], r["rank"], r["method"]): r for r in rows}
    out = []
    for (size, rank, method), r in by.items():
        if method != "greedylore":
            continue
        psgd, dense = by.get((size, rank, "powersgd")), by.get((size, rank, "dense"))
        if psgd is not None:
            met = r["test_loss"] <= psgd["test_loss"] and r["bits_sent"] <= psgd["bits_sent"]
            out.append({"target": f"{size} r={rank}: GreedyLore held-out loss <= PowerSGD's "
                                  f"at <= its bits", "met": bool(met),
                        "value": f"{r['test_loss']:.4f} vs {psgd['test_loss']:.4f}, bits "
                                 f"{r['bits_sent'] / psgd['bits_sent']:.3f}x PowerSGD's"})
        if dense is not None:
            gap = r["test_loss"] / dense["test_loss"] - 1
            met = gap <= 0.03 and r["compression"] >= 10
            out.append({"target": f"{size} r={rank}: GreedyLore within 3% of dense held-out "
                                  f"loss at >= 10x fewer bits", "met": bool(met),
                        "value": f"{100 * gap:+.1f}% at {r['compression']:.1f}x"})
    return out


def at_equal_bits(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """GreedyLore against PowerSGD's loss interpolated to GreedyLore's bits.

    PowerSGD's (bits, held-out loss) points of a size, one per rank, are joined linearly
    in log-bits (extended along the same line past the ends); the comparison says how
    far GreedyLore's loss is from PowerSGD's at exactly GreedyLore's bits.
    """
    out = []
    for size in sorted({r["size"] for r in rows}):
        pts = sorted((r["bits_sent"], r["test_loss"]) for r in rows
                     if r["size"] == size and r["method"] == "powersgd")
        if len(pts) < 2:
            continue
        x, y = np.log([b for b, _ in pts]), np.array([v for _, v in pts])
        for r in rows:
            if r["size"] != size or r["method"] != "greedylore":
                continue
            bx = np.log(r["bits_sent"])
            i = int(np.clip(np.searchsorted(x, bx) - 1, 0, len(x) - 2))
            expect = y[i] + (y[i + 1] - y[i]) * (bx - x[i]) / (x[i + 1] - x[i])
            out.append({"size": size, "rank": r["rank"], "greedylore": r["test_loss"],
                        "powersgd_at_same_bits": float(expect),
                        "difference": float(r["test_loss"] - expect)})
    return out


def digits_curves(args) -> dict[str, Any]:
    """Training loss against cumulative bits on digits, GreedyLore against PowerSGD."""
    mesh = common.mesh_of(8)
    curves = {}
    for method in ("powersgd", "greedylore"):
        tx = optax.chain(make_transform(method, args.digits_rank, 0), optax.adam(1e-3))
        run = common.train_run("digits", tx, steps=args.digits_steps, mesh=mesh,
                               batch_size=128, seed=0)
        loss = np.convolve(run["losses"], np.ones(10) / 10, mode="valid")
        curves[method] = (np.asarray(run["bits_sent"][9:], float), loss)
    (b_p, l_p), (b_g, l_g) = curves["powersgd"], curves["greedylore"]
    grid = np.linspace(max(b_p[0], b_g[0]), min(b_p[-1], b_g[-1]), 50)
    gl, ps = np.interp(grid, b_g, l_g), np.interp(grid, b_p, l_p)
    return {"rank": args.digits_rank, "bits": grid.tolist(), "greedylore": gl.tolist(),
            "powersgd": ps.tolist(), "share_at_or_below": float(np.mean(gl <= ps * 1.001)),
            "met": bool(np.all(gl <= ps * 1.02))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default="64x2,128x2", help="D_MODELxLAYERS, comma-separated")
    p.add_argument("--ranks", default="4,8")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-examples", type=int, default=1024)
    p.add_argument("--target-factor", type=float, default=1.05,
                   help="held-out target = this x dense's mean final held-out loss")
    p.add_argument("--digits", action="store_true", help="also compare loss per bit on digits")
    p.add_argument("--digits-rank", type=int, default=4)
    p.add_argument("--digits-steps", type=int, default=400)
    args = p.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    ranks, seeds = common.ints(args.ranks), common.ints(args.seeds)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "lm_quality_runs.json"
    runs = json.loads(cache.read_text()) if cache.exists() else {}
    print(f"lm quality: {common.describe_machine()}")
    for size in sizes:
        for seed in seeds:
            for rank in ranks:
                for method in methods:
                    k = key(size, 0 if method == "dense" else rank, method, seed)
                    if k in runs:
                        continue
                    runs[k] = run_one(parse_size(size), rank, method, seed, args)
                    cache.write_text(json.dumps(runs, indent=1))
                    r = runs[k]
                    print(f"  {k}: held-out {r['final_test_loss']:.4f}, "
                          f"{r['bits_dense'] / r['bits_sent']:.1f}x, {r['wall_s']:.0f} s",
                          flush=True)
    rows, targets = summarize(runs, sizes, ranks, seeds, args.target_factor)
    checks = check_targets(rows)
    equal_bits = at_equal_bits(rows)
    payload: dict[str, Any] = {"args": vars(args), "rows": rows, "targets": targets,
                               "checks": checks, "at_equal_bits": equal_bits}
    md = [common.table(
        f"lm: held-out loss after {args.steps} steps (global batch {args.batch}, seq "
        f"{args.seq_len}, Adam {args.lr:g} cosine, 8 devices, seeds {args.seeds})",
        ["size", "rank", "method", "held-out loss", "spread (min-max)", "MiB sent / device",
         "x fewer bits", "steps to target"],
        [[r["size"], r["rank"] or "-", r["method"], f"{r['test_loss']:.4f}",
          f"{r['test_loss_min']:.3f}-{r['test_loss_max']:.3f}", r["bits_sent"] / 8 / 2 ** 20,
          r["compression"], ", ".join(str(s) if s else "-" for s in r["steps_to_target"])]
         for r in rows],
        note="target per size: " + ", ".join(f"{s}: {t:.3f}" for s, t in targets.items())
             + f" ({args.target_factor:g} x dense's final held-out loss); '-': not reached")]
    if equal_bits:
        md.append(common.table(
            "GreedyLore against PowerSGD interpolated to the same bits (log-linear between "
            "PowerSGD's ranks)", ["size", "rank", "GreedyLore", "PowerSGD at its bits",
                                 "difference"],
            [[e["size"], e["rank"], f"{e['greedylore']:.4f}", f"{e['powersgd_at_same_bits']:.4f}",
              f"{e['difference']:+.4f}"] for e in equal_bits]))
    if args.digits:
        payload["digits"] = digits_curves(args)
        d = payload["digits"]
        checks.append({"target": f"digits r={d['rank']}: GreedyLore's loss per bit at or "
                                 f"below PowerSGD's", "met": d["met"],
                       "value": f"at or below at {100 * d['share_at_or_below']:.0f}% of the "
                                f"bits grid (2% tolerance for the verdict)"})
    md.append("\n".join(f"- {c['target']}: {c['value']}: {'MET' if c['met'] else 'NOT MET'}"
                        for c in checks) + "\n")
    print(md[-1])
    common.write_json(out, "lm_quality", payload, "\n".join(md))
    return payload


if __name__ == "__main__":
    main()
