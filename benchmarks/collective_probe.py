"""One node of ``cluster_bytes.py --collectives``: single collectives, counted at the interface.

Run as one process per node of an emulated cluster (:mod:`lore_jax.cluster`), one device
each::

    python -m benchmarks.collective_probe COORDINATOR NUM_PROCESSES PROCESS_ID

Each collective (an all-reduce or all-gather of one buffer, or of many small ones) runs
``REPEATS`` times after a first call; the bytes this node's interfaces sent and received
in between, per call, are printed by process 0 as one JSON line per collective, and the
idle traffic per second (the coordination service's heartbeats) last.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"

import json
import sys
import time

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lore_jax.training.metrics import interface_bytes

REPEATS = 20
#: (name, collective, float32 sizes of the leaves it takes).
CASES = [
    *[(f"all-reduce f32[{n}]", "psum", [n]) for n in (1, 256, 4096, 65536, 1048576)],
    ("all-reduce 38 x f32[188]", "psum", [188] * 38),
    *[(f"all-gather f32[{n}]", "all_gather", [n]) for n in (256, 16384, 262144)],
]


def measure(mesh, collective: str, sizes: list[int]) -> tuple[float, float]:
    """Bytes sent and received per call of the collective (one jitted program)."""
    def body(leaves):
        if collective == "psum":
            return [jax.lax.psum(x, "d") for x in leaves]
        return [jax.lax.all_gather(x, "d", tiled=True)[:x.shape[0]] for x in leaves]

    step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("d"), out_specs=P("d")))
    n = jax.device_count()
    args = [jax.make_array_from_callback((n * s,), NamedSharding(mesh, P("d")),
                                         lambda i, s=s: np.ones((s,), np.float32))
            for s in sizes]
    jax.block_until_ready(step(args))
    time.sleep(0.3)
    before = interface_bytes()
    for _ in range(REPEATS):
        jax.block_until_ready(step(args))
    time.sleep(0.3)
    after = interface_bytes()
    return (after[0] - before[0]) / REPEATS, (after[1] - before[1]) / REPEATS


def main(argv: list[str]) -> int:
    coordinator, num_processes, process_id = argv[0], int(argv[1]), int(argv[2])
    jax.distributed.initialize(coordinator, num_processes, process_id)
    mesh = jax.make_mesh((jax.device_count(),), ("d",))
    rows = []
    for name, collective, sizes in CASES:
        sent, received = measure(mesh, collective, sizes)
        rows.append({"collective": name, "payload": 4 * sum(sizes), "sent": sent,
                     "received": received, "kind": "all-reduce" if collective == "psum"
                     else "all-gather"})
    time.sleep(1.0)
    before = interface_bytes()
    time.sleep(5.0)
    after = interface_bytes()
    rows.append({"collective": "idle, per second", "payload": 0,
                 "sent": (after[0] - before[0]) / 5, "received": (after[1] - before[1]) / 5,
                 "kind": None})
    if process_id == 0:
        for row in rows:
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
