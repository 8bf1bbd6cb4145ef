"""Suite time: the wall time of the README's test command, `python -m pytest -q` (CI=true).

    python -m benchmarks.suite_time [--quick] [--json] [-- PYTEST ARGS]

Not run by `python -m benchmarks` unless asked (`--only suite`): it takes
minutes and runs the browser test. Runs in the current environment, so
`ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` reproduces an AVX2-only CPU
(the results file then names it as simulated). Target: <= 8 min wall on a
2-core AVX2-only machine. Reports CPU time too: on a busy machine the wall
time mostly measures the other processes.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, emit, row  # noqa: E402

SECTION = "suite time"
TARGET_S = 8 * 60


def measure(pytest_args: list) -> list:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "CI": "true"}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    summary = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    what = f"`CI=true python -m pytest -q {' '.join(pytest_args)}`".replace(" `", "`") + f" ({summary})"
    return [row(SECTION, what, f"{wall / 60:.1f} min wall (CPU {cpu / 60:.1f} min)", "8 min", wall / TARGET_S,
                "time / target", "≤ 8 min on 2-core AVX2", wall <= TARGET_S if proc.returncode == 0 else False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one small test file (checks the plumbing)")
    ap.add_argument("--json", action="store_true", help="rows as JSON for `python -m benchmarks`")
    ap.add_argument("pytest_args", nargs="*", help="passed to pytest (default: the whole suite)")
    args = ap.parse_args()
    emit(measure(args.pytest_args or (["tests/test_precision.py"] if args.quick else [])), args.json)


if __name__ == "__main__":
    main()
