"""MoE cost vs dense, and our index dispatch vs two naive dispatches.

    python benchmarks/moe_latency.py [--batch 256] [--repeats 7]

Prints a markdown table. Every comparison is timed side by side in one process
(interleaved, median of repeats), since absolute times on a shared 2-core
machine are noisy; the ratio is the figure to read.
Targets (issue 2): per-image MoE (E=10, k=1) forward within 1.15x the dense
model; per-token dispatch at least 2x faster than all-experts-then-mask at E=8.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from workbench.models import create_model  # noqa: E402
from workbench.models.vmoe import TokenMoE  # noqa: E402


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def side_by_side(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median seconds per call of each fn, interleaving the calls."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name] += timed(fn, 1)
    return {name: statistics.median(t) for name, t in times.items()}


def naive_all_experts_then_mask(moe: TokenMoE, h: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, then keep the routed ones (what we avoid)."""
    B, T, D = h.shape
    flat = h.reshape(-1, D)
    r = moe.router(flat, add_noise=False)
    ex = moe.experts
    hidden = F.gelu(torch.einsum("nd,ehd->enh", flat, ex.fc1_weight) + ex.fc1_bias[:, None])
    y = torch.einsum("enh,edh->end", hidden, ex.fc2_weight) + ex.fc2_bias[:, None]   # (E, N, D)
    combine = torch.zeros(flat.shape[0], ex.num_experts).scatter_(1, r["experts"], r["gates"])
    return torch.einsum("ne,end->nd", combine, y).view(B, T, D)


def onehot_einsum_dispatch(moe: TokenMoE, h: torch.Tensor) -> torch.Tensor:
    """GShard-style dense dispatch: per group, tokens x experts x capacity one-hot tensors.

    Groups are single images, like our default `group_size=1`.
    """
    G, S, D = h.shape
    E, k = moe.router.num_experts, moe.router.top_k
    r = moe.router(h.reshape(-1, D), add_noise=False)
    experts, gates = r["experts"].view(G, S, k), r["gates"].view(G, S, k)
    cap = max(1, math.ceil(k * moe.eval_capacity_ratio * S / E))
    mask = F.one_hot(experts, E).float()                                   # (G, S, k, E)
    choice_major = mask.transpose(1, 2).reshape(G, k * S, E)               # 1st choices first
    pos = (choice_major.cumsum(1) - 1).view(G, k, S, E).transpose(1, 2) * mask
    keep = (pos < cap) * mask
    dispatch = keep.unsqueeze(-1) * F.one_hot(pos.long().clamp(0, cap - 1), cap)   # (G, S, k, E, C)
    combine = (dispatch * gates[..., None, None]).sum(2)                   # (G, S, E, C)
    dispatch = dispatch.sum(2)
    xin = torch.einsum("gsec,gsd->gecd", dispatch, h)
    ex = moe.experts
    hidden = F.gelu(torch.einsum("gecd,ehd->gech", xin, ex.fc1_weight) + ex.fc1_bias[None, :, None])
    y = torch.einsum("gech,edh->gecd", hidden, ex.fc2_weight) + ex.fc2_bias[None, :, None]
    return torch.einsum("gsec,gecd->gsd", combine, y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--experts", default="4,8,16")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    x = torch.randn(args.batch, 1, 28, 28)

    with torch.inference_mode():
        dense, moe = create_model("vit-12x192").eval(), create_model("mvmoe-12x192-e10k1").eval()
        t = side_by_side({"dense": lambda: dense(x), "moe": lambda: moe(x)}, args.repeats)
        rows.append(("forward, batch %d: mvmoe-12x192-e10k1 vs vit-12x192" % args.batch,
                     t["moe"], t["dense"], "<= 1.15"))

        for E in [int(e) for e in args.experts.split(",")]:
            model = create_model(f"vmoe-12x192-e{E}k2", moe_layers=[11]).eval()
            layer = model.blocks[11].mlp
            h = torch.randn(args.batch, 50, 192)
            t = side_by_side({
                "ours": lambda: layer(h),
                "naive": lambda: naive_all_experts_then_mask(layer, h),
                "onehot": lambda: onehot_einsum_dispatch(layer, h),
            }, args.repeats)
            rows.append((f"per-token MoE layer E={E} k=2, {args.batch}x50 tokens: ours vs all-experts-then-mask",
                         t["ours"], t["naive"], ">= 2x faster at E=8"))
            rows.append((f"per-token MoE layer E={E} k=2, {args.batch}x50 tokens: ours vs one-hot einsum (GShard)",
                         t["ours"], t["onehot"], ">= 2x faster at E=8"))

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, median of {args.repeats}\n")
    print("| measurement | ours (ms) | reference (ms) | ours / reference | target |")
    print("|---|---:|---:|---:|---|")
    for name, ours, ref, target in rows:
        print(f"| {name} | {ours * 1e3:.1f} | {ref * 1e3:.1f} | {ours / ref:.2f} | {target} |")


if __name__ == "__main__":
    main()
