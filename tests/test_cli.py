"""The lore-jax command: train, compare, and one-line errors for bad requests."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lore_jax import cli
from lore_jax.training import compare as compare_lib
from lore_jax.training.metrics import read_log

REPO = Path(__file__).resolve().parents[1]
TINY = ["--hidden", "16", "--batch-size", "32", "--no-progress"]


def _one_line_error(capsys, rc):
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lore-jax: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def trained(mesh, tmp_path_factory):
    """A 3-step dense run with a log and a checkpoint."""
    root = tmp_path_factory.mktemp("cli")
    rc = cli.main(["train", "--compressor", "dense", "--steps", "3", *TINY,
                   "--log", str(root / "log.jsonl"), "--checkpoint-dir", str(root / "ckpt")])
    assert rc == 0
    return root


def test_train_writes_log_and_checkpoint(trained):
    records = read_log(trained / "log.jsonl")
    assert [r["event"] for r in records] == ["config", "train", "train", "train", "eval",
                                             "summary"]
    train_records = [r for r in records if r["event"] == "train"]
    assert all({"loss", "accuracy", "bits_sent", "bits_dense", "step_time"} <= r.keys()
               for r in train_records)
    assert train_records[-1]["bits_sent"] == 3 * train_records[0]["bits_sent"]
    assert records[0]["devices"] == 8 and records[0]["hidden"] == [16]
    assert (trained / "ckpt" / "3").is_dir()


def _snapshot(directory: Path):
    return sorted((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in directory.rglob("*"))


def test_checkpoint_errors_leave_it_untouched(trained, capsys):
    ckpt = trained / "ckpt"
    before = _snapshot(ckpt)
    base = ["train", "--compressor", "dense", "--steps", "6", *TINY, "--checkpoint-dir",
            str(ckpt)]
    line = _one_line_error(capsys, cli.main(base))  # no --resume
    assert "already holds a checkpoint (step 3)" in line and "--resume" in line
    line = _one_line_error(capsys, cli.main([*base, "--resume", "--hidden", "32"]))
    assert "different model" in line and "dense0" in line
    line = _one_line_error(capsys, cli.main([*base, "--resume", "--task", "classification"]))
    assert "--task digits" in line
    assert _snapshot(ckpt) == before


@pytest.mark.parametrize("argv, message", [
    (["train", "--task", "nope"], "unknown task 'nope'"),
    (["train", "--compressor", "zip"], "unknown compressor 'zip'"),
    (["compare", "--compressors", "dense,zip"], "unknown compressor 'zip'"),
    (["train", "--devices", "16"], "--devices 16 asked for, but only 8"),
    (["train", "--task", "mnist"], "--data DIR"),
    (["train", "--task", "mnist", "--data", "{tmp}/nowhere"], "MNIST directory not found"),
    (["train", "--task", "charlm", "--data", "{tmp}/missing.txt"], "text file not found"),
    (["train", "--task", "cifar10", "--data", "{tmp}"], "no data_batch_* files"),
    (["train", "--model", "transformer"], "language model"),
    (["train", "--steps", "many"], "invalid int value"),
    (["train", "--resume"], "--resume needs --checkpoint-dir"),
    (["train", "--batch-size", "12"], "not divisible"),
    (["train", "--tracking", "power"], "--tracking: invalid choice: 'power'"),
    (["train", "--task", "lm", "--data", "{tmp}/nowhere"], "text corpus not found"),
    (["train", "--task", "lm", "--d-model", "30"], "--d-model 30 is not divisible by --heads 4"),
    (["train", "--task", "lm", "--layers", "0"], "--layers must be at least 1, got 0"),
    (["train", "--task", "lm", "--heads", "0"], "--heads must be at least 1, got 0"),
    (["train", "--sync-every", "0"], "--sync-every must be at least 1, got 0"),
])
def test_bad_requests_give_one_line(mesh, tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert message in _one_line_error(capsys, cli.main([*argv, "--no-progress"]))
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_subprocess_error_has_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    for argv, message in ((["train", "--task", "nope"], "unknown task"),
                          (["train", "--devices", "4"], "only 2 cpu device(s)")):
        p = subprocess.run([sys.executable, "-m", "lore_jax", *argv], env=env,
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in p.stderr


def test_no_arguments_runs_the_default_comparison(monkeypatch, capsys, tmp_path):
    seen = {}

    def fake_compare(config, compressors, out_dir, main_process=True):
        seen.update(config=config, compressors=compressors, out_dir=out_dir)
        return {"config": {"task": config.task}, "runs": {
            "dense": {"summary": {"train_loss": 0.1, "test_loss": 0.2, "test_accuracy": 0.9,
                                  "bits_sent": 10, "compression": 1.0, "time_s": 1.0}}}}

    monkeypatch.setattr(compare_lib, "compare", fake_compare)
    monkeypatch.chdir(tmp_path)
    assert cli.main([]) == 0
    assert seen["compressors"] == ["dense", "greedylore", "powersgd", "random"]
    assert seen["config"].task == "digits" and seen["config"].rank == 4
    assert "90.00" in capsys.readouterr().out


@pytest.mark.slow
def test_compare_digits_greedylore_matches_dense_with_fewer_bits(mesh, tmp_path, capsys):
    """``lore-jax compare`` at the default settings, dense and GreedyLore only (for time):
    GreedyLore at rank 4 within 1 point of dense test accuracy, with >= 10x fewer bits."""
    out = tmp_path / "cmp"
    rc = cli.main(["compare", "--compressors", "dense,greedylore", "--out", str(out),
                   "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "compare.json").read_text())
    runs = results["runs"]
    assert list(runs) == ["dense", "greedylore"]
    dense, lore = runs["dense"]["summary"], runs["greedylore"]["summary"]
    assert lore["test_accuracy"] >= dense["test_accuracy"] - 0.01
    assert lore["bits_dense"] >= 10 * lore["bits_sent"] and lore["compression"] >= 10
    assert dense["compression"] == 1.0 and dense["bits_dense"] == lore["bits_dense"]
    # The printed table and the plot hold these numbers.
    for name, run in runs.items():
        s = run["summary"]
        row = next(line for line in printed.splitlines() if f" {name} " in line)
        assert f"{100 * s['test_accuracy']:.2f}" in row and f"{s['compression']:.1f}x" in row
        assert f"{s['bits_sent']:.4g}" in row
    png = (out / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert len(runs["greedylore"]["curve"]["bits_sent"]) == results["config"]["steps"] == 400
    assert (out / "greedylore.jsonl").exists()


@pytest.mark.parametrize("compressor", ["powersgd", "random", "topk", "qsgd", "sign"])
def test_other_compressors_train(mesh, tmp_path, compressor):
    from lore_jax.training import TrainConfig, train

    res = train(TrainConfig(compressor=compressor, steps=3, hidden=(32, 32), batch_size=32,
                            progress=False))
    assert np.isfinite(res.summary["train_loss"]) and res.summary["compression"] > 1.5


def test_greedylore_tracking_and_error_feedback_options_reach_the_transform(mesh):
    from lore_jax.training import TrainConfig, train

    # The paper's mode refreshes every 4 steps; range tracking only at the first step.
    kw = dict(steps=9, hidden=(32, 32), batch_size=32, update_interval=4,
              schedule="constant", eval_every=9, progress=False)
    paper = train(TrainConfig(tracking="off", **kw)).summary
    ranged = train(TrainConfig(tracking="range", **kw)).summary
    ef21 = train(TrainConfig(tracking="off", error_feedback="ef21", **kw)).summary
    for run in (paper, ranged, ef21):
        assert np.isfinite(run["train_loss"]) and run["compression"] > 1.5
    # The paper's mode sends whole gradients at its refreshes (steps 1, 5 and 9), range
    # tracking its tracking probes at every step: the two send different amounts.
    assert paper["bits_sent"] != ranged["bits_sent"]
    # The error feedback changes the values sent, not their size, ...
    assert ef21["bits_sent"] == paper["bits_sent"]
    # ... and the directions chosen, by far more than rounding.
    assert abs(ef21["train_loss"] - paper["train_loss"]) > 1e-5


@pytest.mark.parametrize("flags, size", [
    ([], (64, 4, 2)),                                        # the defaults lm runs with
    (["--d-model", "24", "--heads", "3", "--layers", "3"], (24, 3, 3)),
])
def test_transformer_size_flags_reach_the_model(flags, size):
    from flax import nnx

    from lore_jax.training import models, tasks

    args = cli.build_parser().parse_args(["train", "--task", "lm", "--seq-len", "16", *flags])
    cfg = cli._config(args, "dense")
    assert (cfg.model, cfg.steps, cfg.batch_size, cfg.learning_rate) == ("transformer", 600,
                                                                         64, 3e-3)
    d, heads, layers = size
    dataset = tasks.load_data(cfg.task, cfg.data, cfg.seq_len)
    model = nnx.eval_shape(lambda: tasks.make_model(
        cfg.model, dataset, cfg.seed, cfg.hidden, d_model=cfg.d_model,
        num_heads=cfg.num_heads, num_layers=cfg.num_layers))
    _, params = models.split(model)
    assert params["token_embed"]["embedding"].shape == (256, d)
    assert params["position_embed"]["embedding"].shape == (16, d)
    assert sorted(k for k in params if k.startswith("block")) == [f"block{i}"
                                                                  for i in range(layers)]
    assert params["block0"]["attention"]["qkv"]["kernel"].shape == (d, 3 * d)
    assert model.block0.attention.num_heads == heads


def test_topk_sends_its_fraction_of_every_leaf(mesh):
    """Bits per step, per leaf of d entries: k float32 values and k indices of ceil(log2 d)
    bits packed into 32-bit words, k = max(1, round(f d))."""
    from lore_jax.training import TrainConfig, train

    res = train(TrainConfig(compressor="topk", fraction=0.05, steps=2, hidden=(32, 32),
                            batch_size=32, progress=False))
    sizes = [64 * 32, 32, 32 * 32, 32, 32 * 10, 10]   # the MLP's kernels and biases
    ks = [max(1, round(0.05 * d)) for d in sizes]
    want = sum(32 * k + 32 * int(np.ceil(k * np.ceil(np.log2(d)) / 32))
               for k, d in zip(ks, sizes, strict=True))
    assert res.history[0]["bits_sent"] == want
    assert res.history[1]["bits_sent"] == 2 * want


def test_target_loss_stops_at_the_first_evaluation_at_or_below_it(mesh, tmp_path):
    from lore_jax.training import TrainConfig, train

    kw = dict(compressor="dense", steps=40, hidden=(32, 32), batch_size=32, eval_every=5,
              progress=False)
    full = train(TrainConfig(**kw))
    target = full.evals[3]["test_loss"] + 1e-6   # reached at step 20 (or before)
    first = next(e["step"] for e in full.evals if e["test_loss"] <= target)
    log = tmp_path / "log.jsonl"
    res = train(TrainConfig(target_loss=target, log=str(log), **kw))
    assert res.summary["steps"] == first and len(res.history) == first
    records = read_log(log)
    stop = next(r for r in records if r["event"] == "target")
    assert stop["step"] == first and stop["test_loss"] <= target
    assert [r["event"] for r in records][-2:] == ["target", "summary"]


def test_the_log_records_start_up_and_wall_clock(mesh, tmp_path):
    from lore_jax.training import TrainConfig, train

    log = tmp_path / "log.jsonl"
    train(TrainConfig(compressor="dense", steps=3, hidden=(16,), batch_size=32,
                      eval_examples=40, progress=False, log=str(log)))
    records = read_log(log)
    config = records[0]
    assert set(config["startup"]) == {"before_run_s", "data_s", "init_s", "compile_s",
                                      "wait_s"}
    assert all(v >= 0 for v in config["startup"].values())
    assert config["startup_s"] >= sum(config["startup"].values()) - 1e-3
    walls = [r["wall_s"] for r in records if r["event"] == "train"]
    assert walls == sorted(walls) and walls[0] >= config["startup_s"]
    # One process: no interface counters; an evaluation on 40 examples reports its time.
    assert all("net_sent_bytes" not in r for r in records if r["event"] == "train")
    assert next(r for r in records if r["event"] == "eval")["eval_s"] > 0


def test_a_compressor_option_binds_a_resume_only_for_its_compressor():
    from lore_jax.training import TrainConfig
    from lore_jax.training.loop import _resume_settings

    topk = _resume_settings(TrainConfig(compressor="topk", fraction=0.05).resolved())
    greedy = _resume_settings(TrainConfig(compressor="greedylore").resolved())
    assert topk["fraction"] == 0.05 and "levels" not in topk
    assert "fraction" not in greedy and "levels" not in greedy
    assert _resume_settings(TrainConfig(compressor="qsgd", levels=3).resolved())["levels"] == 3
