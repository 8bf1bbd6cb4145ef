"""Routing over training: churn, load and router accuracy per epoch, and when the routing settles.

Reads the per-epoch snapshots that training writes (`workbench/snapshots.py`).
Also here: agreement between two models' routing after the best one-to-one
matching of their experts — expert 2 of one seed can be expert 5 of another,
so raw equality of indices means nothing (Hungarian matching, scipy).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from workbench.snapshots import RoutingHistory, churn

__all__ = ["routing_churn", "load_over_time", "router_accuracy_over_time", "settling_epoch", "matched_agreement"]


def _layer(history: RoutingHistory, layer: Optional[int]) -> np.ndarray:
    if layer is None:
        layer = history.layers[0]
    if layer not in history.experts:
        raise ValueError(f"block {layer} has no snapshots; snapshotted MoE blocks are {history.layers}")
    return history.experts[layer]


def routing_churn(history: RoutingHistory, layer: Optional[int] = None) -> pd.DataFrame:
    """Per epoch (from the second snapshot on): the share of probe items whose expert changed since the last one.

    Items are images (per-image routing) or tokens (per-token routing); a
    dropped item (-1) counts as its own route.
    """
    e = _layer(history, layer)
    return pd.DataFrame({"epoch": history.epochs[1:], "churn": [churn(a, b) for a, b in zip(e[:-1], e[1:])]})


def load_over_time(history: RoutingHistory, num_experts: int, layer: Optional[int] = None) -> pd.DataFrame:
    """Rows = epochs, columns = experts (+ "dropped"): the share of probe items each received."""
    e = _layer(history, layer)
    if e.max() >= num_experts:     # before counting: rows of a bincount past E would not stack
        raise ValueError(f"snapshots name expert {int(e.max())}, but the model has {num_experts} experts")
    flat = e.reshape(len(e), -1)
    counts = np.stack([np.bincount(np.where(r < 0, num_experts, r), minlength=num_experts + 1) for r in flat])
    shares = counts / np.maximum(flat.shape[1], 1)
    cols = [str(i) for i in range(num_experts)] + ["dropped"]
    return pd.DataFrame(shares, index=pd.Index(history.epochs, name="epoch"), columns=cols)


def router_accuracy_over_time(history: RoutingHistory, superclasses: Sequence[int],
                              layer: Optional[int] = None) -> pd.DataFrame:
    """Per epoch: the share of probe images routed to their class's super-class (expert g = super-class g).

    Per-image routing only (a super-class-guided router's target); for
    per-token routing the question has no single answer per image.
    """
    e = _layer(history, layer)
    if e.ndim != 2:
        raise ValueError("router accuracy vs super-classes is defined for per-image routing only")
    target = np.asarray(superclasses, dtype=np.int64)[history.labels]
    return pd.DataFrame({"epoch": history.epochs, "router accuracy": (e == target[None]).mean(1)})


def settling_epoch(churn: pd.DataFrame, threshold: float = 0.02) -> Optional[int]:
    """The first epoch from which churn stays at or below `threshold` to the end; None if it never does."""
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold must be a share in [0, 1], got {threshold}")
    settled = None
    for epoch, c in zip(churn["epoch"], churn["churn"]):
        if c > threshold:
            settled = None
        elif settled is None:
            settled = int(epoch)
    return settled


def matched_agreement(a, b, num_experts: int) -> tuple[float, np.ndarray]:
    """Agreement of two routings of the same items after the best one-to-one expert matching.

    -> (share of items whose expert in `a`, mapped, equals their expert in
    `b`; mapping with mapping[i] = the expert of `b` matched to expert i of `a`).
    Dropped items (-1) only agree with dropped items.
    """
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if a.shape != b.shape or len(a) == 0:
        raise ValueError(f"need two routings of the same items, got {a.shape} and {b.shape}")
    if max(a.max(), b.max()) >= num_experts:
        raise ValueError(f"expert indices must be below num_experts={num_experts}")
    n = num_experts + 1                                   # last row/column: dropped
    a2, b2 = np.where(a < 0, num_experts, a), np.where(b < 0, num_experts, b)
    joint = np.bincount(a2 * n + b2, minlength=n * n).reshape(n, n)
    rows, cols = linear_sum_assignment(-joint[:num_experts, :num_experts])
    mapping = np.full(num_experts, -1)
    mapping[rows] = cols
    agree = joint[rows, cols].sum() + joint[num_experts, num_experts]
    return float(agree / len(a)), mapping
