"""Super-class discovery: cluster a dense model's confusion graph into E groups.

Mobile V-MoE (Daxberger et al., arXiv 2309.04354) guides its per-image router
with semantic super-classes: classes that a dense baseline confuses with each
other are grouped, so each expert specialises in a set of look-alike classes
(SPEC section 2, "Super-class discovery", steps 3-5). The paper clusters the
confusion graph; it does not prescribe one algorithm, so several are offered
here, selectable by name (`METHODS`), and `clustering_quality` /
`compare_methods` say how well each one does.

The graph: classes are nodes and the edge weight is the symmetrised
off-diagonal confusion *rate*, w_ij = (r_ij + r_ji) / 2 with r = row-normalised
confusion, so frequent classes do not dominate the grouping.

Every method returns exactly E non-empty groups, relabelled 0..E-1 in order of
first appearance (class 0 is in group 0), and is deterministic for a seed.
Two fixes make that hold on any matrix, including classes never confused:
- a tiny affinity (`_EPS` x the largest weight) is added between all pairs,
  so the graph is connected: spectral clustering stays well posed and greedy
  modularity can merge down to E groups;
- if a method still returns a different number of groups (degenerate inputs),
  `_force_num_groups` repairs it deterministically: while too few, the
  largest group sheds the member least tied to it; while too many, the
  smallest group merges into the group it is most confused with.

`confusion_graph_layout` places the graph's nodes; `pages.figures.confusion_graph_figure`
draws it for the app's Confusion graph page and for notebooks.
"""
from __future__ import annotations

import math
import time
from functools import partial
from typing import Callable, Optional, Sequence

import networkx as nx
import numpy as np
import pandas as pd
from networkx.algorithms import community as nx_comm
from sklearn.cluster import AgglomerativeClustering, SpectralClustering
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from .confusion import normalize_rows, per_class_accuracy

_EPS = 1e-6  # relative affinity added between every pair of classes (see module docstring)


# ----------------------------------------------------------------------------- graph

def _check_cm(cm) -> np.ndarray:
    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] == 0:
        raise ValueError(f"confusion matrix must be square (C, C), but got shape {cm.shape}")
    if not np.isfinite(cm).all() or (cm < 0).any():
        raise ValueError("confusion matrix must hold finite non-negative counts")
    return cm


def confusion_affinity(cm) -> np.ndarray:
    """Symmetric affinity w_ij = (r_ij + r_ji) / 2 of the row-normalised confusion, zero diagonal."""
    r = normalize_rows(_check_cm(cm))
    w = (r + r.T) / 2
    np.fill_diagonal(w, 0.0)
    return w


def confusion_graph(
    cm, class_names: Sequence[str], threshold: float = 0.0, top_m: Optional[int] = None
) -> nx.Graph:
    """The confusion graph: one node per class, edges weighted by symmetrised confusion rate.

    Nodes are class indices with attributes `name` and `accuracy` (per-class recall).
    Edges carry `weight` (w_ij, see `confusion_affinity`) and `count` (c_ij + c_ji).
    By default every pair confused at least once is an edge; for display, keep
    only edges with weight > `threshold` and/or each node's `top_m` heaviest edges
    (an edge stays if it is in the top m of either end).
    """
    cm = _check_cm(cm)
    n = len(cm)
    if len(class_names) != n:
        raise ValueError(f"{len(class_names)} class names for a {n}x{n} confusion matrix")
    if top_m is not None and top_m < 1:
        raise ValueError(f"top_m must be >= 1 or None, but got {top_m}")
    w = confusion_affinity(cm)
    acc = per_class_accuracy(cm)
    keep = np.triu(w > max(threshold, 0.0), k=1)
    if top_m is not None:
        ranked = np.zeros_like(keep)
        for i in range(n):
            # stable sort on -w: ties go to the lower class index
            order = [j for j in np.argsort(-w[i], kind="stable") if j != i and w[i, j] > max(threshold, 0.0)]
            for j in order[:top_m]:
                ranked[min(i, j), max(i, j)] = True
        keep &= ranked
    g = nx.Graph()
    for i, name in enumerate(class_names):
        g.add_node(i, name=str(name), accuracy=float(acc[i]))
    for i, j in zip(*np.nonzero(keep)):
        g.add_edge(int(i), int(j), weight=float(w[i, j]), count=float(cm[i, j] + cm[j, i]))
    return g


# ----------------------------------------------------------------------------- clustering

def _relabel(labels: Sequence[int]) -> np.ndarray:
    """Group ids 0..E-1 in order of first appearance."""
    mapping: dict[int, int] = {}
    return np.array([mapping.setdefault(int(g), len(mapping)) for g in labels], dtype=np.int64)


def _force_num_groups(labels: np.ndarray, affinity: np.ndarray, num_groups: int) -> np.ndarray:
    """Deterministically repair a clustering that has more or fewer than E groups."""
    labels = _relabel(labels)
    while labels.max() + 1 < num_groups:
        sizes = np.bincount(labels)
        big = int(np.argmax(sizes))  # largest group, lowest id on ties
        members = np.flatnonzero(labels == big)
        tie = affinity[np.ix_(members, members)].sum(axis=1)
        loner = members[np.argmin(tie)]  # least tied member, lowest index on ties
        labels[loner] = labels.max() + 1
    while labels.max() + 1 > num_groups:
        sizes = np.bincount(labels)
        small = len(sizes) - 1 - int(np.argmin(sizes[::-1]))  # smallest group, highest id on ties
        members = labels == small
        links = np.array([affinity[np.ix_(members, labels == g)].sum() for g in range(len(sizes))])
        links[small] = -np.inf
        labels[members] = int(np.argmax(links))
        labels = _relabel(labels)
    return _relabel(labels)


def _spectral(aff: np.ndarray, num_groups: int, seed: int) -> np.ndarray:
    model = SpectralClustering(n_clusters=num_groups, affinity="precomputed", random_state=seed, n_init=10)
    return model.fit_predict(aff)


def _greedy_modularity(aff: np.ndarray, num_groups: int, seed: int, resolution: float = 1.0) -> np.ndarray:
    # Deterministic by construction; `seed` is accepted for a uniform signature.
    # resolution < 1 favours fewer, larger communities (less balanced groups).
    g = nx.from_numpy_array(aff)
    comms = nx_comm.greedy_modularity_communities(g, weight="weight", resolution=resolution,
                                                  cutoff=num_groups, best_n=num_groups)
    labels = np.empty(len(aff), dtype=np.int64)
    for k, members in enumerate(comms):
        labels[list(members)] = k
    return labels


def _kernighan_lin(aff: np.ndarray, num_groups: int, seed: int, restarts: int = 4) -> np.ndarray:
    """Recursive Kernighan-Lin bisection with planned sizes, so groups are balanced for any E.

    A part that must yield k groups is split into parts that yield floor(k/2) and
    ceil(k/2) groups, with node counts in the same proportion (KL swaps pairs, so
    it keeps the sizes of its starting partition). Each split keeps the lowest
    cut over a few seeded random starts.
    """
    g = nx.from_numpy_array(aff)
    rng = np.random.default_rng(seed)
    labels = np.zeros(len(aff), dtype=np.int64)
    todo = [(list(range(len(aff))), num_groups)]
    next_label = 0
    while todo:
        nodes, k = todo.pop(0)
        if k == 1:
            labels[nodes] = next_label
            next_label += 1
            continue
        k1 = k // 2
        n1 = min(max(round(len(nodes) * k1 / k), k1), len(nodes) - (k - k1))
        sub = g.subgraph(nodes)
        best, best_cut = None, math.inf
        for _ in range(restarts):
            perm = rng.permutation(nodes).tolist()
            start = (set(perm[:n1]), set(perm[n1:]))
            a, b = nx_comm.kernighan_lin_bisection(sub, partition=start, weight="weight")
            cut = nx.cut_size(sub, a, b, weight="weight")
            if cut < best_cut - 1e-12:
                best, best_cut = (a, b), cut
        small, large = sorted(best, key=lambda part: (len(part), min(part)))
        todo += [(sorted(small), k1), (sorted(large), k - k1)]
    return labels


def _agglomerative(aff: np.ndarray, num_groups: int, seed: int, linkage: str = "average") -> np.ndarray:
    # Deterministic by construction; `seed` is accepted for a uniform signature.
    # linkage: "complete" keeps groups compact, "single" chains (least balanced), "average" in between.
    dist = 1.0 - aff / aff.max()
    np.fill_diagonal(dist, 0.0)
    model = AgglomerativeClustering(n_clusters=num_groups, metric="precomputed", linkage=linkage)
    return model.fit_predict(dist)


METHODS: dict[str, Callable[[np.ndarray, int, int], np.ndarray]] = {
    # analysis.superclass_choice scores them all. The paper's procedure (one clustering of the
    # confusion graph) is "spectral", the pipeline's method before that module.
    "spectral": _spectral,                    # sklearn SpectralClustering, precomputed affinity
    "greedy-modularity": _greedy_modularity,  # networkx Clauset-Newman-Moore, stopped at E groups
    "kernighan-lin": _kernighan_lin,          # networkx KL bisection, recursive; equal sizes by design,
                                              # so it cannot recover blocks of unequal size
    "agglomerative": _agglomerative,          # sklearn average linkage on 1 - affinity
    # balance settings of the same algorithms, from balanced to unbalanced groups:
    "agglomerative-complete": partial(_agglomerative, linkage="complete"),    # compact groups
    "greedy-modularity-coarse": partial(_greedy_modularity, resolution=0.5),  # fewer, larger communities
    "agglomerative-single": partial(_agglomerative, linkage="single"),        # chaining, least balanced
}


def cluster_superclasses(cm, num_groups: int, method: str = "spectral", seed: int = 0) -> np.ndarray:
    """Class -> super-class (int64, groups 0..E-1 by first appearance), exactly E non-empty groups."""
    cm = _check_cm(cm)
    n = len(cm)
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)):
        raise ValueError(f"num_groups must be an integer, but got {num_groups!r}")
    if not 2 <= num_groups <= n:
        raise ValueError(f"need 2 <= num_groups <= number of classes ({n}), but got num_groups={num_groups}")
    if method not in METHODS:
        raise ValueError(f"unknown clustering method {method!r}; choose one of {sorted(METHODS)}")
    if num_groups == n:  # one class per group; spares the solvers a degenerate problem
        return np.arange(n, dtype=np.int64)
    aff = confusion_affinity(cm)
    aff = aff + _EPS * (aff.max() if aff.max() > 0 else 1.0)
    np.fill_diagonal(aff, 0.0)
    labels = METHODS[method](aff, int(num_groups), int(seed))
    return _force_num_groups(np.asarray(labels), aff, int(num_groups))


# ----------------------------------------------------------------------------- quality

def clustering_quality(cm, assignment: Sequence[int], reference: Optional[Sequence[int]] = None) -> dict:
    """How good a grouping is for routing: confusion kept inside groups, balance, modularity.

    Keys: `num_groups`, `sizes`, `min_size`, `max_size`, `balance` (entropy of the
    size distribution / log E, 1 = equal sizes), `within_share` (share of the
    off-diagonal confusion counts that stay inside a group), `within_share_rate`
    (the same on row-normalised rates), `modularity` (networkx, on the confusion
    graph; NaN when nothing is confused), and `ari` / `nmi` against `reference`.
    """
    cm = _check_cm(cm)
    a = np.asarray(assignment, dtype=np.int64)
    if a.shape != (len(cm),):
        raise ValueError(f"assignment has {a.size} entries for {len(cm)} classes")
    if a.min() < 0:
        raise ValueError("group indices must be >= 0")
    sizes = np.bincount(a)
    sizes = sizes[sizes > 0]
    e = len(sizes)
    same = a[:, None] == a[None, :]
    off = ~np.eye(len(cm), dtype=bool)

    def share(m: np.ndarray) -> float:
        total = m[off].sum()
        return float(m[off & same].sum() / total) if total > 0 else float("nan")

    p = sizes / sizes.sum()
    graph = confusion_graph(cm, [str(i) for i in range(len(cm))])
    groups = [set(np.flatnonzero(a == g).tolist()) for g in np.unique(a)]
    out = {
        "num_groups": int(e),
        "sizes": [int(s) for s in sizes],
        "min_size": int(sizes.min()),
        "max_size": int(sizes.max()),
        "balance": float(-(p * np.log(p)).sum() / np.log(e)) if e > 1 else 1.0,
        "within_share": share(cm),
        "within_share_rate": share(normalize_rows(cm)),
        "modularity": float(nx_comm.modularity(graph, groups, weight="weight"))
        if graph.number_of_edges() else float("nan"),
    }
    if reference is not None:
        ref = np.asarray(reference, dtype=np.int64)
        if ref.shape != a.shape:
            raise ValueError(f"reference has {ref.size} entries for {a.size} classes")
        out["ari"] = float(adjusted_rand_score(ref, a))
        out["nmi"] = float(normalized_mutual_info_score(ref, a))
    return out


def compare_methods(cm, num_groups: int, reference: Optional[Sequence[int]] = None, seed: int = 0) -> pd.DataFrame:
    """One row per method in `METHODS`: its quality, wall time and assignment."""
    rows = []
    for name in METHODS:
        t0 = time.perf_counter()
        assignment = cluster_superclasses(cm, num_groups, method=name, seed=seed)
        seconds = time.perf_counter() - t0
        rows.append({"method": name, **clustering_quality(cm, assignment, reference),
                     "seconds": seconds, "assignment": assignment.tolist()})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- names, map file, order

def group_names(assignment: Sequence[int], class_names: Sequence[str], max_names: int = 3) -> list[str]:
    """A label per group from its member names, e.g. "Sandal / Sneaker / Ankle boot" or "A / B / C +2"."""
    a = np.asarray(assignment, dtype=np.int64)
    if a.size != len(class_names):
        raise ValueError(f"assignment has {a.size} entries for {len(class_names)} class names")
    if max_names < 1:
        raise ValueError(f"max_names must be >= 1, but got {max_names}")
    labels = []
    for g in range(int(a.max()) + 1 if a.size else 0):
        members = [str(class_names[i]) for i in np.flatnonzero(a == g)]
        label = " / ".join(members[:max_names])
        labels.append(label + (f" +{len(members) - max_names}" if len(members) > max_names else ""))
    return labels


def _check_contiguous(groups: Sequence[int], where: str) -> int:
    present = sorted(set(int(g) for g in groups))
    if present != list(range(len(present))):
        raise ValueError(f"{where}: group indices must be 0..E-1 with every group used, but got {present}")
    return len(present)


def superclass_map(assignment: Sequence[int], class_names: Sequence[str], dataset: str, method: str) -> dict:
    """The super-class map file's content (docs/CONTRACTS.md, "Super-class map file")."""
    a = [int(g) for g in assignment]
    if len(a) != len(class_names):
        raise ValueError(f"assignment has {len(a)} entries for {len(class_names)} class names")
    if len(set(class_names)) != len(class_names):
        raise ValueError("class names must be unique")
    e = _check_contiguous(a, "assignment")
    return {
        "dataset": str(dataset),
        "method": str(method),
        "num_groups": e,
        "classes": {str(name): g for name, g in zip(class_names, a)},
        "groups": group_names(a, class_names),
    }


# The map file's schema, loader and writer live with training, its reader (one validator).
from workbench.superclass_map import load_superclass_map, save_superclass_map  # noqa: E402,F401


def order_by_groups(assignment: Sequence[int]) -> list[int]:
    """Class indices sorted by group (then by index), to plot a confusion matrix in blocks."""
    a = np.asarray(assignment, dtype=np.int64)
    return np.argsort(a, kind="stable").tolist()




def confusion_graph_layout(cm, class_names: Optional[Sequence[str]] = None, seed: int = 0) -> dict:
    """Node -> (x, y): a spring layout of the confusion graph, so confused classes sit close together."""
    g = confusion_graph(cm, class_names)
    return {int(k): tuple(map(float, v)) for k, v in nx.spring_layout(g, weight="weight", seed=seed).items()}
