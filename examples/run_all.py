"""Runs E1-E8 in one process and writes a summary of every verdict.

Usage (from the repository root)::

    python examples/run_all.py --quick            # smoke run, about 2 minutes
    python examples/run_all.py                    # full runs, about 10-15 minutes
    python examples/run_all.py --only e4 e5       # a subset

Each script writes ``<name>.png`` and ``<name>.json`` into ``--out`` (default
``results/examples``); this one adds ``summary.json`` with every claim and its verdict.
Exit status 0 when every claim was reproduced.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the `examples` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from examples import common

SCRIPTS = (
    "e1_compressor_constants",
    "e2_convergence_vs_bits",
    "e3_step_size_admissibility",
    "e4_staleness",
    "e5_dcgd_floor",
    "e6_data_sparsity",
    "e7_deterministic_and_absolute",
    "e8_async_and_bcd",
)


def main(argv: Sequence[str] | None = None) -> bool:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every script in --quick mode")
    parser.add_argument("--out", default=common.DEFAULT_OUT, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=None,
                        help="prefixes of the scripts to run, e.g. e2 e7")
    args = parser.parse_args(argv)
    chosen = [s for s in SCRIPTS if not args.only or any(s.startswith(p) for p in args.only)]
    summary, ok = {}, True
    for name in chosen:
        start = time.perf_counter()
        module = importlib.import_module(f"examples.{name}")
        script_argv = ["--out", args.out, "--seed", str(args.seed)] + (
            ["--quick"] if args.quick else [])
        ok &= bool(module.main(script_argv))
        report = json.loads((Path(args.out) / f"{name}.json").read_text())
        summary[name] = {"seconds": round(time.perf_counter() - start, 1),
                         "claims": [(c["claim"], c["ok"]) for c in report["claims"]]}
    Path(args.out, "summary.json").write_text(json.dumps(
        {"quick": args.quick, "all_ok": ok, "scripts": summary}, indent=1))
    print("\nsummary:")
    for name, entry in summary.items():
        held = sum(ok_ for _, ok_ in entry["claims"])
        print(f"  {name:32s} {held}/{len(entry['claims'])} claims reproduced "
              f"({entry['seconds']:.0f} s)")
    return ok


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
