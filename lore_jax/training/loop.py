"""One training run, start to finish: config, data, model, optimizer, loop, evaluation, checkpoint.

Example:
  >>> from lore_jax.training import TrainConfig, train
  >>> result = train(TrainConfig(task="digits", compressor="greedylore", rank=4,
  ...                            steps=50, progress=False))          # doctest: +SKIP
  >>> result.summary["test_accuracy"], result.summary["compression"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lore_jax import _xla, accounting, layout
from lore_jax.data_parallel import DataParallel, data_parallel
from lore_jax.training import data as data_lib
from lore_jax.training import faults, models, optimizers, tasks
from lore_jax.training import metrics as metrics_lib
from lore_jax.training.checkpoint import Checkpointer, CheckpointError, UnreadableCheckpoint
from lore_jax.training.errors import TrainingError

AXIS = "data"
# Config fields whose command-line flag is not ``--`` + the name with dashes.
FLAGS = {"num_heads": "--heads", "num_layers": "--layers", "learning_rate": "--lr",
         "outer_learning_rate": "--outer-lr"}


@dataclasses.dataclass
class TrainConfig:
    """Everything a run depends on. ``None`` fields take the task's defaults (:data:`tasks.TASKS`).

    Attributes:
      task: a name in :data:`tasks.TASKS`.
      model: ``"mlp"``, ``"cnn"`` or ``"transformer"``.
      compressor: a name in :data:`optimizers.COMPRESSORS` (``"dense"``, ``"greedylore"``,
        ``"powersgd"``, ``"random"``, ``"topk"``, ``"qsgd"``, ``"sign"``).
      rank: rank of the low-rank compressors.
      devices: devices on the data axis (``None``: all).
      steps: total optimizer steps (a resumed run continues up to this number).
      batch_size: global batch, split evenly over the devices.
      learning_rate, optimizer, momentum: the base optimizer (``"adam"`` or ``"sgd"``).
      schedule: ``"cosine"`` (decay to 0 at ``steps``; a resumed run with a different
        ``steps`` follows the new schedule) or ``"constant"``.
      update_interval, warmup_steps, error_feedback: GreedyLore / error-feedback settings
        (``update_interval=None``: GreedyLore's default for its ``tracking``).
      tracking: GreedyLore's basis tracking, ``"range"`` (the default) or ``"off"`` (the
        paper's). See :func:`lore_jax.greedylore`.
      fraction: top-k's share of every leaf's entries.
      levels: QSGD's levels.
      sync_every, outer_learning_rate, outer_momentum: infrequent synchronisation
        (:func:`lore_jax.diloco`): ``sync_every`` local steps per round (``None``: average
        every step), then the pseudo-gradient's mean through the compressor and an outer
        SGD step with this learning rate and Nesterov momentum (0: none); ``None``: 0.7
        and 0.9 (DiLoCo's) with the dense mean, 1.0 and 0 with a compressed one, whose
        error feedback takes the momentum's place (SparseLoCo's).
      seed: seeds the initialisation, the data order and the compressors' keys.
      hidden: MLP hidden widths.
      d_model, num_heads, num_layers: the transformer's width, attention heads and
        blocks (``lm`` and ``charlm``; ``d_model`` divisible by ``num_heads``).
      data: a file or directory for tasks that read one.
      seq_len: tokens per example of ``lm`` and ``charlm``.
      eval_every: evaluate on the test set every this many steps (and at the end).
      eval_examples: evaluate on this many test examples, evenly spaced over the test
        set (``None``: all of it; :meth:`~lore_jax.training.data.Dataset.test_subset`).
      target_loss: stop after the first evaluation whose held-out loss is at most this
        (a ``"target"`` record in the log; checkpointed like the last step).
      log: a JSON-lines file for the metrics.
      checkpoint_dir: where to save checkpoints (at the end, and every
        ``checkpoint_every`` steps when set).
      resume: continue from the newest checkpoint in ``checkpoint_dir``.
      progress: show a progress bar on stderr.
    """

    task: str = "digits"
    model: str | None = None
    compressor: str = "greedylore"
    rank: int = 4
    devices: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    optimizer: str = "adam"
    momentum: float = 0.9
    schedule: str = "cosine"
    update_interval: int | None = None
    warmup_steps: int = 0
    error_feedback: str | None = "ef14"
    tracking: str = "range"
    fraction: float = 0.01
    levels: int = 7
    sync_every: int | None = None
    outer_learning_rate: float | None = None
    outer_momentum: float | None = None
    seed: int = 0
    hidden: Sequence[int] = (256, 256)
    d_model: int = 64
    num_heads: int = 4
    num_layers: int = 2
    data: str | None = None
    seq_len: int = 64
    eval_every: int = 100
    eval_examples: int | None = None
    target_loss: float | None = None
    log: str | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    resume: bool = False
    progress: bool = True

    def resolved(self) -> TrainConfig:
        """A copy with the task's defaults filled in and every option checked."""
        for name, choices in (("task", tasks.TASKS), ("compressor", optimizers.COMPRESSORS),
                              ("schedule", optimizers.SCHEDULES),
                              ("optimizer", optimizers.OPTIMIZERS),
                              ("tracking", optimizers.TRACKING)):
            if getattr(self, name) not in choices:
                raise TrainingError(f"unknown {name} {getattr(self, name)!r}; choose one of "
                                    f"{', '.join(c for c in choices if c)}.")
        d = tasks.TASKS[self.task]
        out = dataclasses.replace(
            self, model=self.model or d.model, steps=self.steps or d.steps,
            batch_size=self.batch_size or d.batch_size,
            learning_rate=self.learning_rate or d.learning_rate, hidden=tuple(self.hidden))
        dense = self.compressor == "dense"
        if out.outer_learning_rate is None:
            out = dataclasses.replace(out, outer_learning_rate=0.7 if dense else 1.0)
        if out.outer_momentum is None:
            out = dataclasses.replace(out, outer_momentum=0.9 if dense else 0.0)
        for name in ("rank", "steps", "batch_size", "update_interval", "seq_len",
                     "eval_examples", "sync_every"):
            if getattr(out, name) is not None and getattr(out, name) < 1:
                raise TrainingError(f"--{name.replace('_', '-')} must be at least 1, got "
                                    f"{getattr(out, name)}.")
        tasks.check_transformer_size(out.d_model, out.num_heads, out.num_layers)
        if out.devices is not None and out.devices < 1:
            raise TrainingError(f"--devices must be at least 1, got {out.devices}.")
        if out.resume and not out.checkpoint_dir:
            raise TrainingError("--resume needs --checkpoint-dir DIR.")
        return out

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}


@dataclasses.dataclass
class RunResult:
    """What a run produced.

    Attributes:
      config: the resolved configuration (JSON-able).
      history: one ``"train"`` record per step (see :mod:`metrics`).
      evals: the ``"eval"`` records.
      summary: final ``test_loss``, ``test_accuracy`` (when it applies), ``train_loss``,
        ``bits_sent``, ``bits_dense``, ``compression`` (dense / sent), ``time_s`` (training
        steps, compilation excluded), ``compile_s``, ``steps``, ``start_step``.
    """

    config: dict[str, Any]
    history: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    summary: dict[str, Any]


def make_mesh(devices: int | None) -> jax.sharding.Mesh:
    """A one-axis ``"data"`` mesh over the first ``devices`` devices (all by default).

    Raises:
      TrainingError: more devices asked for than exist.
    """
    available = jax.devices()
    n = len(available) if devices is None else devices
    if n > len(available):
        raise TrainingError(
            f"--devices {n} asked for, but only {len(available)} {available[0].platform} "
            f"device(s) are available; ask for at most {len(available)}.")
    if jax.process_count() > 1 and n != len(available):
        raise TrainingError(f"a multi-process run uses every device ({len(available)}); got "
                            f"--devices {n}.")
    return jax.make_mesh((n,), (AXIS,), devices=available[:n])


_INIT_CACHE: dict[tuple, Any] = {}


def _initial_params(cfg: TrainConfig, dataset: data_lib.Dataset, new_model) -> Any:
    """The model's initial parameters as host arrays, reused by runs that share them.

    Initialisation depends only on the model, its input shape and the seed; compiling
    it costs seconds on CPU (one threefry program per initialiser), so a comparison of
    compressors, or a test suite, pays it once per model.
    """
    key = (cfg.model, tuple(cfg.hidden), cfg.d_model, cfg.num_heads, cfg.num_layers, cfg.seed,
           dataset.input_shape, dataset.num_outputs)
    if key not in _INIT_CACHE:
        if len(_INIT_CACHE) >= 8:
            _INIT_CACHE.clear()
        _INIT_CACHE[key] = jax.device_get(models.create(new_model)[1])
    return _INIT_CACHE[key]


def _reached(record: dict[str, Any], target: float | None) -> bool:
    """Whether an evaluation record reached the held-out ``target`` loss."""
    return target is not None and record["test_loss"] <= target


class _Startup:
    """Seconds each start-up phase of a run took (``mark`` ends one), and the launch."""

    def __init__(self) -> None:
        self.launch = metrics_lib.launch_time()
        self.phases: dict[str, float] = {"before_run_s": time.time() - self.launch}
        self._t = time.perf_counter()

    def mark(self, name: str) -> float:
        now = time.perf_counter()
        self.phases[name], self._t = now - self._t, now
        return self.phases[name]


class _NetCounters:
    """This process's interface byte counters since the first step (multi-process runs)."""

    def __init__(self, enabled: bool) -> None:
        self._start = metrics_lib.interface_bytes() if enabled else None

    def since_start(self) -> dict[str, int]:
        now = metrics_lib.interface_bytes() if self._start is not None else None
        if now is None:
            return {}
        return {"net_sent_bytes": now[0] - self._start[0],
                "net_received_bytes": now[1] - self._start[1]}


#: Options a resumed run must share with its checkpoint: they change what the saved
#: state means (the compressor's, the optimizer's, the data order and the corpus) without
#: changing its shapes. ``--steps`` may change (a run is continued to more steps), and so
#: may ``--eval-every``, ``--checkpoint-every``, ``--log`` and ``--progress``.
RESUME_SETTINGS = ("task", "model", "data", "seq_len", "compressor", "rank", "optimizer",
                   "learning_rate", "momentum", "schedule", "batch_size", "seed",
                   "error_feedback", "update_interval", "warmup_steps", "tracking",
                   "sync_every", "outer_learning_rate", "outer_momentum")
#: Options of one compressor that a resumed run must share when it uses that compressor.
COMPRESSOR_SETTINGS = {"topk": ("fraction",), "qsgd": ("levels",)}


def _resume_settings(cfg: TrainConfig) -> dict[str, Any]:
    """:data:`RESUME_SETTINGS` of this run, its compressor's own options and the
    transformer's size (the number of heads changes what it computes, not its
    parameters' shapes), as the checkpoint stores them."""
    names = list(RESUME_SETTINGS) + list(COMPRESSOR_SETTINGS.get(cfg.compressor, ()))
    if cfg.model == "transformer":
        names += ["d_model", "num_heads", "num_layers"]
    config = cfg.to_json()
    return {k: config[k] for k in names}


class Preempted(Exception):  # noqa: N818 (a stop, not an error)
    """Training stopped on SIGTERM (a preemption notice) after finishing step ``step``.

    Attributes:
      step: the last finished step.
      checkpoint: the directory of the checkpoint written for it, or ``None`` when the
        run has no ``checkpoint_dir``.
    """

    def __init__(self, step: int, checkpoint: str | None):
        self.step, self.checkpoint = step, checkpoint
        saved = (f"checkpoint {checkpoint} written; continue with --resume"
                 if checkpoint else "no --checkpoint-dir, so nothing was saved")
        super().__init__(f"stopped by SIGTERM after step {step}: {saved}")


@contextlib.contextmanager
def _preemption_notice():
    """Yields ``stop(step) -> bool``: whether to stop after ``step`` for a preemption.

    One process: a SIGTERM handler (installed for the run, the previous one restored)
    sets a flag, read after every step. Several processes (``jax.distributed``): JAX's
    preemption service, which hears SIGTERM on any process and makes every process stop
    after the same step (``multihost_utils.reached_preemption_sync_point``).
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        available = [True]

        def synced(step: int) -> bool:
            if not available[0]:
                return False
            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:   # the preemption service is switched off
                available[0] = False
                return False

        yield synced
        return
    if threading.current_thread() is not threading.main_thread():
        yield lambda step: False   # signal handlers live in the main thread only
        return
    heard = [False]

    def on_sigterm(signum, frame):
        del signum, frame
        heard[0] = True

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield lambda step: heard[0]
    finally:
        signal.signal(signal.SIGTERM, previous)


def _restore_newest_readable(ckpt: Checkpointer, params: Any, opt_state: Any,
                             settings: dict[str, Any]) -> tuple[int, dict[str, Any], tuple]:
    """Restores the newest checkpoint that can be read, after checking that it fits.

    A damaged one (files cut short, unreadable metadata) is skipped with one line on
    stderr naming it and the one tried next, and once an older one is restored it is
    renamed ``damaged-STEP`` (kept, out of the way of the run that saves that step
    again); a checkpoint that does not fit the run (another setting, model or
    optimizer) is refused, not skipped.

    Returns:
      ``(step, meta, (params, opt_state))``.

    Raises:
      CheckpointError: a checkpoint that does not fit, or none that can be read.
    """
    steps = ckpt.steps()
    for i, step in enumerate(steps):
        try:
            meta = ckpt.check(step, params, opt_state, settings, flags=FLAGS)
            restored = ckpt.restore(step, params, opt_state)
            for damaged in steps[:i]:
                ckpt.set_aside(damaged)
            return step, meta, restored
        except UnreadableCheckpoint as e:
            if i + 1 == len(steps):
                raise CheckpointError(f"no checkpoint in {ckpt.directory} can be read; the "
                                      f"oldest failed with: {e}") from None
            if jax.process_index() == 0:
                print(f"lore-jax: warning: {e}; trying {ckpt.directory / str(steps[i + 1])} "
                      f"(a damaged checkpoint is kept as damaged-STEP).", file=sys.stderr)
    raise CheckpointError(f"no checkpoint in {ckpt.directory}.")


def train(config: TrainConfig) -> RunResult:
    """Runs (or resumes) one training run and returns its metrics.

    The same call runs on every process of a ``jax.distributed`` job; only process 0
    writes logs and shows progress.

    On SIGTERM (a scheduler's preemption notice) the run finishes its current step,
    writes a checkpoint of it (with ``checkpoint_dir``), logs a ``"preempted"`` record
    and raises :class:`Preempted`; ``--resume`` continues from it bit for bit. The grace
    period this needs is one step plus one checkpoint write.

    In a multi-process run, a collective or the distributed runtime failing because
    another process is gone raises :class:`~lore_jax.training.faults.PeerLost` (the
    last finished step and the error's first line). Each finished step is reported to a
    supervising ``lore-jax`` parent process, if there is one
    (:func:`~lore_jax.training.faults.supervise`).

    Raises:
      TrainingError: bad options, missing data, too few devices, or a checkpoint that
        does not fit (checked before anything is written).
      Preempted: SIGTERM arrived (see above).
      PeerLost: another process of the job was lost.
    """
    done: list[int] = []   # the last finished step, for PeerLost
    try:
        with _xla.blas_single_threaded(), _preemption_notice() as stop:
            return _train(config.resolved(), stop, done)
    except Exception as e:
        if jax.process_count() > 1 and faults.is_peer_failure(e):
            raise faults.PeerLost(done[-1] if done else None, faults.first_line(e)) from e
        raise


def _train(cfg: TrainConfig, stop=lambda step: False,
           done: list[int] | None = None) -> RunResult:
    def finished(step: int) -> None:
        if done is not None:
            done[:] = [step]
        faults.report_step(step)

    startup = _Startup()
    ckpt, latest = _open_checkpoints(cfg)   # refuse to overwrite before anything else
    mesh, dataset = _devices_and_data(cfg)
    startup.mark("data_s")
    setup = _setup(cfg, mesh, dataset)
    start, position, params, opt_state = _restore_or_init(cfg, setup, ckpt, latest)
    if start:
        finished(start)
    startup.mark("init_s")
    first = tuple(a[:cfg.batch_size] for a in (dataset.x_train, dataset.y_train))
    setup.train.lower(params, opt_state, first).compile()   # the step reuses it
    startup.mark("compile_s")
    faults.wait_for_every_process("compiled")   # before the step's first collective
    startup.mark("wait_s")   # for the processes still compiling (0 in a single process)
    run = _Run(cfg, setup, ckpt, _open_log(cfg, start, setup, startup), startup,
               data_lib.BatchStream(dataset.x_train, dataset.y_train, cfg.batch_size,
                                    cfg.seed, position),
               dataset.test_subset(cfg.eval_examples), params, opt_state, start, start,
               comm=accounting.communication(opt_state),
               net=_NetCounters(jax.process_count() > 1))
    _loop(run, stop, finished)
    return _finish(run)


class _Setup(NamedTuple):
    """What a run trains with."""

    mesh: jax.sharding.Mesh
    dataset: data_lib.Dataset
    new_model: Callable[[], Any]
    params: Any
    """The model's parameters as ``jax.ShapeDtypeStruct`` leaves."""
    tx: optax.GradientTransformation
    train: DataParallel


@dataclasses.dataclass
class _Run:
    """A run's pieces, and its state and records as the loop advances them."""

    cfg: TrainConfig
    setup: _Setup
    ckpt: Checkpointer | None
    log: metrics_lib.JsonLogger
    startup: _Startup
    stream: data_lib.BatchStream
    eval_set: tuple[np.ndarray, np.ndarray]
    params: Any
    opt_state: Any
    start: int
    step: int
    """The last finished step."""
    comm: dict[str, int]
    net: _NetCounters
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    evals: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    train_time: float = 0.0


def _open_checkpoints(cfg: TrainConfig) -> tuple[Checkpointer | None, int | None]:
    """The run's checkpointer and its newest step; refuses to overwrite a checkpoint."""
    if not cfg.checkpoint_dir:
        return None, None
    ckpt = Checkpointer(cfg.checkpoint_dir)
    latest = ckpt.latest_step()
    if latest is not None and not cfg.resume:
        raise CheckpointError(
            f"{ckpt.directory} already holds a checkpoint (step {latest}); pass --resume "
            f"to continue it, or choose another --checkpoint-dir.")
    ckpt.check_writable()
    if latest is None and cfg.resume and jax.process_index() == 0:
        print(f"lore-jax: --resume: no checkpoint in {ckpt.directory}; starting from "
              f"step 0.", file=sys.stderr)
    return ckpt, latest


def _devices_and_data(cfg: TrainConfig) -> tuple[jax.sharding.Mesh, data_lib.Dataset]:
    """The mesh and the dataset, with the global batch checked against both."""
    mesh = make_mesh(cfg.devices)
    n_dev = mesh.shape[AXIS]
    dataset = tasks.load_data(cfg.task, cfg.data, cfg.seq_len)
    if cfg.batch_size % n_dev:
        raise TrainingError(f"--batch-size {cfg.batch_size} is not divisible by the "
                            f"{n_dev} devices; use a multiple of {n_dev}.")
    if cfg.batch_size > len(dataset.x_train):
        raise TrainingError(f"--batch-size {cfg.batch_size} exceeds the "
                            f"{len(dataset.x_train)} training examples.")
    return mesh, dataset


def _setup(cfg: TrainConfig, mesh: jax.sharding.Mesh, dataset: data_lib.Dataset) -> _Setup:
    """The model (shapes only), the optimizer chain and the data-parallel step."""
    tasks.check_model(cfg.model, dataset)

    def new_model():
        return tasks.make_model(cfg.model, dataset, cfg.seed, cfg.hidden,
                                d_model=cfg.d_model, num_heads=cfg.num_heads,
                                num_layers=cfg.num_layers)

    apply_fn, params = models.abstract(new_model)
    tx = optimizers.make_optimizer(
        cfg.compressor, rank=cfg.rank, optimizer=cfg.optimizer,
        learning_rate=cfg.learning_rate, momentum=cfg.momentum, schedule=cfg.schedule,
        total_steps=cfg.steps, axis_name=AXIS, update_interval=cfg.update_interval,
        warmup_steps=cfg.warmup_steps, error_feedback=cfg.error_feedback, seed=cfg.seed,
        tracking=cfg.tracking, fraction=cfg.fraction, levels=cfg.levels,
        sync_every=cfg.sync_every, outer_learning_rate=cfg.outer_learning_rate,
        outer_momentum=cfg.outer_momentum)
    train = data_parallel(tasks.loss_fn(dataset.kind, apply_fn), tx, mesh, axis_name=AXIS,
                          has_aux=True)
    return _Setup(mesh, dataset, new_model, params, tx, train)


def _on_mesh(tree: Any, specs: Any, mesh: jax.sharding.Mesh) -> Any:
    """``jax.ShapeDtypeStruct`` leaves carrying ``NamedSharding(mesh, spec)`` layouts."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
        tree, specs, is_leaf=lambda x: isinstance(x, P))


def _restore_or_init(cfg: TrainConfig, setup: _Setup, ckpt: Checkpointer | None,
                     latest: int | None) -> tuple[int, data_lib.DataPosition, Any, Any]:
    """``(step, data position, params, opt_state)``: restored from the newest checkpoint
    that fits, or the initial ones (replicated copies: the step donates them)."""
    mesh = setup.mesh
    if latest is None:
        params = jax.tree.map(lambda x: layout.global_array(np.array(x, copy=True), mesh, P()),
                              _initial_params(cfg, setup.dataset, setup.new_model))
        return 0, data_lib.DataPosition(0, 0), params, setup.train.init(params)
    opt_state = jax.eval_shape(lambda p: layout.sharded_init(setup.tx, p, mesh, AXIS),
                               setup.params)
    start, meta, (params, opt_state) = _restore_newest_readable(
        ckpt, _on_mesh(setup.params, jax.tree.map(lambda _: P(), setup.params), mesh),
        _on_mesh(opt_state, layout.state_specs(opt_state, AXIS), mesh), _resume_settings(cfg))
    return start, data_lib.DataPosition(*meta["position"]), params, opt_state


def _open_log(cfg: TrainConfig, start: int, setup: _Setup,
              startup: _Startup) -> metrics_lib.JsonLogger:
    """The JSON-lines log, its ``"config"`` record written.

    A resumed run's log continues after the restored step: records of the interrupted
    run past it are dropped, so every step appears once.
    """
    log = metrics_lib.JsonLogger(cfg.log, append=start > 0, enabled=jax.process_index() == 0,
                                 after_step=start if start > 0 else None)
    log.write({"event": "config", **cfg.to_json(), "start_step": start,
               "devices": setup.mesh.shape[AXIS], "processes": jax.process_count(),
               "backend": jax.default_backend(), "compile_s": startup.phases["compile_s"],
               "startup": startup.phases, "startup_s": time.time() - startup.launch,
               "data": tasks.describe(setup.dataset)})
    return log


def _loop(run: _Run, stop, finished) -> None:
    """Steps up to ``steps``: evaluates, checkpoints, stops at the target or on SIGTERM."""
    cfg = run.cfg
    with metrics_lib.progress_bar(cfg.progress and jax.process_index() == 0) as bar:
        task_id = bar.add_task(f"{cfg.compressor} {cfg.task}", total=cfg.steps,
                               completed=run.start, status="")
        for step in range(run.start + 1, cfg.steps + 1):
            record = _train_step(run, step)
            finished(step)
            reached = ((step % cfg.eval_every == 0 or step == cfg.steps)
                       and _reached(_evaluate_and_log(run), cfg.target_loss))
            preempted = step < cfg.steps and not reached and stop(step)
            if run.ckpt is not None and (step == cfg.steps or reached or preempted or (
                    cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
                run.ckpt.save(step, run.params, run.opt_state, {
                    "position": list(run.stream.position), "config": cfg.to_json()})
            if preempted:
                _stop_for_preemption(run)
            ratio = run.comm["bits_dense"] / max(run.comm["bits_sent"], 1)
            bar.update(task_id, advance=1,
                       status=f"loss {record['loss']:.4f}  {ratio:.1f}x fewer bits")
            if reached:
                run.log.write({"event": "target", "step": step, "target_loss": cfg.target_loss,
                               "test_loss": run.evals[-1]["test_loss"],
                               "wall_s": record["wall_s"]})
                break


def _train_step(run: _Run, step: int) -> dict[str, Any]:
    """One step on the next batch; returns (and logs) its ``"train"`` record."""
    batch = tuple(layout.global_array(a, run.setup.mesh, P(AXIS)) for a in next(run.stream))
    t = time.perf_counter()
    run.params, run.opt_state, loss, aux = run.setup.train.step(run.params, run.opt_state,
                                                                batch)
    metrics = tasks.weighted_means(loss, aux)
    dt = time.perf_counter() - t
    run.train_time += dt
    run.step, run.comm = step, accounting.communication(run.opt_state)
    record = {"event": "train", "step": step, **metrics, **run.comm, "step_time": dt,
              "wall_s": time.time() - run.startup.launch, **run.net.since_start()}
    run.history.append(record)
    run.log.write(record)
    return record


def evaluate(train: DataParallel, params: Any, x: np.ndarray, y: np.ndarray, devices: int,
             chunk: int = 1024) -> dict[str, float]:
    """Mean loss (and accuracy) of ``params`` on a host dataset, in padded chunks.

    Args:
      train: a :func:`lore_jax.data_parallel` of :func:`tasks.loss_fn` (``has_aux``).
      params: the parameters.
      x: the evaluation set's inputs (host arrays, ``n`` rows).
      y: its targets.
      devices: the size of the data axis.
      chunk: examples per call, rounded up to a multiple of ``devices``; the last chunk
        is padded with examples of weight 0.

    Returns:
      ``{"loss": ..., "accuracy": ...}`` as Python floats (no accuracy for regression).
    """
    chunk = -(-min(chunk, len(x)) // devices) * devices
    totals = None
    for start in range(0, len(x), chunk):
        xb, yb = x[start:start + chunk], y[start:start + chunk]
        pad = chunk - len(xb)
        weights = np.concatenate([np.ones(len(xb), np.float32), np.zeros(pad, np.float32)])
        xb, yb = (np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) for a in (xb, yb))
        out = jax.tree.map(float, jax.device_get(train.evaluate(params, (xb, yb, weights))))
        totals = out if totals is None else jax.tree.map(lambda a, b: a + b, totals, out)
    return tasks.weighted_means(*totals)


def _evaluate_and_log(run: _Run) -> dict[str, Any]:
    """Evaluates the current parameters; returns (and logs) the ``"eval"`` record."""
    t = time.perf_counter()
    m = evaluate(run.setup.train, run.params, *run.eval_set, run.setup.mesh.shape[AXIS])
    record = {"event": "eval", "step": run.step, **{f"test_{k}": v for k, v in m.items()},
              "eval_s": time.perf_counter() - t}
    run.evals.append(record)
    run.log.write(record)
    return record


def _stop_for_preemption(run: _Run) -> None:
    """Logs the ``"preempted"`` record, closes the log and checkpoints, and raises."""
    where = str(run.ckpt.directory / str(run.step)) if run.ckpt is not None else None
    run.log.write({"event": "preempted", "step": run.step, "checkpoint": where})
    run.log.close()
    if run.ckpt is not None:
        run.ckpt.close()
    raise Preempted(run.step, where)


def _finish(run: _Run) -> RunResult:
    """The final evaluation (unless the last step had one) and the summary."""
    final = (run.evals[-1] if run.evals and run.evals[-1]["step"] == run.step
             else _evaluate_and_log(run))
    if run.ckpt is not None:
        run.ckpt.close()
    comm = run.comm
    summary = {
        "steps": run.step, "start_step": run.start, "devices": run.setup.mesh.shape[AXIS],
        "processes": jax.process_count(),
        "train_loss": run.history[-1]["loss"] if run.history else None,
        **{k: v for k, v in final.items() if k.startswith("test_")},
        "bits_sent": comm["bits_sent"], "bits_dense": comm["bits_dense"],
        "compression": comm["bits_dense"] / comm["bits_sent"] if comm["bits_sent"] else None,
        "time_s": run.train_time, "compile_s": run.startup.phases["compile_s"],
    }
    run.log.write({"event": "summary", **summary})
    run.log.close()
    return RunResult(run.cfg.to_json(), run.history, run.evals, summary)
