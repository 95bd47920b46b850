"""How GreedyLore's compile time over dense's grows with the number of leaves and shapes.

For MLPs of ``--layers`` small square ``--width`` kernels with their biases (many leaves
of two shapes), and of the same depths with every hidden width different (a new kernel
shape per layer), it compiles :func:`lore_jax.data_parallel`'s training step (forward,
backward, the transform and Adam) with GreedyLore at ``--rank`` and with the dense mean,
alternating them ``--compiles`` times from cold caches, and prints the median of the
paired ratios (each GreedyLore compile over dense's right after it; the machine's
compile speed drifts, a ratio of neighbours cancels the drift) and the distinct fused
kernels of each compiled step (:func:`benchmarks.collectives.distinct_kernels`: XLA:CPU
compiles one kernel per distinct fusion, shared by same-shape leaves; the count does not
drift with the machine's load).

Example:
  python -m benchmarks.compile_leaves
  python -m benchmarks.compile_leaves --layers 10,20 --compiles 1     # quick
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import statistics
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lore_jax
from benchmarks import collectives as bc
from benchmarks import common
from lore_jax import compressors
from lore_jax.training import models


def mlp(layers: int, width: int, distinct: bool) -> bc.Model:
    """``layers`` kernels with biases: ``width`` square, or (``distinct``) hidden widths
    ``width, width + 8, ...``, so that every kernel has a shape of its own."""
    hidden = tuple(width + (8 * i if distinct else 0) for i in range(layers - 1))
    rng = np.random.default_rng(0)
    return bc.Model(lambda: models.MLP(width, hidden, width, rngs=nnx.Rngs(0)), "regression",
                    rng.standard_normal((32, width)).astype(np.float32),
                    rng.standard_normal((32, width)).astype(np.float32))


def measure(model: bc.Model, rank: int, mesh, compiles: int) -> dict[str, Any]:
    """Paired cold compiles of GreedyLore's and dense's training steps on ``model``."""
    apply_fn, params = models.create(model.factory)
    params = jax.device_put(params, NamedSharding(mesh, P()))
    leaves = jax.tree.leaves(params)
    steps = {name: bc.training_step(tx, model, apply_fn, params, mesh) for name, tx in (
        ("dense", lore_jax.compressed_mean(compressors.identity(), error_feedback=None)),
        ("greedylore", lore_jax.greedylore(rank)))}
    pairs, kernels = [], {}
    for _ in range(compiles):
        seconds = {}
        for name, step in steps.items():
            compiled, seconds[name] = bc._compile(*step, 1)
            kernels[name] = bc.distinct_kernels(compiled.as_text())
        pairs.append((seconds["greedylore"], seconds["dense"]))
    return {"leaves": len(leaves), "shapes": len({x.shape for x in leaves}),
            "greedylore_s": statistics.median(g for g, _ in pairs),
            "dense_s": statistics.median(d for _, d in pairs),
            "ratio": statistics.median(g / d for g, d in pairs),
            "greedylore_kernels": kernels["greedylore"], "dense_kernels": kernels["dense"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--layers", type=common.ints, default=[10, 20, 40],
                   help="comma-separated MLP depths")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--compiles", type=int, default=3, help="paired cold compiles each")
    p.add_argument("--shapes", default="two,distinct",
                   help="two (square kernels and biases), distinct (a shape per layer)")
    args = p.parse_args(argv)
    mesh = common.mesh_of(None)
    rows, results = [], []
    for shapes in args.shapes.split(","):
        for layers in args.layers:
            r = {"layers": layers, "kind": shapes,
                 **measure(mlp(layers, args.width, shapes == "distinct"), args.rank, mesh,
                           args.compiles)}
            results.append(r)
            rows.append([shapes, layers, r["leaves"], r["shapes"], r["dense_s"],
                         r["greedylore_s"], r["ratio"], r["dense_kernels"],
                         r["greedylore_kernels"]])
            print(rows[-1], flush=True)
    note = (f"{mesh.size} simulated devices, width {args.width}, rank {args.rank}; training "
            f"step (forward, backward, transform, Adam); medians of {args.compiles} paired "
            f"cold compiles; {common.describe_machine()}")
    md = common.table("GreedyLore's compile time over dense's, by leaves and shapes",
                      ["shapes", "layers", "leaves", "distinct shapes", "dense s",
                       "greedylore s", "ratio", "dense kernels", "greedylore kernels"],
                      rows, note)
    payload = {"results": results}
    common.write_json(args.out, "compile_leaves", payload, md)
    return payload


if __name__ == "__main__":
    main()
