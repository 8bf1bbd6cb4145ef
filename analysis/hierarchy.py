"""Discovered super-classes against a human hierarchy: does the confusion graph recover semantic categories?

The reference is whatever hierarchy the dataset has: WordNet groups for Tiny
ImageNet (`workbench/wordnet.py`), CIFAR-100's coarse classes, the designed
groups of `synthetic`, the unofficial Fashion-MNIST map. Scores are
scikit-learn's ARI (chance-corrected pair agreement: 0 = chance, 1 = identical)
and NMI (shared information, 0..1); the contingency table shows where they
agree and disagree.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

__all__ = ["compare_groupings", "group_members"]


def compare_groupings(discovered: Sequence[int], reference: Sequence[int],
                      discovered_names: Optional[Sequence[str]] = None,
                      reference_names: Optional[Sequence[str]] = None) -> dict:
    """-> {"ari", "nmi", "contingency" (DataFrame: discovered group x reference group, class counts),
    "purity" (share of classes in their discovered group's most common reference group)}."""
    d, r = np.asarray(discovered, dtype=np.int64), np.asarray(reference, dtype=np.int64)
    if d.shape != r.shape or d.ndim != 1 or len(d) < 2:
        raise ValueError(f"need one discovered and one reference group per class (>= 2 classes), got "
                         f"{d.shape} and {r.shape}")
    if d.min() < 0 or r.min() < 0:
        raise ValueError("group indices must be >= 0")
    nd, nr = int(d.max()) + 1, int(r.max()) + 1
    table = np.zeros((nd, nr), dtype=np.int64)
    np.add.at(table, (d, r), 1)
    rows = list(discovered_names) if discovered_names is not None else [f"group {g}" for g in range(nd)]
    cols = list(reference_names) if reference_names is not None else [f"reference {g}" for g in range(nr)]
    if len(rows) != nd or len(cols) != nr:
        raise ValueError(f"need {nd} discovered and {nr} reference group names, got {len(rows)} and {len(cols)}")
    return {
        "ari": float(adjusted_rand_score(r, d)),
        "nmi": float(normalized_mutual_info_score(r, d)),
        "purity": float(table.max(1).sum() / len(d)),
        "contingency": pd.DataFrame(table, index=pd.Index(rows, name="discovered"),
                                    columns=pd.Index(cols, name="reference")),
    }


def group_members(discovered: Sequence[int], class_names: Sequence[str], reference: Sequence[int],
                  reference_names: Sequence[str], detail: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """One row per class, sorted by discovered group: its reference group (and e.g. its WordNet path)."""
    df = pd.DataFrame({"group": np.asarray(discovered, dtype=np.int64), "class": list(class_names),
                       "reference group": [reference_names[g] for g in reference]})
    if detail is not None:
        df["hierarchy"] = list(detail)
    return df.sort_values(["group", "reference group", "class"], kind="stable").reset_index(drop=True)
