"""Expert ablation: what each expert contributes, class by class.

Disabling expert e sets its router logit to -inf, so the router's softmax
renormalises over the others and every image/token that chose e picks its
next-best expert instead (`model.set_routing(disabled_experts=[e])`; the
model's settings are restored afterwards). `expert_ablation` reports the
per-class accuracy change of each ablation and `impact_matrix` pivots it into a
class x expert table. `forced_vs_disabled_gap` checks the mechanism: disabling
every expert but e must give the same model as forcing every item to e.
`oracle_routing` asks the complementary question for a super-class-guided
per-image MoE: how accurate would it be with a perfect router?
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from .collect import force_expert, predict_logits, routing_overrides

__all__ = ["per_class_accuracy", "expert_ablation", "impact_matrix", "forced_vs_disabled_gap",
           "oracle_routing"]


def per_class_accuracy(predictions, labels, num_classes: int) -> np.ndarray:
    """(num_classes,) accuracy per true class (NaN for a class with no images)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    n = np.bincount(labels, minlength=num_classes)
    hit = np.bincount(labels, weights=(predictions == labels), minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, hit / np.maximum(n, 1), np.nan)


def expert_ablation(model: nn.Module, images, labels, mean: Sequence[float], std: Sequence[float], *,
                    experts: Optional[Sequence[int]] = None, classes: Optional[Sequence[str]] = None,
                    batch_size: int = 256, bf16: bool = False) -> pd.DataFrame:
    """Accuracy per class with each expert disabled in turn (all MoE blocks at once).

    One row per (expert, class) plus an "all" class row per expert: images,
    base_accuracy, ablated_accuracy, delta (ablated - base; negative = the class
    needs that expert) and changed (share of images whose prediction changed).
    The model's routing settings are restored afterwards.
    """
    cfg = model.cfg
    if cfg.family == "vit":
        raise ValueError("a dense model has no experts to disable")
    labels = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64).reshape(-1)
    C = cfg.num_classes
    names = list(classes) if classes is not None else [str(c) for c in range(C)]
    already = set(model.routing_settings()["disabled_experts"])
    todo = [e for e in (range(cfg.num_experts) if experts is None else experts) if e not in already]
    base_pred = predict_logits(model, images, mean, std, batch_size, bf16=bf16).argmax(1)
    base = per_class_accuracy(base_pred, labels, C)
    n = np.bincount(labels, minlength=C)
    rows = []
    for e in todo:
        with routing_overrides(model, disabled_experts=sorted(already | {int(e)})):
            pred = predict_logits(model, images, mean, std, batch_size, bf16=bf16).argmax(1)
        acc = per_class_accuracy(pred, labels, C)
        changed = np.bincount(labels, weights=(pred != base_pred), minlength=C)
        for c in range(C):
            rows.append({"expert": int(e), "class": names[c], "images": int(n[c]), "base_accuracy": base[c],
                         "ablated_accuracy": acc[c], "delta": acc[c] - base[c],
                         "changed": changed[c] / n[c] if n[c] else np.nan})
        b, a = float((base_pred == labels).mean()), float((pred == labels).mean())
        rows.append({"expert": int(e), "class": "all", "images": len(labels), "base_accuracy": b,
                     "ablated_accuracy": a, "delta": a - b, "changed": float((pred != base_pred).mean())})
    return pd.DataFrame(rows)


def impact_matrix(ablation: pd.DataFrame, value: str = "delta") -> pd.DataFrame:
    """Class x expert table of `value` (default the accuracy change) from `expert_ablation`."""
    d = ablation[ablation["class"] != "all"]
    order = list(dict.fromkeys(d["class"]))
    m = d.pivot(index="class", columns="expert", values=value).reindex(order)
    m.columns.name, m.index.name = "disabled expert", "class"
    return m


def forced_vs_disabled_gap(model: nn.Module, images, mean: Sequence[float], std: Sequence[float], expert: int,
                           batch_size: int = 256) -> float:
    """Max |logit difference| between "disable every expert but e" (k = 1) and "force e".

    0 (up to float noise) when ablation works as documented: with one expert
    left, the renormalised router gives it probability 1, i.e. gate 1.
    """
    E = model.cfg.num_experts
    others = [i for i in range(E) if i != expert]
    with routing_overrides(model, top_k=1, disabled_experts=others):
        disabled = predict_logits(model, images, mean, std, batch_size)
    with force_expert(model, expert):
        forced = predict_logits(model, images, mean, std, batch_size)
    return float(np.abs(disabled - forced).max())


def oracle_routing(model: nn.Module, images, labels, mean: Sequence[float], std: Sequence[float],
                   superclasses: Optional[Sequence[int]] = None, batch_size: int = 256,
                   summary=None) -> dict:
    """Accuracy as routed vs with every image sent to its true super-class's expert (gate 1).

    A super-class-guided router is trained so that expert g serves super-class g;
    the gap between the two accuracies is what router mistakes cost, and the
    split of accuracy by router right/wrong shows whether a wrong expert
    usually means a wrong answer. Per-image models only (`mvmoe`). `summary`: a
    `collect_routing` pass of the same model over the same images, if one is at
    hand (saves the routed pass).
    """
    from .collect import collect_routing

    if model.cfg.family != "mvmoe":
        raise ValueError(f"oracle routing needs a per-image MoE, got a {model.cfg.family!r} model")
    sc = model.cfg.superclasses if superclasses is None else superclasses
    if sc is None:
        raise ValueError("the model has no super-class map; pass superclasses=")
    sc = np.asarray(sc, dtype=np.int64)
    if sc.max() >= model.cfg.num_experts:
        raise ValueError(f"super-classes 0..{sc.max()} need as many experts, the model has {model.cfg.num_experts}")
    labels = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64)
    if summary is None:
        summary = collect_routing(model, images, labels, mean, std, batch_size, superclasses=sc)
    elif len(summary.predictions) != len(labels):
        raise ValueError(f"summary covers {len(summary.predictions)} images, got {len(labels)}")
    target = sc[labels]
    routed_right = summary.layers[0].experts[:, 0] == target
    correct = summary.predictions == labels
    oracle = np.empty(len(labels), dtype=bool)
    images = torch.as_tensor(images)
    for g in np.unique(target):
        idx = np.flatnonzero(target == g)
        with force_expert(model, int(g)):
            logits = predict_logits(model, images[torch.as_tensor(idx)], mean, std, batch_size)
        oracle[idx] = logits.argmax(1) == labels[idx]
    return {
        "routed_accuracy": float(correct.mean()), "oracle_accuracy": float(oracle.mean()),
        "router_accuracy": float(routed_right.mean()),
        "accuracy_when_router_right": float(correct[routed_right].mean()) if routed_right.any() else float("nan"),
        "accuracy_when_router_wrong": float(correct[~routed_right].mean()) if (~routed_right).any() else float("nan"),
        "images": int(len(labels)),
    }
