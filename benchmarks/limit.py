"""How close training gets to what this CPU can do: achieved GFLOP/s vs a measured GEMM peak.

    python benchmarks/limit.py [--models vit-6x96 vit-12x192] [--gemm 4096] [--json]

- Peak: the median rate of one large square matmul (n x n @ n x n, 2 n^3 FLOPs)
  in bf16 and in fp32, on all torch threads: the best case for oneDNN, so an
  upper bound a whole training step cannot reach (attention, LayerNorm, GELU,
  the optimizer and autograd bookkeeping are not GEMMs).
- Achieved: the training step of each of `--models` (as workbench.train runs it),
  counted as 3 x forward MACs x 2 FLOPs per image (backward ~ 2x forward),
  times images/s, with MACs from `workbench.flops.count_macs` (exact vs
  torch's FlopCounterMode, see tests/test_flops.py).
Both are measured in this process, interleaved; the fraction is the figure.
- GEMM share: the fraction of the step's operator time spent in matrix products
  (aten::mm, addmm, bmm, baddbmm; torch.profiler, self CPU time), and what
  follows from it: a step whose every other operator took no time at all would
  be 1 / share faster. Any implementation that runs the same products through
  the same library (timm does) can be beaten by at most that factor.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import emit, native_bf16, row, side_by_side, train_step  # noqa: E402
from workbench.flops import count_macs  # noqa: E402
from workbench.models import create_model  # noqa: E402

SECTION = "against the limit"
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def gemm_share(step, steps: int = 3) -> float:
    """Fraction of the step's operator self time (torch.profiler) spent in matrix products."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS) / total


def gemm(n: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
    return lambda: torch.mm(a, b)


def measure(models=("vit-6x96", "vit-12x192"), n: int = 4096, batch_size: int = 128, repeats: int = 5) -> list:
    flop = 2 * n ** 3
    train_flop = {m: 3 * 2 * count_macs(create_model(m), (1, 28, 28))["active"] * batch_size for m in models}
    precisions = [("bf16", torch.bfloat16)] if native_bf16() else []
    precisions.append(("fp32", None))
    rows = []
    for name, amp in precisions:
        steps = {m: train_step(create_model(m), batch_size, amp) for m in models}
        t = side_by_side({"gemm": gemm(n, amp or torch.float32), **steps}, repeats)
        peak = flop / t["gemm"] / 1e9
        rows.append(row(SECTION, f"{name} GEMM peak: {n}×{n}×{n} matmul", f"{peak:.0f} GFLOP/s", "", None, ""))
        for model in models:
            achieved = train_flop[model] / t[model] / 1e9
            rows.append(row(SECTION, f"{model} training, batch {batch_size}, {name}"
                            + (" autocast" if amp else "") + f": achieved vs {name} GEMM peak "
                            f"({batch_size / t[model]:.0f} img/s × 3 × 2 × forward MACs)",
                            f"{achieved:.0f} GFLOP/s", f"{peak:.0f} GFLOP/s", achieved / peak, "fraction of peak"))
            share = gemm_share(steps[model])
            rows.append(row(SECTION, f"{model} training, batch {batch_size}, {name}: share of the step in matrix "
                            f"products ({', '.join(GEMM_OPS)}; torch.profiler self time) and the most any "
                            "implementation with the same products could gain (1 / share: every other operator free)",
                            f"{share:.0%} of the step", f"ceiling {1 / share:.2f}×", share, "fraction of the step"))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit-6x96", "vit-12x192"])
    p.add_argument("--gemm", type=int, default=4096, help="matrix size n of the peak GEMM")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="2 repeats, n=2048 (a smoke run)")
    p.add_argument("--json", action="store_true", help="rows as JSON for `python -m benchmarks`")
    args = p.parse_args()
    emit(measure(tuple(args.models), 2048 if args.quick else args.gemm, args.batch_size, 2 if args.quick else args.repeats),
         args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
