"""End-to-end runs of the E1-E8 example scripts in --quick mode, on the 8 simulated devices.

Each script's ``main(argv)`` runs in this process (conftest.py has already given JAX its 8
CPU devices) and writes a PNG and a JSON into a temporary directory. The JSON's verdicts
are computed by the script from its measured curves; the test requires every one of them
to hold and checks that the curves it reports are well formed (and, for E3, that they show
what its verdicts say).
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `examples` is a directory of the repository, not installed
    sys.path.insert(0, str(ROOT))

from examples.run_all import SCRIPTS  # the scripts run_all.py runs: E1-E8


def _number(x) -> float:
    """A JSON value: a number, or "inf" / "nan" for non-finite ones."""
    return float(x)


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_example_quick_run_reproduces_its_claims(name, tmp_path, capsys):
    module = importlib.import_module(f"examples.{name}")
    ok = module.main(["--quick", "--out", str(tmp_path)])
    printed = capsys.readouterr().out

    png, js = tmp_path / f"{name}.png", tmp_path / f"{name}.json"
    assert png.exists() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(js.read_text())
    assert report["experiment"] == name[:2].upper()
    assert report["config"]["quick"] is True
    assert "not quoted from the paper" in report["provenance"]

    claims = report["claims"]
    assert claims, "a script must judge at least one claim"
    failed = [c["claim"] for c in claims if not c["ok"]]
    assert not failed, f"{name}: not reproduced: {failed}\n{printed}"
    assert ok is True and report["all_ok"] is True
    # One verdict line per claim on stdout.
    for c in claims:
        assert f"{report['experiment']}: {c['claim']}: OK" in printed

    if name != "e1_compressor_constants":   # optimization runs: curves vs iterations and bits
        assert report["curves"]
        for curve in report["curves"]:
            its, bits = curve["iterations"], curve["bits"]
            values = [_number(v) for v in curve["values"]]
            assert len(its) == len(bits) == len(values) >= 2
            assert its == sorted(its) and its[0] == 0
            assert all(b2 >= b1 for b1, b2 in zip(bits, bits[1:], strict=False))
            assert bits[0] == 0 and bits[-1] > 0
            assert math.isfinite(values[0]) and values[0] > 0
            if "bound" in curve:
                assert len(curve["bound"]) == len(its)

    if name == "e3_step_size_admissibility":
        # The verdicts follow from the stored curves: runs with c <= 1 end far below where
        # they started, runs with c > 2 far above.
        for curve in report["curves"]:
            start, end = _number(curve["values"][0]), _number(curve["values"][-1])
            if curve["factor"] <= 1:
                assert end < 1e-4 * start, curve["label"]
            elif curve["factor"] > 2:
                assert not end < 1e3 * start, curve["label"]

