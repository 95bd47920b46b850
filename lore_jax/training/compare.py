"""Train the same task with several compressors and compare accuracy against bits sent.

:func:`compare` runs :func:`lore_jax.training.train` once per compressor with every other
setting shared (same seed, data order and initialisation), then :func:`results_table`,
:func:`plot` and the JSON written by :func:`save_results` report final loss and accuracy,
cumulative bits sent per device, the compression ratio against a dense all-reduce, and
wall time.

Example:
  >>> from lore_jax.training import TrainConfig
  >>> from lore_jax.training.compare import compare
  >>> results = compare(TrainConfig(task="digits", steps=100), ["dense", "greedylore"],
  ...                   out_dir="/tmp/cmp")                      # doctest: +SKIP
  >>> results["runs"]["greedylore"]["summary"]["compression"]     # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lore_jax.training import optimizers
from lore_jax.training.errors import TrainingError
from lore_jax.training.loop import TrainConfig, train

DEFAULT_COMPRESSORS = ("dense", "greedylore", "powersgd", "random")


def compare(
    config: TrainConfig,
    compressors: Sequence[str] = DEFAULT_COMPRESSORS,
    out_dir: str | os.PathLike | None = None,
    main_process: bool = True,
) -> dict[str, Any]:
    """Trains ``config`` once per compressor; returns (and optionally saves) the results.

    Args:
      config: the shared settings; its ``compressor``, ``log`` and checkpoint fields are
        replaced per run.
      compressors: names from :data:`lore_jax.training.optimizers.COMPRESSORS`.
      out_dir: if given, per-run JSON-lines logs, ``compare.json`` and ``compare.png``
        are written there (by process 0).
      main_process: whether this process writes files and notes.

    Returns:
      ``{"config": ..., "runs": {name: {"summary", "curve", "evals"}}}``
      where ``curve`` holds per-step ``step``, ``loss`` and ``bits_sent`` lists.

    Raises:
      TrainingError: an unknown compressor name.
    """
    unknown = [c for c in compressors if c not in optimizers.COMPRESSORS]
    if unknown:
        raise TrainingError(f"unknown compressor {unknown[0]!r}; choose from "
                            f"{', '.join(optimizers.COMPRESSORS)}.")
    out = Path(out_dir) if out_dir is not None else None
    results: dict[str, Any] = {"config": None, "runs": {}}
    for name in compressors:
        run_cfg = dataclasses.replace(
            config, compressor=name, checkpoint_dir=None, resume=False,
            log=str(out / f"{name}.jsonl") if out is not None else None)
        run = train(run_cfg)
        results["config"] = {k: v for k, v in run.config.items()
                             if k not in ("compressor", "log", "checkpoint_dir", "resume")}
        results["runs"][name] = {
            "summary": run.summary,
            "evals": run.evals,
            "curve": {k: [h[k] for h in run.history] for k in ("step", "loss", "bits_sent")},
        }
    if out is not None and main_process:
        save_results(results, out)
    return results


def save_results(results: dict[str, Any], out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Writes ``compare.json`` and ``compare.png`` into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "compare.json", out / "compare.png"
    json_path.write_text(json.dumps(results, indent=1))
    plot(results, png_path)
    return json_path, png_path


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if len(y) < window or window < 2:
        return y
    kernel = np.ones(window) / window
    head = np.cumsum(y[:window - 1]) / np.arange(1, window)
    return np.concatenate([head, np.convolve(y, kernel, mode="valid")])


def plot(results: dict[str, Any], path: str | os.PathLike) -> None:
    """Training loss against steps and against cumulative bits sent, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_steps, ax_bits) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, run in results["runs"].items():
        curve = run["curve"]
        loss = _smooth(np.asarray(curve["loss"], float), 10)
        ax_steps.plot(curve["step"], loss, label=name)
        ax_bits.plot(np.asarray(curve["bits_sent"], float), loss, label=name)
    task = (results.get("config") or {}).get("task", "")
    ax_steps.set(xlabel="step", ylabel="training loss (10-step mean)", yscale="log",
                 title=f"{task}: loss per step")
    ax_bits.set(xlabel="bits sent per device (cumulative)", ylabel="training loss (10-step mean)",
                xscale="log", yscale="log", title=f"{task}: loss per bit sent")
    for ax in (ax_steps, ax_bits):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def results_table(results: dict[str, Any]):
    """A ``rich.table.Table`` of the runs: loss, accuracy, bits, compression, time."""
    from rich.table import Table

    runs = results["runs"]
    has_acc = any("test_accuracy" in r["summary"] for r in runs.values())
    table = Table(title=f"lore-jax compare: {(results.get('config') or {}).get('task', '')}")
    for col in ("compressor", "train loss", "test loss",
                *(("test acc %",) if has_acc else ()), "bits sent", "compression", "time s"):
        table.add_column(col, justify="left" if col == "compressor" else "right")
    for name, run in runs.items():
        s = run["summary"]
        row = [name, f"{s['train_loss']:.4f}", f"{s['test_loss']:.4f}"]
        if has_acc:
            row.append(f"{100 * s['test_accuracy']:.2f}" if "test_accuracy" in s else "-")
        comp = s["compression"]
        row += [f"{s['bits_sent']:.4g}", f"{comp:.1f}x" if comp else "-", f"{s['time_s']:.1f}"]
        table.add_row(*row)
    return table
