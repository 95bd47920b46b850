"""Bytes each device puts on the wire per step, read from the compiled HLO.

For every distinct gradient shape of GPT-2 small and ResNet-18 (shapes only: the inputs
are abstract, nothing is allocated or trained), one ``jax.shard_map``-ed update step of
each method is compiled on 8 devices and the sizes of its all-reduce / all-gather
buffers are read from the optimized HLO (:func:`lore_jax.accounting.hlo_collectives`),
not from formulas. An all-reduce counts its buffer; an all-gather counts ``1/N`` of its
result (one device's slot). GreedyLore's step is one ``lax.switch`` over warm-up, refresh
and compressed branches, whose collectives are read per branch.

Model totals add the per-leaf numbers (every method treats leaves independently; GreedyLore
stacks same-shape matrices, which does not change their bytes), and one whole-model
compile per method at ``--check-layers`` layers checks that sum against the HLO of the
real tree. Embeddings, the tied LM head and the ResNet classifier are dense for every
method, so that all methods compress the same tensors.

Amortized GreedyLore bytes:

* per period: ``(refresh + (tau - 1) * compressed) / tau``, the steady state;
* per run: ``(t0 * warmup + n_refresh * refresh + n_compressed * compressed) / T`` for a
  run of ``T = --run-steps`` steps with ``t0 = --warmup-steps`` dense warm-up steps.

Example:
  python -m benchmarks.bytes_on_wire                 # both models, 12 GPT-2 layers
  python -m benchmarks.bytes_on_wire --model gpt2-small --rank 32 --check-layers 12
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see benchmarks/README.md, "Threads"

import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import lore_jax
from benchmarks import common, shapes

# Bit-packing code builds constant index arrays that XLA's constant folding can spend
# minutes on; collectives do not depend on it.
COMPILER_OPTIONS = {"xla_disable_hlo_passes": "constant_folding"}


def methods(rank: int, tau: int, t0: int, rate: float, fraction: float
            ) -> dict[str, Callable[[], optax.GradientTransformation] | None]:
    """Name -> builder of the transform applied to the compressible leaves."""
    out: dict[str, Any] = {
        "dense": lambda: lore_jax.compressed_mean(lore_jax.compressors.identity(),
                                                  error_feedback=None),
        f"greedylore r={rank}": lambda: lore_jax.greedylore(   # the paper's settings
            rank, update_interval=tau, warmup_steps=t0, axis_name=common.AXIS,
            min_compression_rate=rate, tracking="off"),
    }
    cm = common.compressors_module()
    if cm is None:
        return out
    comps, cmean = cm

    def via(make):
        return lambda: cmean(make(), axis_name=common.AXIS)

    pct = f"{100 * fraction:g}%"
    out.update({
        f"powersgd r={rank}": via(lambda: comps.powersgd(rank)),
        f"random projection r={rank}": via(lambda: comps.random_projection(rank)),
        f"top-k {pct}": via(lambda: comps.top_k(fraction=fraction)),
        f"random-k {pct} (shared seed)": via(
            lambda: comps.random_k(fraction=fraction, shared_seed=True)),
        "qsgd 4-bit (s=7, B=512)": via(lambda: comps.qsgd(7, bucket_size=512)),
        "terngrad": via(lambda: comps.terngrad()),
        "scaled sign": via(lambda: comps.scaled_sign()),
    })
    return out


def compile_text(tx: optax.GradientTransformation, params: dict, mesh) -> str:
    state, specs = common.abstract_state(tx, params, mesh)
    n = mesh.shape[common.AXIS]
    grads = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((n,) + tuple(x.shape), x.dtype,
                                       sharding=jax.sharding.NamedSharding(
                                           mesh, jax.sharding.PartitionSpec(common.AXIS))),
        params)
    lowered = common.update_step(tx, mesh, specs).lower(grads, state)
    return lowered.compile(compiler_options=COMPILER_OPTIONS).as_text()


def phase_bits(text: str, n: int) -> dict[str, int]:
    """Per-device bits of a step, split by GreedyLore's switch branches when present.

    Returns ``{"step": bits}`` for a branch-free step, else ``{"warmup", "refresh",
    "compressed"}`` each including the collectives outside the switch.
    """
    wb = common.wire_bits(text, n)
    total = {c: sum(v.values()) for c, v in wb["by_computation"].items()}
    switches = [b for b in wb["branches"] if len(b) == 3]
    if not switches:
        return {"step": sum(total.values())}
    (warm, refresh, comp), = switches
    outside = sum(v for c, v in total.items() if c not in (warm, refresh, comp))
    return {"warmup": outside + total.get(warm, 0), "refresh": outside + total.get(refresh, 0),
            "compressed": outside + total.get(comp, 0)}


def amortize(ph: dict[str, int], tau: int, t0: int, run_steps: int) -> dict[str, float]:
    if "step" in ph:
        return {"compressed": ph["step"], "period": ph["step"], "run": ph["step"],
                "refresh": ph["step"], "warmup": ph["step"]}
    compressed_phase = max(run_steps - t0, 0)
    n_refresh = math.ceil(compressed_phase / tau)
    n_comp = compressed_phase - n_refresh
    return {
        "compressed": ph["compressed"], "refresh": ph["refresh"], "warmup": ph["warmup"],
        "period": (ph["refresh"] + (tau - 1) * ph["compressed"]) / tau,
        "run": (min(t0, run_steps) * ph["warmup"] + n_refresh * ph["refresh"]
                + n_comp * ph["compressed"]) / run_steps,
    }


def shape_key(shape: tuple[int, ...], dense: bool) -> str:
    return "x".join(map(str, shape)) + (" (dense)" if dense else "")


def measure_model(model: str, leaves: dict, builders: dict, mesh, args) -> dict[str, Any]:
    n = mesh.shape[common.AXIS]
    distinct: dict[tuple, list[str]] = {}
    for name, (shape, dense) in leaves.items():
        distinct.setdefault((shape, dense), []).append(name)
    per_shape: dict[str, dict[str, Any]] = {}
    for (shape, dense), names in distinct.items():
        key = shape_key(shape, dense)
        params = {"w": jax.ShapeDtypeStruct(shape, jnp.float32)}
        row: dict[str, Any] = {"shape": list(shape), "dense": dense, "count": len(names),
                               "methods": {}}
        for mname, build in builders.items():
            if dense and mname != "dense":
                row["methods"][mname] = None        # filled from "dense" below
                continue
            t = time.perf_counter()
            ph = phase_bits(compile_text(build(), params, mesh), n)
            row["methods"][mname] = {"phases": ph,
                                     **amortize(ph, args.tau, args.warmup_steps,
                                                args.run_steps),
                                     "compile_s": time.perf_counter() - t}
        for mname in builders:
            if row["methods"][mname] is None:
                row["methods"][mname] = dict(row["methods"]["dense"])
        per_shape[key] = row
        print(f"  {model} {key}: done")

    totals: dict[str, dict[str, float]] = {}
    for mname in builders:
        acc: dict[str, float] = {}
        for row in per_shape.values():
            for k in ("compressed", "period", "run", "refresh", "warmup"):
                acc[k] = acc.get(k, 0) + row["count"] * row["methods"][mname][k]
        totals[mname] = acc
    return {"per_shape": per_shape, "totals": totals}


def check_whole_model(model: str, rank: int, builders: dict, check: list[str],
                      per_shape: dict[str, Any], mesh, args) -> dict[str, Any]:
    """Compiles the whole tree (at ``--check-layers`` for GPT-2) and compares its compressed
    step's HLO bits with the sum of the per-shape measurements over the same leaves."""
    leaves = (shapes.gpt2_small(args.check_layers) if model == "gpt2-small"
              else shapes.resnet18())
    params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, (s, _) in leaves.items()}
    mask = {k: d for k, (_, d) in leaves.items()}
    n = mesh.shape[common.AXIS]
    out = {}
    for mname in check:
        tx = builders[mname]()
        if mname.startswith("greedylore"):
            tx = lore_jax.greedylore(rank, update_interval=args.tau,
                                     warmup_steps=args.warmup_steps, axis_name=common.AXIS,
                                     min_compression_rate=args.min_compression_rate,
                                     dense=mask, tracking="off")
        elif mname != "dense":
            tx = common.with_dense(tx, mask)
        ph = phase_bits(compile_text(tx, params, mesh), n)
        summed = sum(per_shape[shape_key(s, d)]["methods"][mname]["compressed"]
                     for s, d in leaves.values())
        whole = ph.get("compressed", ph.get("step"))
        out[mname] = {"whole_model_hlo_bits": whole, "sum_of_leaves_bits": summed,
                      "equal": whole == summed}
    return {"layers": args.check_layers if model == "gpt2-small" else None, "methods": out}


def kib(bits: float) -> float:
    return bits / 8 / 1024


def mib(bits: float) -> float:
    return bits / 8 / 2**20


def report(results: dict[str, Any], args, gl: str, psgd: str | None) -> tuple[str, dict]:
    md = []
    targets: dict[str, Any] = {}
    for model, res in results.items():
        rank = args.rank if model == "gpt2-small" else args.cnn_rank
        rows, ok_psgd, ok_20x = [], [], []
        for key, row in res["per_shape"].items():
            if row["dense"]:
                continue
            m = row["methods"]
            dense = m["dense"]["compressed"]
            g = m[gl]
            rec = [key, row["count"], kib(dense), kib(g["compressed"]),
                   dense / g["compressed"], kib(g["period"]), dense / g["period"]]
            if psgd is not None:
                p = m[psgd]["compressed"]
                rec += [kib(p), dense / p, g["compressed"] <= p]
                if len(row["shape"]) > 1:
                    ok_psgd.append(g["compressed"] <= p)
            if model == "gpt2-small" and len(row["shape"]) > 1:
                ok_20x.append(dense / g["period"] >= 20)
            rows.append(rec)
        cols = ["shape", "count", "dense KiB", f"GL r={rank} KiB", "x", "GL period KiB", "x"]
        if psgd is not None:
            cols += [f"PowerSGD r={rank} KiB", "x", "GL <= PSGD"]
        md.append(common.table(
            f"{model}: per-device bytes per step, per gradient shape (8 devices)", cols, rows,
            note=f"GL = greedylore (tau={args.tau}); 'period' amortizes one dense refresh over "
                 f"tau steps; x = dense / method. Vectors are sent dense by both."))
        targets[model] = {"greedylore_le_powersgd_every_matrix": all(ok_psgd) if ok_psgd else None}
        if ok_20x:
            targets[model]["greedylore_period_ge_20x_every_matrix"] = all(ok_20x)

        # All methods, whole model and per shape ratios.
        rows = []
        dense_tot = res["totals"]["dense"]["compressed"]
        fixed = sum(r["count"] * r["methods"]["dense"]["compressed"]
                    for r in res["per_shape"].values() if r["dense"])
        for mname, tot in res["totals"].items():
            kinds = ([("compressed", " (compressed step)"),
                      ("period", f" (per period, tau={args.tau})"),
                      ("run", f" (per run, T={args.run_steps}, t0={args.warmup_steps})")]
                     if mname == gl else [("compressed", "")])
            for k, label in kinds:
                rows.append([mname + label, mib(tot[k]), dense_tot / tot[k],
                             (dense_tot - fixed) / (tot[k] - fixed)])
        nparams = shapes.num_params(shapes.MODELS[model](**(
            {"layers": args.layers} if model == "gpt2-small" else {})))
        md.append(common.table(
            f"{model} ({nparams / 1e6:.1f}M parameters): per-device MiB per step, whole model",
            ["method", "MiB / step", "x vs dense", "x excl. dense-marked"], rows,
            note="Embeddings / tied head / classifier are dense for every method; the last "
                 "column leaves them out of both sides."))

        matrix_keys = [k for k, r in res["per_shape"].items()
                       if not r["dense"] and len(r["shape"]) > 1]
        mnames = [k for k in res["totals"] if k != "dense"]
        rows = []
        for k in matrix_keys:
            m = res["per_shape"][k]["methods"]
            d = m["dense"]["compressed"]
            rows.append([k] + [d / m[x]["compressed"] for x in mnames])
        md.append(common.table(f"{model}: compression ratio (dense / method) per matrix shape",
                               ["shape"] + mnames, rows))
    return "\n".join(md), targets


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--model", choices=["all", *shapes.MODELS], default="all")
    p.add_argument("--layers", type=int, default=12, help="GPT-2 layers in the totals")
    p.add_argument("--rank", type=int, default=32, help="rank on the transformer shapes")
    p.add_argument("--cnn-rank", type=int, default=8, help="rank on the ResNet-18 shapes")
    p.add_argument("--tau", type=int, default=200, help="GreedyLore update_interval")
    p.add_argument("--warmup-steps", type=int, default=1000)
    p.add_argument("--run-steps", type=int, default=20000)
    p.add_argument("--min-compression-rate", type=float, default=2.0)
    p.add_argument("--fraction", type=float, default=0.01, help="top-k / random-k fraction")
    p.add_argument("--methods", default="",
                   help="comma-separated name prefixes to keep (dense and greedylore always run)")
    p.add_argument("--check-layers", type=int, default=2,
                   help="GPT-2 layers of the whole-model cross-check compile (0: skip)")
    args = p.parse_args(argv)
    mesh = common.mesh_of(8, "cpu")
    print(f"bytes on the wire: {common.describe_machine()}; mesh of {mesh.devices.size} CPU "
          f"devices")

    results, checks, parts, targets = {}, {}, [], {}
    for model in (shapes.MODELS if args.model == "all" else [args.model]):
        rank = args.rank if model == "gpt2-small" else args.cnn_rank
        builders = methods(rank, args.tau, args.warmup_steps, args.min_compression_rate,
                           args.fraction)
        keep = [m.strip() for m in args.methods.split(",") if m.strip()]
        if keep:
            builders = {k: v for k, v in builders.items()
                        if k.startswith(("dense", "greedylore")) or k.startswith(tuple(keep))}
        gl = f"greedylore r={rank}"
        psgd = f"powersgd r={rank}" if f"powersgd r={rank}" in builders else None
        leaves = (shapes.gpt2_small(args.layers) if model == "gpt2-small"
                  else shapes.resnet18())
        t = time.perf_counter()
        res = measure_model(model, leaves, builders, mesh, args)
        res.update(rank=rank, seconds=time.perf_counter() - t)
        results[model] = res
        if args.check_layers or model != "gpt2-small":
            check = ["dense", gl] + ([psgd] if psgd else [])
            checks[model] = check_whole_model(model, rank, builders, check, res["per_shape"],
                                              mesh, args)
        text, tg = report({model: res}, args, gl, psgd)
        parts.append(text)
        targets.update(tg)
    md = "\n".join(parts)
    if checks:
        rows = [[f"{m} / {k}", c["whole_model_hlo_bits"], c["sum_of_leaves_bits"], c["equal"]]
                for m, ch in checks.items() for k, c in ch["methods"].items()]
        md += "\n" + common.table("Cross-check: whole-model HLO bits vs sum over leaves "
                                  "(compressed step)",
                                  ["model / method", "whole model", "sum of leaves", "equal"], rows,
                                  note=f"GPT-2 compiled at {args.check_layers} layers.")
    lines = []
    for model, tg in targets.items():
        for k, v in tg.items():
            lines.append(f"- {model}: {k.replace('_', ' ')}: {'MET' if v else 'NOT MET'}")
    if common.compressors_module() is None:
        lines.append("- lore_jax.compressors / compressed_mean not installed: PowerSGD and the "
                     "other compressors were skipped.")
    print("\n".join(lines))
    md += "\nTargets:\n\n" + "\n".join(lines) + "\n"
    common.write_json(args.out, "bytes_on_wire",
                      {"args": vars(args), "results": results, "checks": checks,
                       "targets": targets}, md)
    return {"results": results, "checks": checks, "targets": targets}


if __name__ == "__main__":
    main()
