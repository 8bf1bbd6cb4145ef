"""Expert gallery: which test images each expert receives, which of those it gets wrong, which classes it owns.

A routing heatmap says "expert 3 takes 40 % of the Shirts"; a gallery shows
the Shirts. Everything here reads one `RoutingSummary` (analysis/collect.py),
so the model runs once for every expert and layer.

What "expert e receives image i" means depends on the routing:
- per image (Mobile V-MoE): e is one of the image's kept choices; the score
  is the router's margin for e: the log-odds of e over the best other expert
  (a trained super-class router gives gates of 1.00 to nearly every image, so
  the gate itself ranks nothing);
- per token (V-MoE): some of the image's tokens were kept by e; the score is
  the share of the image's patch tokens that e processed, so the top images
  are the ones e covers most.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd

from analysis.collect import RoutingSummary
from workbench.models import RoutingRecord

__all__ = ["expert_scores", "router_margin", "expert_gallery", "expert_classes", "patch_mask", "highlight_patches"]


def _check_expert(lr: RoutingRecord, expert: int) -> None:
    if not 0 <= int(expert) < lr.num_experts:
        raise ValueError(f"expert must be in 0..{lr.num_experts - 1}, got {expert}")


def expert_scores(summary: RoutingSummary, expert: int, layer: Optional[int] = None) -> np.ndarray:
    """(N,) how strongly each image goes to `expert` in block `layer`; 0 = not at all (see module doc)."""
    lr = summary.layer(layer)
    _check_expert(lr, expert)
    taken = (lr.experts == expert) & lr.kept                        # (..., k)
    if lr.per_token:
        patches = taken[:, 1:].any(-1)                              # (N, T-1): the class token is not a patch
        return patches.mean(1).astype(np.float64)
    return np.where(taken, lr.gates, 0.0).sum(-1).astype(np.float64)


def router_margin(summary: RoutingSummary, expert: int, layer: Optional[int] = None) -> np.ndarray:
    """(N,) per image: the router's log-odds of `expert` over the best other expert (from its logits,
    or its probabilities where a view has no logits); positive where `expert` is the first choice."""
    lr = summary.layer(layer)
    _check_expert(lr, expert)
    if lr.logits is not None:
        scores = np.asarray(lr.logits, dtype=np.float64)
    else:
        scores = np.log(np.clip(np.asarray(lr.probs, dtype=np.float64), 1e-300, None))
    others = np.delete(scores, expert, axis=-1)
    return scores[..., expert] - others.max(-1)


def expert_gallery(summary: RoutingSummary, expert: int, layer: Optional[int] = None, n: int = 12) -> dict:
    """The images `expert` receives with the highest scores, and the highest-scored ones it gets wrong.

    -> {"top": DataFrame, "wrong": DataFrame, "received": int, "errors": int}; each frame has one row per
    image (`index` into the summary's split, `label`, `prediction`, `score`), best first. The score is
    the share of patches (per token) or the router's margin (per image, `router_margin`).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    taken = expert_scores(summary, expert, layer)
    received = np.flatnonzero(taken > 0)
    score = taken if summary.layer(layer).per_token else router_margin(summary, expert, layer)
    wrong = received[summary.predictions[received] != summary.labels[received]]

    def best(idx: np.ndarray) -> pd.DataFrame:
        order = idx[np.argsort(-score[idx], kind="stable")][:n]     # stable: ties keep split order
        return pd.DataFrame({"index": order, "label": summary.labels[order],
                             "prediction": summary.predictions[order], "score": score[order]})

    return {"top": best(received), "wrong": best(wrong), "received": int(len(received)), "errors": int(len(wrong))}


def expert_classes(summary: RoutingSummary, expert: int, layer: Optional[int] = None) -> pd.DataFrame:
    """Per class: images `expert` receives, that share of the class, its share of the expert's images.

    A class is "owned" by the expert that receives the largest share of it. Per token every expert
    sees a patch of nearly every image, so the share is of the class's *patches* (the mean share of
    each image's patches the expert processed), not of its images. Sorted by share of class.
    """
    lr = summary.layer(layer)
    _check_expert(lr, expert)
    C = summary.num_classes
    per_expert = np.stack([expert_scores(summary, e, layer) for e in range(lr.num_experts)], 1)  # (N, E)
    received = per_expert[:, expert] > 0
    class_size = np.bincount(summary.labels, minlength=C)
    counts = np.bincount(summary.labels[received], minlength=C)
    mean_share = np.zeros((C, lr.num_experts))
    np.add.at(mean_share, summary.labels, per_expert if lr.per_token else (per_expert > 0))
    mean_share /= np.maximum(class_size, 1)[:, None]
    df = pd.DataFrame({
        "class": summary.class_names(),
        "images": counts,
        "share of class": mean_share[:, expert] if lr.per_token else counts / np.maximum(class_size, 1),
        "share of expert": counts / max(int(received.sum()), 1),
        "owned": (mean_share.argmax(1) == expert) & (class_size > 0),
    })
    return df.sort_values("share of class", ascending=False, kind="stable").reset_index(drop=True)


def patch_mask(summary: RoutingSummary, index: int, expert: int, layer: Optional[int] = None) -> np.ndarray:
    """(g, g) bool: the patches of image `index` that `expert` kept (per-image routing: all or none)."""
    lr = summary.layer(layer)
    _check_expert(lr, expert)
    g = summary.grid
    taken = ((lr.experts[index] == expert) & lr.kept[index]).any(-1)
    if lr.per_token:
        return taken[1:].reshape(g, g)
    return np.full((g, g), bool(taken))


def highlight_patches(image_chw, mask, color=(255, 64, 0), strength: float = 0.55) -> np.ndarray:
    """uint8 (C, H, W) image + (g, g) patch mask -> uint8 (H, W, 3): masked patches tinted, the rest dimmed."""
    img = np.asarray(image_chw, dtype=np.float32)
    rgb = np.repeat(img, 3, 0) if img.shape[0] == 1 else img[:3]
    rgb = np.transpose(rgb, (1, 2, 0))
    H, W = rgb.shape[:2]
    mask = np.asarray(mask, dtype=bool)
    g = mask.shape[0]
    if H % g or W % g:
        raise ValueError(f"a {H}x{W} image does not split into a {g}x{g} patch grid")
    full = np.kron(mask, np.ones((H // g, W // g), dtype=bool))[..., None]
    tinted = (1 - strength) * rgb + strength * np.asarray(color, dtype=np.float32)
    return np.where(full, tinted, 0.45 * rgb).clip(0, 255).astype(np.uint8)
