"""Routing statistics: what the routers of a V-MoE / Mobile V-MoE learned.

All functions read a `RoutingSummary` (analysis/collect.py: one batched pass
over a split) or plain numpy arrays, and return DataFrames or arrays
(pages/figures.py draws them). Units: entropies and mutual information in bits.

- who goes where: `class_expert_counts` (class or super-class x expert, raw
  or normalised either way), `image_expert_counts`, `spatial_expert_maps`
- balance: `expert_load`, `load_balance` (CV^2, Gini, an imbalance/collapse
  flag), `routing_entropy`
- capacity (V-MoE §2.2): `capacity_drops`, `drop_summary`,
  `compare_batch_priority` (BPR vs vanilla, re-running the model)
- structure: `layer_agreement`, `router_superclass_accuracy` (Mobile V-MoE's
  super-class router), `expert_specialisation` (mutual information)
- `routing_report`: everything above in one call (what the benchmark times).

"Assignments" are (item, choice) pairs, an item being an image (per-image
routing) or a token (per-token routing). Unless said otherwise, counts use the
assignments that survived capacity, i.e. the work the experts really did.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import pandas as pd

from workbench.models import RoutingRecord

from .collect import RoutingSummary, collect_routing, routing_overrides

__all__ = [
    "image_expert_counts", "class_expert_counts", "group_table", "expert_load", "load_frame", "balance_table",
    "load_stats", "gini", "cv_squared",
    "imbalance_flag", "superclass_shares", "keep_difference", "load_balance", "entropy_bits", "routing_entropy", "capacity_drops", "drop_summary",
    "compare_batch_priority", "spatial_expert_maps", "mapped_agreement", "normalized_mutual_info",
    "layer_agreement", "router_superclass_accuracy", "mutual_information", "expert_specialisation",
    "routing_report",
]


# =========================================================================== assignments
def _select(lr: RoutingRecord, tokens: str, ranks: Optional[Sequence[int]], after_capacity: bool):
    """experts (N, M) and a mask (N, M) of the assignments to count (M = tokens x ranks)."""
    experts, mask = lr.experts, lr.kept if after_capacity else np.ones(lr.kept.shape, dtype=bool)
    if ranks is not None:
        ranks = list(ranks)
        if any(not 0 <= r < lr.top_k for r in ranks):
            raise ValueError(f"ranks must be in 0..{lr.top_k - 1}, got {ranks}")
        experts, mask = experts[..., ranks], mask[..., ranks]
    if lr.per_token:
        sl = {"all": slice(None), "patches": slice(1, None), "cls": slice(0, 1)}
        if tokens not in sl:
            raise ValueError(f"tokens must be 'all', 'patches' or 'cls', got {tokens!r}")
        experts, mask = experts[:, sl[tokens]], mask[:, sl[tokens]]
    N = experts.shape[0]
    return experts.reshape(N, -1), mask.reshape(N, -1)


def image_expert_counts(lr: RoutingRecord, *, after_capacity: bool = True, ranks: Optional[Sequence[int]] = None,
                        tokens: str = "all") -> np.ndarray:
    """(N, E) assignments each image sent to each expert.

    Per image: 1 per chosen expert. Per token: the number of the image's tokens
    (`tokens`: "all", "patches" or "cls") assigned to the expert.
    ranks: which choice ranks to count (0 = first choice; default all k).
    """
    experts, mask = _select(lr, tokens, ranks, after_capacity)
    N, E = experts.shape[0], lr.num_experts
    idx = (np.arange(N)[:, None] * E + experts)[mask]
    return np.bincount(idx, minlength=N * E).reshape(N, E).astype(np.float64)


def _group_labels(summary: RoutingSummary, by: str):
    if by == "class":
        return summary.labels, summary.class_names()
    if by == "superclass":
        groups = summary.superclass_labels()
        n = int(np.max(summary.superclasses)) + 1
        names = summary.superclass_names or [f"super-class {g}" for g in range(n)]
        return groups, list(names)
    raise ValueError(f"by must be 'class' or 'superclass', got {by!r}")


def _normalize(counts: np.ndarray, normalize: Optional[str]) -> np.ndarray:
    if normalize is None:
        return counts
    if normalize == "row":
        s = counts.sum(1, keepdims=True)
    elif normalize == "column":
        s = counts.sum(0, keepdims=True)
    elif normalize == "all":
        s = counts.sum()
    else:
        raise ValueError(f"normalize must be None, 'row', 'column' or 'all', got {normalize!r}")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(s > 0, counts / np.where(s > 0, s, 1), 0.0)


def class_expert_counts(summary: RoutingSummary, layer: Optional[int] = None, *, by: str = "class",
                        normalize: Optional[str] = None, per_image: bool = False, after_capacity: bool = True,
                        ranks: Optional[Sequence[int]] = None, tokens: str = "all") -> pd.DataFrame:
    """Group x expert assignment counts of one MoE block (None: the first).

    by: "class" or "superclass". normalize: None (counts), "row" (P(expert |
    group): where a class goes), "column" (P(group | expert): what an expert
    sees) or "all" (joint). per_image=True first scales each image's counts to
    sum to 1, so every image weighs the same whatever its number of tokens.
    """
    lr = summary.layer(layer)
    counts = image_expert_counts(lr, after_capacity=after_capacity, ranks=ranks, tokens=tokens)
    if per_image:
        counts = _normalize(counts, "row")
    groups, names = _group_labels(summary, by)
    return group_table(counts, groups, names, by=by, normalize=normalize, layer=lr.layer)


def group_table(counts: np.ndarray, groups, names: Sequence[str], *, by: str = "class",
                normalize: Optional[str] = None, layer: Optional[int] = None) -> pd.DataFrame:
    """Rows of (item, expert) `counts` summed by group (`groups[i]` for row i) -> group x expert table,
    normalised as `class_expert_counts` says. Shared with the card's tables (analysis/card_routing.py)."""
    table = np.zeros((len(names), counts.shape[1]))
    np.add.at(table, np.asarray(groups, dtype=np.int64), counts)
    df = pd.DataFrame(_normalize(table, normalize), index=pd.Index(names, name=by),
                      columns=pd.Index(range(counts.shape[1]), name="expert"))
    df.attrs.update(layer=layer, normalize=normalize)
    return df


# =========================================================================== load balance
def cv_squared(x) -> float:
    """Squared coefficient of variation, var / mean^2 (population variance); 0 when balanced."""
    x = np.asarray(x, dtype=np.float64)
    m = x.mean()
    return float(x.var() / m ** 2) if m > 0 else 0.0


def gini(x) -> float:
    """Gini coefficient of non-negative loads: 0 balanced, (E - 1) / E when one expert takes all."""
    x = np.asarray(x, dtype=np.float64)
    if x.sum() <= 0:
        return 0.0
    diffs = np.abs(x[:, None] - x[None, :]).sum()
    return float(diffs / (2 * len(x) ** 2 * x.mean()))


def entropy_bits(p, axis: int = -1) -> np.ndarray:
    """Shannon entropy in bits of distributions along `axis` (0 log 0 = 0)."""
    p = np.asarray(p, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = np.where(p > 0, np.log2(np.where(p > 0, p, 1.0)), 0.0)
    return -(p * logp).sum(axis)


def load_stats(counts) -> dict:
    """Balance statistics of one per-expert load vector (counts or shares)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    share = counts / total if total > 0 else np.zeros_like(counts)
    E = len(counts)
    return {
        "assignments": float(total),
        "min_share": float(share.min()), "max_share": float(share.max()), "std_share": float(share.std()),
        "p50_share": float(np.percentile(share, 50)), "p95_share": float(np.percentile(share, 95)),
        "cv2": cv_squared(counts), "gini": gini(counts),
        "entropy_norm": float(entropy_bits(share) / np.log2(E)) if E > 1 else 1.0,
        "max_over_uniform": float(share.max() * E),
    }


def _default_thresholds(E: int, max_share: Optional[float], min_share: Optional[float]):
    # defaults: twice the uniform share (at most 0.75), and a quarter of it
    return (min(0.75, 2.0 / E) if max_share is None else max_share,
            0.25 / E if min_share is None else min_share)


def imbalance_flag(shares, max_share: Optional[float] = None, min_share: Optional[float] = None,
                   collapse_share: float = 0.9, expected=None) -> tuple:
    """("ok" | "imbalanced" | "collapsed", reason) for a per-expert share vector.

    collapsed: one expert takes >= `collapse_share` of the assignments.
    imbalanced: one expert above `max_share` (default 2/E, at most 0.75) or one
    below `min_share` (default 0.25/E, a nearly dead expert).
    `expected`: each expert's intended share (a super-class router: its super-class's share of
    the images). Then only a departure from it is flagged: more than `max_share` - 1/E above it
    (the allowance the uniform rule gives), or below a quarter of it.
    Shares of disabled experts should be left out by the caller.
    """
    shares = np.asarray(shares, dtype=np.float64)
    if expected is not None:
        return _departure_flag(shares, np.asarray(expected, dtype=np.float64), max_share, collapse_share)
    hi, lo = _default_thresholds(len(shares), max_share, min_share)
    top, low = int(shares.argmax()), int(shares.argmin())
    if shares[top] >= collapse_share:
        return "collapsed", f"expert {top} takes {shares[top]:.0%} of assignments (>= {collapse_share:.0%})"
    reasons = []
    if shares[top] > hi:
        reasons.append(f"expert {top} takes {shares[top]:.1%} (> {hi:.1%})")
    if shares[low] < lo:
        reasons.append(f"expert {low} takes {shares[low]:.1%} (< {lo:.1%})")
    return ("imbalanced", "; ".join(reasons)) if reasons else ("ok", "")


def _departure_flag(shares: np.ndarray, expected: np.ndarray, max_share: Optional[float],
                    collapse_share: float) -> tuple:
    E = len(shares)
    allowance = _default_thresholds(E, max_share, None)[0] - 1.0 / E
    top = int(shares.argmax())
    if shares[top] >= collapse_share > expected[top]:
        return "collapsed", f"expert {top} takes {shares[top]:.0%} of assignments (>= {collapse_share:.0%})"
    reasons = [f"expert {e} takes {shares[e]:.1%}, its super-class {expected[e]:.1%} of the images"
               for e in range(E) if shares[e] > expected[e] + allowance or shares[e] < 0.25 * expected[e]]
    return ("imbalanced", "; ".join(reasons)) if reasons else ("ok", "")


def superclass_shares(summary: RoutingSummary) -> Optional[np.ndarray]:
    """Each super-class's share of the summary's images (what a super-class router's experts should
    carry); None without a map."""
    if summary.superclasses is None or not len(summary.labels):
        return None
    groups = np.asarray(summary.superclasses)[summary.labels]
    return np.bincount(groups, minlength=summary.num_experts) / len(groups)


def keep_difference(map_a, map_b) -> dict:
    """Two expert maps of the same tokens (-1: dropped): how many tokens only `a` kept, only `b` kept."""
    a, b = np.asarray(map_a) >= 0, np.asarray(map_b) >= 0
    return {"kept_only_a": int((a & ~b).sum()), "kept_only_b": int((b & ~a).sum())}


def _enabled(summary: RoutingSummary, E: int) -> np.ndarray:
    mask = np.ones(E, dtype=bool)
    mask[list(summary.settings.get("disabled_experts", []))] = False
    return mask


def expert_load(summary: RoutingSummary, *, after_capacity: bool = True,
                ranks: Optional[Sequence[int]] = None) -> pd.DataFrame:
    """Long table (layer, expert, count, share) of assignments per expert and MoE block."""
    return load_frame({lr.layer: image_expert_counts(lr, after_capacity=after_capacity, ranks=ranks).sum(0)
                       for lr in summary.layers})


def load_frame(loads: dict) -> pd.DataFrame:
    """{block: assignments per expert} -> long table (layer, expert, count, share), blocks in the given order."""
    rows = []
    for layer, counts in loads.items():
        total = counts.sum()
        for e, c in enumerate(counts):
            rows.append({"layer": layer, "expert": e, "count": float(c), "share": float(c / total) if total else 0.0})
    return pd.DataFrame(rows, columns=["layer", "expert", "count", "share"])


def load_balance(summary: RoutingSummary, *, max_share: Optional[float] = None, min_share: Optional[float] = None,
                 collapse_share: float = 0.9, after_capacity: bool = True, guided: bool = False) -> pd.DataFrame:
    """One row per MoE block, plus "all": share min/max/std/p50/p95, CV^2, Gini, flag.

    The "all" row pools the per-expert loads of every block (p50/p95 are then
    across layers and experts), and its flag is the worst block's flag.
    Disabled experts are left out of the statistics. `guided` (a super-class router): each
    expert's load is compared with its super-class's share of the images, not with 1/E.
    """
    load = expert_load(summary, after_capacity=after_capacity)
    expected = superclass_shares(summary) if guided and not summary.settings.get("disabled_experts") else None
    return balance_table({lr.layer: load[load.layer == lr.layer]["count"].to_numpy()[_enabled(summary, lr.num_experts)]
                          for lr in summary.layers}, max_share=max_share, min_share=min_share,
                         collapse_share=collapse_share, expected=expected)


def balance_table(loads: dict, *, max_share: Optional[float] = None, min_share: Optional[float] = None,
                  collapse_share: float = 0.9, expected=None) -> pd.DataFrame:
    """{block: assignments per (enabled) expert} -> the rows of `load_balance`, "all" included;
    `expected`: the experts' intended shares (see `imbalance_flag`)."""
    rows, pooled, worst = [], [], ("ok", "")
    order = {"ok": 0, "imbalanced": 1, "collapsed": 2}
    for layer, counts in loads.items():
        stats = load_stats(counts)
        flag, reason = imbalance_flag(counts / max(counts.sum(), 1), max_share, min_share, collapse_share,
                                      expected=expected)
        if order[flag] > order[worst[0]]:
            worst = (flag, f"block {layer}: {reason}")
        hi, lo = _default_thresholds(len(counts), max_share, min_share)    # the limits the flag used
        rows.append({"layer": str(layer), **stats, "flag": flag, "reason": reason,
                     "lowest_allowed": lo, "highest_allowed": hi})
        pooled.append(counts / max(counts.sum(), 1))
    if pooled:
        shares = np.concatenate(pooled)
        stats = load_stats(shares)
        stats["assignments"] = float(sum(r["assignments"] for r in rows))
        rows.append({"layer": "all", **stats, "flag": worst[0], "reason": worst[1],
                     "lowest_allowed": max(r["lowest_allowed"] for r in rows),
                     "highest_allowed": min(r["highest_allowed"] for r in rows)})
    return pd.DataFrame(rows)


def routing_entropy(summary: RoutingSummary) -> pd.DataFrame:
    """Per MoE block: mean entropy of each item's router distribution and of the marginal.

    mean_entropy: average over items (images or tokens) of H(p_item) — low
    when the router is confident. marginal_entropy: H(mean p) — high when the
    experts are used evenly. top1_entropy: H of the first-choice histogram.
    `*_norm` divide by log2 of the number of enabled experts.
    """
    rows = []
    for lr in summary.layers:
        p = lr.probs.reshape(-1, lr.num_experts).astype(np.float64)
        E_on = int((p.max(0) > 0).sum()) if len(p) else lr.num_experts
        norm = np.log2(E_on) if E_on > 1 else 1.0
        h = entropy_bits(p)
        top1 = np.bincount(lr.top1.reshape(-1), minlength=lr.num_experts)
        rows.append({
            "layer": lr.layer, "mean_entropy": float(h.mean()), "mean_entropy_norm": float(h.mean() / norm),
            "marginal_entropy": float(entropy_bits(p.mean(0))),
            "marginal_entropy_norm": float(entropy_bits(p.mean(0)) / norm),
            "top1_entropy": float(entropy_bits(top1 / max(top1.sum(), 1))),
            "enabled_experts": E_on,
        })
    return pd.DataFrame(rows)


# =========================================================================== capacity
def capacity_drops(summary: RoutingSummary) -> pd.DataFrame:
    """Long table (layer, rank, expert): assignments before capacity, kept, dropped, drop_rate,
    and the gate mass of all / of the dropped assignments (gate_total, dropped_gate).

    rank 1 is the first choice. Per-image routing never drops (capacity does
    not apply), so its rows show 0 dropped. Within one rank, an expert keeps
    min(assigned, capacity) assignments whatever the priority; what priority
    changes is *which* ones, hence the gate mass: BPR drops the least confident.
    """
    rows = []
    for lr in summary.layers:
        E = lr.num_experts
        ex = lr.experts.reshape(-1, lr.top_k)
        kept = lr.kept.reshape(-1, lr.top_k)
        gates = lr.gates.reshape(-1, lr.top_k).astype(np.float64)
        for r in range(lr.top_k):
            assigned = np.bincount(ex[:, r], minlength=E)
            k = np.bincount(ex[:, r], weights=kept[:, r], minlength=E)
            g_all = np.bincount(ex[:, r], weights=gates[:, r], minlength=E)
            g_drop = np.bincount(ex[:, r], weights=gates[:, r] * ~kept[:, r], minlength=E)
            for e in range(E):
                a = int(assigned[e])
                rows.append({"layer": lr.layer, "rank": r + 1, "expert": e, "assigned": a, "kept": int(k[e]),
                             "dropped": a - int(k[e]), "drop_rate": (a - k[e]) / a if a else 0.0,
                             "gate_total": float(g_all[e]), "dropped_gate": float(g_drop[e])})
    return pd.DataFrame(rows, columns=["layer", "rank", "expert", "assigned", "kept", "dropped", "drop_rate",
                                       "gate_total", "dropped_gate"])


def drop_summary(summary: RoutingSummary) -> pd.DataFrame:
    """Per MoE block: capacity, assignments, dropped, drop_rate, per-rank drop rates,
    and items that lost every choice (they skip the block through the residual)."""
    rows = []
    for lr in summary.layers:
        kept = lr.kept.reshape(-1, lr.top_k)
        row = {"layer": lr.layer, "capacity": lr.capacity, "assignments": kept.size,
               "dropped": int((~kept).sum()), "drop_rate": float((~kept).mean())}
        for r in range(lr.top_k):
            row[f"drop_rate_rank{r + 1}"] = float((~kept[:, r]).mean())
        row["items_dropped"] = int((~kept.any(1)).sum())
        row["item_drop_rate"] = float((~kept.any(1)).mean())
        rows.append(row)
    return pd.DataFrame(rows)


def compare_batch_priority(model, images, labels, mean, std, *, eval_capacity_ratio: Optional[float] = None,
                           batch_size: int = 256, bf16: bool = False) -> pd.DataFrame:
    """Drops and accuracy with Batch Priority Routing vs vanilla (position) priority.

    Re-runs the per-token model twice with `set_routing(batch_priority=...)`
    (optionally at another eval capacity ratio, where BPR matters most: tight
    buffers) and restores the model's settings afterwards. One row per
    (priority, layer, rank) with assigned, dropped, drop_rate,
    dropped_gate_share (gate mass lost to capacity / all gate mass) and accuracy.
    """
    if model.cfg.family != "vmoe":
        raise ValueError("BPR only applies to per-token (vmoe) models; per-image routing has no capacity")
    frames = []
    for bpr in (True, False):
        with routing_overrides(model, batch_priority=bpr, eval_capacity_ratio=eval_capacity_ratio):
            s = collect_routing(model, images, labels, mean, std, batch_size, bf16=bf16)
        d = capacity_drops(s).groupby(["layer", "rank"], as_index=False)[
            ["assigned", "dropped", "gate_total", "dropped_gate"]].sum()
        d["drop_rate"] = d["dropped"] / d["assigned"].where(d["assigned"] > 0, 1)
        d["dropped_gate_share"] = d["dropped_gate"] / d["gate_total"].where(d["gate_total"] > 0, 1)
        d = d.drop(columns=["gate_total", "dropped_gate"])
        d.insert(0, "priority", "BPR" if bpr else "vanilla")
        d["accuracy"] = s.accuracy
        d["capacity_ratio"] = s.settings["eval_capacity_ratio"]
        frames.append(d)
    return pd.concat(frames, ignore_index=True)


# =========================================================================== spatial maps
def spatial_expert_maps(summary: RoutingSummary, layer: Optional[int] = None, indices=None, *, rank: int = 0,
                        after_capacity: bool = True) -> tuple:
    """Per-image patch grids of the chosen expert: (maps (n, g, g) int, class_token (n,) int).

    rank 0 = first choice; with after_capacity, a dropped assignment is -1.
    Per-image routing gives a constant grid (the image's expert).
    """
    lr = summary.layer(layer)
    if not 0 <= rank < lr.top_k:
        raise ValueError(f"rank must be in 0..{lr.top_k - 1}, got {rank}")
    idx = np.arange(len(summary.labels)) if indices is None else np.atleast_1d(np.asarray(indices))
    ex = lr.experts[idx, ..., rank]
    if after_capacity:
        ex = np.where(lr.kept[idx, ..., rank], ex, -1)
    g = summary.grid
    if lr.per_token:
        return ex[:, 1:].reshape(len(idx), g, g), ex[:, 0]
    return np.repeat(ex[:, None], g * g, axis=1).reshape(len(idx), g, g), ex


# =========================================================================== structure
def _contingency(a: np.ndarray, b: np.ndarray, na: int, nb: int) -> np.ndarray:
    return np.bincount(a.astype(np.int64) * nb + b, minlength=na * nb).reshape(na, nb).astype(np.float64)


def mapped_agreement(a, b, num_experts: Optional[int] = None) -> float:
    """P(b == m(a)) where m maps each expert of `a` to its most frequent partner in `b`.

    "How often does layer i's top-1 expert predict layer j's?" 1 when b is a
    function of a (e.g. a shared per-image router, or a relabelling);
    asymmetric: many-to-one maps agree from the fine side only.
    """
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if len(a) == 0:
        return float("nan")
    n = int(num_experts or max(a.max(), b.max()) + 1)
    c = _contingency(a, b, n, n)
    return float(c.max(1).sum() / len(a))


def normalized_mutual_info(a, b, num_experts: Optional[int] = None) -> float:
    """NMI(a, b) = I(a; b) / mean(H(a), H(b)) (scikit-learn's arithmetic normalisation).

    Symmetric and invariant to relabelling; 1 for identical partitions (also
    when both use a single expert), 0 for independent ones.
    """
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    n = int(num_experts or max(a.max(), b.max()) + 1)
    mi, ha, hb = mutual_information(_contingency(a, b, n, n))
    if ha == 0 and hb == 0:
        return 1.0
    return float(mi / ((ha + hb) / 2)) if mi > 0 else 0.0


def layer_agreement(summary: RoutingSummary, method: str = "mapped", *, after_capacity: bool = False) -> pd.DataFrame:
    """L x L matrix comparing the top-1 experts of MoE blocks, item by item.

    method "mapped": entry (i, j) = P(top1_j == m_ij(top1_i)), m_ij mapping each
    expert of block i to the expert of block j it co-occurs with most (experts
    of different blocks are different networks, so equal indices mean nothing);
    rows predict columns, the diagonal is 1. method "nmi": normalised mutual
    information, symmetric. Items are images (per-image) or tokens at the same
    position (per-token). after_capacity=True maps dropped choices to their own
    label (-1 -> E), i.e. "skipped the block" counts as a route.
    """
    if method not in ("mapped", "nmi"):
        raise ValueError(f"method must be 'mapped' or 'nmi', got {method!r}")
    E = summary.num_experts
    tops = []
    for lr in summary.layers:
        t = lr.top1_kept if after_capacity else lr.top1
        tops.append(np.where(t < 0, E, t).ravel())
    fn = mapped_agreement if method == "mapped" else normalized_mutual_info
    n = len(tops)
    m = np.ones((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                m[i, j] = fn(tops[i], tops[j], E + 1)
    names = pd.Index(summary.layer_indices, name="block")
    df = pd.DataFrame(m, index=names, columns=names.rename("predicted block"))
    df.attrs["method"] = method
    return df


def router_superclass_accuracy(summary: RoutingSummary, superclasses=None, *, by_group: bool = False) -> pd.DataFrame:
    """How well a per-image router predicts each image's super-class (Mobile V-MoE §2.2).

    Per MoE block: accuracy (top-1 expert == super-class: expert g is trained on
    super-class g), topk_hit (super-class among the k choices) and purity (top-1
    accuracy after mapping each expert to its most frequent super-class — for
    routers trained without labels). by_group=True: one row per (block,
    super-class) with the recall of that super-class instead.
    """
    if summary.family != "mvmoe":
        raise ValueError("router accuracy against super-classes applies to per-image (mvmoe) routing")
    if superclasses is None:
        superclasses = summary.superclasses
    if superclasses is None:
        raise ValueError("no super-class map: pass superclasses= (class -> group)")
    sc = np.asarray(superclasses, dtype=np.int64)
    target = sc[summary.labels]
    n_groups = int(sc.max()) + 1
    rows = []
    for lr in summary.layers:
        top1 = lr.top1
        hit = (lr.experts == target[:, None]).any(1)
        if by_group:
            for g in range(n_groups):
                m = target == g
                rows.append({"layer": lr.layer, "superclass": g, "images": int(m.sum()),
                             "recall": float((top1[m] == g).mean()) if m.any() else float("nan"),
                             "topk_hit": float(hit[m].mean()) if m.any() else float("nan")})
            continue
        n = max(n_groups, lr.num_experts)
        purity = _contingency(top1, target, n, n).max(1).sum() / len(top1)
        rows.append({"layer": lr.layer, "images": len(top1), "accuracy": float((top1 == target).mean()),
                     "topk_hit": float(hit.mean()), "purity": float(purity)})
    return pd.DataFrame(rows)


def mutual_information(joint_counts) -> tuple:
    """(I(row; col), H(row), H(col)) in bits of a joint count table."""
    c = np.asarray(joint_counts, dtype=np.float64)
    total = c.sum()
    if total <= 0:
        return 0.0, 0.0, 0.0
    p = c / total
    pr, pc = p.sum(1), p.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(p > 0, p / (pr[:, None] * pc[None, :]), 1.0)
    mi = float((p * np.log2(ratio)).sum())
    return max(mi, 0.0), float(entropy_bits(pr)), float(entropy_bits(pc))


def expert_specialisation(summary: RoutingSummary, layer: Optional[int] = None, *, by: str = "class",
                          after_capacity: bool = True, tokens: str = "all") -> pd.DataFrame:
    """Per expert: how concentrated its traffic is on few classes (or super-classes).

    Columns: share (of assignments), top_group and top_group_share (purity),
    kl_bits = KL(P(group | expert) || P(group)) and specialisation =
    kl_bits / H(group) (1: the expert sees a single class of a uniform
    split; 0: it sees classes in their overall proportions). The share-weighted
    sum of kl_bits is the mutual information I(expert; group); `df.attrs` holds
    `mutual_information`, `mi_over_group_entropy` (fraction of class
    uncertainty the routing explains), `mi_over_expert_entropy` (1: the expert
    is a function of the class) and `nmi`.
    """
    counts = class_expert_counts(summary, layer, by=by, after_capacity=after_capacity, tokens=tokens)
    c = counts.to_numpy().T                                                # (E, groups)
    mi, h_e, h_g = mutual_information(c)
    total = c.sum()
    pg = c.sum(0) / total if total else np.zeros(c.shape[1])
    rows = []
    for e, row in enumerate(c):
        n = row.sum()
        if n == 0:
            rows.append({"expert": e, "share": 0.0, "top_group": None, "top_group_share": float("nan"),
                         "kl_bits": float("nan"), "specialisation": float("nan")})
            continue
        q = row / n
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = float(np.where(q > 0, q * np.log2(np.where(q > 0, q, 1) / np.where(pg > 0, pg, 1)), 0).sum())
        rows.append({"expert": e, "share": float(n / total), "top_group": counts.index[int(q.argmax())],
                     "top_group_share": float(q.max()), "kl_bits": kl,
                     "specialisation": kl / h_g if h_g > 0 else 0.0})
    df = pd.DataFrame(rows)
    df.attrs.update(layer=counts.attrs["layer"], by=by, mutual_information=mi,
                    mi_over_group_entropy=mi / h_g if h_g > 0 else 0.0,
                    mi_over_expert_entropy=mi / h_e if h_e > 0 else 0.0,
                    nmi=mi / ((h_e + h_g) / 2) if (h_e + h_g) > 0 else 1.0)
    return df


# =========================================================================== everything
def routing_report(summary: RoutingSummary, *, max_share: Optional[float] = None,
                   min_share: Optional[float] = None, guided: bool = False) -> dict:
    """Every routing statistic of a summary, as a dict of DataFrames (keys below); `guided`: a
    super-class router, whose experts' loads are judged against their super-classes' shares."""
    if not summary.layers:
        raise ValueError("a dense model has no routing to analyse")
    report = {
        "load": expert_load(summary),
        "balance": load_balance(summary, max_share=max_share, min_share=min_share, guided=guided),
        "entropy": routing_entropy(summary),
        "drops": capacity_drops(summary),
        "drop_summary": drop_summary(summary),
        "agreement": layer_agreement(summary, "mapped"),
        "agreement_nmi": layer_agreement(summary, "nmi"),
    }
    spec = []
    for lr in summary.layers:
        report[f"class_expert_{lr.layer}"] = class_expert_counts(summary, lr.layer)
        d = expert_specialisation(summary, lr.layer)
        d.insert(0, "layer", lr.layer)
        spec.append(d)
        if summary.superclasses is not None:
            report[f"superclass_expert_{lr.layer}"] = class_expert_counts(summary, lr.layer, by="superclass")
    report["specialisation"] = pd.concat(spec, ignore_index=True)
    if summary.family == "mvmoe" and summary.superclasses is not None:
        report["router_accuracy"] = router_superclass_accuracy(summary)
    if summary.family == "vmoe":
        report["spatial_maps"] = spatial_expert_maps(summary)
    return report
