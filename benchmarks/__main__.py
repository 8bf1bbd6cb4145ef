"""Run every benchmark and write one table: `python -m benchmarks`.

    python -m benchmarks [--quick] [--only SECTION ...] [--out benchmarks/results.md]
                         [--peer-python /tmp/bench-venv/bin/python]
    python -m benchmarks --only suite      # the suite-time row: only when asked

Each section runs in its own subprocess (clean thread pools, caches and peak
memory) and hands back rows as JSON; every comparison inside a section is
measured side by side in that one process, interleaved, median of repeats,
since absolute times on a shared machine are noisy — read the ratios.
The timm comparison needs timm, which cannot be imported next to the
project's torch (shared/NOTES.md): it runs under `--peer-python` (default
$BENCH_PEER_PYTHON, else /tmp/bench-venv/bin/python when present), and its
row says "skipped" with the reason when none has timm.
The results file keeps one part per CPU kind (model, ISA level, native bf16,
cores), so figures from different machines are never mixed: a run replaces,
in its CPU kind's part, the tables of the sections it ran, and leaves every
other table (and every other CPU kind) as it was.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.common import JSON_MARKER, ROOT, machine, markdown_table, skipped

# section -> (module, what it measures); run in this order
SECTIONS = {
    "peer": ("benchmarks.peer", "training throughput vs timm"),
    "limit": ("benchmarks.limit", "achieved training GFLOP/s vs GEMM peak"),
    "moe": ("benchmarks.moe_latency", "per-image MoE cost; per-token dispatch"),
    "training": ("benchmarks.train_throughput", "bf16 autocast before/after"),
    "analysis": ("benchmarks.analysis_speed", "analysis targets"),
    "scaling": ("benchmarks.scaling", "routing analysis vs images, batch, experts"),
    "app": ("benchmarks.app_render", "page render times"),
    "latency": ("benchmarks.batch1_latency", "batch-1 latency: dense vs per-image vs per-token MoE"),
    "data": ("benchmarks.data_path", "imagefolder load time and peak memory"),
    "suite": ("benchmarks.suite_time", "wall time of the README test command (only when asked)"),
}
ONLY_WHEN_ASKED = {"suite"}
DEFAULT_PEER_PYTHON = "/tmp/bench-venv/bin/python"


def has_timm(python: str) -> bool:
    try:
        return subprocess.run([python, "-c", "import timm"], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def peer_python(requested: str | None) -> tuple[str | None, str]:
    """The interpreter for the timm section, or (None, why not)."""
    candidates = [requested] if requested else [sys.executable, os.environ.get("BENCH_PEER_PYTHON"),
                                                DEFAULT_PEER_PYTHON]
    for python in filter(None, candidates):
        if Path(python).exists() and has_timm(python):
            return python, ""
    return None, ("timm not found in " + ", ".join(filter(None, candidates)) +
                  "; create the venv shown in benchmarks/peer.py or pass --peer-python")


def run_section(module: str, python: str, quick: bool, log) -> tuple[list, dict | None]:
    cmd = [python, "-m", module, "--json"] + (["--quick"] if quick else [])
    print(f"$ {' '.join(cmd)}", file=log, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    print(proc.stderr[-2000:] if proc.returncode else "", end="", file=log)
    print(f"  ({time.perf_counter() - t0:.0f} s, exit {proc.returncode})", file=log, flush=True)
    for line in proc.stdout.splitlines():
        if line.startswith(JSON_MARKER):
            data = json.loads(line[len(JSON_MARKER):])
            return data["rows"], data["machine"]
    return [skipped(module, "section failed", f"exit {proc.returncode}: "
                    + (proc.stderr.strip().splitlines() or ["no output"])[-1][:200])], None


def describe(m: dict) -> str:
    return (f"{m['cpu']}, {m['isa']}, native bf16: {'yes' if m['native_bf16'] else 'no'}, {m['cores']} cores "
            f"({m['threads']} torch threads), {m['memory']} RAM, torch {m['torch']} (ATen CPU capability "
            f"{m['capability']}), Python {m['python']}")


def cpu_kind(m: dict) -> str:
    """What makes figures comparable: the CPU model, its ISA level (or the simulated one), bf16, cores."""
    return f"{m['cpu']} · {m['isa']} · native bf16: {'yes' if m['native_bf16'] else 'no'} · {m['cores']} cores"


PREAMBLE = """# Benchmark results

Written by `python -m benchmarks`. One part per CPU kind: figures are only comparable within a part.
Within a part, each table comes from the run named above it (command, date, load).
Ratios: *speed-up* = comparison time / our time (> 1: ours faster); *time X / Y* = our time /
comparison time (< 1: ours cheaper); *fraction of peak* = achieved / peak; *fraction of the step* = time in that part / step time.
"""


def read_results(path: Path) -> dict:
    """{cpu kind: {table title: markdown}} from a results file written by `write_results`."""
    kinds, kind, title = {}, None, None
    if not path.exists():
        return kinds
    for line in path.read_text().splitlines():
        if line.startswith("## CPU: "):
            kind, title = line[len("## CPU: "):].strip(), None
            kinds.setdefault(kind, {})
        elif line.startswith("### ") and kind is not None:
            title = line[4:].strip()
            kinds[kind][title] = ""
        elif kind is not None and title is not None:
            kinds[kind][title] += line + "\n"
    return kinds


def write_results(path: Path, kinds: dict) -> None:
    parts = [PREAMBLE]
    for kind, tables in kinds.items():
        parts.append(f"## CPU: {kind}\n")
        parts += [f"### {title}\n\n{text.strip()}\n" for title, text in tables.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(parts))
    tmp.replace(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few repeats and small sizes: checks the plumbing, "
                   "not figures to quote")
    p.add_argument("--only", nargs="+", choices=list(SECTIONS), metavar="SECTION",
                   help="run these sections only: " + "; ".join(f"{n} ({what})" for n, (_, what) in SECTIONS.items()))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results.md"), help="markdown file to write")
    p.add_argument("--peer-python", default=None, help="a Python with timm and torch for the peer section")
    args = p.parse_args(argv)

    started = datetime.now(timezone.utc)
    here = machine()
    rows, peer_machine = {}, None
    for name in args.only or [n for n in SECTIONS if n not in ONLY_WHEN_ASKED]:
        module, _ = SECTIONS[name]
        python = sys.executable
        if name == "peer":
            python, why = peer_python(args.peer_python)
            if python is None:
                print(f"peer section skipped: {why}", file=sys.stderr)
                rows[name] = [skipped("peer (timm)", "vit-6x96, vit-12x192 training vs timm VisionTransformer", why)]
                continue
        section_rows, m = run_section(module, python, args.quick, sys.stderr)
        rows[name] = section_rows
        if name == "peer" and m:
            peer_machine = m
    minutes = (datetime.now(timezone.utc) - started).total_seconds() / 60
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(markdown_table([r for rs in rows.values() for r in rs]))

    command = "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])
    run_line = (f"`{command.strip()}` — {started:%Y-%m-%d %H:%M} UTC, {minutes:.1f} min, load average "
                f"{here['load_average'][0]:.2f} before / {load_after:.2f} after"
                + (" (**--quick: smoke-run sizes, not figures to quote**)" if args.quick else "")
                + f". {describe(here)}.")
    out = Path(args.out)
    kinds = read_results(out)
    tables = kinds.setdefault(cpu_kind(here), {})
    for name, section_rows in rows.items():
        text = run_line
        if name == "peer" and peer_machine:
            text += (f" The peer section ran in a separate venv: torch {peer_machine['torch']}, Python "
                     f"{peer_machine['python']} (timm cannot be imported beside the project's torch).")
        tables[f"{name}: {SECTIONS[name][1]}"] = text + "\n\n" + markdown_table(section_rows)
    write_results(out, kinds)
    print(f"\nwritten to {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
