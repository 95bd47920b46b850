"""Time to a held-out target over emulated links: how much sooner compression gets there.

Every run is ``lore-jax train`` on the ``lm`` task as P processes (one simulated device
each) of an emulated cluster (:mod:`lore_jax.cluster`: network namespaces joined by links
shaped by a token bucket). It evaluates the held-out loss every ``--eval-every`` steps on
``--eval-examples`` fixed test windows and stops at the first evaluation at or below
``--target`` (``--target-loss``), or after ``--steps``.

Reported per link rate, cluster size and method (from process 0's log):

* start-up: seconds from the launch of the command to the first step (imports,
  ``jax.distributed``, data, initialisation, compilation);
* step: the median seconds of a training step (forward, backward, compression, the
  collectives, the optimizer); compute: the same method's median step on the unshaped
  link of the same cluster size; network wait: step minus compute;
* model: the bandwidth model's step for the same run, compute plus the ring
  collectives' bytes at the link's rate (:func:`modelled_step`), without framing, latency
  or overlap;
* steps and time to target: the first evaluation at or below the target, and the
  seconds from the launch to the end of that step, evaluation time left out (start-up
  included); ``x dense``: that time over dense's on the same link;
* wire: bytes node 0's interface sent per step (whole frames).

Runs are appended to ``<out>/cluster_time_runs.jsonl`` as they finish; a run already
there is not repeated, so a long sweep can be stopped and continued (``--only`` picks
part of the grid). The toolkit's candidates (``--toolkit``) first race on the smallest
cluster's unshaped link; the fastest to the target represents the toolkit elsewhere.

The machine's cores are shared: P processes on C cores get C/P cores each (on 2 cores,
one core each at P = 2 and half a core at P = 4).

Example:
  python -m benchmarks.cluster_time                                 # the whole grid
  python -m benchmarks.cluster_time --nodes 2 --rates 100mbit --seeds 0 --methods dense,greedylore
  python -m benchmarks.cluster_time --report                        # tables from the runs so far
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common
from benchmarks.cluster_bytes import collective_factor
from lore_jax import cluster
from lore_jax.training import metrics as metrics_lib

#: Method -> (``lore-jax train`` flags, the collective its payload goes through). A name
#: may end in `` r=N`` for another rank than ``--rank`` (``greedylore r=16``).
METHODS: dict[str, tuple[list[str], str]] = {
    "dense": (["--compressor", "dense"], "all-reduce"),
    "powersgd": (["--compressor", "powersgd"], "all-reduce"),
    "greedylore": (["--compressor", "greedylore"], "all-reduce"),
    "greedylore (paper)": (["--compressor", "greedylore", "--tracking", "off"], "all-reduce"),
    "topk 1%": (["--compressor", "topk", "--fraction", "0.01"], "all-gather"),
    "sign": (["--compressor", "sign"], "all-gather"),
    "random": (["--compressor", "random"], "all-reduce"),
}
TOOLKIT = ("topk 1%", "sign", "random")
#: The issue's targets: GreedyLore's time to target over dense's, on 2 nodes, per rate.
TARGET_RATIOS = {"100mbit": 0.6, "20mbit": 0.25}


def method_flags(method: str, rank: int) -> tuple[list[str], str]:
    """``lore-jax train`` flags and collective of a method name (``greedylore r=16``)."""
    base, _, r = method.partition(" r=")
    if base not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {list(METHODS)}, with an "
                         f"optional ' r=N'")
    flags, kind = METHODS[base]
    return [*flags, "--rank", r or str(rank)], kind


def _method_order(method: str) -> tuple[int, int]:
    base, _, r = method.partition(" r=")
    return list(METHODS).index(base), int(r or 0)


def run_key(method: str, nodes: int, rate: str, seed: int) -> str:
    return f"{method} | P={nodes} | {rate} | seed {seed}"


def run_one(method: str, nodes: int, rate: str, seed: int, args: Any) -> dict[str, Any]:
    """One training job on the emulated cluster; its log's numbers."""
    flags, _ = method_flags(method, args.rank)
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "log.jsonl")
        job = ["train", "--task", "lm", *args.model.split(), *flags, "--steps", str(args.steps),
               "--eval-every", str(args.eval_every),
               "--eval-examples", str(args.eval_examples),
               "--target-loss", str(min([args.target, *args.also])),
               "--seed", str(seed), "--no-progress", "--log", log,
               "--compilation-cache", args.compilation_cache]
        t = time.time()
        result = cluster.run(cluster.lore_jax_command(job, nodes), nodes=nodes, rate=rate,
                             timeout=args.timeout, output=sys.stdout if args.echo else None)
        records = metrics_lib.read_log(log) if os.path.exists(log) else []
    if not result.ok:
        raise RuntimeError(f"{run_key(method, nodes, rate, seed)} failed: "
                           f"{result.summary(tails=True)}")
    config = next(r for r in records if r["event"] == "config")
    train = [r for r in records if r["event"] == "train"]
    evals = [r for r in records if r["event"] == "eval"]
    return {"key": run_key(method, nodes, rate, seed), "method": method, "nodes": nodes,
            "rate": rate, "seed": seed, "started": t, "startup_s": config["startup_s"],
            "startup": config["startup"],
            "steps": [r["step"] for r in train],
            "step_time": [r["step_time"] for r in train],
            "wall_s": [r["wall_s"] for r in train],
            "bits_sent": [r["bits_sent"] for r in train],
            "net_sent": [r.get("net_sent_bytes") for r in train],
            "evals": [{k: e[k] for k in ("step", "test_loss", "eval_s")} for e in evals],
            "reached": any(r["event"] == "target" for r in records),
            "traffic": [tr.__dict__ for tr in result.traffic], "cluster_wall_s": result.wall_s}


def time_to_target(run: dict[str, Any], target: float) -> tuple[int | None, float | None]:
    """The first evaluation at or below ``target``: its step, and the seconds from the
    launch to the end of that step with the evaluations before it left out."""
    spent = 0.0
    for e in run["evals"]:
        if e["test_loss"] <= target:
            i = run["steps"].index(e["step"])
            return e["step"], run["wall_s"][i] - spent
        spent += e["eval_s"]
    return None, None


def curve(run: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Held-out loss against seconds from the launch (evaluation time left out)."""
    xs, ys, spent = [], [], 0.0
    for e in run["evals"]:
        i = run["steps"].index(e["step"])
        xs.append(run["wall_s"][i] - spent)
        ys.append(e["test_loss"])
        spent += e["eval_s"]
    return xs, ys


def median_step(run: dict[str, Any]) -> float:
    """The median training step, the first (its first execution) left out."""
    return statistics.median(run["step_time"][1:] or run["step_time"])


def bytes_per_step(run: dict[str, Any]) -> tuple[float, float]:
    """Accounted payload bytes and node 0's wire bytes per step, over steps 2 to the end
    (evaluations between them included in the wire bytes, a few hundred bytes each)."""
    n = len(run["steps"]) - 1
    if n < 1:
        return float("nan"), float("nan")
    accounted = (run["bits_sent"][-1] - run["bits_sent"][0]) / 8 / n
    wire = (run["net_sent"][-1] - run["net_sent"][0]) / n if run["net_sent"][0] is not None \
        else float("nan")
    return accounted, wire


def modelled_step(compute_s: float, payload_bytes: float, kind: str, nodes: int,
                  rate: str) -> float:
    """Compute plus the ring collective's bytes at the link's rate (no framing, no
    latency, no overlap): the bandwidth model of :mod:`benchmarks.time_to_target`."""
    bps = cluster.parse_rate(rate)
    if bps is None:
        return compute_s
    return compute_s + 8 * payload_bytes * collective_factor(kind, nodes) / bps


def load(path: Path) -> dict[str, dict[str, Any]]:
    runs: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                runs[r["key"]] = r
    return runs


def grid(args: Any, toolkit: str | None) -> list[tuple[str, int, str, int]]:
    """The runs to make, in order: per cluster size and rate, every method and seed."""
    methods = [m for m in args.methods.split(",") if m]
    out = []
    for nodes in common.ints(args.nodes):
        for rate in args.rates.split(","):
            seeds = common.ints(args.seeds) if (nodes, rate) == (2, "100mbit") else [0]
            for seed in seeds:
                for m in methods:
                    if m == "toolkit":
                        if toolkit is None:
                            continue
                        m = toolkit
                    out.append((m, nodes, rate, seed))
    return out


def choose_toolkit(runs: dict[str, dict[str, Any]], args: Any,
                   candidates: list[str]) -> str | None:
    """The toolkit candidate that reached the target soonest on the smallest cluster's
    unshaped link, or, if none did, the one whose last held-out loss is lowest (``None``
    until they have all run)."""
    nodes = min(common.ints(args.nodes))
    scores = {}
    for m in candidates:
        r = runs.get(run_key(m, nodes, "unshaped", 0))
        if r is None:
            return None
        t = time_to_target(r, args.target)[1]
        scores[m] = (float("inf") if t is None else t, r["evals"][-1]["test_loss"])
    return min(scores, key=scores.get)


def report(runs: dict[str, dict[str, Any]], args: Any, out: Path) -> str:
    """The tables and the figure from the runs so far; prints which targets are met."""
    by = {}
    for r in runs.values():
        by.setdefault((r["nodes"], r["rate"], r["method"]), []).append(r)
    rows, others = [], []
    for (nodes, rate, method), rs in sorted(by.items(), key=lambda kv: (
            kv[0][0], _rate_order(kv[0][1]), _method_order(kv[0][2]))):
        kind = method_flags(method, args.rank)[1]
        base = by.get((nodes, "unshaped", method))
        compute = statistics.median(median_step(b) for b in base) if base else float("nan")
        step = statistics.median(median_step(r) for r in rs)
        accounted, wire = bytes_per_step(rs[0])
        ttt = [time_to_target(r, args.target) for r in rs]
        reached = [t for _, t in ttt if t is not None]
        dense = by.get((nodes, rate, "dense"))
        dense_t = [time_to_target(d, args.target)[1] for d in dense] if dense else []
        dense_t = [t for t in dense_t if t is not None]
        ratio = (statistics.median(reached) / statistics.median(dense_t)
                 if reached and dense_t and len(reached) == len(rs) else None)
        startup = statistics.median(r["startup_s"] for r in rs)
        model = modelled_step(compute, accounted, kind, nodes, rate)
        steps = [s for s, _ in ttt]
        rows.append([f"P={nodes}", rate, method, len(rs), startup, step, compute,
                     max(step - compute, 0.0), model,
                     ", ".join(str(s) if s else "-" for s in steps),
                     statistics.median(reached) if len(reached) == len(rs) else None,
                     startup + statistics.median(steps) * model if all(steps) else None,
                     ratio, wire / 1e3])
        others.append([f"P={nodes}", rate, method, *[
            _ratio(by, (nodes, rate, method), t) for t in args.also]])
    md = common.table(
        f"lm {args.model}: time to held-out loss <= {args.target} on an emulated cluster",
        ["nodes", "link", "method", "seeds", "start-up s", "step s", "compute s",
         "network wait s", "model step s", "steps to target", "time to target s",
         "model time s", "x dense", "wire KB/step"], rows,
        note="start-up: launch to first step; step: median step on this link; compute: "
             "the same method's median step on the unshaped link; network wait: step - "
             "compute (0 where run-to-run noise makes it negative); model step: compute + "
             "ring collective bytes / rate; time to target: launch to the step of the first "
             "evaluation at or below the target, evaluations left out, median over seeds; "
             "model time: start-up + steps to target x model step; x dense: time to target "
             "over dense's on the same link.")
    if args.also:
        md += "\n" + common.table(
            "Time to other held-out targets over dense's (medians over seeds)",
            ["nodes", "link", "method", *[f"<= {t}" for t in args.also]], others,
            note="-: not reached within the run (or not run).")
    md += "\n" + _targets(by, args)
    _figure(by, args, out)
    return md


def _rate_order(rate: str) -> float:
    bps = cluster.parse_rate(rate)
    return -(bps or float("inf"))


def _ratio(by, key, target) -> float | None:
    """A method's median time to ``target`` over dense's on the same link."""
    mine, dense = _ttt(by, key, target), _ttt(by, (key[0], key[1], "dense"), target)
    return None if mine is None or dense is None else mine / dense


def _ttt(by, key, target) -> float | None:
    rs = by.get(key)
    if not rs:
        return None
    ts = [time_to_target(r, target)[1] for r in rs]
    return None if any(t is None for t in ts) else statistics.median(ts)


def _targets(by, args) -> str:
    lines = ["**Targets**", ""]
    for rate, limit in TARGET_RATIOS.items():
        g, d = _ttt(by, (2, rate, "greedylore"), args.target), _ttt(by, (2, rate, "dense"),
                                                                     args.target)
        if g is None or d is None:
            lines.append(f"- 2 nodes, {rate}: GreedyLore / dense time to target <= {limit}: "
                         f"not measured (or not reached)")
            continue
        ok = g / d <= limit
        lines.append(f"- 2 nodes, {rate}: GreedyLore / dense time to target {g / d:.3f} "
                     f"(limit {limit}): {'met' if ok else 'NOT met'}")
    rates = sorted({k[1] for k in by}, key=_rate_order)
    for nodes in sorted({k[0] for k in by}):
        for rate in rates:
            g = _ttt(by, (nodes, rate, "greedylore"), args.target)
            p = _ttt(by, (nodes, rate, "powersgd"), args.target)
            if g is None or p is None:
                continue
            lines.append(f"- {nodes} nodes, {rate}: GreedyLore {g:.0f} s vs PowerSGD {p:.0f} "
                         f"s to target: {'met' if g <= p else 'NOT met'} (GreedyLore <= "
                         f"PowerSGD)")
    starts = [r["startup_s"] for k, rs in by.items() if k[0] == 2 for r in rs]
    if starts:
        lines.append(f"- start-up to the first step on 2 nodes: median "
                     f"{statistics.median(starts):.1f} s, max {max(starts):.1f} s (limit 10 s): "
                     f"{'met' if max(starts) <= 10 else 'NOT met'}")
    text = "\n".join(lines) + "\n"
    print(text)
    return text


def _figure(by, args, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:   # pragma: no cover - a dependency
        return
    sizes = sorted({k[0] for k in by})
    rates = sorted({k[1] for k in by}, key=_rate_order)
    if not sizes:
        return
    methods = sorted({k[2] for k in by}, key=_method_order)
    colour = {m: f"C{i % 10}" for i, m in enumerate(methods)}   # one colour per method
    fig, axes = plt.subplots(len(sizes), len(rates), figsize=(4.2 * len(rates),
                             3.4 * len(sizes)), squeeze=False)
    for row, nodes in zip(axes, sizes, strict=True):
        for ax, rate in zip(row, rates, strict=True):
            for method in methods:
                rs = by.get((nodes, rate, method))
                if rs:
                    r = min(rs, key=lambda r: r["seed"])
                    ax.plot(*curve(r), label=method, color=colour[method], marker=".",
                            markersize=3)
            ax.axhline(args.target, color="grey", lw=0.8, ls="--")
            ax.set_title(f"{nodes} nodes, {rate}")
            ax.set_xlabel("seconds from launch (evaluations excluded)")
            ax.set_ylabel("held-out loss")
            ax.set_ylim(top=min(3.5, ax.get_ylim()[1]))
    handles = {m: h for ax in axes.flat for h, m in zip(*ax.get_legend_handles_labels(),
                                                         strict=True)}
    fig.legend(list(handles.values()), list(handles), loc="lower center",
               ncol=min(len(handles), 5), fontsize=8)
    fig.tight_layout(rect=(0, 0.1 / len(sizes), 1, 1))
    fig.savefig(out / "cluster_time.png", dpi=110)
    print(f"wrote {out / 'cluster_time.png'}")


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--methods", default="dense,powersgd,greedylore,greedylore (paper),toolkit",
                   help="comma-separated: " + common.listing(METHODS)
                        + " (each may end in "
                        "' r=N'), toolkit (the "
                        "fastest of --toolkit)")
    p.add_argument("--toolkit", default=",".join(TOOLKIT),
                   help="the toolkit's candidates, raced on the unshaped link")
    p.add_argument("--nodes", default="2,4")
    p.add_argument("--rates", default="unshaped,100mbit,20mbit")
    p.add_argument("--seeds", default="0,1,2", help="seeds on 2 nodes at 100mbit (else 0)")
    p.add_argument("--model", default="--d-model 128 --layers 4")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--steps", type=int, default=600, help="the schedule's length")
    p.add_argument("--target", type=float, default=2.2, help="held-out loss to reach")
    p.add_argument("--also", default="2.3,2.1",
                   help="other held-out targets reported (runs stop at the lowest)")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-examples", type=int, default=1024)
    p.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    p.add_argument("--compilation-cache", default="off",
                   help="--compilation-cache of every run (off: every start-up compiles)")
    p.add_argument("--report", action="store_true", help="only the tables of the runs so far")
    p.add_argument("--echo", action="store_true", help="show the nodes' output")
    args = p.parse_args(argv)
    args.also = [float(t) for t in args.also.split(",") if t.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "cluster_time_runs.jsonl"
    candidates = [m for m in args.toolkit.split(",") if m]
    runs = load(path)

    def ensure(method: str, nodes: int, rate: str, seed: int) -> None:
        key = run_key(method, nodes, rate, seed)
        if key in runs:
            return
        print(f"{key} ...", flush=True)
        r = run_one(method, nodes, rate, seed, args)
        runs[key] = r
        with path.open("a") as f:
            f.write(json.dumps(r) + "\n")
        step, t = time_to_target(r, args.target)
        print(f"{key}: start-up {r['startup_s']:.1f} s, median step {median_step(r):.3f} s, "
              f"target at step {step} after {'-' if t is None else f'{t:.1f}'} s", flush=True)

    if not args.report:
        reason = cluster.unavailable_reason()
        if reason:
            print(f"cluster_time: skipped: {reason}")
            return 0
        if "toolkit" in args.methods.split(","):
            for m in candidates:   # the race on the unshaped link
                ensure(m, min(common.ints(args.nodes)), "unshaped", 0)
        for run in grid(args, choose_toolkit(runs, args, candidates)):
            ensure(*run)
    md = report(runs, args, out)
    toolkit = choose_toolkit(runs, args, candidates)
    if toolkit:
        md += (f"\nThe toolkit is represented by {toolkit}, the fastest to the target of "
               f"{', '.join(candidates)} on the unshaped link.\n")
    common.write_json(out, "cluster_time", {"args": vars(args), "toolkit": toolkit,
                                            "runs": list(runs.values())}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
