"""Training throughput (images/s) of dense ViTs on 28x28x1 inputs, fp32 vs bf16 autocast.

    python benchmarks/train_throughput.py [--models vit-6x96 vit-12x192] [--batch-size 128] [--json]

One training step is exactly what workbench.train does per batch (see
benchmarks/common.train_step); random inputs, so data loading is not measured.
fp32 and bf16 steps are interleaved and the median is reported: the
before/after rows of the bf16-autocast optimisation. bf16 pays off only where
the CPU runs bf16 matmuls natively (AMX or AVX512-BF16, used through oneDNN).
A last row tries `torch.compile` on one model (compilation is part of the
warm-up, not of the timed steps): the trainer stays eager unless this row
shows a gain.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import emit, native_bf16, row, side_by_side, train_step  # noqa: E402
from workbench.models import create_model  # noqa: E402

SECTION = "training"


def measure(models=("vit-6x96", "vit-12x192"), batch_size: int = 128, steps: int = 8, warmup: int = 2,
            compile_model: str | None = "vit-6x96") -> list:
    rows = []
    for preset in models:
        torch.manual_seed(0)
        fns = {"fp32": train_step(create_model(preset), batch_size, None),
               "bf16": train_step(create_model(preset), batch_size, torch.bfloat16)}
        t = side_by_side(fns, steps, warmup)
        fp32, bf16 = batch_size / t["fp32"], batch_size / t["bf16"]
        rows.append(row(SECTION, f"{preset} training, batch {batch_size}: bf16 autocast vs fp32 "
                        f"(native bf16: {native_bf16()})", f"{bf16:.0f} img/s", f"{fp32:.0f} img/s",
                        bf16 / fp32, "speed-up", "> 1× where bf16 is native",
                        (bf16 > fp32) if native_bf16() else None))
    rows += attention_rows(models, batch_size, steps, warmup)
    if compile_model:
        # the candidate optimisation: inductor-compiled forward+backward (compile time excluded: warm-up)
        amp = torch.bfloat16 if native_bf16() else None
        torch.manual_seed(0)
        fns = {"eager": train_step(create_model(compile_model), batch_size, amp),
               "compiled": train_step(torch.compile(create_model(compile_model)), batch_size, amp)}
        t = side_by_side(fns, steps, warmup)
        rows.append(row(SECTION, f"{compile_model} training, batch {batch_size}, {'bf16' if amp else 'fp32'}: "
                        "torch.compile (default inductor) vs eager", f"{batch_size / t['compiled']:.0f} img/s",
                        f"{batch_size / t['eager']:.0f} img/s", t["eager"] / t["compiled"], "speed-up"))
    return rows


def attention_rows(models, batch_size: int, steps: int, warmup: int) -> list:
    """Before/after of the written-out CPU attention (workbench/models/vit.py `Attention`): the same
    training step with torch's fused SDPA kernel (the limit set to 0 tokens) and with ours."""
    from workbench.models.vit import Attention

    rows = []
    for preset in models:
        for amp in ([None, torch.bfloat16] if native_bf16() else [None]):
            torch.manual_seed(0)
            ours, fused = train_step(create_model(preset), batch_size, amp), train_step(create_model(preset), batch_size, amp)

            def fused_step(step=fused, limit=Attention.EXPLICIT_MAX_TOKENS):
                Attention.EXPLICIT_MAX_TOKENS = 0
                try:
                    step()
                finally:
                    Attention.EXPLICIT_MAX_TOKENS = limit

            t = side_by_side({"ours": ours, "fused": fused_step}, steps, warmup)
            rows.append(row(SECTION, f"{preset} training, batch {batch_size}, {'bf16' if amp else 'fp32'}: written-out "
                            "attention (ours) vs before: torch's fused SDPA kernel", f"{batch_size / t['ours']:.0f} img/s",
                            f"{batch_size / t['fused']:.0f} img/s", t["fused"] / t["ours"], "speed-up"))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit-6x96", "vit-12x192"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--compile-model", default="vit-6x96", help="model of the torch.compile row ('' to skip)")
    p.add_argument("--quick", action="store_true", help="3 steps (a smoke run, not figures to quote)")
    p.add_argument("--json", action="store_true", help="rows as JSON for `python -m benchmarks`")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    emit(measure(args.models, args.batch_size, 3 if args.quick else args.steps, 1 if args.quick else args.warmup,
                 args.compile_model or None), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
