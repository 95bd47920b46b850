"""An emulated cluster on one Linux machine: P nodes joined by links of a chosen rate.

Try a data-parallel job under the link you are about to rent, on one machine: each node
is a Linux network namespace with its own address, joined to a switch (a Linux bridge)
by a veth pair. Both ends of the pair are shaped by a token bucket (``tc qdisc ... tbf``):
the node's end limits what it sends (``up``), the switch's end what it receives
(``down``). One process of the job runs in each node; it reaches the others over real
TCP through the shaped links, so Gloo's collectives and JAX's coordination service see
the bandwidth a real link would give them.

What is emulated is **bandwidth only**: no latency beyond the machine's own (tens of
microseconds), no jitter, no loss except the token bucket's queue overflowing. The
processes share this machine's cores (P processes on C cores get C/P cores each), which
real nodes would not.

The network lives in namespaces made for the run (user, network, mount and PID, through
``unshare``): the kernel removes all of it when the run ends, however it ends (success,
a crash, a timeout, Ctrl-C, the launcher killed), and nothing is left in the host's
network. It works as root, and without root where the kernel allows unprivileged user
namespaces; :func:`unavailable_reason` says in one line what is missing otherwise. It
needs ``unshare`` and ``mount`` (util-linux) and ``ip`` and ``tc`` (iproute2).

Bytes are counted at each node's interface (``/proc/net/dev`` of the switch's port):
whole Ethernet frames (headers included, no preamble or inter-frame gap). Segmentation
offload is turned off on every link (``gso_max_segs 1``), so frames are at most one MTU
(1500 bytes), as on a wire, and the counts include one header per frame.

Example:
  >>> from lore_jax import cluster
  >>> result = cluster.run(                                        # doctest: +SKIP
  ...     cluster.lore_jax_command(["train", "--task", "lm", "--steps", "50"], nodes=2),
  ...     nodes=2, rate="100mbit")
  >>> result.returncodes, result.traffic[0].sent_bytes             # doctest: +SKIP

From the command line: ``lore-jax cluster --nodes 2 --rate 100mbit -- train --task lm``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

#: The placeholders a node's command may hold, replaced per node by :func:`run`.
PLACEHOLDERS = ("{coordinator}", "{process_id}", "{num_processes}", "{address}")
#: Port of the coordinator on node 0 (the namespaces are private, so it cannot clash).
COORDINATOR_PORT = 12355
MAX_NODES = 250
_SUBNET = "10.77.0"
_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12,
               "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}
_RATE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_UNSHAPED = ("", "none", "unshaped", "off")
_PR_SET_PDEATHSIG = 1
#: Seconds the nodes get to finish after one of them failed or a stop was asked for,
#: before they are killed.
GRACE_S = 15.0
#: Lines of each node's output a :class:`ClusterResult` keeps.
TAIL_LINES = 20


class ClusterError(RuntimeError):
    """The emulated cluster cannot be made here, or a request for one is malformed."""


def parse_rate(rate: str | float | int | None) -> float | None:
    """A link rate in bits per second, or ``None`` for an unshaped link.

    Args:
      rate: a number (bits/s) or a string in ``tc``'s units, SI: ``"100mbit"`` is 1e8
        bits/s, ``"1gbit"``, ``"500kbit"``; ``"12.5mbps"`` is bytes per second (1e8
        bits/s). ``None``, ``"unshaped"`` or ``"none"``: not shaped.

    Example:
      >>> parse_rate("100mbit"), parse_rate("20Mbit"), parse_rate(None)
      (100000000.0, 20000000.0, None)
    """
    if rate is None or isinstance(rate, str) and rate.strip().lower() in _UNSHAPED:
        return None
    if isinstance(rate, (int, float)) and not isinstance(rate, bool):
        value = float(rate)
    else:
        m = _RATE_RE.match(str(rate))
        unit = m.group(2).lower() if m else None
        if not m or unit not in _RATE_UNITS and unit != "":
            raise ClusterError(
                f"rate {rate!r} is not a rate: give bits per second as a number or with a "
                f"unit ({', '.join(_RATE_UNITS)}), e.g. '100mbit', or 'unshaped'.")
        value = float(m.group(1)) * _RATE_UNITS.get(unit, 1)
    if not value >= 8000:
        raise ClusterError(f"rate {rate!r} is {value:g} bits/s; a link needs at least 8 kbit/s "
                           f"(or 'unshaped').")
    return value


def format_rate(bits_per_s: float | None) -> str:
    """``1e8 -> "100 Mbit/s"``; ``None -> "unshaped"``."""
    if bits_per_s is None:
        return "unshaped"
    for scale, unit in ((1e9, "Gbit/s"), (1e6, "Mbit/s"), (1e3, "kbit/s")):
        if bits_per_s >= scale:
            return f"{bits_per_s / scale:g} {unit}"
    return f"{bits_per_s:g} bit/s"


@dataclasses.dataclass(frozen=True)
class NodeTraffic:
    """What one node's link carried during the run (whole Ethernet frames).

    Attributes:
      sent_bytes, received_bytes: bytes of the frames the node sent and received.
      sent_packets, received_packets: the frames themselves.
    """

    sent_bytes: int
    received_bytes: int
    sent_packets: int
    received_packets: int


@dataclasses.dataclass(frozen=True)
class ClusterResult:
    """The outcome of :func:`run`.

    Attributes:
      returncodes: each node's exit status (``128 + N`` for a node ended by signal N).
      traffic: each node's :class:`NodeTraffic`, from its start to the end of the run.
      wall_s: seconds from the first node's start to the last node's end.
      setup_s: seconds spent making the network before the nodes started.
      timed_out: the run was stopped by ``timeout``.
      up, down: the link rates, bits per second (``None``: unshaped).
      tails: each node's last output lines (at most :data:`TAIL_LINES`).
    """

    returncodes: list[int]
    traffic: list[NodeTraffic]
    wall_s: float
    setup_s: float
    timed_out: bool
    up: float | None
    down: float | None
    tails: list[list[str]] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every node exited with status 0 before the timeout."""
        return not self.timed_out and all(c == 0 for c in self.returncodes)

    def summary(self, tails: bool = False) -> str:
        """One line per node: bytes and frames sent and received, and the mean rates
        (with ``tails``, then each failed node's last output lines)."""
        lines = [f"{len(self.returncodes)} nodes, links up {format_rate(self.up)} / down "
                 f"{format_rate(self.down)}: {self.wall_s:.1f} s"
                 + (" (timed out)" if self.timed_out else "")]
        for i, (code, t) in enumerate(zip(self.returncodes, self.traffic, strict=True)):
            rate = 8 * t.sent_bytes / self.wall_s / 1e6 if self.wall_s else 0.0
            lines.append(f"node {i}: exit {code}, sent {t.sent_bytes / 1e6:.2f} MB in "
                         f"{t.sent_packets} frames, received {t.received_bytes / 1e6:.2f} MB "
                         f"in {t.received_packets} frames (mean {rate:.1f} Mbit/s out)")
        for i, (code, tail) in enumerate(zip(self.returncodes, self.tails, strict=False)):
            if tails and code:
                lines += [f"node {i} | {line}" for line in tail]
        return "\n".join(lines)


def address(node: int) -> str:
    """Node ``node``'s IPv4 address on the emulated network."""
    return f"{_SUBNET}.{node + 1}"


def lore_jax_command(args: Sequence[str], nodes: int, devices_per_node: int = 1
                     ) -> list[str]:
    """The command that runs ``lore-jax ARGS`` as one process per node of :func:`run`.

    Adds ``--coordinator``, ``--num-processes``, ``--process-id`` and ``--devices``
    (``nodes * devices_per_node``; on the CPU each process simulates
    ``devices_per_node`` devices).

    Example:
      >>> lore_jax_command(["train", "--task", "lm"], nodes=2)[-8:]
      ['--coordinator', '{coordinator}', '--num-processes', '2', '--process-id', \
'{process_id}', '--devices', '2']
    """
    if not args or args[0] not in ("train", "compare"):
        raise ClusterError(f"a lore-jax job is 'train ...' or 'compare ...'; got "
                           f"{' '.join(args)!r}.")
    for flag in ("--coordinator", "--num-processes", "--process-id", "--devices"):
        if any(a == flag or a.startswith(flag + "=") for a in args):
            raise ClusterError(f"{flag} is set by the cluster for each node; leave it out "
                               f"(use --nodes and --devices-per-node).")
    return [sys.executable, "-m", "lore_jax", *args, "--coordinator", "{coordinator}",
            "--num-processes", str(nodes), "--process-id", "{process_id}",
            "--devices", str(nodes * devices_per_node)]


# --------------------------------------------------------------------------- availability


def _unshare_command(user_namespace: bool | None = None) -> list[str]:
    """``unshare`` into fresh network, mount and PID namespaces, inside a new user
    namespace where the caller is root (``user_namespace``; ``None``: unless it is root
    already)."""
    if user_namespace is None:
        user_namespace = os.geteuid() != 0
    user = ["--user", "--map-root-user"] if user_namespace else []
    return ["unshare", *user, "--net", "--mount", "--pid", "--fork", "--mount-proc",
            "--kill-child"]


def unavailable_reason(user_namespace: bool | None = None) -> str | None:
    """Why an emulated cluster cannot be made on this machine, in one line, or ``None``.

    Checks the tools (``unshare``, ``mount``, ``ip``, ``tc``), then makes an empty set of
    namespaces with a veth pair and a token bucket and removes it (``user_namespace``:
    as :func:`run`).
    """
    if not sys.platform.startswith("linux"):
        return f"an emulated cluster needs Linux network namespaces; this is {sys.platform}."
    missing = [t for t in ("unshare", "mount", "ip", "tc") if shutil.which(t) is None]
    if missing:
        return (f"an emulated cluster needs {', '.join(missing)} on PATH (packages "
                f"util-linux and iproute2).")
    probe = ("ip link add lj-a type veth peer name lj-b && ip link set lj-a up && "
             "tc qdisc add dev lj-a root tbf rate 1mbit burst 16kb latency 100ms")
    try:
        out = subprocess.run([*_unshare_command(user_namespace), "sh", "-c", probe],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"could not run unshare: {e}."
    if out.returncode == 0:
        return None
    detail = " ".join((out.stderr or out.stdout).split()) or f"exit {out.returncode}"
    unprivileged = os.geteuid() != 0 if user_namespace is None else user_namespace
    if unprivileged and ("unshare" in detail or "Operation not permitted" in detail):
        return (f"this kernel does not let an unprivileged user make namespaces ({detail}); "
                f"run as root, or allow user namespaces (sysctl "
                f"kernel.unprivileged_userns_clone=1, user.max_user_namespaces > 0).")
    if "tbf" in detail or "qdisc" in detail.lower():
        return f"the kernel has no token-bucket filter (sch_tbf): {detail}."
    return f"could not make network namespaces: {detail}."


# --------------------------------------------------------------------------- the launcher


def run(command: Sequence[str] | Callable[[int], Sequence[str]], *, nodes: int = 2,
        rate: str | float | None = None, up: str | float | None = None,
        down: str | float | None = None, timeout: float | None = None,
        env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
        output: IO[str] | None = sys.stdout, log_dir: str | os.PathLike | None = None,
        grace_s: float = GRACE_S, user_namespace: bool | None = None) -> ClusterResult:
    """Runs one process per node of an emulated cluster and returns their traffic.

    Args:
      command: each node's command, a list of arguments in which the placeholders
        ``{coordinator}`` (node 0's ``ADDRESS:PORT``), ``{process_id}``,
        ``{num_processes}`` and ``{address}`` (this node's) are replaced; or a function
        ``node -> list``. :func:`lore_jax_command` builds one for ``lore-jax``.
      nodes: processes, one per node (1 to 250).
      rate: every link's rate both ways (see :func:`parse_rate`); ``None``: unshaped.
      up, down: the rate of what a node sends (up) or receives (down), when they differ
        from ``rate``.
      timeout: seconds after which the nodes are stopped (SIGINT, then SIGKILL after
        ``grace_s``); ``None``: no limit.
      env: environment of the nodes (default: this process's).
      cwd: their working directory (default: this process's).
      output: where each node's output lines go, prefixed ``node I |`` (``None``: nowhere).
      log_dir: also write node I's output to ``log_dir/nodeI.log``.
      grace_s: seconds the nodes get to stop on their own once one failed, the timeout
        passed or Ctrl-C was pressed (a ``lore-jax`` job stops within seconds when a
        process is lost), before they are killed.
      user_namespace: make the namespaces inside a new user namespace, as an
        unprivileged user must (``None``: only when not root; ``True`` as root tries
        what an unprivileged user would get).

    Returns:
      A :class:`ClusterResult`.

    Raises:
      ClusterError: bad arguments, or namespaces cannot be made here (the message says
        what is missing).
    """
    if not isinstance(nodes, int) or not 1 <= nodes <= MAX_NODES:
        raise ClusterError(f"nodes must be an integer from 1 to {MAX_NODES}; got {nodes!r}.")
    for name, value in (("timeout", timeout), ("grace_s", grace_s)):
        if value is not None and not (isinstance(value, (int, float)) and value > 0):
            raise ClusterError(f"{name} must be a positive number of seconds; got {value!r}.")
    up_bps = parse_rate(up if up is not None else rate)
    down_bps = parse_rate(down if down is not None else rate)
    commands = [_node_command(command, i, nodes) for i in range(nodes)]
    reason = unavailable_reason(user_namespace)
    if reason:
        raise ClusterError(reason)
    with tempfile.TemporaryDirectory(prefix="lore-jax-cluster-") as tmp:
        spec = {"commands": commands, "up": up_bps, "down": down_bps, "timeout": timeout,
                "env": dict(os.environ if env is None else env),
                "cwd": str(cwd or os.getcwd()), "hostname": socket.gethostname(),
                "log_dir": str(Path(log_dir).resolve()) if log_dir else None,
                "grace_s": grace_s,
                "result": os.path.join(tmp, "result.json"), "tmp": tmp}
        spec_path = os.path.join(tmp, "spec.json")
        Path(spec_path).write_text(json.dumps(spec), encoding="utf-8")
        lab = subprocess.Popen(
            [*_unshare_command(user_namespace), sys.executable, "-m", "lore_jax.cluster",
             "--lab", spec_path],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
            start_new_session=True, preexec_fn=_die_with_parent)
        tail: collections.deque = collections.deque(maxlen=TAIL_LINES)
        relay = threading.Thread(target=_relay, args=(lab.stdout, output, tail), daemon=True)
        relay.start()
        try:
            lab.wait(timeout=None if timeout is None else timeout + 3 * grace_s + 60)
        except KeyboardInterrupt:
            _stop(lab, grace_s)
            raise
        except subprocess.TimeoutExpired:
            _stop(lab, grace_s)
            raise ClusterError(f"the emulated cluster did not stop within {timeout} s and "
                               f"its grace periods; it was killed.") from None
        finally:
            relay.join(timeout=5)
            if lab.poll() is None:
                lab.kill()
        try:
            result = json.loads(Path(spec["result"]).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise ClusterError(f"the emulated cluster failed before it could report (exit "
                               f"{lab.returncode}): {' | '.join(tail)}") from None
    if "error" in result:
        raise ClusterError(result["error"])
    return ClusterResult(
        returncodes=result["returncodes"],
        traffic=[NodeTraffic(**t) for t in result["traffic"]],
        wall_s=result["wall_s"], setup_s=result["setup_s"], timed_out=result["timed_out"],
        up=up_bps, down=down_bps, tails=result["tails"])


def _node_command(command, node: int, nodes: int) -> list[str]:
    argv = list(command(node) if callable(command) else command)
    if not argv or not all(isinstance(a, str) for a in argv):
        raise ClusterError(f"a node's command must be a non-empty list of strings; got "
                           f"{argv!r}.")
    values = {"{coordinator}": f"{address(0)}:{COORDINATOR_PORT}", "{process_id}": str(node),
              "{num_processes}": str(nodes), "{address}": address(node)}
    out = []
    for a in argv:
        for k, v in values.items():
            a = a.replace(k, v)
        out.append(a)
    return out


def _die_with_parent() -> None:   # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _relay(stream: IO[str], output: IO[str] | None, tail: collections.deque) -> None:
    for line in stream:
        tail.append(line.rstrip("\n"))
        if output is not None:
            output.write(line)
            output.flush()


def _stop(lab: subprocess.Popen, grace_s: float) -> None:
    """Asks the lab to stop its nodes (SIGINT) and waits for it, then kills it.

    The signal goes to the lab's process group: ``unshare`` itself ignores SIGINT while
    it waits for its child, the lab in the new namespaces, which shares its group.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(lab.pid, signal.SIGINT)
    try:
        lab.wait(timeout=grace_s + 10)
    except subprocess.TimeoutExpired:
        lab.kill()
        lab.wait()


# --------------------------------------------------------------------------- the lab


def _sh(*args: str) -> None:
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode:
        raise ClusterError(f"{' '.join(args)} failed: {' '.join(out.stderr.split())}")


def _shape(prefix: list[str], dev: str, bps: float | None) -> None:
    """A token bucket of ``bps`` on ``dev``'s egress, and segmentation offload off."""
    _sh(*prefix, "ip", "link", "set", "dev", dev, "gso_max_segs", "1")
    if bps is None:
        return
    # The bucket holds 2 ms of traffic (at least 16 KiB, at most a few MTUs more than
    # the kernel's timer needs); its queue 100 ms, after which packets are dropped.
    burst = max(16384, int(bps / 8 * 0.002))
    _sh(*prefix, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
        f"{int(bps)}bit", "burst", str(burst), "latency", "100ms")


def _build_network(nodes: int, up: float | None, down: float | None) -> None:
    """The switch (this namespace) and one namespace per node, joined by shaped veths."""
    run_dir = "/run/netns"
    if subprocess.run(["mkdir", "-p", run_dir], capture_output=True).returncode:
        run_dir = "/run"   # not root on the host: a private /run instead
    _sh("mount", "-t", "tmpfs", "lore-jax-netns", run_dir)
    _sh("ip", "link", "set", "lo", "up")
    _sh("ip", "link", "add", "switch", "type", "bridge")
    _sh("ip", "link", "set", "switch", "up")
    for i in range(nodes):
        ns = f"node{i}"
        _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", f"port{i}", "type", "veth", "peer", "name", "eth0",
            "netns", ns)
        _sh("ip", "link", "set", f"port{i}", "master", "switch")
        _sh("ip", "link", "set", f"port{i}", "up")
        _sh("ip", "-n", ns, "addr", "add", f"{address(i)}/24", "dev", "eth0")
        _sh("ip", "-n", ns, "link", "set", "eth0", "up")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _shape(["ip", "netns", "exec", ns], "eth0", up)   # what node i sends
        _shape([], f"port{i}", down)                      # what node i receives


def _port_counters(nodes: int) -> list[NodeTraffic]:
    """Each node's traffic so far, read at the switch's port (its rx = the node's tx)."""
    fields: dict[str, list[int]] = {}
    for line in Path("/proc/net/dev").read_text().splitlines()[2:]:
        name, _, values = line.partition(":")
        fields[name.strip()] = [int(v) for v in values.split()]
    out = []
    for i in range(nodes):
        v = fields[f"port{i}"]   # rx bytes, packets, ... (8 fields), tx bytes, packets, ...
        out.append(NodeTraffic(sent_bytes=v[0], received_bytes=v[8], sent_packets=v[1],
                               received_packets=v[9]))
    return out


def _hosts_file(tmp: str, node: int, nodes: int, hostname: str) -> str:
    """Node ``node``'s /etc/hosts: this machine's host name is the node's address (Gloo
    takes its address from the host name), ``nodeJ`` names node J."""
    lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost",
             f"{address(node)} {hostname}"]
    lines += [f"{address(j)} node{j}" for j in range(nodes)]
    path = os.path.join(tmp, f"hosts{node}")
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


class _Lab:
    """Runs inside the namespaces: builds the network, starts and watches the nodes."""

    def __init__(self, spec: dict[str, Any]):
        self.spec = spec
        self.nodes = len(spec["commands"])
        self.procs: list[subprocess.Popen] = []
        self.readers: list[threading.Thread] = []
        self.tails: list[collections.deque] = [collections.deque(maxlen=TAIL_LINES)
                                               for _ in range(self.nodes)]
        self.lock = threading.Lock()
        self.stop_asked = threading.Event()

    def start_nodes(self) -> None:
        s = self.spec
        for i, argv in enumerate(s["commands"]):
            hosts = _hosts_file(s["tmp"], i, self.nodes, s["hostname"])
            wrapper = ["ip", "netns", "exec", f"node{i}", "sh", "-c",
                       'mount --bind "$0" /etc/hosts && exec "$@"', hosts, *argv]
            env = {**s["env"], "LORE_JAX_CLUSTER_NODE": str(i)}
            proc = subprocess.Popen(wrapper, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, cwd=s["cwd"],
                                    start_new_session=True)
            self.procs.append(proc)
            self.readers.append(threading.Thread(target=self.stream, args=(i, proc),
                                                 daemon=True))
            self.readers[-1].start()

    def stream(self, node: int, proc: subprocess.Popen) -> None:
        log = None
        if self.spec["log_dir"]:
            os.makedirs(self.spec["log_dir"], exist_ok=True)
            log = open(os.path.join(self.spec["log_dir"], f"node{node}.log"), "wb")  # noqa: SIM115
        for raw in proc.stdout:
            if log is not None:
                log.write(raw)
                log.flush()
            for part in raw.decode("utf-8", "replace").rstrip("\n").split("\r"):
                if part.strip():
                    self.tails[node].append(part)
                    with self.lock:
                        sys.stdout.write(f"node {node} | {part}\n")
                        sys.stdout.flush()
        if log is not None:
            log.close()

    def signal_all(self, signum: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signum)

    def wait(self, timeout: float | None) -> bool:
        """Waits for every node; returns whether the timeout stopped them."""
        deadline = None if timeout is None else time.monotonic() + timeout
        stop_at, timed_out = None, False
        while any(p.poll() is None for p in self.procs):
            now = time.monotonic()
            failed = any(p.poll() not in (None, 0) for p in self.procs)
            if stop_at is None and (failed or self.stop_asked.is_set()
                                    or deadline is not None and now > deadline):
                timed_out = not failed and not self.stop_asked.is_set()
                if not failed:
                    self.signal_all(signal.SIGINT)
                stop_at = now + self.spec["grace_s"]
            if stop_at is not None and now > stop_at:
                self.signal_all(signal.SIGKILL)
            time.sleep(0.05)
        return timed_out


def _lab_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    lab = _Lab(spec)
    signal.signal(signal.SIGINT, lambda *_: lab.stop_asked.set())
    signal.signal(signal.SIGTERM, lambda *_: lab.stop_asked.set())
    result: dict[str, Any]
    try:
        t0 = time.perf_counter()
        _build_network(lab.nodes, spec["up"], spec["down"])
        before = _port_counters(lab.nodes)
        t1 = time.perf_counter()
        lab.start_nodes()
        timed_out = lab.wait(spec["timeout"])
        wall = time.perf_counter() - t1
        for reader in lab.readers:
            reader.join(timeout=5)
        after = _port_counters(lab.nodes)
        traffic = [{f.name: getattr(a, f.name) - getattr(b, f.name)
                    for f in dataclasses.fields(NodeTraffic)}
                   for a, b in zip(after, before, strict=True)]
        codes = [p.returncode if p.returncode >= 0 else 128 - p.returncode for p in lab.procs]
        result = {"returncodes": codes, "traffic": traffic, "wall_s": wall,
                  "setup_s": t1 - t0, "timed_out": timed_out,
                  "tails": [list(t) for t in lab.tails]}
    except (ClusterError, OSError) as e:
        lab.signal_all(signal.SIGKILL)
        result = {"error": str(e)}
    Path(spec["result"]).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--lab":
        sys.exit(_lab_main(sys.argv[2]))
    sys.exit("usage: lore-jax cluster --help (this module's entry point is internal)")
