"""The shard_map training step, evaluation, checkpoints/resume and multi-process runs."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import lore_jax
from lore_jax import collectives, compressors
from lore_jax.training import TrainConfig, TrainingError, models, tasks, train
from lore_jax.training.checkpoint import CheckpointError
from lore_jax.training.loop import evaluate
from lore_jax.training.metrics import read_log

REPO = Path(__file__).resolve().parents[1]

# Small, quick runs: a 32-32 MLP on digits, GreedyLore refreshing every 6 steps after 2
# warm-up steps, so that a resume at step 8 lands between refreshes.
SMALL = dict(task="digits", compressor="greedylore", rank=2, hidden=(32, 32), batch_size=32,
             update_interval=6, warmup_steps=2, optimizer="sgd", learning_rate=0.05,
             eval_every=1000, progress=False)


def _losses(result):
    return [h["loss"] for h in result.history]


# --------------------------------------------------------------------------- the step


def _dense_mean():
    return lore_jax.compressed_mean(compressors.identity(), error_feedback=None)


def test_sharded_step_equals_full_batch_step(mesh):
    """8 devices with a mean all-reduce = one device on the whole batch."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 6)).astype(np.float32)
    y = rng.integers(0, 3, 32).astype(np.int32)
    apply_fn, params0 = models.create(lambda: models.MLP(6, (16,), 3, rngs=nnx.Rngs(0)))
    tx = optax.chain(_dense_mean(), optax.sgd(0.5))
    train_ = lore_jax.data_parallel(tasks.loss_fn("classification", apply_fn), tx, mesh,
                                    has_aux=True)
    params, opt_state = params0, train_.init(params0)

    def ref_loss(p):
        logits = apply_fn(p, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    ref, ref_tx = params0, optax.sgd(0.5)
    ref_state = ref_tx.init(ref)
    for _ in range(3):
        loss, grads = jax.value_and_grad(ref_loss)(ref)
        accuracy = np.mean(np.argmax(apply_fn(ref, x), -1) == y)
        params, opt_state, *out = train_.step(params, opt_state, (x, y))
        metrics = tasks.weighted_means(*out)
        np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
        np.testing.assert_allclose(metrics["accuracy"], accuracy, rtol=1e-6)
        updates, ref_state = ref_tx.update(grads, ref_state, ref)
        ref = optax.apply_updates(ref, updates)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 params, ref)
    # The dense baseline counts one float32 all-reduce of every gradient per step.
    n_params = sum(v.size for v in jax.tree.leaves(params0))
    assert lore_jax.communication(opt_state) == {"bits_sent": 3 * 32 * n_params,
                                                 "bits_dense": 3 * 32 * n_params}


@pytest.mark.parametrize("kind", ["classification", "regression", "language_model"])
def test_evaluate_pads_uneven_test_sets(mesh, kind):
    """13 examples in chunks of 8 on 8 devices: the weighted means equal NumPy's."""
    rng = np.random.default_rng(1)
    if kind == "language_model":
        x = rng.integers(0, 7, (13, 5)).astype(np.int32)
        y = rng.integers(0, 7, (13, 5)).astype(np.int32)
        apply_fn, params = models.create(lambda: models.CharTransformer(
            7, 5, d_model=8, num_heads=2, num_layers=1, rngs=nnx.Rngs(1)))
    else:
        x = rng.standard_normal((13, 5)).astype(np.float32)
        y = (rng.integers(0, 4, 13).astype(np.int32) if kind == "classification"
             else rng.standard_normal((13, 4)).astype(np.float32))
        apply_fn, params = models.create(lambda: models.MLP(5, (8,), 4, rngs=nnx.Rngs(1)))
    tx = optax.chain(_dense_mean(), optax.sgd(0.1))
    train_ = lore_jax.data_parallel(tasks.loss_fn(kind, apply_fn), tx, mesh, has_aux=True)
    out = evaluate(train_, params, x, y, 8, chunk=8)
    outputs = np.asarray(apply_fn(params, x), np.float64)
    if kind == "regression":
        np.testing.assert_allclose(out["loss"], np.mean(np.sum((outputs - y) ** 2, -1)),
                                   rtol=1e-5)
        assert "accuracy" not in out
        return
    shifted = outputs - outputs.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_p, y[..., None], -1)[..., 0]
    np.testing.assert_allclose(out["loss"], nll.mean(), rtol=1e-5)
    np.testing.assert_allclose(out["accuracy"], (outputs.argmax(-1) == y).mean(), rtol=1e-6)


def test_models_shapes_and_causality():
    apply_cnn, cnn = models.split(nnx.eval_shape(lambda: models.CNN(1, 10, rngs=nnx.Rngs(0))))
    assert jax.eval_shape(apply_cnn, cnn, jnp.zeros((2, 28, 28, 1))).shape == (2, 10)
    apply_lm, lm = models.create(lambda: models.CharTransformer(
        11, 16, d_model=32, num_heads=4, num_layers=1, rngs=nnx.Rngs(0)))
    assert all(isinstance(k, str) for k in lm)
    tokens = jnp.array(np.random.default_rng(0).integers(0, 11, (2, 16)))
    both = jax.jit(jax.vmap(apply_lm, in_axes=(None, 0)))(
        lm, jnp.stack([tokens, tokens.at[:, 10:].set(0)]))  # change only the future
    assert both.shape == (2, 2, 16, 11)
    np.testing.assert_allclose(both[0, :, :10], both[1, :, :10], rtol=1e-5, atol=1e-6)
    assert not np.allclose(both[0, :, 10:], both[1, :, 10:])


def test_train_charlm_runs(mesh):
    res = train(TrainConfig(task="charlm", compressor="dense", steps=2, batch_size=16,
                            seq_len=16, progress=False))
    assert len(res.history) == 2 and np.isfinite(res.summary["test_loss"])
    assert 0.0 <= res.summary["test_accuracy"] <= 1.0


TINY_LM = dict(task="lm", compressor="dense", batch_size=16, seq_len=16, d_model=16,
               num_heads=2, num_layers=1, progress=False)


def test_train_lm_tiny_model_runs(mesh):
    """2 steps of ``lm`` on its default corpus (the standard library's source)."""
    res = train(TrainConfig(steps=2, **TINY_LM))
    assert len(res.history) == 2 and res.config["d_model"] == 16
    assert res.summary["start_step"] == 0 and np.isfinite(res.history[-1]["loss"])
    # Near the uniform log(256) nats per byte after 2 steps, but finite.
    assert np.isfinite(res.summary["test_loss"]) and res.summary["test_loss"] < np.log(256) + 1


def test_lm_checkpoint_records_the_model_size(mesh, tmp_path):
    """The checkpoint holds the 16-wide, 1-block model, and a resume with another number
    of heads (same shapes) or blocks is refused. A small directory corpus keeps it quick."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i}\n" * 8)
    tiny = {**TINY_LM, "data": str(corpus)}
    ckpt = tmp_path / "ckpt"
    train(TrainConfig(steps=2, checkpoint_dir=str(ckpt), **tiny))
    sig = json.loads((ckpt / "2" / "meta" / "metadata").read_text())["signature"]["params"]
    assert sig["['token_embed']['embedding']"] == "float32[256,16]"
    assert sig["['position_embed']['embedding']"] == "float32[16,16]"
    assert not any("block1" in k for k in sig)
    with pytest.raises(CheckpointError, match="written with --heads 2, but this run has "
                                              "--heads 4"):
        train(TrainConfig(steps=3, checkpoint_dir=str(ckpt), resume=True,
                          **{**tiny, "num_heads": 4}))
    with pytest.raises(CheckpointError, match="written with --layers 1"):
        train(TrainConfig(steps=3, checkpoint_dir=str(ckpt), resume=True,
                          **{**tiny, "num_layers": 2}))


def test_initial_params_follow_the_transformer_size(mesh):
    """The cache of initial parameters never hands one size's parameters to another."""
    from lore_jax.training import loop, tasks

    dataset = tasks.load_data("charlm", seq_len=8)
    shapes = []
    for d_model in (8, 16):
        cfg = TrainConfig(task="charlm", d_model=d_model, num_heads=2, num_layers=1,
                          seq_len=8).resolved()
        params = loop._initial_params(cfg, dataset, lambda cfg=cfg: tasks.make_model(
            cfg.model, dataset, cfg.seed, d_model=cfg.d_model, num_heads=cfg.num_heads,
            num_layers=cfg.num_layers))
        shapes.append(params["token_embed"]["embedding"].shape)
    assert shapes == [(dataset.num_outputs, 8), (dataset.num_outputs, 16)]


def test_transformer_size_is_checked_before_anything_runs():
    with pytest.raises(TrainingError, match="--d-model 30 is not divisible by --heads 4"):
        TrainConfig(task="lm", d_model=30).resolved()
    with pytest.raises(TrainingError, match="--layers must be at least 1"):
        TrainConfig(task="lm", num_layers=0).resolved()


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def reference_run(mesh, tmp_path_factory):
    """16 uninterrupted GreedyLore steps, checkpointed at steps 8 and 16, and its log."""
    root = tmp_path_factory.mktemp("reference")
    result = train(TrainConfig(steps=16, checkpoint_dir=str(root / "ckpt"), checkpoint_every=8,
                               log=str(root / "log.jsonl"), **SMALL))
    return result, root


TWO_PROCESS_ARGS = [
    "--task", "digits", "--compressor", "greedylore", "--rank", "2", "--hidden", "32,32",
    "--batch-size", "32", "--update-interval", "6", "--warmup-steps", "2", "--optimizer",
    "sgd", "--lr", "0.05", "--devices", "8", "--no-progress"]


def _two_processes(args, tmp_path, tag):
    """Starts ``lore-jax train ARGS`` as 2 processes x 4 simulated devices."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    port = _free_port()
    return [
        subprocess.Popen(
            [sys.executable, "-m", "lore_jax", "train", *args, "--log",
             str(tmp_path / f"{tag}{i}.jsonl"), "--coordinator", f"localhost:{port}",
             "--num-processes", "2", "--process-id", str(i)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]


def test_resume_matches_uninterrupted_run_bit_for_bit(reference_run, tmp_path):
    full, root = reference_run
    ckpt = tmp_path / "ckpt"
    shutil.copytree(root / "ckpt", ckpt)
    shutil.rmtree(ckpt / "16")  # as if the run had stopped after step 8
    log = tmp_path / "log.jsonl"
    log.write_text("".join(line for line in (root / "log.jsonl").read_text().splitlines(True)
                           if json.loads(line).get("step", 0) <= 8 and
                           json.loads(line)["event"] in ("config", "train")))
    resumed = train(TrainConfig(steps=16, checkpoint_dir=str(ckpt), log=str(log), resume=True,
                                **SMALL))
    assert resumed.summary["start_step"] == 8
    assert _losses(resumed) == _losses(full)[8:]  # exact, not approximate
    for key in ("bits_sent", "bits_dense", "test_loss", "test_accuracy"):
        assert resumed.summary[key] == full.summary[key], key
    # The log continues: steps 1..16 once each, and two config records.
    records = read_log(log)
    assert [r["step"] for r in records if r["event"] == "train"] == list(range(1, 17))
    assert [r["start_step"] for r in records if r["event"] == "config"] == [0, 8]
    assert (ckpt / "16").is_dir()


def test_checkpoint_holds_per_device_buffers_and_refuses_mismatches(reference_run, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference_run[1] / "ckpt", ckpt)
    meta = json.loads((ckpt / "16" / "meta" / "metadata").read_text())
    batches_per_epoch = 1437 // 32
    assert meta["step"] == 16 and meta["position"] == [16 // batches_per_epoch, 16]
    errors = [v for k, v in meta["signature"]["opt_state"].items() if ".error" in k]
    assert errors and all(v.startswith("float32[8,") for v in errors)  # one row per device
    before = sorted((p, p.stat().st_mtime_ns) for p in ckpt.rglob("*"))
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        train(TrainConfig(steps=20, checkpoint_dir=str(ckpt), **SMALL))
    with pytest.raises(CheckpointError, match="different model"):
        train(TrainConfig(steps=20, checkpoint_dir=str(ckpt), resume=True,
                          **{**SMALL, "hidden": (32, 16)}))
    with pytest.raises(CheckpointError, match="written with --rank 2"):
        train(TrainConfig(steps=20, checkpoint_dir=str(ckpt), resume=True,
                          **{**SMALL, "rank": 3}))
    with pytest.raises(CheckpointError, match="different optimizer state"):
        train(TrainConfig(steps=20, checkpoint_dir=str(ckpt), resume=True, devices=4,
                          **SMALL))
    assert sorted((p, p.stat().st_mtime_ns) for p in ckpt.rglob("*")) == before


@pytest.mark.parametrize("change, flag", [
    ({"seed": 1}, "--seed 0"), ({"batch_size": 64}, "--batch-size 32"),
    ({"update_interval": 7}, "--update-interval 6"), ({"learning_rate": 0.1}, "--lr 0.05")])
def test_resume_refuses_settings_that_change_the_run(reference_run, tmp_path, change, flag):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(reference_run[1] / "ckpt", ckpt)
    before = sorted((p, p.stat().st_mtime_ns) for p in ckpt.rglob("*"))
    with pytest.raises(CheckpointError, match=f"written with {flag}, but this run has"):
        train(TrainConfig(steps=20, checkpoint_dir=str(ckpt), resume=True,
                          log=str(tmp_path / "log.jsonl"), **{**SMALL, **change}))
    assert sorted((p, p.stat().st_mtime_ns) for p in ckpt.rglob("*")) == before
    assert not (tmp_path / "log.jsonl").exists()   # refused before anything is written


def test_an_unwritable_checkpoint_directory_is_refused_before_training(tmp_path):
    (tmp_path / "file").write_text("x")   # a file where a directory should be
    log = tmp_path / "log.jsonl"
    with pytest.raises(CheckpointError, match=r"cannot write checkpoints to .*file/ck: Not "
                                              r"a directory; choose a writable"):
        train(TrainConfig(steps=4, checkpoint_dir=str(tmp_path / "file" / "ck"),
                          log=str(log), **SMALL))
    assert not log.exists()


@pytest.mark.parametrize("code, cause", [(30, "Read-only file system"),
                                         (13, "Permission denied")])
def test_a_read_only_or_forbidden_directory_is_refused_before_training(tmp_path, monkeypatch,
                                                                       code, cause):
    """A read-only file system or a directory without write permission (injected into
    the probe write, since root ignores permissions here): one line naming the directory
    and the cause, before anything is trained or logged."""
    import pathlib

    real = pathlib.Path.write_bytes

    def write_bytes(self, data):
        if self.name.startswith(".lore_jax_write_probe"):
            raise OSError(code, cause)
        return real(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)
    log = tmp_path / "log.jsonl"
    with pytest.raises(CheckpointError) as e:
        train(TrainConfig(steps=4, checkpoint_dir=str(tmp_path / "ck"), log=str(log), **SMALL))
    assert str(e.value) == (f"cannot write checkpoints to {tmp_path / 'ck'}: {cause}; choose "
                            f"a writable --checkpoint-dir.")
    assert not log.exists()


def test_a_failed_save_names_the_cause_and_the_checkpoint_kept(tmp_path, monkeypatch):
    """A full disk at the second save: one error naming the cause and the step-2
    checkpoint, which stays complete (a fault-injecting orbax save)."""
    import orbax.checkpoint as ocp

    real, calls = ocp.CheckpointManager.save, []

    def save(self, step, *args, **kwargs):
        calls.append(step)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    ck = tmp_path / "ck"
    with pytest.raises(CheckpointError) as e:
        train(TrainConfig(steps=6, checkpoint_dir=str(ck), checkpoint_every=2, **SMALL))
    assert str(e.value) == (f"cannot save checkpoint {ck / '4'}: No space left on device; "
                            f"the newest complete checkpoint is {ck / '2'}.")
    monkeypatch.setattr(ocp.CheckpointManager, "save", real)
    resumed = train(TrainConfig(steps=6, checkpoint_dir=str(ck), resume=True, **SMALL))
    assert resumed.summary["start_step"] == 2


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(reference_run, tmp_path,
                                                                    capsys):
    """The newest checkpoint's largest array file cut short: one warning naming it and the
    step-8 checkpoint, then the run continues from step 8 as the uninterrupted one did."""
    full, root = reference_run
    ckpt = tmp_path / "ckpt"
    shutil.copytree(root / "ckpt", ckpt)
    data = max((p for p in (ckpt / "16" / "state").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:100])
    resumed = train(TrainConfig(steps=16, checkpoint_dir=str(ckpt), resume=True, **SMALL))
    assert resumed.summary["start_step"] == 8
    assert _losses(resumed) == _losses(full)[8:]
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("lore-jax:")]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"lore-jax: warning: cannot restore checkpoint {ckpt / '16'}: ")
    assert warnings[0].endswith(f"; trying {ckpt / '8'} (a damaged checkpoint is kept as "
                                f"damaged-STEP).")
    # Kept aside, and the resumed run's own step 16 is the newest checkpoint now.
    assert (ckpt / "damaged-16").is_dir() and (ckpt / "16").is_dir()
    again = train(TrainConfig(steps=16, checkpoint_dir=str(ckpt), resume=True, **SMALL))
    assert again.summary["start_step"] == 16 and again.history == []
    assert again.summary["test_loss"] == full.summary["test_loss"]


def test_resume_of_a_missing_directory_says_it_starts_fresh(tmp_path, capsys):
    run = train(TrainConfig(steps=2, checkpoint_dir=str(tmp_path / "none"), resume=True,
                            **SMALL))
    assert run.summary["start_step"] == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lore-jax: --resume: no checkpoint in {tmp_path / 'none'}; starting "
                   f"from step 0."]


def test_resumed_log_holds_each_step_once(reference_run, tmp_path):
    """The interrupted run logged steps 1..16 (and evaluations, a summary) but its last
    checkpoint is step 8: the resumed log drops what came after step 8 and repeats it."""
    full, root = reference_run
    ckpt = tmp_path / "ckpt"
    shutil.copytree(root / "ckpt", ckpt)
    shutil.rmtree(ckpt / "16")
    log = tmp_path / "log.jsonl"
    text = (root / "log.jsonl").read_text()
    log.write_text(text + text.splitlines(True)[-1][:17])   # and a line cut short by a kill
    train(TrainConfig(steps=16, checkpoint_dir=str(ckpt), log=str(log), resume=True, **SMALL))
    records = read_log(log)
    train_steps = [r["step"] for r in records if r["event"] == "train"]
    assert train_steps == list(range(1, 17))
    assert [r["event"] for r in records].count("summary") == 2   # the old run's, the new
    assert [r["loss"] for r in records if r["event"] == "train"] == _losses(full)


@pytest.mark.slow
def test_sigterm_saves_the_step_and_resume_matches_an_uninterrupted_run(tmp_path):
    """SIGTERM to ``lore-jax train``: it finishes the step, checkpoints it, says so in one
    line and exits 0; ``--resume`` then gives the uninterrupted run's losses exactly (a
    constant step size: the first run is told to go on for 100000 steps)."""
    args = ["train", "--task", "digits", "--compressor", "greedylore", "--rank", "2",
            "--hidden", "32,32", "--batch-size", "32", "--update-interval", "6",
            "--warmup-steps", "2", "--optimizer", "sgd", "--lr", "0.05", "--devices", "8",
            "--schedule", "constant", "--eval-every", "1000", "--no-progress",
            "--checkpoint-dir", str(tmp_path / "ck")]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    log = tmp_path / "log.jsonl"
    p = subprocess.Popen([sys.executable, "-m", "lore_jax", *args, "--steps", "100000",
                          "--log", str(log)], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    import time
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and p.poll() is None:
        if log.exists() and sum('"train"' in line for line in log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    p.send_signal(15)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    stopped = [r for r in read_log(log) if r["event"] == "preempted"]
    assert len(stopped) == 1
    k = stopped[0]["step"]
    assert err.strip().splitlines() == [
        f"lore-jax: stopped by SIGTERM after step {k}: checkpoint {tmp_path / 'ck' / str(k)} "
        f"written; continue with --resume"]
    from lore_jax.cli import main
    assert main([*args, "--steps", str(k + 4), "--log", str(log), "--resume"]) == 0
    losses = [r["loss"] for r in read_log(log) if r["event"] == "train"]
    full = train(TrainConfig(steps=k + 4, **{**SMALL, "schedule": "constant"}))
    assert [r["step"] for r in read_log(log) if r["event"] == "train"] == list(range(1, k + 5))
    assert losses == _losses(full)


def test_config_errors_are_training_errors():
    with pytest.raises(TrainingError, match="unknown task 'nope'"):
        train(TrainConfig(task="nope"))
    with pytest.raises(TrainingError, match="unknown tracking 'power'.*range, off"):
        train(TrainConfig(tracking="power"))
    with pytest.raises(TrainingError, match="--devices 16"):
        train(TrainConfig(devices=16, steps=1, progress=False))
    with pytest.raises(TrainingError, match="not divisible"):
        train(TrainConfig(batch_size=12, steps=1, progress=False))


def test_sharded_init_layout(mesh):
    from lore_jax.training.optimizers import make_optimizer

    _, params = models.create(lambda: models.MLP(64, (32,), 10, rngs=nnx.Rngs(0)))
    opt_state = lore_jax.sharded_init(make_optimizer("greedylore", rank=2), params, mesh)
    specs = lore_jax.state_specs(opt_state)
    flat = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))
    assert P("data") in flat and P() in flat
    assert collectives.find_states(opt_state)


# --------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process(reference_run, tmp_path):
    """2 processes x 4 simulated devices (jax.distributed) = 1 process x 8 devices.

    Not bit-exact: across processes the CPU all-reduce goes through Gloo, which sums in
    a different order than the in-process reduction, so losses agree to float32
    rounding (observed relative differences ~1e-7 over 16 SGD steps). Adam would
    amplify them (it normalises near-zero gradient coordinates, where rounding is
    relatively large: ~1e-4 after 20 steps), hence SGD here.
    """
    single = reference_run[0]
    procs = _two_processes([*TWO_PROCESS_ARGS, "--steps", "16"], tmp_path, "p")
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    assert not (tmp_path / "p1.jsonl").exists()  # only process 0 writes
    records = read_log(tmp_path / "p0.jsonl")
    config = records[0]
    assert config["processes"] == 2 and config["devices"] == 8
    multi = [r["loss"] for r in records if r["event"] == "train"]
    np.testing.assert_allclose(multi, _losses(single), rtol=1e-6, atol=0)
    summary = records[-1]
    assert summary["bits_sent"] == single.summary["bits_sent"]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_after_the_same_step(tmp_path):
    """SIGTERM to process 1 of 2: JAX's preemption service stops both after the same
    step, which is checkpointed; both exit 0, and the resumed pair continues the losses
    of a one-process run (to Gloo's float32 rounding, as above)."""
    import time
    ck = ["--schedule", "constant", "--checkpoint-dir", str(tmp_path / "ck")]
    procs = _two_processes([*TWO_PROCESS_ARGS, *ck, "--steps", "100000"], tmp_path, "a")
    log = tmp_path / "a0.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and procs[0].poll() is None:
        if log.exists() and sum('"train"' in line for line in log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    procs[1].send_signal(15)
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    (stop,) = [r for r in read_log(log) if r["event"] == "preempted"]
    k = stop["step"]
    assert (tmp_path / "ck" / str(k)).is_dir()
    for _, err in outs:
        assert f"stopped by SIGTERM after step {k}" in err
    procs = _two_processes([*TWO_PROCESS_ARGS, *ck, "--steps", str(k + 3), "--resume"],
                           tmp_path, "b")
    for p, (_, err) in zip(procs, [p.communicate(timeout=300) for p in procs], strict=True):
        assert p.returncode == 0, err[-2000:]
    losses = [r["loss"] for r in read_log(log) if r["event"] == "train"]
    losses += [r["loss"] for r in read_log(tmp_path / "b0.jsonl") if r["event"] == "train"]
    single = train(TrainConfig(steps=k + 3, **{**SMALL, "schedule": "constant"}))
    np.testing.assert_allclose(losses, _losses(single), rtol=1e-6, atol=0)


# --------------------------------------------------------------------------- a lost process


def _runtime_lines(err: str) -> list[str]:
    """Lines of a traceback or of the distributed runtime's C++ logs and stacks."""
    import re

    cpp = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d|Check failure|^\s+@\s+0x|terminate called|"
                     r"Traceback|gloo::|JaxRuntimeError")
    return [line for line in err.splitlines() if cpp.search(line)]


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_process_stops_the_other_within_seconds(tmp_path, victim):
    """SIGKILL to one process of two, once a checkpoint is written: the other exits
    within 15 s with status 75 and one line naming the lost process, the step and the
    newest checkpoint; no traceback, no C++ stack. Process 0 hosts the coordination
    service, so losing it is the harder case (JAX's client aborts from C++)."""
    import re
    import time

    from lore_jax.training.faults import EXIT_PEER_LOST

    ck = tmp_path / "ck"
    args = [*TWO_PROCESS_ARGS, "--compressor", "dense", "--schedule", "constant",
            "--steps", "100000", "--checkpoint-dir", str(ck), "--checkpoint-every", "2"]
    procs = _two_processes(args, tmp_path, "k")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and procs[0].poll() is None and not (ck / "2").is_dir():
        time.sleep(0.05)
    procs[victim].kill()
    killed = time.monotonic()
    survivor = procs[1 - victim]
    _, err = survivor.communicate(timeout=120)
    elapsed = time.monotonic() - killed
    procs[victim].communicate(timeout=30)
    assert survivor.returncode == EXIT_PEER_LOST, err[-3000:]
    assert elapsed < 15, elapsed
    assert _runtime_lines(err) == [], err[-3000:]
    lines = [line for line in err.splitlines() if line.strip()]
    lost = "process 0 (the coordinator)" if victim == 0 else "process 1"
    m = re.fullmatch(rf"lore-jax: lost {re.escape(lost)} after step (\d+), so process "
                     rf"{1 - victim} stops; the newest checkpoint is {re.escape(str(ck))}/(\d+): "
                     rf"restart every process with --resume to continue from it\.", lines[-1])
    assert m, lines[-1]
    step, saved = int(m[1]), int(m[2])
    assert saved == max(int(p.name) for p in ck.iterdir() if p.name.isdigit())
    assert 2 <= saved <= step
    logged = [r["step"] for r in read_log(tmp_path / "k0.jsonl") if r["event"] == "train"]
    assert step == logged[-1] if victim == 1 else abs(step - logged[-1]) <= 1


def test_the_supervisor_turns_a_runtime_abort_into_one_line(tmp_path, capfd):
    """A child that JAX's client ends from C++ (its fatal log, a stack, SIGABRT) after
    step 7: the parent holds those lines back and prints the one line instead; a child
    that ends otherwise keeps its exit status and its C-level stderr."""
    from lore_jax.training import faults

    fatal = ("F1201 17:31:36.401415    9127 client.h:80] Terminating process because the "
             "JAX distributed service detected fatal errors. absl::Status: UNAVAILABLE: "
             "Failed to send RPC to coordination service. Either the leader task was "
             "preempted/died/restarted unexpectedly\\n*** Check failure stack trace: ***\\n"
             "    @     0x7fb533040634  absl::log_internal::LogMessage::SendToLog()\\n")
    script = ("import os, sys\nfrom lore_jax.training import faults\nfaults.start_worker()\n"
              "print('warning from Python', file=sys.stderr, flush=True)\n"
              "os.write(2, b'a C-level line\\n')\n"
              "if sys.argv[1] != 'no-connect': faults.report_connected()\n"
              f"faults.report_step(7)\nos.write(2, b'{fatal}')\n"
              "if sys.argv[1] != 'exit': os.abort()\nsys.exit(3)\n")
    command = [sys.executable, "-c", script]
    (tmp_path / "ck" / "6").mkdir(parents=True)
    (tmp_path / "ck" / "8.orbax-checkpoint-tmp").mkdir()
    job = faults.Job(1, 2, "localhost:1234", 300, str(tmp_path / "ck"))
    assert faults.supervise(["abort"], job, command=command) == 75
    err = capfd.readouterr().err.splitlines()
    assert err == ["warning from Python", "a C-level line",
                   f"lore-jax: lost process 0 (the coordinator) after step 7, so process 1 "
                   f"stops; the newest checkpoint is {tmp_path / 'ck' / '6'}: restart every "
                   f"process with --resume to continue from it."]
    assert faults.supervise(["exit"], job, command=command) == 3
    err = capfd.readouterr().err
    assert "Check failure stack trace" in err and "lost" not in err
    assert faults.supervise(["no-connect"], job, command=command) == 75
    assert capfd.readouterr().err.splitlines()[-1] == (
        "lore-jax: the 2-process job did not start: process 1 and the others did not all "
        "connect to the coordinator at localhost:1234 within 300 s (--init-timeout); start "
        "every process with the same --coordinator and --num-processes.")


def test_lost_process_names_and_messages():
    from lore_jax.training.faults import lost_message, lost_processes

    heartbeat = ("UNAVAILABLE: The following tasks are unhealthy (stopped sending "
                 "heartbeats):\n2\nThe tasks have crashed.")
    assert lost_processes(heartbeat, 0, 4) == [2]
    assert lost_processes("Barrier failed: Task 3 heartbeat timeout.", 1, 4) == [3]
    assert lost_processes("Failed to send RPC to coordination service.", 2, 4) == [0]
    assert lost_processes("Gloo all-reduce failed: Connection reset by peer", 1, 2) == [0]
    assert lost_processes("Gloo all-reduce failed: Connection reset by peer", 1, 4) == []
    assert lost_message([], 1, None, None) == (
        "lore-jax: lost a peer process before the first step, so process 1 stops; no "
        "--checkpoint-dir was given, so a restart begins at step 0.")


_BARRIER_SCRIPT = """
import sys, time
import jax
from lore_jax.training import faults
port, pid = sys.argv[1], int(sys.argv[2])
jax.distributed.initialize(f"localhost:{port}", 2, pid)
waited = []
for delay in (3, 2):   # the same name twice, as two trainings in one job would use it
    if pid == 1:
        time.sleep(delay)   # as a process that compiles its step longer than the others
    t = time.monotonic()
    faults.wait_for_every_process("test", timeout_s=60)
    waited.append(time.monotonic() - t)
print(*waited)
"""


def test_wait_for_every_process_holds_the_early_process_until_the_late_one_arrives():
    """The barrier the training loop passes after compiling: JAX caches compiled programs
    from process 0 only, so a rerun's process 0 is ready long before the others, and
    Gloo gives up on a collective whose peers are 30 s late."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _BARRIER_SCRIPT, str(port), str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    waits_0, waits_1 = ([float(w) for w in out.split()[-2:]] for out, _ in outs)
    assert waits_0[0] >= 2.5 and waits_0[1] >= 1.5, waits_0   # process 0 waited twice
    assert max(waits_1) < 1.5, waits_1                          # process 1 never did
