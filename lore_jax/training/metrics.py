"""Metric records outside the jitted step: JSON-lines logs and a progress bar.

Every record is one JSON object per line, with an ``"event"`` field:

* ``"config"``: the run's settings, written when a run starts or resumes;
* ``"train"``: ``step``, ``loss``, ``accuracy`` (when it applies), ``bits_sent`` and
  ``bits_dense`` (cumulative, per device), ``step_time`` (seconds), ``wall_s`` (seconds
  since the command was launched, at the end of the step) and, in a multi-process run on
  Linux, ``net_sent_bytes`` and ``net_received_bytes``: what this process's network
  interfaces carried since the first step began (:func:`interface_bytes`; all traffic
  of the machine's network namespace, not only the job's);
* ``"eval"``: ``step``, ``test_loss``, ``test_accuracy``, ``eval_s`` (seconds);
* ``"summary"``: the final numbers of a run.

In a multi-process run only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.progress import Progress


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN / inf
    return value


class JsonLogger:
    """Appends records to a JSON-lines file (or does nothing when ``path`` is ``None``).

    Args:
      path: the log file; its parent directory is created.
      append: keep existing lines (a resumed run continues its log).
      enabled: ``False`` on processes other than 0.
      after_step: with ``append``, first drop the records past this step (those of an
        interrupted run that a resumed one repeats).

    Example:
      >>> log = JsonLogger(None)
      >>> log.write({"event": "train", "step": 1, "loss": 2.3})
    """

    def __init__(self, path: str | os.PathLike | None, append: bool = False, enabled: bool = True,
                 after_step: int | None = None):
        self._file: IO[str] | None = None
        if path is not None and enabled:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            if append and after_step is not None and path.exists():
                _truncate_after(path, after_step)
            self._file = open(path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115

    def write(self, record: dict[str, Any]) -> None:
        """Writes one record as a line and flushes it."""
        if self._file is not None:
            self._file.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _truncate_after(path: Path, step: int) -> None:
    """Drops the records of ``path`` whose ``"step"`` is past ``step`` (a resumed run
    writes them again), and a last line cut short by a kill; rewrites it atomically."""
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines(True):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record.get("step"), int) or record["step"] <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep), encoding="utf-8")
    os.replace(tmp, path)


#: Environment variable holding the launch time (``time.time()``) of the ``lore-jax``
#: command, set by a supervising parent process for its child.
LAUNCH_TIME_ENV = "LORE_JAX_LAUNCH_TIME"


def launch_time() -> float:
    """When this run's command was launched (``time.time()`` seconds).

    The value of :data:`LAUNCH_TIME_ENV` if set (a supervising parent's own start), else
    this process's start as the kernel reports it (Linux), else now.
    """
    try:
        return float(os.environ[LAUNCH_TIME_ENV])
    except (KeyError, ValueError):
        pass
    try:   # field 22 of /proc/self/stat: start time in clock ticks after boot
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])  # noqa: SIM115
        boot = next(int(line.split()[1]) for line in open("/proc/stat")  # noqa: SIM115
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration, AttributeError):
        return time.time()


def interface_bytes() -> tuple[int, int] | None:
    """Bytes sent and received so far by every network interface but loopback, as the
    kernel counts them (``/proc/net/dev`` of this process's network namespace: whole
    frames, headers included); ``None`` where there is no such file (not Linux)."""
    try:
        lines = open("/proc/net/dev").read().splitlines()[2:]  # noqa: SIM115
    except OSError:
        return None
    sent = received = 0
    for line in lines:
        name, _, values = line.partition(":")
        if name.strip() != "lo":
            v = values.split()
            received, sent = received + int(v[0]), sent + int(v[8])
    return sent, received


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a JSON-lines log."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def progress_bar(enabled: bool = True) -> Progress:
    """A rich progress bar on stderr showing the step, loss and compression so far."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
        console=None if sys.stderr.isatty() else _plain_console(),
    )


def _plain_console():
    from rich.console import Console

    return Console(file=sys.stderr, width=100)
