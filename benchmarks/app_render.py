"""Render time of every app page, cold and warm, with the largest sample checkpoint.

    python benchmarks/app_render.py [--checkpoint DIR] [--repeats 3]

Measured with streamlit's AppTest (in-process, no browser; charts are
serialised but not drawn):
- cold: a fresh AppTest session after `st.cache_data.clear()` and
  `st.cache_resource.clear()`, so models, datasets and analyses are loaded and
  computed again (Python modules stay imported: the first page's time also
  shows import cost, and is listed separately);
- warm: the same session run again (median of --repeats), i.e. what a user
  waits for after touching a widget that changes nothing expensive.
Targets (issue 6): warm <= 1 s, cold <= 5 s per page on this machine.
Prints a markdown table (or JSON rows with --json); exits non-zero if any page raised.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

APP = str(ROOT / "workbench" / "app.py")
COLD_TARGET, WARM_TARGET = 5.0, 1.0


def app_pages() -> list[tuple[str, str]]:
    """(title, path relative to workbench/app.py) of every st.Page declared in the app."""
    import ast

    pages = []
    for node in ast.walk(ast.parse(Path(APP).read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "Page" and node.args:
            path = node.args[0].value
            title = next((k.value.value for k in node.keywords if k.arg == "title"), Path(path).stem)
            pages.append((title, path))
    return pages


def render(at) -> tuple[float, float, list[str]]:
    """-> (wall seconds, process CPU seconds, problems). CPU time (all threads) shows the work done
    independently of other load on the machine; on an idle 2-core machine wall >= CPU / 2."""
    t0, c0 = time.perf_counter(), time.process_time()
    at.run()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    problems = [e.message for e in at.exception] + [f"st.error: {e.value}" for e in at.error]
    return dt, cpu, problems


def cold_render(page: str, ref: str, timeout: float):
    """A fresh AppTest on `page` with every Streamlit cache emptied -> (app, seconds, CPU seconds, problems)."""
    import streamlit as st  # imported after main() has set the folders' environment
    from streamlit.testing.v1 import AppTest

    from pages.common import CKPT_KEY

    st.cache_data.clear()
    st.cache_resource.clear()
    at = AppTest.from_file(APP, default_timeout=timeout)
    at.session_state[CKPT_KEY] = ref
    at.switch_page(page)
    return (at, *render(at))


def measure(checkpoint=None, repeats: int = 3, timeout: float = 300, log=sys.stderr) -> tuple[list, bool]:
    """-> (result rows, whether any page raised)."""
    from benchmarks.common import largest_sample, row
    from workbench.paths import samples_dir

    if checkpoint:  # the app only opens checkpoints under the samples/runs folders
        ckpt = Path(checkpoint).resolve()
        os.environ["WORKBENCH_SAMPLES"] = str(ckpt.parent)
    else:
        ckpt = largest_sample()
        if ckpt is None:
            sys.exit(f"no sample checkpoints in {samples_dir()}; pass --checkpoint DIR or set WORKBENCH_SAMPLES")
    # the Train page lists runs: give it an empty runs folder, so the user's runs do not count
    os.environ.setdefault("WORKBENCH_RUNS", tempfile.mkdtemp(prefix="bench-runs-"))

    from pages.common import ckpt_ref
    from workbench.checkpoint import read_card

    card = read_card(ckpt)
    ref = ckpt_ref(ckpt)
    print(f"checkpoint: {ref} ({card.get('preset')}, {(card.get('params') or {}).get('total', 0) / 1e6:.2f}M params, "
          f"dataset {card.get('dataset')})", file=log)
    rows, failed, t_first = [], False, None
    for title, page in app_pages():
        at, cold, cold_cpu, problems = cold_render(page, ref, timeout)
        if t_first is None:
            t_first = cold
            # modules are imported on this first run; measure it again cold, with imports done
            at, cold, cold_cpu, problems = cold_render(page, ref, timeout)
        warm_times = []
        for _ in range(repeats):
            dt, _, more = render(at)
            warm_times.append(dt)
            problems += more
        warm = statistics.median(warm_times)
        failed |= bool(problems)
        note = ("; PROBLEMS: " + "; ".join(p.replace("\n", " ")[:120] for p in problems[:2])) if problems else ""
        print(f"  {title}: cold {cold:.2f} s ({cold_cpu:.2f} s CPU), warm {warm:.2f} s{note}", file=log, flush=True)
        worst = max(cold / COLD_TARGET, warm / WARM_TARGET)
        rows.append(row("app", f"page '{title}' with `{ref}` ({card.get('preset')}): cold / warm render{note}",
                        f"{cold:.2f} s / {warm:.2f} s", f"{COLD_TARGET:.0f} s / {WARM_TARGET:.0f} s",
                        worst, "worst time / target", f"cold ≤ {COLD_TARGET:.0f} s, warm ≤ {WARM_TARGET:.0f} s",
                        worst <= 1.0 and not problems))
    rows.append(row("app", "first page including module imports (torch, plotly, …), cold", f"{t_first:.2f} s", "",
                    None, ""))
    return rows, failed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", help="checkpoint folder (default: the largest under the samples folder)")
    ap.add_argument("--repeats", type=int, default=3, help="warm runs per page (median reported)")
    ap.add_argument("--timeout", type=float, default=300, help="AppTest timeout per run, seconds")
    ap.add_argument("--quick", action="store_true", help="1 warm run per page")
    ap.add_argument("--json", action="store_true", help="rows as JSON for `python -m benchmarks`")
    args = ap.parse_args()
    from benchmarks.common import emit

    rows, failed = measure(args.checkpoint, 1 if args.quick else args.repeats, args.timeout)
    emit(rows, args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
