"""The benchmark scripts at tiny sizes: they run, write their JSON and markdown, and the
numbers they report agree with independent formulas (payload sizes, the amortization and
the bandwidth model). Timings are never asserted, only how they are combined."""

from __future__ import annotations

import json

import numpy as np
import optax
import pytest

from benchmarks import bytes_on_wire, collectives, overhead, time_to_target


def _written(tmp_path, name):
    assert (tmp_path / f"{name}.md").read_text().strip()
    return json.loads((tmp_path / f"{name}.json").read_text())


def test_bytes_on_wire_reads_the_payload_formulas_from_hlo(tmp_path):
    r, tau = 8, 10
    bytes_on_wire.main(["--out", str(tmp_path), "--model", "gpt2-small", "--layers", "1",
                        "--check-layers", "0", "--methods", "powersgd", "--rank", str(r),
                        "--tau", str(tau), "--warmup-steps", "5", "--run-steps", "100"])
    d = _written(tmp_path, "bytes_on_wire")
    per_shape = d["results"]["gpt2-small"]["per_shape"]
    matrices = [v for v in per_shape.values() if len(v["shape"]) == 2 and not v["dense"]]
    assert len(matrices) == 4  # qkv, attention out, MLP in, MLP out
    for v in per_shape.values():
        m = v["methods"]
        size = int(np.prod(v["shape"]))
        assert m["dense"]["compressed"] == 32 * size
        if v in matrices:
            a, b = sorted(v["shape"])
            gl = m[f"greedylore r={r}"]
            # one probe score per basis direction, then r rows of length b
            assert gl["compressed"] == 32 * (a + r * b)
            assert gl["refresh"] == gl["warmup"] == 32 * size
            assert gl["period"] == pytest.approx((gl["refresh"] + (tau - 1) * gl["compressed"])
                                                 / tau)
            assert m[f"powersgd r={r}"]["compressed"] == 32 * r * (a + b)   # P and Q
        else:  # vectors and dense-marked leaves: every method sends them whole
            assert {x["compressed"] for x in m.values()} == {32 * size}
    assert d["targets"]["gpt2-small"]["greedylore_le_powersgd_every_matrix"] is True


@pytest.mark.slow
def test_overhead_combines_phases_as_documented(tmp_path):
    tau = 50
    overhead.main(["--out", str(tmp_path), "--configs", "digits:32,32@64", "--rounds", "2",
                   "--tau", str(tau)])
    d = _written(tmp_path, "overhead")
    (res,) = d["results"]
    methods = res["methods"]
    assert {"dense", "greedylore (paper)", "powersgd r=4",
            "greedylore (default: range tracking)"} <= set(methods)
    dense = methods["dense"]["amortized"]
    for name, ph in methods.items():
        if "refresh" in ph:
            assert ph["amortized"] == pytest.approx(
                ((tau - 1) * ph["compressed"] + ph["refresh"]) / tau)
        elif "compressed" in ph:   # the default refreshes at its first step only
            assert ph["amortized"] == ph["compressed"]
        assert ph["overhead"] == pytest.approx(ph["amortized"] / dense), name
    (target,) = d["targets"]
    best = min(ph["overhead"] for n, ph in methods.items() if n.startswith("greedylore"))
    assert target["met"] == (best <= 1.10)


@pytest.mark.slow
def test_time_to_target_bits_and_bandwidth_model(tmp_path):
    time_to_target.main(["--out", str(tmp_path), "--tasks", "digits", "--max-steps", "4",
                         "--repeats", "1", "--methods", "powersgd"])
    d = _written(tmp_path, "time_to_target")
    (res,) = d["results"]
    dense = res["methods"]["dense"]
    assert dense["bits_per_step"] == 32 * 85_002   # the digits MLP (64-256-256-10)
    for name, m in res["methods"].items():
        assert m["steps_run"] == 4 and not m["reached"]   # 4 steps cannot reach the target
        s = m["bits_per_step"]
        ar = s * m["hlo_all_reduce_bits"] / (m["hlo_all_reduce_bits"]
                                             + m["hlo_all_gather_bits"])
        for gbps, by_n in m["projected_step_s"].items():
            for n, t in by_n.items():
                bw, n = float(gbps) * 1e9, int(n)
                expect = m["compute_s"] + 2 * (n - 1) / n * ar / bw + (n - 1) * (s - ar) / bw
                assert t == pytest.approx(expect, rel=1e-6), (name, gbps, n)
    assert res["methods"]["powersgd r=4"]["bits_per_step"] < dense["bits_per_step"]


def test_train_run_stops_at_a_held_out_lm_target(mesh):
    """``lm`` with a held-out target: evaluations every 3 steps on a fixed, evenly spaced
    subset of test windows; the run stops at the first evaluation at or below it."""
    import lore_jax
    from benchmarks import common
    from lore_jax.training import tasks

    dense = lore_jax.compressed_mean(lore_jax.compressors.identity(), error_feedback=None)
    tx = optax.chain(dense, optax.adam(3e-3))
    run = common.train_run("lm", tx, steps=6, mesh=mesh, batch_size=16, seq_len=16,
                           d_model=16, num_heads=2, num_layers=1, eval_every=3,
                           eval_examples=64, target=100.0, target_metric="test")
    assert run["steps_to_target"] == 3 and len(run["losses"]) == 3   # the first evaluation
    assert [s for s, _ in run["evals"]] == [3] and run["evals"][0][1] < 100.0
    assert run["bits_to_target"] == run["bits_sent"][2]
    assert run["num_params"] == (
        256 * 16 + 16 * 16 + 16 * 48 + 48 + 16 * 16 + 16 + 16 * 64 + 64 + 64 * 16 + 16
        + 3 * 2 * 16 + 16 * 256 + 256)   # embeddings, one block, 3 LayerNorms, head
    # Only an evaluation at this step counts, and the training loss does not.
    out = {"evals": [[3, 2.0]], "losses": [1.0] * 10}
    assert common._reached(out, 3, 2.0, "test", 10)
    assert not common._reached(out, 3, 1.9, "test", 10)
    assert not common._reached(out, 4, 2.5, "test", 10)
    assert common._reached(out, 4, 1.0, "train", 10)
    assert not common._reached(out, 4, 1.0, "train", 11)   # fewer steps than the window
    dataset = tasks.load_data("lm", seq_len=16)
    x, _ = common.eval_subset(dataset, 64)
    n = len(dataset.x_test)
    np.testing.assert_array_equal(x, dataset.x_test[[round(i * (n - 1) / 63)
                                                     for i in range(64)]])


@pytest.mark.slow
def test_collectives_counts_the_ops_of_each_step(tmp_path):
    collectives.main(["--out", str(tmp_path), "--mlp-layers", "3", "--width", "16",
                      "--gpt-layers", "1", "--gpt-width", "16", "--rank", "2",
                      "--repeats", "1", "--compiles", "1", "--methods", "greedylore"])
    d = _written(tmp_path, "collectives")
    (mlp, gpt) = d["models"].values()
    assert (mlp["leaves"], mlp["shapes"]) == (6, 2)
    for model in (mlp, gpt):
        rows = {r["method"]: r for r in model["rows"]}
        assert set(rows) == {"dense", "greedylore"}
        # Dense: every leaf in one mean, which XLA keeps as one (tuple) all-reduce.
        assert rows["dense"]["collectives"] == {"all-reduce": 1}
        assert rows["dense"]["compile_vs_dense"] == rows["dense"]["train_compile_vs_dense"] == 1
        # GreedyLore's compressed step runs fewer collectives than its three branches hold,
        # and at least its two rounds.
        step, total = rows["greedylore"]["compressed_step"], rows["greedylore"]["collectives"]
        assert 2 <= sum(step.values()) < sum(total.values())
        for r in rows.values():   # the training step holds the update step
            assert r["train_compile_s"] > 0 and r["train_step_s"] > 0
        # GreedyLore's step holds dense's forward, backward and Adam, and its own phases.
        assert 0 < rows["dense"]["train_kernels"] < rows["greedylore"]["train_kernels"]
    figures = {}   # the figure each check judges, recomputed from the rows
    for name, model in d["models"].items():
        for r in model["rows"][1:]:
            per_round = sum((r.get("compressed_step") or r["collectives"]).values())
            figures[f"{name} {r['method']}: <="] = (per_round, 5)
            figures[f"{name} {r['method']}: training"] = (
                float(np.median([a / b for a, b in r["train_compile_pairs"]])), 2)
            assert r["train_compile_s"] == min(a for a, _ in r["train_compile_pairs"])
        figures[f"{name} greedylore: first"] = (
            model["refresh_one_device_s"] / model["numpy_svd_s"], 1)
    assert len(d["checks"]) == len(figures) == 2 * 3
    for c in d["checks"]:   # each verdict is the one its figure gives
        (figure, limit), = [v for k, v in figures.items() if c["target"].startswith(k)]
        assert c["figure"] == pytest.approx(figure) and c["limit"] == limit
        assert c["met"] == (figure <= limit)


def test_distinct_kernels_ignores_names_and_metadata_only():
    def fusion(name, param, op, shape="f32[4]{0}"):
        return (f"%{name} (p.{name}: f32[4]) -> f32[4] {{\n"
                f"  %{param} = {shape} parameter(0)\n"
                f"  ROOT %r.{name} = {shape} {op}(%{param}), "
                f'metadata={{op_name="jit(f)/{name}"}}\n}}\n')
    hlo = "HloModule m\n\n" + "\n".join([
        fusion("fused_computation", "param_0", "sine"),
        fusion("fused_computation.1", "param_0.7", "sine"),       # names differ: shared
        fusion("fused_computation.2", "param_0.8", "cosine"),     # op differs
        fusion("fused_computation.3", "param_0.9", "sine", "f32[8]{0}"),   # shape differs
        fusion("region_0", "param_0.10", "tanh"),                  # not a fusion
    ]) + "\nENTRY %main (x: f32[4]) -> f32[4] {\n  ROOT %x = f32[4]{0} parameter(0)\n}\n"
    assert collectives.distinct_kernels(hlo) == 3


@pytest.mark.slow
def test_lm_quality_runs_and_judges_its_targets_from_the_rows(tmp_path):
    from benchmarks import lm_quality

    lm_quality.main(["--out", str(tmp_path), "--sizes", "16x1", "--ranks", "2", "--seeds",
                     "0", "--steps", "4", "--eval-every", "2", "--eval-examples", "32",
                     "--methods", "dense,powersgd,greedylore"])
    d = _written(tmp_path, "lm_quality")
    rows = {r["method"]: r for r in d["rows"]}
    assert set(rows) == {"dense", "powersgd", "greedylore"}
    for r in rows.values():   # the counters: dense sends every float, the others fewer
        assert r["compression"] == pytest.approx(
            rows["dense"]["bits_sent"] / r["bits_sent"], rel=1e-9)
    assert rows["dense"]["compression"] == 1.0 < rows["powersgd"]["compression"]
    assert d["targets"]["16x1"] == pytest.approx(1.05 * rows["dense"]["test_loss"])
    # The verdicts follow from the rows alone.
    fake = [dict(size="s", rank=4, method="dense", test_loss=2.0, bits_sent=100.0,
                 compression=1.0),
            dict(size="s", rank=4, method="powersgd", test_loss=2.10, bits_sent=10.0,
                 compression=10.0),
            dict(size="s", rank=4, method="greedylore", test_loss=2.05, bits_sent=9.0,
                 compression=11.1)]
    checks = lm_quality.check_targets(fake)
    assert [c["met"] for c in checks] == [True, True]        # 2.05 <= 2.10; +2.5% at 11x
    fake[2].update(bits_sent=11.0, compression=9.1)
    assert [c["met"] for c in lm_quality.check_targets(fake)] == [False, False]
    # PowerSGD at GreedyLore's bits: linear in log-bits between its ranks (1.9 halfway).
    rows = [dict(size="s", rank=4, method="powersgd", test_loss=2.0, bits_sent=100.0),
            dict(size="s", rank=8, method="powersgd", test_loss=1.8, bits_sent=200.0),
            dict(size="s", rank=4, method="greedylore", test_loss=1.95,
                 bits_sent=100 * 2 ** 0.5)]
    (e,) = lm_quality.at_equal_bits(rows)
    assert e["powersgd_at_same_bits"] == pytest.approx(1.9)
    assert e["difference"] == pytest.approx(0.05)


def test_long_run_resumes_and_judges_its_targets_from_the_rows(tmp_path):
    from benchmarks import long_run

    args = ["--out", str(tmp_path), "--sizes", "16x1", "--seeds", "0", "--steps", "4",
            "--eval-every", "2", "--eval-examples", "32"]
    methods = ["--methods", "dense;diloco:H=2,olr=1,om=0,mean=topk0.1,decay=0.9"]
    long_run.main([*args, *methods])
    first = json.loads((tmp_path / "long_run_runs.json").read_text())
    long_run.main([*args, *methods])            # resumed: finished runs are not run again
    assert json.loads((tmp_path / "long_run_runs.json").read_text()) == first
    rows = {r["method"]: r for r in _written(tmp_path, "long_run")["rows"]}
    dense, dil = rows["dense"], rows["diloco:H=2,olr=1,om=0,mean=topk0.1,decay=0.9"]
    assert dense["compression"] == 1.0 and dense["gap"] == 0.0
    assert dil["compression"] > 2 * 5          # a round every 2 steps, 10% of each leaf
    assert dil["gap"] == pytest.approx(dil["test_loss"] / dense["test_loss"] - 1)
    # The verdicts follow from the rows alone (3 seeds needed).
    def row(method, gap, compression, seeds=3):
        return dict(size="s", steps=10, method=method, seeds=seeds, gap=gap,
                    compression=compression)
    fake = [row("greedylore:r=4", 0.009, 9.6), row("demo:k=8", 0.019, 90.0),
            row("diloco:H=50", 0.06, 600.0), row("diloco:H=99", 0.01, 900.0, seeds=1)]
    assert [c["met"] for c in long_run.check_targets(fake, "s", 10)] == [True, True, False]
    with pytest.raises(ValueError, match="'x=1' is not KEY=VALUE with KEY in r"):
        long_run.parse_method("greedylore:x=1")
    with pytest.raises(ValueError, match="unknown method 'adam'"):
        long_run.parse_method("adam")


def test_diagnosis_shares_are_the_projection_energy_and_the_best_rank_r():
    from benchmarks import greedylore_diagnosis as diag

    rng = np.random.default_rng(0)
    g = {"w": rng.standard_normal((6, 10))}
    e_old = {"w": 0.1 * rng.standard_normal((6, 10))}
    h = g["w"] + e_old["w"]
    p = np.linalg.qr(rng.standard_normal((6, 2)))[0]         # any rank-2 projection
    e_new = {"w": h - p @ p.T @ h}
    cap, best, total = diag.shares(g, e_old, e_new, 2)
    assert total == pytest.approx(np.sum(h * h))
    assert cap == pytest.approx(np.sum((p.T @ h) ** 2))
    assert best == pytest.approx(np.sum(np.linalg.svd(h, compute_uv=False)[:2] ** 2))
    assert cap <= best


@pytest.mark.parametrize("name", ["bytes_on_wire", "cluster_bytes", "cluster_time",
                                  "collectives", "compile_leaves", "gpu_check",
                                  "greedylore_diagnosis", "lm_quality", "long_run", "overhead",
                                  "run_all",
                                  "time_to_target", "workarounds"])
def test_every_benchmark_prints_its_help(name, capsys):
    """argparse %-formats help texts: a method named "topk 1%" once broke ``--help``."""
    import importlib

    module = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out
