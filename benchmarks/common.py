"""Shared helpers of the benchmark scripts: devices, timing, tables, JSON, transforms.

Import it after setting ``XLA_FLAGS`` (see :func:`host_device_flag`); it imports JAX.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lore_jax
from lore_jax import accounting

AXIS = "data"


# ----------------------------------------------------------------------------- devices


def mesh_of(n: int | None = None, platform_name: str | None = None) -> jax.sharding.Mesh:
    """A one-axis ``"data"`` mesh over the first ``n`` devices of a platform.

    ``platform_name=None`` takes the default backend (the GPU when there is one);
    ``"cpu"`` takes the simulated host devices even on a GPU machine.
    """
    devices = jax.devices(platform_name) if platform_name else jax.devices()
    n = len(devices) if n is None else min(n, len(devices))
    return jax.make_mesh((n,), (AXIS,), devices=devices[:n])


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    dev = jax.devices()[0]
    return {
        "platform": dev.platform,
        "device_kind": dev.device_kind,
        "devices": jax.device_count(),
        "host_cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def describe_machine() -> str:
    m = machine()
    return (f"{m['devices']} x {m['platform']} ({m['device_kind']}) on {m['host_cpus']} host "
            f"CPU cores, JAX {m['jax']}, Python {m['python']}")


# ----------------------------------------------------------------------------- timing


def block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


def time_call(fn: Callable[..., Any], *args: Any, repeats: int = 5,
              warmup: int = 1) -> dict[str, Any]:
    """Wall-clock seconds of ``fn(*args)`` (blocked on its outputs): min, median, all runs."""
    for _ in range(warmup):
        block(fn(*args))
    runs = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        block(fn(*args))
        runs.append(time.perf_counter() - t)
    return {"min": min(runs), "median": statistics.median(runs), "runs": runs}


# ----------------------------------------------------------------------------- output


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
          note: str | None = None) -> str:
    """Prints a table (rich when it is installed) and returns it as GitHub markdown."""
    cells = [[_fmt(c) for c in row] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title, caption=note)
        for i, c in enumerate(columns):
            t.add_column(c, justify="left" if i == 0 else "right")
        for row in cells:
            t.add_row(*row)
        Console(width=max(120, sum(len(c) for c in columns) + 8 * len(columns))).print(t)
    except ImportError:  # pragma: no cover - rich is a dependency
        print(f"\n{title}")
        print(" | ".join(columns))
        for row in cells:
            print(" | ".join(row))
        if note:
            print(note)
    md = [f"**{title}**", "", "| " + " | ".join(columns) + " |",
          "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|"]
    md += ["| " + " | ".join(row) + " |" for row in cells]
    if note:
        md += ["", note]
    return "\n".join(md) + "\n"


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (float, np.floating)):
        x = float(x)
        if x == 0:
            return "0"
        if abs(x) >= 1e5 or abs(x) < 1e-3:
            return f"{x:.3g}"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        return f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"
    if isinstance(x, (int, np.integer)):
        return f"{int(x):,}"
    return str(x)


def write_json(out_dir: str | os.PathLike, name: str, payload: dict[str, Any],
               markdown: str | None = None) -> Path:
    """Writes ``<out>/<name>.json`` (with the machine and command) and ``<name>.md``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": name,
        "command": "python -m benchmarks." + name + " " + " ".join(sys.argv[1:]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        **payload,
    }
    path = out / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
    if markdown is not None:
        header = (f"Measured on {describe_machine()}.\n\nCommand: `{record['command'].strip()}`"
                  "\n\n")
        (out / f"{name}.md").write_text(header + markdown)
    print(f"wrote {path}")
    return path


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, jax.Array):
        return np.asarray(x).tolist()
    return str(x)


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="results", help="directory for the JSON (and markdown)")
    return p


def listing(names: Iterable[str]) -> str:
    """``names`` joined for an argparse help text (which is %-formatted: ``%`` doubled)."""
    return ", ".join(names).replace("%", "%%")


def ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


# ----------------------------------------------------------------------------- transforms


def compressors_module() -> Any | None:
    """``lore_jax.compressors`` and ``compressed_mean``, or ``None`` when not installed."""
    try:
        from lore_jax import compressors
        from lore_jax.compressed_mean import compressed_mean
    except ImportError:
        return None
    return compressors, compressed_mean


def with_dense(tx: optax.GradientTransformation, dense_mask: Any,
               axis_name: Hashable = AXIS) -> optax.GradientTransformation:
    """``tx`` on the leaves where ``dense_mask`` is False, a dense mean (the identity
    compressor's :func:`lore_jax.compressed_mean`) on the others.

    ``dense_mask`` is a pytree of bools like the parameters, or a callable returning one.
    """
    def compressed(params):
        mask = dense_mask(params) if callable(dense_mask) else dense_mask
        return jax.tree.map(lambda m: not m, mask)

    dense = lore_jax.compressed_mean(lore_jax.compressors.identity(), axis_name=axis_name,
                                     error_feedback=None)
    return optax.chain(optax.masked(tx, compressed), optax.masked(dense, dense_mask))


# ----------------------------------------------------------------------------- HLO


def abstract_global(tree: Any, mesh: jax.sharding.Mesh, specs: Any) -> Any:
    """``ShapeDtypeStruct`` leaves carrying ``NamedSharding(mesh, spec)``: lowering with
    them compiles a step without allocating its inputs."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
        tree, specs, is_leaf=lambda x: isinstance(x, P))


def update_step(tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                specs: Any) -> Callable:
    """``jit(shard_map(tx.update))`` on per-device gradients stacked along axis 0."""
    def step(g, s):
        return tx.update(jax.tree.map(lambda x: x[0], g), s)

    return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(AXIS), specs),
                                 out_specs=(P(), specs)))


def abstract_state(tx: optax.GradientTransformation, params: Any,
                   mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
    """The optimizer state as abstract global arrays, and its shard_map specs."""
    local = jax.eval_shape(tx.init, params)
    specs = lore_jax.state_specs(local, AXIS)
    n = mesh.shape[AXIS]

    def globalize(x, s):
        shape = x.shape if s == P() else (n * x.shape[0],) + tuple(x.shape[1:])
        return jax.ShapeDtypeStruct(shape, x.dtype, sharding=NamedSharding(mesh, s))

    state = jax.tree.map(globalize, local, specs, is_leaf=lambda x: isinstance(x, P))
    return state, specs


def compiled_hlo(tx: optax.GradientTransformation, params: Any,
                 mesh: jax.sharding.Mesh) -> str:
    """The optimized HLO text of one shard_mapped ``tx.update`` step on ``params``'s shapes."""
    state, specs = abstract_state(tx, params, mesh)
    n = mesh.shape[AXIS]
    grads = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((n,) + tuple(x.shape), x.dtype,
                                       sharding=NamedSharding(mesh, P(AXIS))), params)
    return update_step(tx, mesh, specs).lower(grads, state).compile().as_text()


def wire_bits(hlo_text: str, n: int) -> dict[str, Any]:
    """Per-device payload bits of every collective in ``hlo_text``, by computation.

    An all-reduce contributes its buffer; an all-gather's result holds all ``n`` slots,
    so a device contributes ``1/n`` of it.

    Returns:
      ``{"by_computation": {name: {"all-reduce": bits, "all-gather": bits}}, "branches":
      [[names...]] (conditional branches in order)}``.
    """
    by: dict[str, dict[str, int]] = {}
    for c in accounting.hlo_collectives(hlo_text):
        bits = c["bits"] // n if c["op"] == "all-gather" else c["bits"]
        slot = by.setdefault(c["computation"], {})
        slot[c["op"]] = slot.get(c["op"], 0) + bits
    return {"by_computation": by, "branches": accounting.hlo_conditional_branches(hlo_text)}


# ----------------------------------------------------------------------------- training


def training_available() -> bool:
    try:
        from lore_jax.training import data, loop, models, tasks  # noqa: F401
    except ImportError:
        return False
    return True


def task_loss(kind: str, apply_fn: Callable) -> Callable:
    """The mean loss of :func:`lore_jax.training.tasks.loss_fn` alone, without its
    metrics: the loss the timed steps train (their only other collective is its mean)."""
    from lore_jax.training import tasks

    loss = tasks.loss_fn(kind, apply_fn)
    return lambda params, batch: loss(params, batch)[0]


def compiled_step(loss_fn: Callable, tx: optax.GradientTransformation, mesh, params: Any,
                  batch: tuple, compiler_options: dict[str, Any] | None = None
                  ) -> tuple[Any, tuple, float]:
    """:func:`lore_jax.data_parallel`'s step, compiled, without buffer donation: one
    ``(params, state, batch)`` input can be timed again and again (e.g. in a chosen
    GreedyLore phase, :func:`with_count`).

    Returns:
      ``(compiled, (params, state, batch), compile_s)``: ``compiled(params, state,
      batch)`` with the inputs placed on the mesh; ``compile_s`` covers lowering and XLA.
    """
    train = lore_jax.data_parallel(loss_fn, tx, mesh, axis_name=AXIS, donate=False)
    state = train.init(params)
    batch = tuple(lore_jax.layout.global_array(a, mesh, P(AXIS)) for a in batch)
    t = time.perf_counter()
    compiled = train.lower(params, state, batch).compile(compiler_options=compiler_options)
    return compiled, (params, state, batch), time.perf_counter() - t


def train_run(task: str, tx: optax.GradientTransformation, *, steps: int, mesh,
              batch_size: int, model: str | None = None, seed: int = 0, seq_len: int = 32,
              hidden: Sequence[int] = (256, 256), d_model: int = 64, num_heads: int = 4,
              num_layers: int = 2, data: str | None = None, eval_every: int = 0,
              eval_examples: int | None = None, target: float | None = None,
              target_metric: str = "train", window: int = 10,
              compiler_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Trains ``task`` with the optax chain ``tx`` (which must average over ``"data"``).

    The data and NNX models of :mod:`lore_jax.training`, trained by
    :func:`lore_jax.data_parallel` on :func:`lore_jax.training.tasks.loss_fn`, with any
    transform. Every ``eval_every`` steps (and at the last) the test loss is measured
    on :func:`eval_subset` ``(dataset, eval_examples)`` (``None``: the whole test set).
    The loop stops early once the target is reached: with ``target_metric="train"`` when
    the mean training loss over the last ``window`` steps is at most ``target``; with
    ``"test"`` at the first evaluation whose test loss is at most ``target`` (this needs
    ``eval_every``). Evaluation time is not counted in ``time_to_target``.

    Args:
      task: a name in :data:`lore_jax.training.tasks.TASKS`; ``data`` its ``--data``.
      seq_len, hidden, d_model, num_heads, num_layers: the model, as in
        :func:`task_setup`.

    Returns:
      ``losses`` (per step), ``step_times`` (seconds, compilation excluded; each step is
      blocked on), ``bits_sent`` / ``bits_dense`` (cumulative, per step), ``compile_s``,
      ``evals`` (``[step, test_loss]``), ``compiled_text`` (the step's optimized HLO), and,
      with a target, ``steps_to_target``,
      ``time_to_target`` and ``bits_to_target`` (``None`` when it was not reached).
    """
    from lore_jax.training import data as data_lib
    from lore_jax.training import loop, tasks

    if target_metric not in ("train", "test"):
        raise ValueError(f"target_metric must be 'train' or 'test', got {target_metric!r}.")
    if target is not None and target_metric == "test" and eval_every < 1:
        raise ValueError(f"a test-loss target needs eval_every >= 1, got {eval_every}.")
    setup = task_setup(task, mesh, model=model, seed=seed, seq_len=seq_len, hidden=hidden,
                       d_model=d_model, num_heads=num_heads, num_layers=num_layers, data=data)
    dataset, params = setup["dataset"], setup["params"]
    x_eval, y_eval = eval_subset(dataset, eval_examples)
    train = lore_jax.data_parallel(tasks.loss_fn(dataset.kind, setup["apply"]), tx, mesh,
                                   axis_name=AXIS, has_aux=True,
                                   compiler_options=compiler_options)
    opt_state = train.init(params)
    stream = data_lib.BatchStream(dataset.x_train, dataset.y_train, batch_size, seed)

    t = time.perf_counter()
    compiled = train.lower(params, opt_state, (dataset.x_train[:batch_size],
                                               dataset.y_train[:batch_size])).compile()
    compile_s = time.perf_counter() - t   # the step reuses this compilation
    out: dict[str, Any] = {"losses": [], "step_times": [], "bits_sent": [], "bits_dense": [],
                           "evals": [], "compile_s": compile_s, "steps_to_target": None,
                           "compiled_text": compiled.as_text(),
                           "time_to_target": None, "bits_to_target": None,
                           "num_params": int(sum(np.prod(x.shape)
                                                 for x in jax.tree.leaves(params)))}
    elapsed = 0.0
    for i in range(1, steps + 1):
        batch = tuple(lore_jax.layout.global_array(a, mesh, P(AXIS)) for a in next(stream))
        t = time.perf_counter()
        params, opt_state, loss, _ = train.step(params, opt_state, batch)
        loss = float(loss)           # blocks on the step; the weight of a training batch is 1
        dt = time.perf_counter() - t
        elapsed += dt
        comm = accounting.communication(opt_state)
        out["losses"].append(loss)
        out["step_times"].append(dt)
        out["bits_sent"].append(comm["bits_sent"])
        out["bits_dense"].append(comm["bits_dense"])
        if eval_every and (i % eval_every == 0 or i == steps):
            m = loop.evaluate(train, params, x_eval, y_eval, mesh.shape[AXIS])
            out["evals"].append([i, m["loss"]])
        if target is not None and _reached(out, i, target, target_metric, window):
            out.update(steps_to_target=i, time_to_target=elapsed,
                       bits_to_target=comm["bits_sent"])
            break
    out["train_time"] = elapsed
    return out


def _reached(out: dict[str, Any], step: int, target: float, metric: str, window: int) -> bool:
    """Whether step ``step`` of a :func:`train_run` reached ``target``."""
    if metric == "test":
        return bool(out["evals"]) and out["evals"][-1][0] == step and \
            out["evals"][-1][1] <= target
    losses = out["losses"]
    return len(losses) >= window and float(np.mean(losses[-window:])) <= target


def eval_subset(dataset, n: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` test examples evenly spaced over the test set (:meth:`Dataset.test_subset`)."""
    return dataset.test_subset(n)


def task_setup(task: str, mesh, *, model: str | None = None, seed: int = 0,
               seq_len: int = 32, hidden: Sequence[int] = (256, 256), d_model: int = 64,
               num_heads: int = 4, num_layers: int = 2,
               data: str | None = None) -> dict[str, Any]:
    """Dataset, pure ``apply`` and replicated parameters of a :mod:`lore_jax.training` task.

    Args:
      task, data: the task and its ``--data`` (``None``: the task's default source).
      model: ``None`` takes the task's.
      seq_len: tokens per example of ``lm`` and ``charlm``.
      hidden: the MLP's widths; d_model, num_heads, num_layers: the transformer's size
        (:func:`lore_jax.training.tasks.make_model`).
    """
    from lore_jax.training import models, tasks

    dataset = tasks.load_data(task, data, seq_len)
    model = model or tasks.TASKS[task].model
    apply_fn, params = models.create(lambda: tasks.make_model(
        model, dataset, seed, hidden, d_model=d_model, num_heads=num_heads,
        num_layers=num_layers))   # one compilation; the same values as eager construction
    # Copies: on CPU a device array may alias host memory, and a training step donates.
    params = jax.tree.map(
        lambda x: lore_jax.layout.global_array(np.array(x, copy=True), mesh, P()), params)
    return {"dataset": dataset, "apply": apply_fn, "params": params, "model": model}


def with_count(opt_state: Any, count: int, mesh) -> Any:
    """``opt_state`` with every lore_jax state's step ``count`` set (to pick a phase)."""
    def _is_lore_state(x):
        return hasattr(type(x), "PER_DEVICE_FIELDS") and hasattr(x, "_fields")

    def fix(node):
        if _is_lore_state(node) and hasattr(node, "count"):
            return node._replace(count=jax.device_put(jnp.asarray(count, jnp.int32),
                                                      NamedSharding(mesh, P())))
        return node

    return jax.tree.map(fix, opt_state, is_leaf=_is_lore_state)
