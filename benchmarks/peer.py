"""Training throughput of our `vit-12x192` vs timm's `VisionTransformer` of the same shape.

    /tmp/bench-venv/bin/python benchmarks/peer.py [--batch-size 128] [--steps 12] [--json]

timm is a benchmark-only peer, never a dependency: it needs torchvision, which
does not import beside the project's torch 2.13 CPU build, so this runs in a
separate venv where both models share one torch (see shared/NOTES.md):

    python3 -m venv /tmp/bench-venv
    /tmp/bench-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm

`python -m benchmarks` finds that venv (or `--peer-python`) by itself and skips
the rows with a message when timm is nowhere to be found.
Same depth/width/heads/patch/MLP ratio, class-token pooling, 28x28x1 inputs,
same batch, same training step (benchmarks/common.train_step), interleaved.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import emit, interleaved_times, medians, native_bf16, paired_ratios, row, skipped, train_step  # noqa: E402
from workbench.models import create_model  # noqa: E402

SECTION = "peer (timm)"


def timm_vit(preset: str):
    """timm's VisionTransformer with our preset's shape."""
    from timm.models.vision_transformer import VisionTransformer

    cfg = create_model(preset).cfg
    return VisionTransformer(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                             num_classes=cfg.num_classes, embed_dim=cfg.width, depth=cfg.depth,
                             num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
                             class_token=True, global_pool="token")


TARGET = 1.3   # issue 15: our default training path at least 1.3x timm's, same shape, same step


def measure(presets=("vit-6x96", "vit-12x192"), batch_size: int = 128, steps: int = 12, warmup: int = 2) -> list:
    try:
        import timm
    except ImportError as e:
        return [skipped(SECTION, f"{', '.join(presets)} training vs timm VisionTransformer",
                        f"timm not importable here ({e}); see benchmarks/peer.py")]
    rows = []
    for preset in presets:
        n_ours, n_peer = (sum(p.numel() for p in m.parameters()) for m in (create_model(preset), timm_vit(preset)))
        if n_ours != n_peer:
            raise RuntimeError(f"shapes differ: ours {n_ours} params, timm {n_peer}")
        precisions = [("fp32", None)] + ([("bf16", torch.bfloat16)] if native_bf16() else [])
        for name, amp in precisions:
            times = interleaved_times({"ours": train_step(create_model(preset), batch_size, amp),
                                       "timm": train_step(timm_vit(preset), batch_size, amp, ours=False)}, steps, warmup)
            speedup, q1, q3 = paired_ratios(times, "timm", "ours")
            t = medians(times)
            rows.append(row(SECTION, f"{preset} training, batch {batch_size}, {name}: ours vs timm {timm.__version__} "
                            f"VisionTransformer ({n_ours / 1e6:.2f} M params each; torch {torch.__version__}; "
                            f"median of {steps} paired steps, quartiles {q1:.2f}–{q3:.2f}×)",
                            f"{batch_size / t['ours']:.0f} img/s", f"{batch_size / t['timm']:.0f} img/s",
                            speedup, "speed-up", f"≥ {TARGET}×", speedup >= TARGET))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["vit-6x96", "vit-12x192"])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--quick", action="store_true", help="3 steps (a smoke run)")
    p.add_argument("--json", action="store_true", help="rows as JSON for `python -m benchmarks`")
    args = p.parse_args()
    emit(measure(tuple(args.models), args.batch_size, 3 if args.quick else args.steps, 1 if args.quick else 2), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
