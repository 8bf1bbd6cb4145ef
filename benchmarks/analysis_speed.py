"""How long the analyses take on this machine (issue 5 targets).

- Full routing analysis of a randomly initialised `mvmoe-12x192-e10k1` on
  10,000 random 28x28 images: one batched pass (`collect_routing`) plus every
  statistic (`routing_report`). Target: < 20 s.
- One Integrated Gradients attribution with 32 steps (class logit and router
  logit) of the same model. Target: < 2 s.

The pass runs in fp32 (the library default) and under bf16 autocast with the
routers kept in fp32 (`bf16=True`); the table also gives how many router
decisions bf16 changes. Prints a markdown table (or JSON rows with --json).

    python benchmarks/analysis_speed.py [--images 10000] [--batch-size 256] [--json]

Measured on the project machine (2 cores, AVX512-BF16, idle): fp32 pass 40.5 s
(247 img/s), bf16 pass 13.1-13.4 s (750 img/s), statistics 0.02 s, IG 32 steps
0.2 s. fp32 cannot reach 20 s here: 10k images x 277M MACs = 2.77 TMAC, and
2.77 TMAC in 20 s needs 277 GFLOP/s of fp32 GEMM, twice what two cores deliver
(~137 GFLOP/s measured); bf16 dot products double the rate. Other processes on
the machine inflate wall times badly (oneDNN's threads wait for each other),
so compare runs only at a low load average (`python -m benchmarks` records it).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from analysis.attribution import class_attribution, router_attribution  # noqa: E402
from analysis.collect import collect_routing  # noqa: E402
from analysis.routing import routing_report  # noqa: E402
from benchmarks.common import emit, largest_sample, row, skipped  # noqa: E402
from workbench.models import create_model  # noqa: E402


SECTION = "analysis"


def timed(fn, repeat: int = 1):
    """(result of the last call, (wall s, process CPU s) of the fastest call)."""
    best, out = (float("inf"), float("inf")), None
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        best = min(best, (time.perf_counter() - t, time.process_time() - c))
    return out, best


def route_agreement(a, b) -> str:
    """Share of images whose first MoE layer's top-1 expert is the same in two routing summaries."""
    return f"{float((a.layers[0].top1 == b.layers[0].top1).mean()):.2%}"


def trained_sample_agreement(batch_size: int = 256) -> list:
    """Is bf16 analysis accuracy-neutral on a *trained* model? The largest shipped per-image sample,
    the whole test split, fp32 vs bf16 (routers in fp32): agreement of predictions and routes."""
    from workbench.checkpoint import load_checkpoint
    from workbench.data import load_dataset

    path = largest_sample("mvmoe")
    if path is None:
        return [skipped(SECTION, "bf16 vs fp32 on a trained model", "no per-image sample checkpoint")]
    model, card = load_checkpoint(path)
    data = load_dataset(card["dataset"], "test")
    a, b = (collect_routing(model, data.images, data.labels, data.mean, data.std, batch_size, bf16=bf16)
            for bf16 in (False, True))
    what = f"bf16 vs fp32 analysis of trained `{path.name}`, {len(data)} test images"
    return [row(SECTION, f"{what}: predictions unchanged", f"{float((a.predictions == b.predictions).mean()):.2%}",
                "", None, ""),
            row(SECTION, f"{what}: router decisions unchanged", route_agreement(a, b), "", None, ""),
            row(SECTION, f"{what}: test accuracy", f"bf16 {b.accuracy:.2%}", f"fp32 {a.accuracy:.2%}",
                None, "")]


def measure(images: int = 10_000, batch_size: int = 256, ig_repeat: int = 3) -> list:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = create_model("mvmoe-12x192-e10k1", num_classes=10).eval()
    x = torch.randint(0, 256, (images, 1, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (images,), generator=g)
    mean, std = (0.2860,), (0.3530,)                  # Fashion-MNIST's statistics
    superclasses = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]      # E = 10 super-classes, one per class here

    collect_routing(model, x[:64], y[:64], mean, std)            # warm-up (kernels, allocator)
    totals, summaries = {}, {}
    for bf16 in (False, True):
        s, t_pass = timed(lambda: collect_routing(model, x, y, mean, std, batch_size,
                                                  superclasses=superclasses, bf16=bf16))
        _, t_stats = timed(lambda: routing_report(s))
        summaries[bf16] = s
        totals[bf16] = (t_pass[0] + t_stats[0], t_pass[1] + t_stats[1])
    what = f"full routing analysis of mvmoe-12x192-e10k1 (random init), {images} images, batch {batch_size}"
    rows = [row(SECTION, f"{what}, fp32 (library default)", f"{totals[False][0]:.1f} s",
                "20 s", totals[False][0] / 20.0, "time / target", "< 20 s", totals[False][0] < 20.0),
            row(SECTION, f"{what}: bf16 autocast with fp32 routers (`bf16=True`) vs fp32",
                f"{totals[True][0]:.1f} s", f"{totals[False][0]:.1f} s", totals[False][0] / totals[True][0],
                "speed-up", "< 20 s", totals[True][0] < 20.0)]
    a, b = summaries[False], summaries[True]
    rows.append(row(SECTION, "bf16 vs fp32 on this untrained model: router top-1 decisions unchanged",
                    route_agreement(a, b), "", None, ""))

    rows += trained_sample_agreement(batch_size)

    image = x[0]
    for name, fn in (("class logit", class_attribution), ("router logit", router_attribution)):
        _, t = timed(lambda: fn(model, image, mean, std, method="ig", n_steps=32), ig_repeat)
        rows.append(row(SECTION, f"Integrated Gradients, 32 steps, {name} (best of {ig_repeat})", f"{t[0]:.2f} s",
                        "2 s", t[0] / 2.0, "time / target", "< 2 s", t[0] < 2.0))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--ig-repeat", type=int, default=3, help="IG timings are the best of this many runs")
    p.add_argument("--quick", action="store_true", help="1,000 images (a smoke run)")
    p.add_argument("--json", action="store_true", help="rows as JSON for `python -m benchmarks`")
    args = p.parse_args()
    emit(measure(1000 if args.quick else args.images, args.batch_size, 1 if args.quick else args.ig_repeat), args.json)


if __name__ == "__main__":
    main()
