"""Bytes on the wire per training step, counted at each node's interface, against the accounting.

Every compressor family trains the ``lm`` task as ``lore-jax train`` on an emulated
cluster (:mod:`lore_jax.cluster`: P processes, one simulated device each, one per
network namespace, unshaped links). After every step process 0's log holds its
cumulative accounted bits (``bits_sent``, :func:`lore_jax.communication`) and what its
interface sent and received (``net_sent_bytes``, ``net_received_bytes``: whole frames).
Step 1 (compilation's first run) is left out; the final evaluation comes after the last
step's record, so no evaluation traffic is counted.

The accounting counts the payload, the buffer each device contributes to a collective.
What a node's link carries for it depends on the collective (Gloo's ring algorithms,
checked with single collectives at P = 2 and 4):

* all-reduce of ``S`` bytes: each node sends and receives ``2 (P - 1) / P * S``;
* all-gather of ``S`` bytes from each node: each node sends and receives ``(P - 1) * S``.

``implied`` is the accounted bytes times that factor (every method here sends all its
payload through one kind of collective: low-rank methods and dense all-reduce, top-k,
QSGD and sign all-gather). ``sent / implied`` above 1 is framing: 66 bytes of Ethernet,
IP and TCP headers per frame of at most 1,448 payload bytes (4.6%), the ACK frames a node
sends for what it receives (about 2%), Gloo's own messages per operation (a few hundred
bytes), the training step's metrics (one all-reduce of three floats per step) and the
coordination service's heartbeats (tens of bytes per second).

GreedyLore is run with ``--warmup-steps 3 --update-interval 4`` so that one run has
steps of each phase: dense warm-up and refresh steps (the whole gradient, all-reduced)
and compressed steps; rows are split by phase (steps whose accounted bits equal dense's
are "dense", the others "compressed").

Example:
  python -m benchmarks.cluster_bytes --collectives         # every method at P = 2 and 4
  python -m benchmarks.cluster_bytes --nodes 2 --methods dense,greedylore --steps 10
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks import common
from lore_jax import cluster
from lore_jax.training import metrics as metrics_lib

#: Method -> (``lore-jax train`` flags, the collective its payload goes through).
METHODS: dict[str, tuple[list[str], str]] = {
    "dense": (["--compressor", "dense"], "all-reduce"),
    "powersgd": (["--compressor", "powersgd"], "all-reduce"),
    "random": (["--compressor", "random"], "all-reduce"),
    "greedylore": (["--compressor", "greedylore", "--warmup-steps", "3",
                    "--update-interval", "4"], "all-reduce"),
    "greedylore (paper)": (["--compressor", "greedylore", "--tracking", "off",
                            "--warmup-steps", "3", "--update-interval", "4"], "all-reduce"),
    "topk 1%": (["--compressor", "topk", "--fraction", "0.01"], "all-gather"),
    "qsgd 4-bit": (["--compressor", "qsgd", "--levels", "7"], "all-gather"),
    "sign": (["--compressor", "sign"], "all-gather"),
}
#: The tolerance of the target: bytes on the wire within this share of the implied.
TOLERANCE = 0.10
#: Bytes a node's link carries per collective operation beyond its payload's frames, at
#: most, on 2 nodes: Gloo's ring runs an all-reduce as two messages each way, each with
#: its header and the TCP ACKs it draws (measured: an all-reduce of one float moves 412
#: bytes each way, of 1 KiB 2.4 KB, of 64 KiB 70 KB).
OPERATION_BYTES = 2000


def collective_factor(kind: str, nodes: int) -> float:
    """Bytes each node sends (and receives) per accounted byte, for Gloo's ring collectives.

    Example:
      >>> collective_factor("all-reduce", 4), collective_factor("all-gather", 4)
      (1.5, 3.0)
    """
    if kind == "all-reduce":
        return 2 * (nodes - 1) / nodes
    if kind == "all-gather":
        return float(nodes - 1)
    raise ValueError(f"unknown collective {kind!r}")


def per_step(records: list[dict[str, Any]], skip: int = 1) -> list[dict[str, float]]:
    """Each step's accounted bytes and interface bytes from a training log's records
    (process 0's), leaving out the first ``skip`` steps."""
    train = [r for r in records if r.get("event") == "train"]
    if train and "net_sent_bytes" not in train[0]:
        raise ValueError("the log has no interface counters: it is not a multi-process run "
                         "on Linux")
    out = []
    for prev, cur in zip(train, train[1:], strict=False):
        if cur["step"] <= skip:
            continue
        out.append({"step": cur["step"],
                    "accounted": (cur["bits_sent"] - prev["bits_sent"]) / 8,
                    "dense": (cur["bits_dense"] - prev["bits_dense"]) / 8,
                    "sent": cur["net_sent_bytes"] - prev["net_sent_bytes"],
                    "received": cur["net_received_bytes"] - prev["net_received_bytes"]})
    return out


def phases(steps: list[dict[str, float]], kind: str, nodes: int) -> list[dict[str, Any]]:
    """The steps grouped by phase ("dense" when a step's accounted bytes are dense's,
    else "compressed"), with bytes per step and the ratios to the implied bytes."""
    groups: dict[str, list[dict[str, float]]] = {}
    for s in steps:
        groups.setdefault("dense" if s["accounted"] >= s["dense"] else "compressed",
                          []).append(s)
    out = []
    for phase, members in groups.items():
        accounted = sum(s["accounted"] for s in members) / len(members)
        implied = accounted * collective_factor(kind, nodes)
        sent = sum(s["sent"] for s in members) / len(members)
        received = sum(s["received"] for s in members) / len(members)
        out.append({"phase": phase, "steps": len(members), "accounted": accounted,
                    "implied": implied, "sent": sent, "received": received,
                    "sent_ratio": sent / implied, "received_ratio": received / implied,
                    "median_step_ratio": statistics.median(
                        s["sent"] / (s["accounted"] * collective_factor(kind, nodes))
                        for s in members)})
    return out


def run_method(flags: list[str], kind: str, nodes: int, steps: int, model: list[str],
               timeout: float, echo: bool = False) -> dict[str, Any]:
    """One training job on ``nodes`` emulated nodes; returns its phases and traffic."""
    with tempfile.TemporaryDirectory() as tmp:
        log = os.path.join(tmp, "log.jsonl")
        job = ["train", "--task", "lm", *model, *flags, "--steps", str(steps),
               "--eval-every", str(10 * steps), "--eval-examples", "64", "--no-progress",
               "--log", log]
        result = cluster.run(cluster.lore_jax_command(job, nodes), nodes=nodes,
                             timeout=timeout, output=sys.stdout if echo else None)
        if not result.ok:
            raise RuntimeError(f"the {nodes}-node job {' '.join(job)} failed: "
                               f"{result.summary(tails=True)}")
        records = metrics_lib.read_log(log)
    return {"phases": phases(per_step(records), kind, nodes),
            "run": {"wall_s": result.wall_s,
                    "traffic": [t.__dict__ for t in result.traffic]}}


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS),
                   help="comma-separated subset of: " + common.listing(METHODS))
    p.add_argument("--nodes", default="2,4", help="cluster sizes")
    p.add_argument("--steps", type=int, default=14, help="training steps per run")
    p.add_argument("--model", default="--d-model 128 --layers 4",
                   help="lore-jax model flags for the lm task")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--echo", action="store_true", help="show the nodes' output")
    p.add_argument("--collectives", action="store_true",
                   help="also count single collectives of several sizes "
                        "(benchmarks/collective_probe.py)")
    args = p.parse_args(argv)
    reason = cluster.unavailable_reason()
    if reason:
        print(f"cluster_bytes: skipped: {reason}")
        return 0
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    rows, results = [], []
    for nodes in common.ints(args.nodes):
        for name in names:
            flags, kind = METHODS[name]
            print(f"{name} on {nodes} nodes ...", flush=True)
            try:
                r = run_method(flags, kind, nodes, args.steps, args.model.split(),
                               args.timeout, args.echo)
            except RuntimeError as e:   # one failed job keeps the others' rows
                print(e, flush=True)
                results.append({"method": name, "nodes": nodes, "collective": kind,
                                "error": str(e)})
                rows.append([name, nodes, "failed", 0, kind, *[None] * 6, "-"])
                continue
            results.append({"method": name, "nodes": nodes, "collective": kind, **r})
            for ph in r["phases"]:
                ok = max(ph["sent_ratio"], ph["received_ratio"]) <= 1 + TOLERANCE
                rows.append([name, nodes, ph["phase"], ph["steps"], kind,
                             ph["accounted"] / 1e3, ph["implied"] / 1e3, ph["sent"] / 1e3,
                             ph["received"] / 1e3, ph["sent_ratio"], ph["received_ratio"],
                             "met" if ok else "NOT met"])
    md = common.table(
        "Bytes per step on each node's link against the accounting (process 0, unshaped "
        "links)",
        ["method", "P", "phase", "steps", "collective", "accounted KB", "implied KB",
         "sent KB", "received KB", "sent / implied", "received / implied",
         f"within {TOLERANCE:.0%}"], rows,
        note="accounted: lore_jax.communication()'s bits per step / 8 (the payload of one "
             "device); implied: accounted x 2(P-1)/P (ring all-reduce) or x (P-1) (ring "
             "all-gather); sent, received: node 0's interface counters per step (whole "
             "frames).")
    probes = []
    if args.collectives:
        probe_rows = []
        for nodes in common.ints(args.nodes):
            print(f"single collectives on {nodes} nodes ...", flush=True)
            for row in probe_collectives(nodes, args.timeout):
                probes.append({"nodes": nodes, **row})
                implied = (row["payload"] * collective_factor(row["kind"], nodes)
                           if row["kind"] else None)
                probe_rows.append([row["collective"], nodes, row["payload"], implied,
                                   row["sent"], row["received"],
                                   row["sent"] / implied if implied else None])
        md += "\n" + common.table(
            "Single collectives: bytes per call on node 0's link (unshaped)",
            ["collective", "P", "payload B", "implied B", "sent B", "received B",
             "sent / implied"], probe_rows,
            note="one jitted collective run 20 times after a first call "
                 "(benchmarks/collective_probe.py); idle: the coordination service's "
                 "heartbeats.")
    common.write_json(args.out, "cluster_bytes", {"args": vars(args), "results": results,
                                                  "collectives": probes}, md)
    return 0


def probe_collectives(nodes: int, timeout: float) -> list[dict[str, Any]]:
    """Node 0's bytes per call of single collectives (:mod:`benchmarks.collective_probe`)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = cluster.run([sys.executable, "-m", "benchmarks.collective_probe",
                              "{coordinator}", "{num_processes}", "{process_id}"],
                             nodes=nodes, timeout=timeout, output=None, log_dir=tmp)
        if not result.ok:
            raise RuntimeError(f"the collective probe failed: {result.summary(tails=True)}")
        lines = (Path(tmp) / "node0.log").read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


if __name__ == "__main__":
    sys.exit(main())
