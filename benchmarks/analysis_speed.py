"""How long the analyses take on this machine (issue 5 targets).

- Full routing analysis of a randomly initialised `mvmoe-12x192-e10k1` on
  10,000 random 28x28 images: one batched pass (`collect_routing`) plus every
  statistic (`routing_report`). Target: < 20 s.
- One Integrated Gradients attribution with 32 steps (class logit and router
  logit) of the same model. Target: < 2 s.

The pass runs in fp32 (the library default) and under bf16 autocast with the
routers kept in fp32 (`bf16=True`); the table also gives how many router
decisions and predictions bf16 changes. Prints a markdown table.

    python benchmarks/analysis_speed.py [--images 10000] [--batch-size 256]

Measured on the project machine (2 cores, AVX512-BF16, idle): fp32 pass 40.5 s
(247 img/s), bf16 pass 13.1-13.4 s (750 img/s), statistics 0.02 s, IG 32 steps
0.2 s. fp32 cannot reach 20 s here: 10k images x 277M MACs = 2.77 TMAC, and
2.77 TMAC in 20 s needs 277 GFLOP/s of fp32 GEMM, twice what two cores deliver
(~137 GFLOP/s measured); bf16 dot products double the rate. Other processes on
the machine inflate wall times badly (oneDNN's threads wait for each other),
so compare runs only at a low load average (printed below the table).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from analysis.attribution import class_attribution, router_attribution  # noqa: E402
from analysis.collect import collect_routing  # noqa: E402
from analysis.routing import routing_report  # noqa: E402
from workbench.models import create_model  # noqa: E402


def timed(fn, repeat: int = 1):
    """(result of the last call, (wall s, process CPU s) of the fastest call)."""
    best, out = (float("inf"), float("inf")), None
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        best = min(best, (time.perf_counter() - t, time.process_time() - c))
    return out, best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--ig-repeat", type=int, default=3, help="IG timings are the best of this many runs")
    args = p.parse_args()

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = create_model("mvmoe-12x192-e10k1", num_classes=10).eval()
    images = torch.randint(0, 256, (args.images, 1, 28, 28), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (args.images,), generator=g)
    mean, std = (0.2860,), (0.3530,)                  # Fashion-MNIST's statistics
    superclasses = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]      # E = 10 super-classes, one per class here

    load0 = os.getloadavg()
    collect_routing(model, images[:64], labels[:64], mean, std)            # warm-up (kernels, allocator)
    rows = []
    summaries = {}
    for bf16 in (False, True):
        name = "bf16 autocast, fp32 routers" if bf16 else "fp32"
        s, t_pass = timed(lambda: collect_routing(model, images, labels, mean, std, args.batch_size,
                                                  superclasses=superclasses, bf16=bf16))
        _, t_stats = timed(lambda: routing_report(s))
        summaries[bf16] = s
        rows.append((f"routing pass ({name}), {args.images} images", t_pass, None))
        rows.append((f"routing statistics (`routing_report`)", t_stats, None))
        rows.append((f"**full routing analysis, {name}**", (t_pass[0] + t_stats[0], t_pass[1] + t_stats[1]), 20.0))

    image = images[0]
    _, t_ig = timed(lambda: class_attribution(model, image, mean, std, method="ig", n_steps=32), args.ig_repeat)
    rows.append(("IG, 32 steps, class logit", t_ig, 2.0))
    _, t_ig_r = timed(lambda: router_attribution(model, image, mean, std, method="ig", n_steps=32), args.ig_repeat)
    rows.append(("IG, 32 steps, router logit", t_ig_r, 2.0))

    a, b = summaries[False], summaries[True]
    route_agree = float((a.layers[0].top1 == b.layers[0].top1).mean())
    pred_agree = float((a.predictions == b.predictions).mean())

    print(f"\n## Analysis speed — mvmoe-12x192-e10k1 (random init), {torch.get_num_threads()} threads, "
          f"batch {args.batch_size}, torch {torch.__version__}\n")
    print("| step | wall (s) | CPU (s) | target (s) | met |")
    print("|---|---:|---:|---:|:---:|")
    for name, (wall, cpu), target in rows:
        met = "" if target is None else ("yes" if wall < target else "no")
        print(f"| {name} | {wall:.2f} | {cpu:.2f} | {'' if target is None else f'{target:.0f}'} | {met} |")
    print(f"\nbf16 vs fp32 on this untrained model: {route_agree:.2%} of router top-1 decisions and "
          f"{pred_agree:.2%} of predictions unchanged (an untrained router has near-tied logits).")
    print(f"throughput: fp32 {args.images / rows[0][1][0]:.0f} img/s, bf16 {args.images / rows[3][1][0]:.0f} img/s; "
          f"load average before/after: {load0[0]:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          "(other processes inflate wall times; CPU s = this process's CPU time, summed over threads)")


if __name__ == "__main__":
    main()
