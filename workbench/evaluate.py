"""Evaluation during and after training: accuracy, loss and expert load on a dataset split."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .data import augment, normalize
from .device import autocast, resolve_precision


def to_batch(dataset, idx, device, generator=None, augmentation: str = "crop-flip"):
    """uint8 images at `idx` -> normalised (and, with a generator, augmented) float batch + labels.

    `augmentation` (TrainConfig.AUGMENTATIONS): "crop-flip" (random crop after padding 2,
    plus a flip where the dataset allows it), "flip" (the flip alone) or "none".
    """
    x = normalize(dataset.images[idx], dataset.mean, dataset.std)
    if generator is not None and augmentation != "none":
        x = augment(x, dataset.hflip, generator, pad=2 if augmentation == "crop-flip" else 0)
    return x.to(device, non_blocking=True), dataset.labels[idx].to(device, non_blocking=True)


def eval_stats(model, dataset, batch_size: int = 256, device=None, amp_dtype=None, shard=(0, 1)) -> dict:
    """Accuracy, loss and expert load on `dataset` (or the `shard=(rank, world)` slice of it).

    Returns sums so that DDP ranks can add them: correct, total, loss_sum,
    `load`: (MoE layers, E + 2) counts [kept assignments per expert..., dropped, all], and
    `class_expert`: (MoE layers, classes, E) kept assignments by the item's true class (the
    card's routing tables: what the routing views need when the images are not at hand).
    """
    device = device or next(model.parameters()).device
    cfg = model.cfg
    layers = cfg.moe_block_indices()
    E, C = cfg.num_experts, cfg.num_classes
    load = torch.zeros(len(layers), E + 2, dtype=torch.float64)
    class_expert = torch.zeros(len(layers), C * E, dtype=torch.float64)
    correct = total = 0
    loss_sum = 0.0
    rank, world = shard
    idx_all = torch.arange(rank, len(dataset), world)
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for i in range(0, len(idx_all), batch_size):
            x, y = to_batch(dataset, idx_all[i:i + batch_size], device)
            with autocast(device, amp_dtype):
                out = model(x, return_routing=True)
            logits = out.logits.float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
            total += len(y)
            for row, rec in enumerate(out.routing):
                kept = rec.experts[rec.kept].reshape(-1).cpu()
                load[row, :E] += torch.bincount(kept, minlength=E).double()
                load[row, -2] += rec.kept.numel() - kept.numel()
                load[row, -1] += rec.kept.numel()
                label = y.view(-1, *[1] * (rec.experts.dim() - 1)).expand_as(rec.experts)[rec.kept].reshape(-1).cpu()
                class_expert[row] += torch.bincount(label * E + kept, minlength=C * E).double()
    model.train(was_training)
    return {"correct": correct, "total": total, "loss_sum": loss_sum, "load": load, "layers": layers,
            "class_expert": class_expert.view(len(layers), C, E),
            "kinds": ["token" if cfg.family == "vmoe" else "image"] * len(layers)}


def expert_load_summary(stats: dict) -> list:
    """Per MoE layer: share of kept (image or token) assignments per expert, and the dropped share."""
    out = []
    for row, layer in enumerate(stats["layers"]):
        counts = stats["load"][row]
        kept = counts[:-2]
        out.append({
            "layer": int(layer), "kind": stats["kinds"][row],
            "fraction": [round(float(c / max(1.0, float(kept.sum()))), 4) for c in kept],
            "dropped": round(float(counts[-2] / max(1.0, float(counts[-1]))), 4),
        })
    return out


def routing_tables(stats: dict, epoch: Optional[int] = None, split: str = "test") -> Optional[dict]:
    """The card's `routing_tables` (format: workbench/checkpoint.py) from `eval_stats`; None for a dense model.

    Per MoE block, class x expert counts of the kept assignments (images or tokens,
    every one of the k choices) on `split`, computed where the data is.
    """
    if not stats["layers"]:
        return None
    return {"split": split, "epoch": epoch, "unit": stats["kinds"][0],
            "layers": [{"layer": int(layer), "counts": stats["class_expert"][row].round().long().tolist(),
                        "dropped": int(stats["load"][row, -2])}
                       for row, layer in enumerate(stats["layers"])]}


def evaluate(model, dataset, batch_size: int = 256, device=None, precision: str = "fp32") -> float:
    """Top-1 accuracy (a fraction) of `model` on `dataset`."""
    device = device or next(model.parameters()).device
    s = eval_stats(model, dataset, batch_size, device, resolve_precision(precision, device))
    return s["correct"] / max(1, s["total"])


def eval_record(raw, test_set, batch_size: int, device, amp_dtype, rank: int, world: int, epoch: int, step: int) -> dict:
    """The metrics.jsonl "eval" record of one evaluation, summed over DDP ranks."""
    s = eval_stats(raw, test_set, batch_size, device, amp_dtype, shard=(rank, world))
    if world > 1:
        import torch.distributed as dist

        n_load = s["load"].numel()
        packed = torch.cat([torch.tensor([s["correct"], s["total"], s["loss_sum"]], dtype=torch.float64),
                            s["load"].flatten(), s["class_expert"].flatten()])
        dist.all_reduce(packed)
        s.update(correct=packed[0].item(), total=packed[1].item(), loss_sum=packed[2].item(),
                 load=packed[3:3 + n_load].view_as(s["load"]),
                 class_expert=packed[3 + n_load:].view_as(s["class_expert"]))
    return {"epoch": epoch, "step": step, "test_accuracy": round(s["correct"] / max(1, s["total"]), 5),
            "test_loss": round(s["loss_sum"] / max(1, s["total"]), 5),
            **({"expert_load": expert_load_summary(s), "routing_tables": routing_tables(s, epoch)}
               if raw.cfg.is_moe else {})}
