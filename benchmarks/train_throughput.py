"""Training throughput (images/s) of dense ViTs on 28x28x1 inputs, fp32 vs bf16 autocast.

    python benchmarks/train_throughput.py [--models vit-6x96 vit-12x192] [--batch-size 128]

One training step is exactly what workbench.train does per batch: forward
under autocast (or not), cross-entropy with label smoothing, backward,
gradient clipping, AdamW. Random inputs: data loading is not measured.
A few warm-up steps, then the median of the timed steps; printed as a
markdown table with the bf16/fp32 ratio. bf16 pays off only where the CPU
runs bf16 matmuls natively (AMX or AVX512-BF16, used through oneDNN).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from workbench.models import create_model  # noqa: E402
from workbench.train import autocast, cpu_has_native_bf16, param_groups  # noqa: E402


def step_times(preset: str, amp_dtype, batch_size: int, warmup: int, steps: int, device, clock) -> list[float]:
    torch.manual_seed(0)
    model = create_model(preset, num_classes=10, img_size=28, in_chans=1).to(device).train()
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3)
    x = torch.randn(batch_size, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)
    times = []
    for i in range(warmup + steps):
        t = clock()
        with autocast(device, amp_dtype):
            out = model(x, return_routing=True, labels=y)
        loss = F.cross_entropy(out.logits.float(), y, label_smoothing=0.1) + out.total_aux_loss.float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(clock() - t)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["vit-6x96", "vit-12x192"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time (with --threads 1, the throughput an "
                        "idle core would give, robust to other load on a shared machine)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16: {cpu_has_native_bf16()}, batch {args.batch_size}, "
          f"median of {args.steps} steps after {args.warmup} warm-up, {args.clock} clock, "
          f"load average {load:.1f} on {os.cpu_count()} cores\n")
    print("| model | params | fp32 img/s | bf16 img/s | bf16 / fp32 |")
    print("|---|---|---|---|---|")
    for preset in args.models:
        res = {}
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            t = statistics.median(step_times(preset, dtype, args.batch_size, args.warmup, args.steps, device, clock))
            res[name] = args.batch_size / t
        n = sum(p.numel() for p in create_model(preset).parameters())
        print(f"| {preset} | {n / 1e6:.2f}M | {res['fp32']:.0f} | {res['bf16']:.0f} | "
              f"{res['bf16'] / res['fp32']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
