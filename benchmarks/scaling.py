"""How the routing analysis grows with image count, batch size and number of experts.

    python benchmarks/scaling.py [--json]

One full routing analysis = `analysis.collect.collect_routing` (one batched
pass, fp32, inference mode) + `analysis.routing.routing_report`, on a randomly
initialised per-token model `vmoe-6x96-eEk2` (the family whose kept arrays
grow fastest: N x 50 tokens x E probabilities per MoE layer). Each row gives
the wall time, the peak resident memory added by the call (Linux: VmHWM after
resetting it through /proc/self/clear_refs) and the size of the kept result;
the ratio compares time per image with the first row of its sweep, so 1.00x
everywhere means linear growth in images and flat cost in the other axes.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from analysis.collect import collect_routing  # noqa: E402
from analysis.routing import routing_report  # noqa: E402
from benchmarks.common import emit, row  # noqa: E402
from workbench.models import create_model  # noqa: E402

SECTION = "scaling (routing analysis)"


def _rss_kb(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def summary_bytes(summary) -> int:
    arrays = [summary.labels, summary.predictions, summary.features, summary.router_inputs]
    for layer in summary.layers:
        arrays += [layer.experts, layer.kept, layer.gates, layer.probs, layer.router_input]
    return sum(a.nbytes for a in arrays if isinstance(a, np.ndarray))


def one_run(experts: int, images: int, batch_size: int) -> dict:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = create_model(f"vmoe-6x96-e{experts}k2").eval()
    x = torch.randint(0, 256, (images, 1, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (images,), generator=g)
    collect_routing(model, x[:batch_size], y[:batch_size], batch_size=batch_size)   # warm-up
    can_peak = _reset_peak()
    before = _rss_kb("VmRSS")
    t0 = time.perf_counter()
    summary = collect_routing(model, x, y, batch_size=batch_size)
    routing_report(summary)
    seconds = time.perf_counter() - t0
    peak = _rss_kb("VmHWM") - before if can_peak else None
    return {"seconds": seconds, "peak_mb": None if peak is None else peak / 1024, "kept_mb": summary_bytes(summary) / 2**20}


def measure(quick: bool = False) -> list:
    base_images = 2000 if quick else 10_000
    sweeps = {
        "images": [dict(experts=8, images=n, batch_size=256) for n in
                   ((500, 1000, 2000) if quick else (2500, 5000, 10_000, 20_000))],
        "batch size": [dict(experts=8, images=base_images, batch_size=b) for b in (64, 256, 1024)],
        "experts": [dict(experts=e, images=base_images, batch_size=256) for e in (4, 8, 16, 32)],
    }
    rows = []
    for axis, settings in sweeps.items():
        first = None
        for s in settings:
            r = one_run(**s)
            per_image = r["seconds"] / s["images"]
            first = first or per_image
            peak = "n/a" if r["peak_mb"] is None else f"+{r['peak_mb']:.0f} MB peak"
            rows.append(row(SECTION, f"{axis}: vmoe-6x96-e{s['experts']}k2, {s['images']} images, "
                            f"batch {s['batch_size']}",
                            f"{r['seconds']:.2f} s = {1e3 * per_image:.2f} ms/img; {peak}; {r['kept_mb']:.0f} MB kept",
                            f"{1e3 * first:.2f} ms/img (first row)", per_image / first, "time per image vs first row"))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2,000 images at most (a smoke run)")
    p.add_argument("--json", action="store_true", help="rows as JSON for `python -m benchmarks`")
    args = p.parse_args()
    emit(measure(args.quick), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
