"""Where GreedyLore's loss goes: energy captured per step, its decay after a refresh, Adam.

Trains the ``lm`` task (byte-level transformer on the Python standard library's source,
held out by file) with PowerSGD and GreedyLore variants from the same initialisation and
data order, and measures on every step, for every compressed weight matrix:

* **captured energy** ``||C_bar||^2 / ||H_bar||^2``: the share of the error-corrected mean
  gradient ``H_bar = mean_i (g_i + E_i)`` that the step sent. Both methods' reconstructions
  are orthogonal projections of ``H_bar``, so with EF14 ``H_bar = C_bar + E_bar'`` (the
  new mean error) and the share is ``1 - ||E_bar'||^2 / ||H_bar||^2``; ``H_bar`` comes from
  the full-batch mean gradient of the same batch plus the old mean error;
* the **best rank-r share** ``sum_{j<=r} sigma_j(H_bar)^2 / ||H_bar||^2`` (Eckart-Young);
* the share by **steps since the last refresh** (GreedyLore's basis ages between refreshes);
* **Adam's second moment** ``sum nu`` over the compressed matrices just before and just after
  each refresh step, and the norm of the refresh step's gradient against a compressed one's.

Shares are energy-weighted over the matrices (captured energy summed over matrices, over
their ``H_bar`` energy summed). Printed per method, saved as JSON and markdown.

Example:
  python -m benchmarks.greedylore_diagnosis --steps 300 --rank 4
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from typing import Any

import jax
import numpy as np
import optax

import lore_jax
from benchmarks import common

AGE_BUCKETS = ((1, 10), (11, 50), (51, 100), (101, 10 ** 9))


def methods(rank: int, tau: int) -> dict[str, Any]:
    """Name -> lore_jax transform (all EF14)."""
    from lore_jax import compressors

    return {
        f"powersgd r={rank}": lore_jax.compressed_mean(compressors.powersgd(rank)),
        f"greedylore r={rank} (paper)": lore_jax.greedylore(
            rank, **{**lore_jax.GREEDYLORE_PAPER, "update_interval": tau}),
        f"greedylore r={rank} (default: range tracking)": lore_jax.greedylore(rank),
    }


def _oriented(x: np.ndarray) -> np.ndarray:
    m = x.reshape(-1, x.shape[-1])
    return m.T if m.shape[0] > m.shape[1] else m


def mean_errors(lore_state: Any, params: Any) -> dict[str, np.ndarray]:
    """Leaf path -> the device-mean EF14 error of its (oriented) matrix, NumPy float64."""
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    errors = jax.tree.leaves(lore_state.error)
    out = {}
    for path, e, x in zip(paths, errors, jax.tree.leaves(params), strict=True):
        if np.ndim(x) == 2:
            out[path] = _oriented(np.asarray(e, np.float64).mean(0))
    return out


def shares(mean_grad: dict[str, np.ndarray], e_old: dict, e_new: dict, rank: int
           ) -> tuple[float, float, float]:
    """(captured energy, best rank-r energy, H_bar energy) summed over the matrices."""
    cap = best = total = 0.0
    for path, e in e_new.items():
        h = _oriented(mean_grad[path]) + e_old.get(path, 0.0)
        energy = float(np.sum(h * h))
        s = np.linalg.svd(h, compute_uv=False)
        total += energy
        best += float(np.sum(s[:rank] ** 2))
        cap += energy - float(np.sum(e * e))
    return cap, best, total


def run_method(name: str, compress: Any, args, setup: dict[str, Any]) -> dict[str, Any]:
    from lore_jax.training import data as data_lib
    from lore_jax.training.step import loss_and_metrics

    ds, apply_fn = setup["dataset"], setup["apply"]
    mesh = common.mesh_of(8)
    tx = optax.chain(compress, optax.adam(optax.cosine_decay_schedule(args.lr, args.steps)))

    def loss_fn(p, batch):
        x, y = batch
        return loss_and_metrics(ds.kind, apply_fn(p, x), y)[0] / x.shape[0]

    train = lore_jax.data_parallel(loss_fn, tx, mesh, donate=False)
    full_grad = jax.jit(jax.grad(loss_fn))
    params = jax.tree.map(np.asarray, setup["params"])
    state = train.init(params)
    stream = data_lib.BatchStream(ds.x_train, ds.y_train, args.batch, args.seed)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    rec = {"captured": [], "best": [], "grad_norm2": [], "nu": [], "refresh_steps": []}
    e_old = mean_errors(state[0], params)
    for t in range(args.steps):
        batch = next(stream)
        g = dict(zip(paths, (np.asarray(x, np.float64) for x in jax.tree.leaves(
            full_grad(params, batch))), strict=True))
        params, state, _ = train.step(params, state, batch)
        e_new = mean_errors(state[0], params)
        cap, best, total = shares(g, e_old, e_new, args.rank)
        e_old = e_new   # the next step starts from this step's error
        rec["captured"].append(cap / total)
        rec["best"].append(best / total)
        rec["grad_norm2"].append(total)
        nu = state[1][0].nu
        rec["nu"].append(float(sum(np.sum(np.asarray(v)) for v in jax.tree.leaves(nu)
                                   if np.ndim(v) == 2)))
        if _refreshes(state[0], t, args.tau):
            rec["refresh_steps"].append(t)
    return summarize(name, rec, args)


def _refreshes(lore_state: Any, t: int, tau: int) -> bool:
    """Whether step ``t`` was a refresh: every ``tau`` steps for the paper's GreedyLore
    (no factor), only step 0 with tracking."""
    bases = jax.tree.leaves(lore_state.compressor_state,
                            is_leaf=lambda x: isinstance(x, lore_jax.GreedyLoreBasis))
    if not bases or not isinstance(bases[0], lore_jax.GreedyLoreBasis):
        return False
    return t % tau == 0 if bases[0].factor is None else t == 0


def summarize(name: str, rec: dict[str, Any], args) -> dict[str, Any]:
    cap, best = np.asarray(rec["captured"]), np.asarray(rec["best"])
    compressed = np.ones(len(cap), bool)
    compressed[rec["refresh_steps"]] = False
    out = {"method": name, "captured_mean": float(cap[compressed].mean()),
           "best_mean": float(best[compressed].mean()),
           "captured_over_best": float(cap[compressed].mean() / best[compressed].mean())}
    if len(rec["refresh_steps"]) > 1:
        age = np.arange(len(cap)) % args.tau
        out["captured_by_age"] = {f"{lo}-{hi if hi < 10 ** 9 else 'end'}": float(
            cap[(age >= lo) & (age <= hi)].mean()) if np.any((age >= lo) & (age <= hi)) else None
            for lo, hi in AGE_BUCKETS}
        later = [t for t in rec["refresh_steps"] if t > 0]
        nu = np.asarray(rec["nu"])
        out["nu_jump_at_refresh"] = [float(nu[t] / nu[t - 1]) for t in later]
        g2 = np.asarray(rec["grad_norm2"])
        out["refresh_grad_norm_ratio"] = [float(np.sqrt(g2[t] / np.median(g2[max(0, t - 10):t])))
                                          for t in later]
    out["series"] = {k: rec[k] for k in ("captured", "best", "nu")}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--tau", type=int, default=100, help="GreedyLore update_interval")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="", help="comma-separated name prefixes to run")
    args = p.parse_args(argv)
    mesh = common.mesh_of(8)
    setup = common.task_setup("lm", mesh, seed=args.seed, seq_len=args.seq_len,
                              d_model=args.d_model, num_layers=args.layers)
    print(f"greedylore diagnosis: {common.describe_machine()}")
    rows, results = [], []
    for name, compress in methods(args.rank, args.tau).items():
        if args.methods and not name.startswith(tuple(args.methods.split(","))):
            continue
        r = run_method(name, compress, args, setup)
        results.append(r)
        ages = r.get("captured_by_age", {})
        rows.append([name, r["captured_mean"], r["best_mean"], r["captured_over_best"],
                     *[ages.get(k, "-") for k in ("1-10", "11-50", "51-100", "101-end")],
                     max(r.get("nu_jump_at_refresh", [1.0]))])
    md = common.table(
        f"Energy captured per compressed step (lm, d_model {args.d_model}, {args.layers} "
        f"layers, rank {args.rank}, tau {args.tau}, {args.steps} steps, 8 devices)",
        ["method", "captured", "best rank-r", "captured / best", "age 1-10", "11-50",
         "51-100", "101+", "max nu jump at refresh"], rows,
        note="captured: ||C_bar||^2/||H_bar||^2 over compressed matrices, energy-weighted, "
             "compressed steps only; age: steps since the last refresh; nu jump: Adam's "
             "sum(nu) over the matrices after / before a refresh step.")
    common.write_json(args.out, "greedylore_diagnosis", {"args": vars(args),
                                                         "results": results}, md)
    return {"results": results}


if __name__ == "__main__":
    main()
