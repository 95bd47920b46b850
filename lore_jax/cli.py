"""The ``lore-jax`` command: train with a compressed gradient mean, or compare compressors.

Usage::

    lore-jax                                   # = lore-jax compare (digits, ~2 min on CPU)
    lore-jax train --task digits --compressor greedylore --rank 4 --devices 8 \\
        [--steps N --lr LR --optimizer adam|sgd --seed S --log FILE \\
         --checkpoint-dir DIR [--checkpoint-every K] --resume]
    lore-jax compare --task digits [--compressors dense,greedylore,powersgd,random --out DIR]
    lore-jax cluster --nodes 2 --rate 100mbit -- train --task lm ...  # an emulated cluster
    lore-jax train --compressor greedylore --tracking off ...   # the paper's GreedyLore
    lore-jax train --sync-every 25 --compressor greedylore ...  # DiLoCo, compressed rounds
    lore-jax train --task lm --compressor greedylore \\
        [--data FILE_OR_DIR --seq-len 64 --d-model 64 --heads 4 --layers 2]
    python -m lore_jax ...                     # the same

Tasks: digits, classification, regression, lm (a byte-level language model on real text,
by default the Python standard library's source with held-out files; ``--data`` a text
file or directory of your own), charlm (a bundled 8 KB text for fast tests: it is
memorised), mnist and cifar10 (``--data`` their files; nothing is downloaded). The
transformer's size (``--d-model``, ``--heads``, ``--layers``) applies to lm and charlm.

Devices: real accelerators (GPU/TPU) are used when present. Otherwise the command
simulates ``--devices`` CPU devices (default 8) by setting
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` before JAX starts (an existing
setting in ``XLA_FLAGS`` wins, except in a multi-process job given ``--devices``, whose
every process simulates its share); it also turns off XLA's concurrency-optimised CPU
scheduler, which can deadlock simulated devices (see :data:`CPU_SCHEDULER_FLAG`).

Multiple processes (``jax.distributed``): start the same command once per process with
``--coordinator HOST:PORT --num-processes P --process-id I`` (I = 0 .. P-1; process 0's
host runs the coordinator). ``--devices`` is the total over all processes; on CPU each
process simulates ``devices / P`` of them. Only process 0 prints and writes logs and
results; checkpoints are written by all processes together into a shared directory.
For example, on one machine::

    lore-jax train --devices 8 --coordinator localhost:12355 --num-processes 2 --process-id 0 &
    lore-jax train --devices 8 --coordinator localhost:12355 --num-processes 2 --process-id 1

A lost process: if one process of the job dies, every other one stops within seconds
(``--heartbeat-timeout``, default 10 s, bounds it) with one line on stderr naming the lost
process, the last step it finished and the newest checkpoint to resume from, and exits
with status 75 (``EX_TEMPFAIL``); restart every process with ``--resume``. To do this
each process runs the training in a child process that it watches
(:mod:`lore_jax.training.faults` says why).

An emulated cluster (:mod:`lore_jax.cluster`): ``lore-jax cluster --nodes P --rate R --
train ...`` runs the job as P processes on this machine, each in its own network
namespace, joined by links of rate R (``--up`` / ``--down`` for each way), fills in
``--coordinator``, ``--num-processes``, ``--process-id`` and ``--devices``, streams the
output, prints each node's bytes on the wire, and removes the network however the job
ends. It emulates bandwidth only (no latency or loss).

Errors a user can fix (unknown task or compressor, too few devices, a missing data file,
a checkpoint from another model, an existing checkpoint without ``--resume``) print one
line on stderr and exit with status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

from lore_jax.training import faults

EXIT_USAGE = 2
EXIT_SIGTERM = 143   # 128 + SIGTERM: stopped by a preemption notice with nothing saved
# Simulated CPU devices share one XLA thread pool. With the concurrency-optimised
# scheduler, batched LAPACK calls (GreedyLore's SVD refresh of several same-shape
# matrices) that fan out on that pool while other devices' threads wait in a collective
# occasionally deadlock; the plain scheduler avoided it in our runs at no measurable
# cost. It only affects the CPU backend.
CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
DEFAULT_SIMULATED_DEVICES = 8


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (raised, so :func:`main` reports them)."""

    def error(self, message: str):  # type: ignore[override]
        raise _UsageError(message)


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task and model")
    g.add_argument("--task", default="digits",
                   help="digits | classification | regression | lm | charlm | mnist | "
                        "cifar10 (default: digits). lm: byte-level language model on real "
                        "text (default: the Python standard library's source, held out by "
                        "file); charlm: a bundled 8 KB text, memorised, for fast tests")
    g.add_argument("--model", default=None,
                   help="mlp | cnn | transformer (default: the task's)")
    g.add_argument("--data", default=None, metavar="PATH",
                   help="data to read: a text file or a directory of text files (lm; "
                        "default: the Python standard library's source), a text file "
                        "(charlm), the MNIST IDX directory, the CIFAR-10 "
                        "'cifar-10-batches-py' directory; nothing is downloaded")
    g.add_argument("--hidden", default="256,256", metavar="W1,W2,...",
                   help="MLP hidden widths (default: 256,256)")
    g.add_argument("--seq-len", type=int, default=64,
                   help="lm bytes / charlm characters per example (default: 64)")
    g.add_argument("--d-model", type=int, default=64,
                   help="transformer width, lm and charlm (default: 64)")
    g.add_argument("--heads", type=int, default=4,
                   help="transformer attention heads; must divide --d-model (default: 4)")
    g.add_argument("--layers", type=int, default=2,
                   help="transformer blocks (default: 2)")

    g = p.add_argument_group("training")
    g.add_argument("--rank", type=int, default=4, help="rank of the low-rank compressors")
    g.add_argument("--devices", type=int, default=None,
                   help="devices on the data axis, over all processes (default: all "
                        "accelerators, or 8 simulated CPU devices)")
    g.add_argument("--steps", type=int, default=None, help="total steps (default: the task's)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="global batch, split over the devices (default: the task's)")
    g.add_argument("--lr", type=float, default=None, help="learning rate (default: the task's)")
    g.add_argument("--optimizer", default="adam", help="adam | sgd (default: adam)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default: 0.9)")
    g.add_argument("--schedule", default="cosine",
                   help="learning-rate schedule: cosine (decay to 0 at --steps) | constant "
                        "(default: cosine)")
    g.add_argument("--seed", type=int, default=0,
                   help="seeds initialisation, data order and compressors")
    g.add_argument("--update-interval", type=int, default=None,
                   help="GreedyLore: steps between subspace refreshes (default: 200 with "
                        "--tracking off, only the first one with tracking)")
    g.add_argument("--tracking", default="range", choices=("range", "off"),
                   help="GreedyLore's basis tracking: range (a warm-started range finder "
                        "every step) | off (the paper's GreedyLore) (default: range)")
    g.add_argument("--warmup-steps", type=int, default=0,
                   help="GreedyLore: dense steps before compressing (default: 0)")
    g.add_argument("--fraction", type=float, default=0.01,
                   help="topk: share of every leaf's entries sent (default: 0.01)")
    g.add_argument("--levels", type=int, default=7,
                   help="qsgd: quantization levels s, 1 + ceil(log2(s+1)) bits per entry "
                        "(default: 7, 4 bits)")
    g.add_argument("--error-feedback", default="ef14", choices=("ef14", "ef21", "none"),
                   help="error feedback of the compressors (default: ef14)")
    g.add_argument("--sync-every", type=int, default=None, metavar="H",
                   help="infrequent synchronisation (DiLoCo): H local steps per device, then "
                        "the pseudo-gradient's mean through --compressor and an outer SGD "
                        "step (default: average every step)")
    g.add_argument("--outer-lr", type=float, default=None,
                   help="with --sync-every: the outer SGD's learning rate (default: 0.7 "
                        "with --compressor dense, 1.0 with a compressed mean)")
    g.add_argument("--outer-momentum", type=float, default=None,
                   help="with --sync-every: the outer SGD's Nesterov momentum, 0 for none "
                        "(default: 0.9 with --compressor dense, 0 with a compressed mean, "
                        "whose error feedback takes its place)")
    g.add_argument("--eval-every", type=int, default=100,
                   help="evaluate on the test set every N steps (and at the end)")
    g.add_argument("--eval-examples", type=int, default=None, metavar="N",
                   help="evaluate on N test examples evenly spaced over the test set "
                        "(default: all of it)")
    g.add_argument("--target-loss", type=float, default=None, metavar="L",
                   help="stop after the first evaluation whose held-out loss is at most L")
    g.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    g.add_argument("--compilation-cache", default=None, metavar="DIR",
                   help="keep compiled programs in DIR so that a run of the same model "
                        "starts without compiling again (JAX caches process 0's programs "
                        "only: in a multi-process job the others compile every run); "
                        "'off' to disable (default: $XDG_CACHE_HOME/lore_jax/xla, else "
                        "~/.cache/lore_jax/xla)")

    g = p.add_argument_group("multiple processes (jax.distributed)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="address of process 0's coordinator service")
    g.add_argument("--num-processes", type=int, default=1, help="processes in the job")
    g.add_argument("--process-id", type=int, default=0, help="this process, 0 .. P-1")
    g.add_argument("--heartbeat-timeout", type=int, default=faults.HEARTBEAT_TIMEOUT_S,
                   metavar="S",
                   help="seconds without a heartbeat after which a process counts as lost "
                        "and the others stop (exit 75, one line naming it, the step and the "
                        "newest checkpoint) (default: %(default)s)")
    g.add_argument("--shutdown-timeout", type=int, default=faults.SHUTDOWN_TIMEOUT_S,
                   metavar="S",
                   help="seconds a finished process waits for the others at exit "
                        "(default: %(default)s)")
    g.add_argument("--init-timeout", type=int, default=faults.INIT_TIMEOUT_S, metavar="S",
                   help="seconds a starting process waits for all processes to connect "
                        "(default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    """The ``lore-jax`` argument parser (subcommands ``train``, ``compare``, ``cluster``)."""
    parser = _Parser(
        prog="lore-jax",
        description="Communication-efficient data-parallel training with lore_jax. "
                    "With no arguments: compare dense, GreedyLore, PowerSGD and random "
                    "projection on digits.",
        epilog="Multi-process: run the same command once per process with --coordinator "
               "HOST:PORT --num-processes P --process-id I.",
    )
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    train = sub.add_parser("train", help="train one model",
                           description="Train one model with one compressor.")
    _add_common(train)
    g = train.add_argument_group("compression, logs and checkpoints")
    g.add_argument("--compressor", default="greedylore",
                   help="dense | greedylore | powersgd | random | topk | qsgd | sign "
                        "(default: greedylore)")
    g.add_argument("--log", default=None, metavar="FILE", help="JSON-lines metrics log")
    g.add_argument("--checkpoint-dir", default=None, metavar="DIR",
                   help="save checkpoints here (at the end, and every --checkpoint-every)")
    g.add_argument("--checkpoint-every", type=int, default=None, metavar="K",
                   help="also checkpoint every K steps")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --checkpoint-dir")

    compare = sub.add_parser("compare", help="train with several compressors and compare",
                             description="Train the same task with several compressors; "
                                         "print a table, write compare.json and compare.png.")
    _add_common(compare)
    g = compare.add_argument_group("comparison")
    g.add_argument("--compressors", default="dense,greedylore,powersgd,random",
                   help="comma-separated list (default: dense,greedylore,powersgd,random)")
    g.add_argument("--out", default="lore_jax_compare", metavar="DIR",
                   help="where to write compare.json, compare.png and per-run logs "
                        "(default: ./lore_jax_compare)")

    cluster = sub.add_parser(
        "cluster", help="run a job on an emulated cluster of nodes joined by shaped links",
        description="Run one process per node of an emulated cluster on this machine: "
                    "network namespaces joined by links of a chosen rate (Linux; root, or "
                    "unprivileged user namespaces). Bandwidth is emulated, not latency or "
                    "loss. The job after '--' is a lore-jax command ('train ...' or "
                    "'compare ...', given --coordinator, --num-processes, --process-id and "
                    "--devices per node) or any command, whose {coordinator}, {process_id}, "
                    "{num_processes} and {address} are replaced per node.",
        epilog="Example: lore-jax cluster --nodes 2 --rate 100mbit -- train --task lm "
               "--compressor greedylore --no-progress")
    g = cluster.add_argument_group("the emulated cluster")
    g.add_argument("--nodes", type=int, default=2, help="nodes, one process each (default: 2)")
    g.add_argument("--rate", default=None, metavar="RATE",
                   help="every link's rate, both ways, in tc's units: 100mbit, 1gbit, "
                        "500kbit (default: unshaped)")
    g.add_argument("--up", default=None, metavar="RATE",
                   help="rate of what each node sends (default: --rate)")
    g.add_argument("--down", default=None, metavar="RATE",
                   help="rate of what each node receives (default: --rate)")
    g.add_argument("--devices-per-node", type=int, default=1, metavar="D",
                   help="devices each node's process simulates (lore-jax jobs; default: 1)")
    g.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="stop the nodes after S seconds (default: no limit)")
    g.add_argument("--log-dir", default=None, metavar="DIR",
                   help="also write node I's output to DIR/nodeI.log")
    g.add_argument("--check", action="store_true",
                   help="only say whether an emulated cluster can be made here")
    cluster.add_argument("job", nargs=argparse.REMAINDER,
                         help="-- then the job: train ... | compare ... | any command")
    return parser


def _run_cluster(args: argparse.Namespace) -> int:
    from lore_jax import cluster

    if args.check:
        reason = cluster.unavailable_reason()
        print(f"lore-jax: {reason}" if reason else "lore-jax: an emulated cluster can be made "
              "here.", file=sys.stderr if reason else sys.stdout)
        return EXIT_USAGE if reason else 0
    job = args.job[1:] if args.job[:1] == ["--"] else args.job
    if not job:
        raise _UsageError("cluster: give the job after '--', e.g. lore-jax cluster --nodes 2 "
                          "--rate 100mbit -- train --task lm.")
    if args.devices_per_node < 1:
        raise _UsageError(f"--devices-per-node must be at least 1, got "
                          f"{args.devices_per_node}.")
    try:
        command = (cluster.lore_jax_command(job, args.nodes, args.devices_per_node)
                   if job[0] in ("train", "compare") else job)
        result = cluster.run(command, nodes=args.nodes, rate=args.rate, up=args.up,
                             down=args.down, timeout=args.timeout, log_dir=args.log_dir)
    except cluster.ClusterError as e:
        raise _UsageError(str(e)) from None
    print(result.summary(), flush=True)
    if result.timed_out:
        return 124
    return next((c for c in result.returncodes if c), 0)


def _check_processes(args: argparse.Namespace) -> None:
    """The multi-process options, checked before anything starts."""
    if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
        raise _UsageError(f"--process-id must be in [0, {args.num_processes}) and "
                          f"--num-processes >= 1; got {args.process_id} and "
                          f"{args.num_processes}.")
    if args.num_processes > 1 and not args.coordinator:
        raise _UsageError("--num-processes > 1 needs --coordinator HOST:PORT.")
    for name in ("heartbeat_timeout", "shutdown_timeout", "init_timeout"):
        if getattr(args, name) < 1:
            raise _UsageError(f"--{name.replace('_', '-')} must be at least 1 second, got "
                              f"{getattr(args, name)}.")


def compilation_cache_dir(setting: str | None) -> str | None:
    """The persistent compilation cache's directory for ``--compilation-cache``
    (``None`` when it is ``"off"``)."""
    if setting is not None:
        return None if setting.lower() == "off" else os.path.expanduser(setting)
    root = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(root, "lore_jax", "xla")


def _setup_compilation_cache(args: argparse.Namespace) -> None:
    """JAX's persistent compilation cache (every program that takes 0.1 s or more to
    compile), through the environment so that a supervised child process uses it too.

    A multi-process job spends most of its start-up compiling (each process compiles
    the same programs on its share of the cores): a second run of the same model and
    options loads them instead. An existing ``JAX_COMPILATION_CACHE_DIR`` wins (an
    empty one turns the cache off), and nothing changes in a process that imported JAX
    before (``lore_jax.cli.main`` called from Python).
    """
    directory = compilation_cache_dir(args.compilation_cache)
    if directory is None or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    os.environ["JAX_COMPILATION_CACHE_DIR"] = directory
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")


def _setup_devices(args: argparse.Namespace) -> None:
    """Simulated CPU devices and jax.distributed, before JAX starts its backends."""
    total = args.devices or DEFAULT_SIMULATED_DEVICES
    if total % args.num_processes:
        raise _UsageError(f"--devices {total} is not divisible by --num-processes "
                          f"{args.num_processes}.")
    flags = os.environ.get("XLA_FLAGS", "")
    if args.num_processes > 1 and args.devices:
        # Every process of a job uses all its devices: its share of --devices, whatever
        # count XLA_FLAGS holds (a node of `lore-jax cluster` inherits the launcher's).
        flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", flags)
    if "xla_force_host_platform_device_count" not in flags:
        flags += f" --xla_force_host_platform_device_count={total // args.num_processes}"
    if "xla_cpu_enable_concurrency_optimized_scheduler" not in flags:
        flags += f" {CPU_SCHEDULER_FLAG}"
    os.environ["XLA_FLAGS"] = flags.strip()
    if args.coordinator:
        import jax

        # A process that cannot connect within the timeout is ended by JAX's client
        # from C++; the supervising parent reports it (faults.supervise).
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes,
                                   process_id=args.process_id,
                                   initialization_timeout=args.init_timeout,
                                   heartbeat_timeout_seconds=args.heartbeat_timeout,
                                   shutdown_timeout_seconds=args.shutdown_timeout)
        faults.report_connected()


def _config(args: argparse.Namespace, compressor: str):
    from lore_jax.training import TrainConfig

    try:
        hidden = tuple(int(w) for w in args.hidden.split(",") if w.strip())
    except ValueError:
        raise _UsageError(f"--hidden must be comma-separated integers, got "
                          f"{args.hidden!r}.") from None
    return TrainConfig(
        task=args.task, model=args.model, compressor=compressor, rank=args.rank,
        devices=args.devices, steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.lr, optimizer=args.optimizer, momentum=args.momentum,
        schedule=args.schedule,
        update_interval=args.update_interval, warmup_steps=args.warmup_steps,
        error_feedback=None if args.error_feedback == "none" else args.error_feedback,
        tracking=args.tracking, fraction=args.fraction, levels=args.levels,
        sync_every=args.sync_every, outer_learning_rate=args.outer_lr,
        outer_momentum=args.outer_momentum, seed=args.seed, hidden=hidden,
        data=args.data, seq_len=args.seq_len, d_model=args.d_model, num_heads=args.heads,
        num_layers=args.layers,
        eval_every=args.eval_every, eval_examples=args.eval_examples,
        target_loss=args.target_loss, progress=not args.no_progress,
        log=getattr(args, "log", None), checkpoint_dir=getattr(args, "checkpoint_dir", None),
        checkpoint_every=getattr(args, "checkpoint_every", None),
        resume=getattr(args, "resume", False),
    ).resolved()


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 110)


def _run_train(args: argparse.Namespace) -> None:
    import jax

    from lore_jax.training import train

    result = train(_config(args, args.compressor))
    if jax.process_index() == 0:
        s = result.summary
        acc = (f"  test accuracy {100 * s['test_accuracy']:.2f}%"
               if "test_accuracy" in s else "")
        comp = f"{s['compression']:.1f}x" if s["compression"] else "-"
        print(f"{result.config['compressor']} on {result.config['task']}: step {s['steps']}  "
              f"train loss {s['train_loss']:.4f}  test loss {s['test_loss']:.4f}{acc}  "
              f"bits sent {s['bits_sent']:.4g} ({comp} fewer than dense)  "
              f"time {s['time_s']:.1f}s")


def _run_compare(args: argparse.Namespace) -> None:
    import jax

    from lore_jax.training import compare as compare_lib

    names = [c.strip() for c in args.compressors.split(",") if c.strip()]
    main_process = jax.process_index() == 0
    results = compare_lib.compare(_config(args, names[0] if names else "dense"), names,
                                  args.out, main_process=main_process)
    if main_process:
        console = _console()
        console.print(compare_lib.results_table(results))
        console.print(f"wrote {os.path.join(args.out, 'compare.json')} and "
                      f"{os.path.join(args.out, 'compare.png')}")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``lore-jax`` command; returns the exit status.

    Args:
      argv: the arguments after the program name (default ``sys.argv[1:]``); empty means
        ``compare`` with its defaults.

    Returns:
      0 on success, and after SIGTERM once the checkpoint of the finished step is written;
      2 for a problem with the request (reported as one line on stderr); 143 after
      SIGTERM without ``--checkpoint-dir`` (nothing saved); 130 on Ctrl-C; 75
      (:data:`~lore_jax.training.faults.EXIT_PEER_LOST`) when another process of a
      multi-process job was lost (one line on stderr names it, the step and the newest
      checkpoint), or the processes did not all connect within ``--init-timeout``.
    """
    worker = faults.start_worker()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["compare", *argv]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "cluster":
            return _run_cluster(args)
        _check_processes(args)
        _setup_compilation_cache(args)
        if args.num_processes > 1 and not worker:
            return faults.supervise(argv, faults.Job(
                args.process_id, args.num_processes, args.coordinator, args.init_timeout,
                getattr(args, "checkpoint_dir", None)))
        _setup_devices(args)
        from lore_jax.training.errors import TrainingError
        from lore_jax.training.loop import Preempted

        try:
            (_run_train if args.command == "train" else _run_compare)(args)
        except TrainingError as e:
            raise _UsageError(str(e)) from None
        except Preempted as e:
            print(f"lore-jax: {e}", file=sys.stderr)
            return 0 if e.checkpoint else EXIT_SIGTERM
        except faults.PeerLost as e:
            faults.leave_lost(e, getattr(args, "checkpoint_dir", None))
    except _UsageError as e:
        print(f"lore-jax: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lore-jax: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
