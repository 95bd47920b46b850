"""The GPU check: step times of dense, PowerSGD and GreedyLore, and the compiled step's collectives.

One command for the day a GPU is lent (it finishes in a few minutes on one GPU):

* every method's training step (forward, backward, the compressed mean, Adam) on the
  ``lm`` transformer, built with :func:`lore_jax.data_parallel` over all the GPUs;
  compile seconds, the median of ``--steps`` timed steps (each blocked on), and the
  compression overhead, a method's step over dense's;
* the collectives of each compiled step (:func:`lore_jax.hlo_collectives`), compared with
  the bits :func:`lore_jax.communication` counts for one step: equal, or the check fails.
  On one GPU XLA removes the collectives of a 1-device axis, so the same step is also
  compiled for 8 host CPU devices and checked there.

It prints one table and a line per check, and exits non-zero if a check fails. Without a
GPU it runs on the CPU (``--platform cpu``, small sizes for a smoke test).

Example:
  python -m benchmarks.gpu_check                     # on the GPU machine
  python -m benchmarks.gpu_check --platform cpu --d-model 64 --layers 2 --steps 5
"""

from __future__ import annotations

import os

# 8 host CPU devices for the collective check (the GPU platform is unaffected).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import statistics
import sys
import time
from typing import Any

import jax
import numpy as np

import lore_jax
from benchmarks import common
from lore_jax.training import models, tasks
from lore_jax.training import optimizers as optimizers_lib


def methods(rank: int) -> dict[str, dict[str, Any]]:
    """Name -> :func:`lore_jax.training.optimizers.make_optimizer` arguments."""
    return {
        "dense": {"compressor": "dense"},
        f"powersgd r={rank}": {"compressor": "powersgd", "rank": rank},
        f"greedylore r={rank}": {"compressor": "greedylore", "rank": rank},
        f"greedylore r={rank} (paper)": {"compressor": "greedylore", "rank": rank,
                                         "tracking": "off"},
    }


def build(platform: str, d_model: int, layers: int, seq_len: int):
    """The mesh over every device of ``platform``, the model's loss and parameters, and a
    host batch maker."""
    mesh = common.mesh_of(None, platform)
    dataset = tasks.load_data("lm", None, seq_len)
    apply_fn, params = models.create(lambda: tasks.make_model(
        "transformer", dataset, 0, d_model=d_model, num_heads=max(1, d_model // 64),
        num_layers=layers))
    params = jax.device_get(params)
    loss_fn = common.task_loss(dataset.kind, apply_fn)
    rng = np.random.default_rng(0)

    def batch(size: int):
        idx = rng.integers(0, len(dataset.x_train), size)
        return dataset.x_train[idx], dataset.y_train[idx]

    return mesh, loss_fn, params, batch


def time_method(spec: dict[str, Any], mesh, loss_fn, params, batch, global_batch: int,
                steps: int) -> dict[str, Any]:
    """Compile seconds, the median step, one step's accounted bits and the HLO's."""
    tx = optimizers_lib.make_optimizer(learning_rate=1e-3, **spec)
    train = lore_jax.data_parallel(loss_fn, tx, mesh)
    p, state = params, train.init(params)
    data = [batch(global_batch) for _ in range(steps + 2)]
    t = time.perf_counter()
    compiled_text = train.lower(p, state, data[0]).compile().as_text()
    compile_s = time.perf_counter() - t
    p, state, loss = train.step(p, state, data[0])   # GreedyLore's first step refreshes
    jax.block_until_ready(loss)
    before = lore_jax.communication(state)["bits_sent"]
    p, state, loss = train.step(p, state, data[1])
    jax.block_until_ready(loss)
    one_step_bits = lore_jax.communication(state)["bits_sent"] - before
    times = []
    for b in data[2:]:
        t = time.perf_counter()
        p, state, loss = train.step(p, state, b)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t)
    return {"compile_s": compile_s, "step_s": statistics.median(times),
            "loss": float(loss), "bits": one_step_bits, "hlo": compiled_text}


#: The training step's own collective besides the optimizer's: the loss's mean, one f32.
LOSS_BITS = 32


def hlo_step_bits(text: str, n: int) -> int:
    """Per-device payload bits of a later step's optimizer collectives in a compiled step
    on ``n`` devices (:func:`common.wire_bits`): those outside any conditional, plus, of
    each conditional that holds collectives, its last branch (GreedyLore's compressed
    phase), less the loss's mean (:data:`LOSS_BITS`)."""
    wire = common.wire_bits(text, n)
    by = wire["by_computation"]
    inside = {name for names in wire["branches"] for name in names}
    bits = sum(sum(v.values()) for name, v in by.items() if name not in inside)
    for names in wire["branches"]:
        if any(name in by for name in names):
            bits += sum(by.get(names[-1], {}).values())
    return bits - LOSS_BITS


def collective_check(spec: dict[str, Any], loss_fn, params, batch, global_batch: int
                     ) -> tuple[int, int]:
    """One step's accounted bits and its HLO's, on 8 host CPU devices."""
    mesh = common.mesh_of(8, "cpu")
    tx = optimizers_lib.make_optimizer(learning_rate=1e-3, **spec)
    train = lore_jax.data_parallel(loss_fn, tx, mesh)
    cpu = jax.devices("cpu")[0]
    p = jax.device_put(params, cpu)
    state = train.init(p)
    b0, b1 = batch(global_batch), batch(global_batch)
    p, state, _ = train.step(p, state, b0)
    before = lore_jax.communication(state)["bits_sent"]
    text = train.lower(p, state, b1).compile().as_text()
    p, state, _ = train.step(p, state, b1)
    accounted = lore_jax.communication(state)["bits_sent"] - before
    return accounted, hlo_step_bits(text, 8)


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--platform", default=None, help="gpu, cpu (default: JAX's default)")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=64, help="global batch")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--steps", type=int, default=30, help="timed steps per method")
    args = p.parse_args(argv)
    platform = args.platform or jax.default_backend()
    mesh, loss_fn, params, batch = build(platform, args.d_model, args.layers, args.seq_len)
    n = mesh.shape[common.AXIS]
    global_batch = max(args.batch // n, 1) * n
    specs = methods(args.rank)
    results, failures = {}, []
    for name, spec in specs.items():
        results[name] = r = time_method(spec, mesh, loss_fn, params, batch, global_batch,
                                        args.steps)
        hlo_bits = hlo_step_bits(r["hlo"], n)
        if n > 1 and platform != "cpu" and hlo_bits != r["bits"]:
            failures.append(f"{name}: {r['bits']} bits accounted per step on {n} {platform} "
                            f"devices, {hlo_bits} in the compiled step's collectives")
        accounted, cpu_bits = collective_check(spec, loss_fn, params, batch, 64)
        r["cpu_check"] = (accounted, cpu_bits)
        if accounted != cpu_bits:
            failures.append(f"{name}: {accounted} bits accounted per step on 8 CPU devices, "
                            f"{cpu_bits} in the compiled step's collectives")
        print(f"{name}: compile {r['compile_s']:.1f} s, step {1e3 * r['step_s']:.2f} ms, "
              f"collectives {'ok' if accounted == cpu_bits else 'MISMATCH'}", flush=True)
    dense = results["dense"]["step_s"]
    rows = [[name, r["compile_s"], 1e3 * r["step_s"], r["step_s"] / dense,
             r["bits"] / 8 / 2**20, results["dense"]["bits"] / max(r["bits"], 1),
             "yes" if r["cpu_check"][0] == r["cpu_check"][1] else "NO"]
            for name, r in results.items()]
    md = common.table(
        f"lm transformer d={args.d_model} x {args.layers} layers, seq {args.seq_len}, "
        f"global batch {global_batch}, on {n} {platform} device(s)",
        ["method", "compile s", "step ms", "x dense step", "MiB sent / step",
         "x fewer bits", "HLO = accounting"], rows,
        note="step: median of timed steps, each blocked on; x dense step: the compression "
             "overhead; HLO = accounting: one compressed step's collectives in the compiled "
             "HLO (8 host CPU devices), the loss's mean left out, equal the bits "
             "lore_jax.communication counts.")
    common.write_json(args.out, "gpu_check", {
        "args": vars(args), "results": {k: {kk: vv for kk, vv in v.items() if kk != "hlo"}
                                        for k, v in results.items()},
        "failures": failures}, md)
    for f in failures:
        print(f"FAILED: {f}")
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
