"""A lost peer in a multi-process run: detect it, stop every survivor within seconds, say so.

When one process of a ``jax.distributed`` job dies, the others learn it in one of three
ways, all within seconds when the timeouts below are set:

* a collective fails in Python (``JaxRuntimeError: ... Gloo all-reduce failed ...
  Connection reset by peer``), or an orbax barrier fails once the coordination service
  has declared the dead process unhealthy;
* the coordination service (hosted by process 0) misses the dead process's heartbeats
  for ``heartbeat_timeout`` seconds and tells every other process;
* process 0 itself died, so the coordination service is gone: the next call to it fails
  at once.

In the last two cases JAX's distributed client ends the process itself, from a C++
thread: a fatal log message, a C++ stack and ``SIGABRT``. Python cannot catch that, and
the client's hook for it (``missed_heartbeat_callback``) cannot be set from Python in
JAX 0.10 (the binding fails to convert the status it passes: ``std::bad_cast``). So
``lore-jax`` runs each process of a multi-process job in a child process that it
supervises (:func:`supervise`): the child reports its last finished step; the parent
passes the child's Python output straight through, holds back the distributed runtime's
C++ log lines, and when the child ends because a peer was lost, prints one line instead
(:func:`lost_message`: the lost process, the step, the newest checkpoint) and exits with
:data:`EXIT_PEER_LOST`. A child that catches the failure in Python (:class:`PeerLost`)
reports it and leaves with ``os._exit``, so JAX's shutdown barrier, which would wait for
the dead process, never runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lore_jax.training import metrics
from lore_jax.training.errors import causes

#: Exit status of a process that stopped because another process of its job was lost
#: (``EX_TEMPFAIL``: restart the job, with ``--resume`` to continue from a checkpoint).
EXIT_PEER_LOST = 75
#: Seconds without a heartbeat after which the coordination service declares a process
#: dead and stops the others (JAX's default is 100). Heartbeats come from a C++ thread,
#: so long compilations or steps do not delay them; a network that stalls this long
#: does end the job.
HEARTBEAT_TIMEOUT_S = 10
#: Seconds a finishing process waits at JAX's shutdown barrier for the others (JAX's
#: default is 300). Processes of a run finish together (the last step, evaluation and
#: checkpoint are collective), so this only bounds the wait of a process whose peers
#: stopped with an error.
SHUTDOWN_TIMEOUT_S = 60
#: Seconds a starting process waits for all processes to connect (JAX's default): a
#: scheduler may start the processes of a job minutes apart.
INIT_TIMEOUT_S = 300

_WORKER_ENV = "LORE_JAX_SUPERVISED"   # "STATUS_FD,STDERR_FD,PARENT_PID" in the child
_PR_SET_PDEATHSIG = 1
# Errors of the distributed runtime and of Gloo's collectives that mean a process is gone.
_PEER_FAILURE = re.compile(
    r"Gloo|heartbeat|coordination service|CoordinationService|Barrier failed|"
    r"Connection (reset|closed|refused)|Socket closed|leader task|tasks have crashed",
    re.IGNORECASE)
# C++ log lines of the distributed runtime that the supervisor holds back.
_RUNTIME_LOG = re.compile(
    r"coordination[ _]service|preemption_sync|client\.h:|Check failure stack trace|gloo|"
    r"terminate called|heartbeat|PollForError", re.IGNORECASE)


class PeerLost(Exception):  # noqa: N818 (a stop, not a bug)
    """Another process of the ``jax.distributed`` job was lost after step ``step``.

    The distributed runtime cannot be shut down cleanly after this (its shutdown barrier
    waits for the dead process): a program that catches it should leave with
    ``os._exit``, as ``lore-jax`` does.

    Attributes:
      step: the last step this process finished (``None``: none yet).
      detail: the first line of the error that showed it.
    """

    def __init__(self, step: int | None, detail: str):
        self.step, self.detail = step, detail
        where = f"after step {step}" if step is not None else "before the first step"
        super().__init__(f"lost a peer process {where}: {detail}")


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` (or an exception it was raised from) is a distributed-runtime or
    collective failure that means another process is gone.

    Only JAX runtime errors count, found through causes and contexts (a failed checkpoint
    save wraps them), so a bug in the user's code keeps its traceback.
    """
    import jax

    return any(isinstance(e, jax.errors.JaxRuntimeError) and _PEER_FAILURE.search(str(e))
               for e in causes(error))


def first_line(error: BaseException) -> str:
    """The first line of the innermost JAX runtime error behind ``error``."""
    import jax

    found = ([e for e in causes(error) if isinstance(e, jax.errors.JaxRuntimeError)]
             or [error])[-1]
    lines = str(found).strip().splitlines()
    return lines[0] if lines else type(found).__name__


def lost_processes(text: str, process_id: int, num_processes: int) -> list[int]:
    """The processes that ``text`` (the runtime's error messages) says were lost.

    The coordination service names processes that stopped sending heartbeats; a failed
    call to the service itself means process 0, which hosts it, is gone; in a
    two-process job the lost process can only be the other one. Otherwise ``[]``.
    """
    found = {int(t) for t in re.findall(r"Task (\d+) heartbeat timeout", text)}
    listed = re.search(r"stopped sending heartbeats\):\s*((?:\d+[\s,]*)+)", text)
    if listed:
        found |= {int(t) for t in re.findall(r"\d+", listed.group(1))}
    if process_id != 0 and re.search(r"leader task|to coordination service", text):
        found.add(0)
    found.discard(process_id)
    if not found and num_processes == 2:
        found = {1 - process_id}
    return sorted(p for p in found if 0 <= p < num_processes)


def wait_for_every_process(name: str, timeout_s: float = INIT_TIMEOUT_S) -> None:
    """Returns once every process of the ``jax.distributed`` job has called this with
    ``name`` (at once in a single-process run).

    A barrier of the coordination service, not a collective: Gloo gives the processes
    30 s to meet at a new collective's first call, and their compile times can differ by
    more than that. JAX writes its persistent compilation cache from process 0 only, so
    on a rerun process 0 loads its compiled step in a second while every other process
    compiles it again; the training loop waits here after compiling its step.

    Raises the runtime's error (a peer failure, :func:`is_peer_failure`) if some process
    does not arrive within ``timeout_s``.
    """
    from jax._src import distributed  # the runtime client has no public handle

    client = distributed.global_state.client
    if client is not None:
        client.wait_at_barrier(f"lore_jax/{name}", int(timeout_s * 1000))


def newest_checkpoint(checkpoint_dir: str | os.PathLike | None) -> Path | None:
    """The newest complete checkpoint in ``checkpoint_dir``, or ``None``.

    Orbax writes a checkpoint under a temporary name and renames it to its step once
    every process has written its part, so the directories named by a number are the
    complete ones.
    """
    if checkpoint_dir is None:
        return None
    root = Path(checkpoint_dir).expanduser().resolve()
    try:
        steps = [int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir()]
    except OSError:
        return None
    return root / str(max(steps)) if steps else None


def lost_message(lost: Sequence[int], process_id: int, step: int | None,
                 checkpoint_dir: str | os.PathLike | None) -> str:
    """The one line a surviving process prints: who was lost, after which step, and the
    checkpoint to resume from (or that there is none)."""
    names = [f"process {p}" + (" (the coordinator)" if p == 0 else "") for p in lost]
    who = ", ".join(names) if names else "a peer process"
    where = f"after step {step}" if step is not None else "before the first step"
    newest = newest_checkpoint(checkpoint_dir)
    if newest is not None:
        resume = (f"the newest checkpoint is {newest}: restart every process with --resume "
                  f"to continue from it")
    elif checkpoint_dir is not None:
        resume = (f"{Path(checkpoint_dir).expanduser().resolve()} holds no checkpoint yet, "
                  f"so a restart begins at step 0")
    else:
        resume = "no --checkpoint-dir was given, so a restart begins at step 0"
    return f"lore-jax: lost {who} {where}, so process {process_id} stops; {resume}."


# --------------------------------------------------------------------------- the child


class _Reporter:
    """The child's side of the status pipe: JSON lines to the supervising parent."""

    def __init__(self) -> None:
        self._file = None

    def connect(self, fd: int) -> None:
        self._file = open(fd, "w", buffering=1, encoding="utf-8")

    def send(self, **record: Any) -> None:
        if self._file is not None:
            try:
                self._file.write(json.dumps(record) + "\n")
            except (OSError, ValueError):   # the parent is gone; the child follows
                self._file = None


_reporter = _Reporter()


def report_connected() -> None:
    """Tells a supervising parent process (if any) that ``jax.distributed`` is up."""
    _reporter.send(connected=True)


def report_step(step: int) -> None:
    """Tells a supervising parent process (if any) that ``step`` is finished."""
    _reporter.send(step=int(step))


def leave_lost(error: PeerLost, checkpoint_dir: str | None = None) -> None:
    """Reports ``error`` to the supervising parent and ends this process at once with
    :data:`EXIT_PEER_LOST` (no atexit handlers: JAX's shutdown barrier would wait for the
    dead process). Unsupervised, it first prints the one line itself."""
    if _reporter._file is None:
        import jax

        process_id, n = jax.process_index(), jax.process_count()
        print(lost_message(lost_processes(error.detail, process_id, n), process_id,
                           error.step, checkpoint_dir), file=sys.stderr)
    _reporter.send(lost=error.detail)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(EXIT_PEER_LOST)


def start_worker() -> bool:
    """In a child started by :func:`supervise`: write Python's stderr to the parent's
    stderr (the C-level stderr stays a pipe to the parent), connect the status pipe, and
    die with the parent. Returns whether this process is such a child."""
    spec = os.environ.pop(_WORKER_ENV, None)
    if not spec:
        return False
    status_fd, stderr_fd, parent = (int(v) for v in spec.split(","))
    try:   # Linux: the kernel kills this process when its parent dies
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        watch = False
    except (OSError, AttributeError):
        watch = True
    if os.getppid() != parent:   # the parent died before that was set
        os._exit(EXIT_PEER_LOST)
    if watch:
        def watch_parent() -> None:
            while os.getppid() == parent:
                threading.Event().wait(0.5)
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=watch_parent, daemon=True).start()
    sys.stderr = open(stderr_fd, "w", buffering=1, encoding=sys.stderr.encoding,
                      errors="backslashreplace")
    _reporter.connect(status_fd)
    return True


# --------------------------------------------------------------------------- the parent


@dataclasses.dataclass(frozen=True)
class Job:
    """What :func:`supervise` says about the job a process belongs to.

    Attributes:
      process_id, num_processes: this process and the number in the job.
      coordinator: the coordinator's ``HOST:PORT``.
      init_timeout: seconds the processes wait for each other to connect.
      checkpoint_dir: the run's ``--checkpoint-dir`` (``None``: none).
    """

    process_id: int
    num_processes: int
    coordinator: str | None = None
    init_timeout: int = INIT_TIMEOUT_S
    checkpoint_dir: str | None = None


def supervise(argv: Sequence[str], job: Job, command: Sequence[str] | None = None) -> int:
    """Runs ``python -m lore_jax ARGV`` as a child process and returns its exit status;
    if it ended because a peer was lost, prints :func:`lost_message` and returns
    :data:`EXIT_PEER_LOST`, which it also returns, with one line, when the child was
    ended by the runtime before every process of the job had connected.

    The child's stdout and its Python-level stderr go straight to this process's; its
    C-level stderr comes through a pipe and is passed on line by line, except the
    distributed runtime's error lines, which are held back and printed only if the child
    ends for another reason. SIGTERM and SIGINT are passed on to the child (which runs in
    its own session, so a terminal's Ctrl-C reaches it once, from here), and the child
    dies with this process.

    Args:
      argv: the child's arguments.
      job: the job, for the messages.
      command: what runs the child before ``argv`` (default ``python -m lore_jax``); it
        calls :func:`start_worker` first.

    Returns:
      The child's exit status (``128 + N`` for signal ``N``), or :data:`EXIT_PEER_LOST`.
    """
    status_r, status_w = os.pipe()
    stderr_fd = os.dup(2)
    env = {metrics.LAUNCH_TIME_ENV: str(metrics.launch_time()), **os.environ,
           _WORKER_ENV: f"{status_w},{stderr_fd},{os.getpid()}"}
    command = list(command or [sys.executable, "-m", "lore_jax"])
    child = subprocess.Popen([*command, *argv], env=env,
                             pass_fds=(status_w, stderr_fd), stderr=subprocess.PIPE,
                             start_new_session=True)
    os.close(status_w)
    os.close(stderr_fd)
    state: dict[str, Any] = {"step": None, "lost": None, "connected": False, "held": []}

    def read_status() -> None:
        with open(status_r, encoding="utf-8") as f:
            for line in f:
                try:
                    state.update(json.loads(line))
                except ValueError:
                    pass

    def relay_stderr() -> None:
        holding = False
        for raw in child.stderr:
            line = raw.decode("utf-8", "backslashreplace")
            holding = holding or bool(_RUNTIME_LOG.search(line))
            if holding:
                state["held"].append(line)
            else:
                sys.stderr.write(line)
                sys.stderr.flush()

    readers = [threading.Thread(target=f, daemon=True) for f in (read_status, relay_stderr)]
    for t in readers:
        t.start()

    def forward(signum, frame):
        del frame
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    previous = ({s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
                if threading.current_thread() is threading.main_thread() else {})
    try:
        code = child.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for t in readers:
        t.join(timeout=5)
    held = "".join(state["held"])
    lost = state["lost"] if code == EXIT_PEER_LOST else None
    if lost is None and code < 0 and _PEER_FAILURE.search(held):   # ended from C++
        lost = held
    if lost is not None and not state["connected"]:
        print(f"lore-jax: the {job.num_processes}-process job did not start: process "
              f"{job.process_id} and the others did not all connect to the coordinator at "
              f"{job.coordinator} within {job.init_timeout} s (--init-timeout); start every "
              f"process with the same --coordinator and --num-processes.", file=sys.stderr,
              flush=True)
        return EXIT_PEER_LOST
    if lost is not None:
        print(lost_message(lost_processes(lost, job.process_id, job.num_processes),
                           job.process_id, state["step"], job.checkpoint_dir),
              file=sys.stderr, flush=True)
        return EXIT_PEER_LOST
    sys.stderr.write(held)
    sys.stderr.flush()
    return code if code >= 0 else 128 - code
