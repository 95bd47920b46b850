"""The emulated cluster: rates, commands, teardown, and bytes on a shaped link.

The tests that make namespaces are skipped, with the reason, where the kernel or the
tools do not allow it (:func:`lore_jax.cluster.unavailable_reason`).
"""

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from benchmarks import cluster_bytes
from lore_jax import cli, cluster
from lore_jax.training.metrics import read_log

REASON = cluster.unavailable_reason()
needs_namespaces = pytest.mark.skipif(REASON is not None, reason=f"no emulated cluster: "
                                      f"{REASON}")


@pytest.mark.parametrize("text, bps", [("100mbit", 1e8), ("20Mbit", 2e7), ("1gbit", 1e9),
                                       ("500kbit", 5e5), ("12.5mbps", 1e8), (3e6, 3e6),
                                       ("unshaped", None), (None, None)])
def test_parse_rate_reads_tc_units(text, bps):
    assert cluster.parse_rate(text) == bps


@pytest.mark.parametrize("text", ["fast", "100 parsecs", "-5mbit", "1bit", True])
def test_parse_rate_refuses_what_is_not_a_rate(text):
    with pytest.raises(cluster.ClusterError, match="rate"):
        cluster.parse_rate(text)


def test_lore_jax_command_sets_the_process_flags_and_refuses_them_from_the_user():
    argv = cluster.lore_jax_command(["train", "--task", "lm"], nodes=4, devices_per_node=2)
    assert argv[:3] == [sys.executable, "-m", "lore_jax"]
    assert argv[argv.index("--num-processes") + 1] == "4"
    assert argv[argv.index("--devices") + 1] == "8"
    with pytest.raises(cluster.ClusterError, match="--process-id is set by the cluster"):
        cluster.lore_jax_command(["train", "--process-id", "1"], nodes=2)
    with pytest.raises(cluster.ClusterError, match="'train ...' or 'compare ...'"):
        cluster.lore_jax_command(["fit"], nodes=2)


@pytest.mark.parametrize("kwargs, match", [({"nodes": 0}, "nodes must be"),
                                           ({"timeout": -1}, "timeout must be"),
                                           ({"rate": "slow"}, "not a rate")])
def test_bad_requests_are_refused_before_anything_starts(kwargs, match):
    with pytest.raises(cluster.ClusterError, match=match):
        cluster.run(["true"], **kwargs)


def test_cli_cluster_needs_a_job(capsys):
    assert cli.main(["cluster", "--nodes", "2"]) == 2
    assert "give the job after '--'" in capsys.readouterr().err


@needs_namespaces
@pytest.mark.parametrize("user_namespace", [None, True], ids=["as is", "in a user namespace"])
def test_nodes_get_their_placeholders_addresses_and_host_name(tmp_path, user_namespace):
    """Gloo takes a process's address from the host name: each node must resolve it to
    its own address. Also inside a user namespace, as an unprivileged user makes it
    (skipped where the kernel does not allow that)."""
    if user_namespace and cluster.unavailable_reason(user_namespace=True):
        pytest.skip(cluster.unavailable_reason(user_namespace=True))
    result = cluster.run(
        ["sh", "-c", "echo {process_id} {num_processes} {address} {coordinator} "
                     "$(getent hosts $(hostname) | cut -d' ' -f1) $LORE_JAX_CLUSTER_NODE"],
        nodes=3, rate="50mbit", output=None, log_dir=tmp_path, user_namespace=user_namespace)
    assert result.ok, result.summary()
    for i in range(3):
        line = (tmp_path / f"node{i}.log").read_text().split()
        assert line == [str(i), "3", f"10.77.0.{i + 1}", "10.77.0.1:12355",
                        f"10.77.0.{i + 1}", str(i)]


def _alive(marker: str) -> list[str]:
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    return out.stdout.split()


@needs_namespaces
def test_a_timeout_and_a_failed_node_stop_the_others():
    marker = f"sleep 77{uuid.uuid4().int % 1000}"
    t = time.monotonic()
    result = cluster.run(["sh", "-c", marker], nodes=2, timeout=1, output=None, grace_s=1)
    assert result.timed_out and not result.ok and time.monotonic() - t < 20
    result = cluster.run(["sh", "-c", f"[ {{process_id}} = 1 ] && exit 3; {marker}"],
                         nodes=2, output=None, grace_s=1)
    assert result.returncodes[1] == 3 and result.returncodes[0] != 0
    assert not _alive(marker)


@needs_namespaces
@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_ctrl_c_or_a_killed_launcher_leaves_nothing_running(how):
    """Ctrl-C stops the nodes; a launcher killed outright takes the namespaces and every
    process in them with it (the kernel removes a PID namespace whose first process
    dies, and the network namespaces with their last process)."""
    marker = f"sleep 88{uuid.uuid4().int % 1000}"
    # Ctrl-C as a terminal delivers it, whatever the test runner's own disposition: a
    # shell without job control starts background jobs with SIGINT ignored, which exec
    # passes on, and Python then installs no KeyboardInterrupt handler.
    launch = ("import runpy, signal, sys; signal.signal(signal.SIGINT, "
              "signal.default_int_handler); sys.argv = ['lore-jax', *sys.argv[1:]]; "
              "runpy.run_module('lore_jax', run_name='__main__')")
    launcher = subprocess.Popen(
        [sys.executable, "-c", launch, "cluster", "--nodes", "2", "--", "sh", "-c", marker],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while len(_alive(marker)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(_alive(marker)) >= 2, launcher.communicate(timeout=5)
    launcher.send_signal(getattr(signal, how))
    launcher.wait(timeout=60)
    deadline = time.monotonic() + 10
    while _alive(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(marker)
    if how == "SIGINT":
        assert launcher.returncode == 130


@needs_namespaces
@pytest.mark.slow
def test_bytes_on_a_shaped_link_match_the_accounting_and_compression_pays(tmp_path):
    """Two processes train on a 200 Mbit/s link; per step, what node 0's interface sent
    and received is at least the accounted payload (a ring all-reduce of 2 nodes moves
    each node's payload once each way) and at most 10% more plus a fixed cost for each
    of the step's collective operations (at most 4: GreedyLore's two rounds, the dense
    leaves, the loss), and GreedyLore's steps move at least 5x fewer bytes than dense's."""
    wire = {}
    for name in ("dense", "greedylore"):
        log = tmp_path / f"{name}.jsonl"
        job = ["train", "--task", "digits", "--compressor", name, "--steps", "6",
               "--eval-every", "100", "--eval-examples", "64", "--no-progress",
               "--log", str(log)]
        result = cluster.run(cluster.lore_jax_command(job, nodes=2), nodes=2,
                             rate="200mbit", timeout=300, output=None)  # one core each
        assert result.ok, result.summary(tails=True)
        steps = cluster_bytes.per_step(read_log(log), skip=1)
        for phase in cluster_bytes.phases(steps, "all-reduce", 2):
            most = 1.10 * phase["implied"] + 4 * cluster_bytes.OPERATION_BYTES
            assert phase["implied"] <= phase["sent"] <= most, (name, phase)
            assert phase["implied"] <= phase["received"] <= most, (name, phase)
        wire[name] = sum(s["sent"] for s in steps) / len(steps)
        # The whole job, start-up and evaluation included, is on the link too.
        assert result.traffic[0].sent_bytes > sum(s["sent"] for s in steps)
    assert wire["dense"] >= 5 * wire["greedylore"], wire


def test_cluster_bytes_reads_phases_from_a_log():
    """The per-step split of a training log into dense and compressed steps, against the
    ring collectives' factors, checked on a hand-made log."""
    def rec(step, bits, dense, sent, received):
        return {"event": "train", "step": step, "bits_sent": bits, "bits_dense": dense,
                "net_sent_bytes": sent, "net_received_bytes": received}

    records = [{"event": "config"}, rec(1, 800, 800, 120, 120),
               rec(2, 1600, 1600, 230, 225), rec(3, 1680, 2400, 245, 242),
               rec(4, 1760, 3200, 257, 256)]
    steps = cluster_bytes.per_step(records, skip=1)
    assert [s["accounted"] for s in steps] == [100, 10, 10]
    by_phase = {p["phase"]: p for p in cluster_bytes.phases(steps, "all-gather", 4)}
    assert by_phase["dense"]["implied"] == 300 and by_phase["dense"]["sent"] == 110
    assert by_phase["compressed"]["implied"] == 30
    assert by_phase["compressed"]["sent"] == pytest.approx(13.5)
    assert cluster_bytes.collective_factor("all-reduce", 2) == 1.0


def test_interface_counters_are_read_per_network_namespace():
    from lore_jax.training import metrics

    counters = metrics.interface_bytes()
    if not os.path.exists("/proc/net/dev"):
        assert counters is None
    else:
        assert all(isinstance(c, int) and c >= 0 for c in counters)


def test_the_readme_commands_are_valid_command_lines():
    """Every ``lore-jax`` line of the README's shell blocks parses, the job of a
    ``cluster`` line too (running them takes minutes: ``--check`` is run)."""
    import re
    import shlex
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    lines = [line.split(" #")[0].strip() for block in re.findall(r"```bash\n(.*?)```",
                                                                 readme, re.S)
             for line in block.splitlines()]
    commands = [shlex.split(line)[1:] for line in lines if line.startswith("lore-jax")]
    assert any(c[:1] == ["cluster"] for c in commands)
    parser = cli.build_parser()
    for argv in commands:
        if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
            argv = ["compare", *argv]
        args = parser.parse_args(argv or ["compare"])
        if args.command == "cluster" and not args.check:
            job = args.job[1:] if args.job[:1] == ["--"] else args.job
            parser.parse_args(job)
            cluster.lore_jax_command(job, args.nodes, args.devices_per_node)
    assert cli.main(["cluster", "--check"]) == (0 if REASON is None else 2)


def test_cluster_time_reads_time_to_target_from_a_run():
    """Time to target: launch to the end of the step of the first evaluation at or below
    the target, with the evaluations before it left out; the bandwidth model adds the
    ring collective's bytes at the link's rate."""
    from benchmarks import cluster_time

    run = {"steps": [1, 2, 3, 4], "wall_s": [10.0, 11.0, 14.0, 15.0],
           "step_time": [2.0, 1.0, 1.0, 1.0],
           "evals": [{"step": 2, "test_loss": 3.0, "eval_s": 2.0},
                     {"step": 4, "test_loss": 2.0, "eval_s": 2.0}]}
    assert cluster_time.time_to_target(run, 2.5) == (4, 13.0)
    assert cluster_time.time_to_target(run, 1.0) == (None, None)
    assert cluster_time.curve(run) == ([11.0, 13.0], [3.0, 2.0])
    assert cluster_time.median_step(run) == 1.0
    # 1 MB all-reduced on 2 nodes at 100 Mbit/s: 0.08 s; all-gathered on 4: 0.24 s.
    assert cluster_time.modelled_step(0.5, 1e6, "all-reduce", 2, "100mbit") == \
        pytest.approx(0.58)
    assert cluster_time.modelled_step(0.5, 1e6, "all-gather", 4, "100mbit") == \
        pytest.approx(0.74)
    assert cluster_time.modelled_step(0.5, 1e6, "all-gather", 4, "unshaped") == 0.5
