"""Runs every benchmark (each in its own process) and collects the tables in one file.

Example:
  python -m benchmarks.run_all                     # default sizes, results/ (~25 min, 2 cores)
  python -m benchmarks.run_all --full --out results/full
  python -m benchmarks.run_all --only overhead,bytes_on_wire
  python -m benchmarks.run_all --collect           # only rebuild results.md from the .md files
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ORDER = ["bytes_on_wire", "overhead", "time_to_target", "collectives", "workarounds"]
LONG = ["lm_quality", "greedylore_diagnosis"]   # run with --only (about 80 and 10 minutes)
FULL = {
    "bytes_on_wire": ["--check-layers", "12"],
    "overhead": ["--configs", "digits:256,256 digits:1024,1024@1024 digits:2048,2048@2048 "
                 "charlm charlm@256",
                 "--rounds", "30"],
    "time_to_target": ["--max-steps", "2000", "--repeats", "30"],
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results")
    p.add_argument("--full", action="store_true", help="the larger sizes of each script")
    p.add_argument("--only", default="",
                   help="comma-separated subset of " + ",".join(ORDER + LONG))
    p.add_argument("--collect", action="store_true",
                   help="run nothing; concatenate the scripts' existing .md files")
    args = p.parse_args(argv)
    names = [n for n in ORDER + LONG
             if n in args.only.split(",") or not args.only and n in ORDER]
    out = Path(args.out)
    failed = []
    for name in [] if args.collect else names:
        cmd = [sys.executable, "-m", f"benchmarks.{name}", "--out", str(out)]
        if args.full:
            cmd += FULL.get(name, [])
        print(f"\n=== {' '.join(cmd[1:])}", flush=True)
        t = time.perf_counter()
        rc = subprocess.call(cmd)
        print(f"=== {name}: exit {rc} after {time.perf_counter() - t:.0f} s", flush=True)
        if rc:
            failed.append(name)
    parts = ["# lore_jax benchmark results\n"]
    for name in names:
        md = out / f"{name}.md"
        if md.exists():
            parts.append(f"## {name}\n\n{md.read_text()}")
    (out / "results.md").write_text("\n".join(parts))
    print(f"wrote {out / 'results.md'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
