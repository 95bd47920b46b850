"""Steps, bits and time to a target loss per compressor, and projected step times on a network.

**Measured (8 simulated devices).** Each method trains a :mod:`lore_jax.training` task
from the same initialisation and data order, with Adam after the (compressed) mean,
until it reaches the task's target loss (``--targets``) or ``--max-steps``:

* ``digits`` (MLP): the mean *training* loss over the last 10 steps;
* ``lm`` (byte-level transformer on the Python standard library's source, test files
  held out): the *held-out* loss, measured every 25 steps on a fixed subset of 1024 test
  windows evenly spaced over the held-out files (:func:`common.eval_subset`), so the
  target is reached at a multiple of 25 steps;
* ``charlm`` (not run by default: models memorise its 8 KB text): the training loss.

Reported: steps to target, bits each device sent until then (the transforms' exact
counters; amortized over the run, GreedyLore's warm-up and refreshes included), and wall
time on this machine (training steps only, evaluations excluded).

**Projected (bandwidth model).** A step on ``N`` workers joined by links of bandwidth
``B`` costs ``t_step = t_compute + t_comm`` with ring collectives and no latency term:

* all-reduce of ``S`` bytes per device: ``2 (N - 1) / N * S / B``;
* all-gather of ``S`` bytes per device (``N S`` gathered): ``(N - 1) * S / B``.

``t_compute`` is the measured median time of one worker's step (forward, backward,
compression, Adam) on a 1-device mesh with the per-worker batch (global batch / 8),
GreedyLore's refresh amortized over ``tau``. ``S`` is the run's bits per step
(amortized) split into all-reduce and all-gather parts in the proportions read from the
compiled 8-device step's HLO. The per-device payload of every method here does not
depend on ``N``, and compute and communication are not overlapped, so the model is
conservative for methods whose collectives could overlap backward. Projected time to
target multiplies by the steps measured on 8 devices (the same global batch).

Example:
  python -m benchmarks.time_to_target
  python -m benchmarks.time_to_target --tasks lm --targets lm=1.9 --max-steps 1500
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see benchmarks/README.md, "Threads"

import statistics
import time
from typing import Any

import numpy as np
import optax
from jax.sharding import PartitionSpec as P

import lore_jax
from benchmarks import common

BANDWIDTHS_GBPS = (1.0, 10.0, 100.0)
WORKERS = (8, 16, 32, 64, 128, 256)
DEFAULTS = {  # batch, learning rate, target loss and what it is measured on, max steps
    "digits": dict(batch=128, lr=1e-3, target=0.25, metric="train", max_steps=600),
    # Held-out loss in nats per byte (uniform over 256 bytes: 5.55). Dense, measured once
    # (2-core CPU, Python 3.11's stdlib, 137k-parameter transformer): 2.95 at step 25,
    # 2.43 at 100, 2.12 at 250, 2.06 at 300 (the target's first evaluation), 1.88 at 500.
    "lm": dict(batch=64, lr=3e-3, target=2.1, metric="test", max_steps=750, seq_len=64,
               eval_every=25, eval_examples=1024),
    "charlm": dict(batch=32, lr=3e-3, target=2.0, metric="train", max_steps=600, seq_len=32),
}
# Keys of DEFAULTS that are train_run's keyword arguments as they stand.
RUN_KEYS = ("seq_len", "eval_every", "eval_examples")
# Bit packing builds constant index arrays that XLA's constant folding can spend minutes
# on at compile time; it does not change the step's results.
COMPILER_OPTIONS = {"xla_disable_hlo_passes": "constant_folding"}


def methods(rank: int, tau: int, warmup: int, fraction: float, seed: int
            ) -> dict[str, tuple[Any, dict[str, int]]]:
    """Name -> (mean transform, GreedyLore phases to time) for every method available."""
    paper = dict(update_interval=tau, warmup_steps=warmup, axis_name=common.AXIS, key=seed,
                 tracking="off")
    phases = {"refresh": warmup + tau, "compressed": warmup + 1}
    out: dict[str, Any] = {
        "dense": (common.dense_mean(), {}),
        f"greedylore r={rank}": (   # the default: range tracking, only the first refresh
            lore_jax.greedylore(rank, warmup_steps=warmup, axis_name=common.AXIS, key=seed),
            {"compressed": warmup + 1}),
        f"greedylore r={rank} (paper settings)": (
            lore_jax.greedylore(rank, **paper), phases),
    }
    cm = common.compressors_module()
    if cm is None:
        return out
    comps, cmean = cm

    def via(c):
        return cmean(c, axis_name=common.AXIS, key=seed), {}

    pct = f"{100 * fraction:g}%"
    out.update({
        f"powersgd r={rank}": via(comps.powersgd(rank)),
        f"random projection r={rank}": via(comps.random_projection(rank)),
        f"top-k {pct}": via(comps.top_k(fraction=fraction)),
        f"random-k {pct} (shared seed)": via(
            comps.random_k(fraction=fraction, shared_seed=True)),
        "qsgd 4-bit (s=7, B=512)": via(comps.qsgd(7, bucket_size=512)),
        "terngrad": via(comps.terngrad()),
        "scaled sign": via(comps.scaled_sign()),
    })
    return out


def collective_split(compiled_text: str, n: int) -> tuple[float, float]:
    """(all-reduce bits, all-gather bits) per device summed over the step's HLO."""
    wb = common.wire_bits(compiled_text, n)
    ar = sum(v.get("all-reduce", 0) for v in wb["by_computation"].values())
    ag = sum(v.get("all-gather", 0) for v in wb["by_computation"].values())
    return ar, ag


def compute_time(task: str, tx_phases: tuple[Any, dict[str, int]], lr: float, batch: int,
                 tau: int, repeats: int, seed: int, seq_len: int = 32) -> dict[str, float]:
    """One worker's step time (1-device mesh, per-worker batch), refresh amortized."""
    from lore_jax.training import step as step_lib

    compress, phases = tx_phases
    mesh = common.mesh_of(1)
    setup = common.task_setup(task, mesh, seed=seed, seq_len=seq_len)
    ds = setup["dataset"]
    tx = optax.chain(compress, optax.adam(lr))
    state, specs = step_lib.init_optimizer(tx, setup["params"], mesh, common.AXIS)
    x = step_lib.global_array(ds.x_train[:batch], mesh, P(common.AXIS))
    y = step_lib.global_array(ds.y_train[:batch], mesh, P(common.AXIS))
    step = common.plain_train_step(setup["apply"], ds.kind, tx, mesh, specs)
    compiled = step.lower(setup["params"], state, x, y).compile(
        compiler_options=COMPILER_OPTIONS)
    out = {}
    for phase, count in (phases or {"step": 0}).items():
        s = common.with_count(state, count, mesh) if phases else state
        out[phase] = common.time_call(compiled, setup["params"], s, x, y, repeats=repeats,
                                      warmup=2)["median"]
    if "refresh" in out:
        out["amortized"] = ((tau - 1) * out["compressed"] + out["refresh"]) / tau
    else:
        out["amortized"] = out.get("compressed", out.get("step"))
    return out


def comm_time(ar_bytes: float, ag_bytes: float, n: int, gbps: float) -> float:
    bw = gbps * 1e9 / 8            # bytes per second
    return 2 * (n - 1) / n * ar_bytes / bw + (n - 1) * ag_bytes / bw


def run_task(task: str, cfg: dict[str, Any], args) -> dict[str, Any]:
    mesh = common.mesh_of(8)
    n = mesh.shape[common.AXIS]
    rows = {}
    for name, tx_phases in methods(args.rank, args.tau, args.warmup_steps, args.fraction,
                                   args.seed).items():
        if args.methods and not name.startswith(("dense", "greedylore", *args.methods)):
            continue
        compress, _ = tx_phases
        tx = optax.chain(compress, optax.adam(cfg["lr"]))
        t = time.perf_counter()
        run = common.train_run(task, tx, steps=cfg["max_steps"], mesh=mesh,
                               batch_size=cfg["batch"], seed=args.seed, target=cfg["target"],
                               target_metric=cfg["metric"],
                               compiler_options=COMPILER_OPTIONS,
                               **{k: cfg[k] for k in RUN_KEYS if k in cfg})
        steps = len(run["losses"])
        ar, ag = collective_split(run["compiled_text"], n)
        bits_per_step = run["bits_sent"][-1] / steps
        frac_ag = ag / (ar + ag) if ar + ag else 0.0
        compute = compute_time(task, tx_phases, cfg["lr"], cfg["batch"] // n, args.tau,
                               args.repeats, args.seed, cfg.get("seq_len", 32))
        rec = {
            "steps_run": steps, "reached": run["steps_to_target"] is not None,
            "steps_to_target": run["steps_to_target"], "time_to_target_s": run["time_to_target"],
            "bits_to_target": run["bits_to_target"], "final_loss": float(np.mean(
                run["losses"][-10:])),
            "final_test_loss": run["evals"][-1][1] if run["evals"] else None,
            "evals": run["evals"],
            "bits_per_step": bits_per_step, "dense_bits_per_step": run["bits_dense"][-1] / steps,
            "hlo_all_reduce_bits": ar, "hlo_all_gather_bits": ag,
            "median_step_s_8dev": statistics.median(run["step_times"]),
            "compute_s": compute["amortized"], "compute_phases_s": compute,
            "compile_s": run["compile_s"], "wall_s": time.perf_counter() - t,
        }
        ar_bytes = bits_per_step * (1 - frac_ag) / 8
        ag_bytes = bits_per_step * frac_ag / 8
        rec["projected_step_s"] = {
            f"{g:g}": {str(w): compute["amortized"] + comm_time(ar_bytes, ag_bytes, w, g)
                       for w in WORKERS} for g in BANDWIDTHS_GBPS}
        if rec["reached"]:
            rec["projected_time_to_target_s"] = {
                f"{g:g}": rec["steps_to_target"] * rec["projected_step_s"][f"{g:g}"]["8"]
                for g in BANDWIDTHS_GBPS}
        rows[name] = rec
        print(f"  {task} {name}: {'reached' if rec['reached'] else 'NOT reached'} "
              f"{cfg['target']} in {rec['steps_to_target'] or steps} steps, "
              f"{bits_per_step / 8 / 1024:.1f} KiB/step, "
              f"compute {compute['amortized'] * 1e3:.2f} ms")
    return {"task": task, **cfg, "methods": rows}


def tables(res: dict[str, Any], args) -> str:
    md = []
    task = res["task"]
    dense = res["methods"]["dense"]
    rows = []
    for name, r in res["methods"].items():
        proj = r.get("projected_time_to_target_s", {})
        rows.append([
            name, r["steps_to_target"] if r["reached"] else f"> {r['steps_run']}",
            (r["bits_to_target"] / 8 / 2**20) if r["reached"] else "-",
            dense["bits_per_step"] / r["bits_per_step"],
            r["time_to_target_s"] if r["reached"] else "-",
            r["compute_s"] * 1e3,
            *[proj.get(f"{g:g}", "-") for g in BANDWIDTHS_GBPS]])
    md.append(common.table(
        f"{task}: time to {'held-out' if res['metric'] == 'test' else 'train'} loss <= "
        f"{res['target']} (global batch {res['batch']}, 8 devices, Adam lr {res['lr']})",
        ["method", "steps", "MiB sent / device", "x fewer bits/step", "measured s",
         "worker compute ms", *[f"proj. s @ {g:g} Gb/s, N=8" for g in BANDWIDTHS_GBPS]],
        rows, note="measured s: wall time on this machine (8 simulated devices, compilation "
                   "excluded); proj.: steps x modelled step time"))
    shown = (8, 64, 256)
    rows = []
    for name, r in res["methods"].items():
        rows.append([name] + [r["projected_step_s"][f"{g:g}"][str(w)] * 1e3
                              for g in BANDWIDTHS_GBPS for w in shown])
    md.append(common.table(
        f"{task}: projected step time (ms) = worker compute + ring collectives",
        ["method"] + [f"{g:g} Gb/s N={w}" for g in BANDWIDTHS_GBPS for w in shown], rows,
        note="all-reduce 2(N-1)/N S/B, all-gather (N-1) S/B per device payload S; no latency, "
             "no overlap. Full grid (N = 8..256) in the JSON."))
    return "\n".join(md)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--tasks", default="digits,lm")
    p.add_argument("--targets", default="", help="task=loss overrides, e.g. digits=0.2")
    p.add_argument("--max-steps", type=int, default=0, help="override every task's limit")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--tau", type=int, default=100)
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--fraction", type=float, default=0.01, help="top-k / random-k fraction")
    p.add_argument("--methods", default="",
                   help="comma-separated name prefixes to run (dense and greedylore always run)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls for worker compute")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    if not common.training_available():
        print("lore_jax.training is not installed: nothing to measure.")
        return {}
    overrides = dict(kv.split("=") for kv in args.targets.split(",") if kv)
    print(f"time to target: {common.describe_machine()}")
    results, md = [], []
    for task in [t for t in args.tasks.split(",") if t]:
        cfg = dict(DEFAULTS[task])
        if task in overrides:
            cfg["target"] = float(overrides[task])
        if args.max_steps:
            cfg["max_steps"] = args.max_steps
        res = run_task(task, cfg, args)
        results.append(res)
        md.append(tables(res, args))
    if common.compressors_module() is None:
        md.append("lore_jax.compressors / compressed_mean are not installed: only dense and "
                  "GreedyLore ran.\n")
    payload = {"args": {k: v for k, v in vars(args).items()}, "bandwidths_gbps":
               BANDWIDTHS_GBPS, "workers": WORKERS, "results": results}
    common.write_json(args.out, "time_to_target", payload, "\n".join(md))
    return payload


if __name__ == "__main__":
    main()
