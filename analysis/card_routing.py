"""Routing statistics from a card's `routing_tables`, for when the images are not at hand.

A shipped checkpoint trained on data we may not redistribute (Tiny ImageNet)
carries, per MoE block, the class x expert counts of its test split
(workbench.evaluate.routing_tables; format in docs/CONTRACTS.md). These
functions turn them into the same tables the image-level analysis gives
(analysis/routing.py), so the Routing page draws them with the same figures.
What the counts cannot give (per-image choices, capacity by rank, embeddings)
needs the data.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd

from .routing import balance_table, group_table, load_frame

__all__ = ["card_tables", "group_expert_table", "card_expert_load", "card_load_balance", "card_router_accuracy"]


def card_tables(card: dict) -> dict[int, np.ndarray]:
    """{MoE block: (classes, E) counts} of the card (a card checkpoint.validate_card accepted); {} without tables."""
    tables = card.get("routing_tables") or {}
    return {int(t["layer"]): np.asarray(t["counts"], dtype=np.float64) for t in tables.get("layers") or []}


def group_expert_table(counts: np.ndarray, classes: Sequence[str], *, by: str = "class",
                       superclasses: Optional[Sequence[int]] = None, superclass_names: Optional[Sequence[str]] = None,
                       normalize: Optional[str] = None, layer: Optional[int] = None) -> pd.DataFrame:
    """Class (or super-class) x expert table of one block, normalised like `routing.class_expert_counts`."""
    if by == "class":
        groups, names = np.arange(len(classes)), [str(c) for c in classes]
    elif by == "superclass":
        if superclasses is None:
            raise ValueError("by='superclass' needs the class -> super-class map")
        groups = np.asarray(superclasses, dtype=np.int64)
        names = list(superclass_names or [f"super-class {g}" for g in range(int(groups.max()) + 1)])
    else:
        raise ValueError(f"by must be 'class' or 'superclass', got {by!r}")
    return group_table(counts, groups, names, by=by, normalize=normalize, layer=layer)


def card_expert_load(tables: dict[int, np.ndarray]) -> pd.DataFrame:
    """Long table (layer, expert, count, share), as `routing.expert_load`."""
    return load_frame({layer: counts.sum(0) for layer, counts in sorted(tables.items())})


def card_load_balance(tables: dict[int, np.ndarray], max_share: Optional[float] = None,
                      superclasses: Optional[Sequence[int]] = None) -> pd.DataFrame:
    """One row per block and "all": the statistics and flags of `routing.load_balance` (no disabled experts);
    with the map of a super-class router, each expert's load is judged against its super-class's share."""
    expected = None
    if superclasses is not None and tables:
        per_class = next(iter(tables.values())).sum(1)                       # images (or tokens) per class
        expected = np.bincount(np.asarray(superclasses), weights=per_class,
                               minlength=next(iter(tables.values())).shape[1]) / max(per_class.sum(), 1)
    return balance_table({layer: counts.sum(0) for layer, counts in sorted(tables.items())}, max_share=max_share,
                         expected=expected)


def card_router_accuracy(tables: dict[int, np.ndarray], superclasses: Sequence[int], top_k: int = 1) -> pd.DataFrame:
    """Per block: the share of assignments that went to the item's own super-class expert, and purity.

    With k = 1 per image (the super-class router) the share is the router's accuracy
    against the super-classes, as `routing.router_superclass_accuracy` computes it from
    the images; with k > 1 it is the share of the k choices that hit it. purity: the
    same after mapping each expert to the super-class it sees most (for routers
    trained without the map).
    """
    sc = np.asarray(superclasses, dtype=np.int64)
    n_groups = int(sc.max()) + 1
    rows = []
    for layer, counts in sorted(tables.items()):
        total = counts.sum()
        by_group = group_table(counts, sc, range(n_groups)).to_numpy()
        own = sum(by_group[g, g] for g in range(min(n_groups, counts.shape[1])))
        rows.append({"layer": layer, "accuracy" if top_k == 1 else "own_superclass_share": own / total if total else 0.0,
                     "purity": by_group.max(0).sum() / total if total else 0.0, "assignments": int(total)})
    return pd.DataFrame(rows)
