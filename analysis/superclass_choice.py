"""Router-aware super-classes: score candidate groupings and keep the one the router can learn.

Why. A per-image MoE with k = 1 sends each image to one expert; an image sent to
the wrong super-class's expert is almost always misclassified. On Fashion-MNIST
(6x64 / 6x96 / 9x64, sample_checkpoints/README.md) misrouted test images were
right ~25 % of the time against ~88 % when routed right, so the router's
accuracy decides whether the MoE beats its dense twin: the paper's single
clustering (spectral, balanced) gave a 92 % router and -1.7 points, an
agglomerative grouping of the same confusion graph a 98 % router and +1.1.

What. `choose_superclasses` clusters the held-out confusion graph with every
method in `analysis.superclasses.METHODS` (balanced to unbalanced: Kernighan-Lin
forces equal sizes, spectral cuts balanced, greedy modularity at two
resolutions, agglomerative at three linkages), merges identical groupings, and
scores each candidate by what the router will face:

- `probe_accuracy` (the criterion when features are given): a linear classifier
  (StandardScaler + multinomial logistic regression, scikit-learn) is fitted,
  k-fold cross-validated, to predict each image's super-class from the dense
  model's features at the router's input position on the held-out split. The
  Mobile V-MoE router is LayerNorm + linear on exactly that summary, so this is
  the router's task before any MoE is trained (the MoE's blocks keep learning,
  so it estimates, not bounds, the router's accuracy). Folds are shared by all
  candidates, so differences are paired.
- `dense_group_accuracy` (the criterion without features): the share of
  held-out images that the dense model predicts inside their own super-class,
  i.e. how well the dense model's head would route. It is the within-group
  confusion share re-expressed per image.
- feasibility: every group must hold at least `min_group_share` of the held-out
  images (default a quarter of the fair share, 1 / (4E)). A grouping that
  starves an expert is easy to route but wastes the expert; this rule keeps the
  trivial answer (one big group plus tiny ones) out.

The winner is the feasible candidate with the best score; candidates within one
standard error of the best probe accuracy (exactly equal, for the dense-head
score) are a tie, broken by balance (more even experts), then by the order of
`METHODS` (the paper's spectral clustering first).
`method=<name>` keeps a named procedure (the paper's: `PAPER_METHOD`) and still
records every candidate's scores, so reports can show what it gave up.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from workbench.data import normalize
from workbench.models.config import ModelConfig, parse_preset

from .superclasses import METHODS, _check_cm, _relabel, cluster_superclasses, clustering_quality, group_names

PAPER_METHOD = "spectral"   # the paper clusters the confusion graph once; the pipeline's method before this module
AUTO = "auto"               # choose by the criterion below


class SuperclassChoiceError(ValueError):
    """Inputs that cannot be scored (shapes, unknown method, no candidate)."""


# ----------------------------------------------------------------------------- features

def router_input_features(model: torch.nn.Module, dataset, moe: "str | ModelConfig",
                          batch_size: int = 512) -> np.ndarray:
    """(N, D) float32: what the per-image MoE's router would read, computed by the dense `model`.

    The Mobile V-MoE router reads the residual stream entering its first MoE
    block, summarised as the mean patch token (or the class token,
    `router_input="cls"`), see `workbench.models.mvmoe.ImageRouter.summarize`.
    `moe` is the MoE preset (e.g. "mvmoe-6x64-e4k1") or its ModelConfig; the
    dense model must have its depth and width. `dataset` has uint8 `images`,
    `mean` and `std` (a `workbench.data.ImageDataset`). Uses the
    models' public `forward_intermediates`, stopping at the block before the first MoE block.
    """
    cfg = moe if isinstance(moe, ModelConfig) else ModelConfig(**parse_preset(moe))
    if not cfg.is_moe or cfg.family != "mvmoe":
        raise SuperclassChoiceError(f"router features need a per-image MoE config (mvmoe-...), got {cfg.family}")
    if len(model.blocks) != cfg.depth or model.cfg.width != cfg.width:
        raise SuperclassChoiceError(f"dense model is {len(model.blocks)}x{model.cfg.width} but the MoE is "
                                    f"{cfg.depth}x{cfg.width}: the router position must exist in both")
    first_moe = cfg.moe_block_indices()[0]
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for s in range(0, len(dataset.images), batch_size):
                x = normalize(dataset.images[s:s + batch_size], dataset.mean, dataset.std)
                # the stream entering the first MoE block = the output of the block before it
                x = model.embed(x) if first_moe == 0 else \
                    model.forward_intermediates(x, [first_moe - 1], stop_early=True).intermediates[first_moe - 1]
                out.append((x[:, 1:].mean(1) if cfg.router_input == "mean" else x[:, 0]).float())
    finally:
        model.train(was_training)
    return torch.cat(out).numpy()


# ----------------------------------------------------------------------------- scores

def probe_accuracy(features: np.ndarray, labels: np.ndarray, assignments: Sequence[Sequence[int]],
                   folds: int = 5, seed: int = 0) -> list[float]:
    """Cross-validated accuracy of a linear probe predicting each grouping's super-class per image.

    One fold split (stratified by class, so every fold has every class) is shared
    by all assignments: the scores are paired.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64).ravel()
    if x.ndim != 2 or len(x) != len(y):
        raise SuperclassChoiceError(f"features must be (N, D) with one label per row, got {x.shape} and {y.shape}")
    counts = np.bincount(y)
    if counts[counts > 0].min() < folds:
        raise SuperclassChoiceError(f"every class needs at least {folds} held-out images for a {folds}-fold probe")
    split = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(x, y))
    scores = []
    # NOTE: one BLAS thread: these fits are small, and threaded BLAS spin-waits on a shared CPU
    # (measured: 13 s instead of 0.3 s per fit of 4,800 x 64 on the 2-core project machine under load).
    with threadpool_limits(limits=1):
        for a in assignments:
            target = np.asarray(a, dtype=np.int64)[y]
            probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=500))
            pred = cross_val_predict(probe, x, target, cv=split)
            scores.append(float((pred == target).mean()))
    return scores


def dense_group_accuracy(cm, assignment: Sequence[int]) -> float:
    """Share of images whose dense prediction lies in their own super-class (routing by the dense head)."""
    cm = _check_cm(cm)
    a = np.asarray(assignment)
    return float(cm[a[:, None] == a[None, :]].sum() / cm.sum()) if cm.sum() > 0 else float("nan")


def group_shares(cm, assignment: Sequence[int]) -> np.ndarray:
    """Share of the held-out images (confusion row sums) in each group."""
    cm = _check_cm(cm)
    a = np.asarray(assignment, dtype=np.int64)
    totals = np.bincount(a, weights=cm.sum(axis=1), minlength=a.max() + 1)
    return totals / totals.sum() if totals.sum() > 0 else np.full(len(totals), 1 / len(totals))


# ----------------------------------------------------------------------------- candidates

def candidate_groupings(cm, num_groups: int, seed: int = 0,
                        extra: Optional[Mapping[str, Sequence[int]]] = None) -> list[dict]:
    """Every method's grouping (METHODS order), identical partitions merged into one candidate.

    `extra` adds named groupings (e.g. a dataset's reference hierarchy with E groups).
    Each candidate: `name` (first method), `methods` (all that gave it), `assignment`.
    """
    found: dict[tuple, dict] = {}
    named = [(m, cluster_superclasses(cm, num_groups, method=m, seed=seed)) for m in METHODS]
    for name, a in list((extra or {}).items()):
        a = np.asarray(a, dtype=np.int64)
        if a.shape != (len(_check_cm(cm)),) or a.min() < 0 or len(np.unique(a)) != num_groups:
            raise SuperclassChoiceError(f"candidate {name!r} must give each of the {len(cm)} classes one of "
                                        f"exactly {num_groups} groups")
        named.append((str(name), _relabel(a)))
    for name, a in named:
        key = tuple(a.tolist())
        if key in found:
            found[key]["methods"].append(name)
        else:
            found[key] = {"name": name, "methods": [name], "assignment": list(key)}
    return list(found.values())


@dataclass
class SuperclassChoice:
    """The chosen grouping and every candidate's scores (written to clustering.json by the pipeline)."""

    method: str                      # the winner's name (a METHODS name, or an `extra` candidate's)
    assignment: list[int]            # class -> super-class, 0..E-1
    criterion: str                   # "router-probe", "dense-group-accuracy" or "named method"
    reason: str                      # one sentence: why the winner won
    candidates: pd.DataFrame         # one row per distinct grouping, `chosen` marks the winner
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        """Plain-JSON record: method, criterion, reason, settings and every candidate's row."""
        rows = self.candidates.to_dict(orient="records")
        return _plain({"method": self.method, "assignment": self.assignment, "criterion": self.criterion,
                       "reason": self.reason, "settings": self.settings, "candidates": rows})


def _plain(obj):
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    return None if isinstance(obj, float) and math.isnan(obj) else obj


def score_candidates(cm, candidates: list[dict], features=None, labels=None, reference=None,
                     class_names: Optional[Sequence[str]] = None, folds: int = 5, seed: int = 0) -> pd.DataFrame:
    """One row per candidate: group sizes and image shares, balance, within-group confusion,
    dense-head routing accuracy and (with features) the router probe's accuracy and standard error."""
    cm = _check_cm(cm)
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(cm))]
    rows = []
    for c in candidates:
        q = clustering_quality(cm, c["assignment"], reference)
        shares = group_shares(cm, c["assignment"])
        rows.append({"candidate": c["name"], "methods": c["methods"],
                     "groups": group_names(c["assignment"], names, max_names=len(names)),
                     "sizes": q["sizes"], "min_share": float(shares.min()), "max_share": float(shares.max()),
                     "balance": q["balance"], "within_share": q["within_share"],
                     "dense_group_accuracy": dense_group_accuracy(cm, c["assignment"]),
                     **{k: q[k] for k in ("ari", "nmi") if k in q},
                     "assignment": list(c["assignment"])})
    table = pd.DataFrame(rows)
    if features is not None:
        if labels is None:
            raise SuperclassChoiceError("features need the held-out labels they belong to")
        acc = probe_accuracy(features, np.asarray(labels), [c["assignment"] for c in candidates], folds, seed)
        n = len(np.asarray(labels))
        table["probe_accuracy"] = acc
        table["probe_se"] = [math.sqrt(max(p * (1 - p), 1e-12) / n) for p in acc]
    return table


def _pick(table: pd.DataFrame, score: str, min_share: float) -> tuple[int, str]:
    """Index of the winner and the sentence that says why."""
    feasible = table.index[table["min_share"] >= min_share - 1e-12].tolist()
    pool = feasible or table.index.tolist()
    best = max(pool, key=lambda i: table.at[i, score])
    band = table.at[best, "probe_se"] if score == "probe_accuracy" else 0.0
    tied = [i for i in pool if table.at[i, score] >= table.at[best, score] - band]
    win = max(tied, key=lambda i: (round(table.at[i, "balance"], 9), -i))
    label = {"probe_accuracy": "router probe", "dense_group_accuracy": "dense-head routing accuracy"}[score]
    others = sorted((i for i in pool if i != win), key=lambda i: -table.at[i, score])
    runner = (f"; next {table.at[others[0], 'candidate']} {100 * table.at[others[0], score]:.2f}%"
              if others else "")
    why = (f"{table.at[win, 'candidate']}: {label} {100 * table.at[win, score]:.2f}%, best of "
           f"{len(pool)} {'feasible ' if feasible else ''}candidates{runner}")
    if len(tied) > 1:
        why += (f"; {len(tied)} within one standard error ({100 * band:.2f} points), "
                f"the most balanced kept (balance {table.at[win, 'balance']:.2f})")
    if feasible:
        why += (f"; every group holds >= {100 * min_share:.1f}% of the held-out images "
                f"(smallest {100 * table.at[win, 'min_share']:.1f}%)")
        dropped = len(table) - len(feasible)
        if dropped:
            why += f", which {dropped} candidate(s) did not"
    else:
        why += f"; no candidate gave every group >= {100 * min_share:.1f}% of the images, so all were considered"
    return int(win), why


def choose_superclasses(cm, num_groups: int, *, features=None, labels=None, method: str = AUTO,
                        reference: Optional[Sequence[int]] = None, class_names: Optional[Sequence[str]] = None,
                        extra: Optional[Mapping[str, Sequence[int]]] = None,
                        min_group_share: Optional[float] = None, folds: int = 5, seed: int = 0) -> SuperclassChoice:
    """Score every candidate grouping of the held-out confusion `cm` into `num_groups` super-classes
    and return the chosen one with all scores (see the module docstring for the criterion).

    features, labels: the dense model's `router_input_features` on the held-out images and their class
    labels; without them the criterion is the dense head's routing accuracy. method: AUTO, or a METHODS
    name to keep that procedure (e.g. PAPER_METHOD) while still scoring every candidate.
    """
    cm = _check_cm(cm)
    if method != AUTO and method not in METHODS:
        raise SuperclassChoiceError(f"unknown method {method!r}; choose {AUTO!r} or one of {list(METHODS)}")
    min_share = 1 / (4 * num_groups) if min_group_share is None else float(min_group_share)
    if not 0 <= min_share <= 1 / num_groups:
        raise SuperclassChoiceError(f"min_group_share must be in 0..1/E = {1 / num_groups:.3f}, got {min_share}")
    candidates = candidate_groupings(cm, num_groups, seed, extra)
    table = score_candidates(cm, candidates, features, labels, reference, class_names, folds, seed)
    score = "probe_accuracy" if features is not None else "dense_group_accuracy"
    if method == AUTO:
        win, reason = _pick(table, score, min_share)
        criterion = "router-probe" if features is not None else "dense-group-accuracy"
    else:
        win = next(i for i, c in enumerate(candidates) if method in c["methods"])
        criterion, reason = "named method", f"{method}: named by the caller (method={method!r}), not chosen by score"
    table["chosen"] = [i == win for i in range(len(table))]
    ranked = (-table[score]).rank(method="min").astype(int)
    table.insert(1, "rank", ranked)
    settings = {"num_groups": int(num_groups), "min_group_share": min_share, "score": score, "folds": folds,
                "seed": seed, "heldout_images": int(cm.sum()),
                "probe": "StandardScaler + LogisticRegression(C=1), stratified k-fold" if features is not None
                else None}
    return SuperclassChoice(method=str(table.at[win, "candidate"]), assignment=list(table.at[win, "assignment"]),
                            criterion=criterion, reason=reason, candidates=table, settings=settings)


def candidates_table(choice: "SuperclassChoice | dict") -> pd.DataFrame:
    """Display table, one row per candidate, the chosen one marked: from a SuperclassChoice or the
    `to_json()` record the pipeline writes into clustering.json. Percentages as numbers 0..100."""
    rows = choice.to_json()["candidates"] if isinstance(choice, SuperclassChoice) else choice.get("candidates")
    if not rows:
        raise SuperclassChoiceError("this clustering record has no candidates (written before router-aware choice)")
    out = []
    for r in rows:
        pct = lambda k: None if r.get(k) is None else round(100 * r[k], 2)  # noqa: E731
        out.append({"chosen": "✓" if r.get("chosen") else "", "rank": r.get("rank"), "candidate": r["candidate"],
                    "router probe %": pct("probe_accuracy"), "dense-head routing %": pct("dense_group_accuracy"),
                    "confusion kept inside %": pct("within_share"), "smallest group %": pct("min_share"),
                    "largest group %": pct("max_share"), "balance": round(r["balance"], 3),
                    "groups": " | ".join(r["groups"]), "also found by": ", ".join(r["methods"][1:])})
    table = pd.DataFrame(out)
    return table.dropna(axis=1, how="all").sort_values(["rank", "candidate"], kind="stable").reset_index(drop=True)
