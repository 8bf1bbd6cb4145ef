"""Accuracy vs compute: inference-time routing sweeps and a table over checkpoints.

- `sweep_routing`: accuracy and active MACs for every k (1..E) and, for
  per-token models, every eval capacity ratio — changed with
  `model.set_routing` on the trained model, no retraining, restored afterwards.
  MACs come from `workbench.flops.count_macs` with the routing records of the
  pass, so dropped tokens are not counted.
- `checkpoint_table`: one row per checkpoint (card `metrics.test_accuracy` and
  `macs.active`, recomputed when missing), `pareto_frontier`, `moe_gains`
  (MoE minus the dense model of the same shape); `pages.figures.tradeoff_figure` draws them.
- `paper_reference`: the two gains quoted in the Mobile V-MoE abstract
  (Daxberger et al., arXiv 2309.04354) — the only published numbers used here.

MACs are multiply-accumulates per image, the unit papers call "FLOPs".
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch.nn as nn

from .collect import collect_routing, routing_overrides
from .paired import paired_difference

__all__ = ["sweep_routing", "checkpoint_table", "pareto_frontier", "moe_gains", "payoff_table",
           "paper_reference"]

def _input_shape(model: nn.Module) -> tuple:
    c = model.cfg
    return (c.in_chans, c.img_size, c.img_size)


# =========================================================================== sweeps
def sweep_routing(model: nn.Module, images, labels, mean: Sequence[float], std: Sequence[float], *,
                  ks: Optional[Sequence[int]] = None, capacity_ratios: Optional[Sequence[float]] = None,
                  batch_size: int = 256, bf16: bool = False) -> pd.DataFrame:
    """Accuracy and active MACs per (k, eval capacity ratio), without retraining.

    ks: default 1..(enabled experts). capacity_ratios: per-token models only
    (default 0.5, 1, 1.5, 2 and the model's own); per-image models have no
    capacity (the column is NaN). Columns: k, capacity_ratio, accuracy,
    macs_active, macs_dense, relative_macs, params_active, drop_rate.
    """
    from workbench.flops import count_macs

    cfg = model.cfg
    if cfg.family == "vit":
        raise ValueError("a dense model has no routing to sweep")
    settings = model.routing_settings()
    enabled = cfg.num_experts - len(settings["disabled_experts"])
    ks = list(range(1, enabled + 1)) if ks is None else [int(k) for k in ks]
    if cfg.family == "vmoe":
        ratios = sorted({0.5, 1.0, 1.5, 2.0, float(settings["eval_capacity_ratio"])}) if capacity_ratios is None \
            else [float(c) for c in capacity_ratios]
    else:
        if capacity_ratios is not None:
            raise ValueError("per-image models have no capacity: leave capacity_ratios unset")
        ratios = [None]
    rows = []
    for k in ks:
        for ratio in ratios:
            with routing_overrides(model, top_k=k, eval_capacity_ratio=ratio):
                s = collect_routing(model, images, labels, mean, std, batch_size, bf16=bf16)
                macs = count_macs(model, _input_shape(model), routing=s.to_records())
            kept = np.concatenate([lr.kept.ravel() for lr in s.layers])
            rows.append({"k": k, "capacity_ratio": np.nan if ratio is None else ratio, "accuracy": s.accuracy,
                         "macs_active": macs["active"], "macs_dense": macs["dense"],
                         "relative_macs": macs["active"] / macs["dense"], "params_active": macs["params_active"],
                         "drop_rate": float((~kept).mean())})
    return pd.DataFrame(rows)


# =========================================================================== checkpoints
def _get(d: dict, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d or d[k] is None:
            return default
        d = d[k]
    return d


def checkpoint_table(checkpoints: Iterable[Union[str, Path, dict]], *,
                     data: Union[None, object, Callable[[str], object]] = None, recompute: bool = False,
                     max_images: Optional[int] = None, batch_size: int = 256) -> pd.DataFrame:
    """One row per checkpoint: name, preset, family, routing, shape, accuracy, MACs, params, source.

    checkpoints: checkpoint directories, or card dicts (optionally with "path"
    and "name" keys). Accuracy and MACs come from the card; when missing (or
    with recompute=True) they are recomputed from the weights: MACs with
    `count_macs` (per-token models: routing of a real pass when data is given),
    accuracy on `data` — an ImageDataset, or a function dataset name ->
    ImageDataset — limited to `max_images`. Without data a missing accuracy
    stays NaN. `source` says which numbers were recomputed.
    """
    from workbench.checkpoint import load_checkpoint, read_card
    from workbench.flops import count_macs
    from workbench.models.config import router_kind

    rows = []
    for item in checkpoints:
        if isinstance(item, dict):
            card, path = item, item.get("path")
        else:
            path = Path(item)
            card = read_card(path)
        cfg = card.get("config") or {}
        family = cfg.get("family", "vit")
        row = {
            "name": card.get("name") or (Path(path).name if path else card.get("preset", "?")),
            "preset": card.get("preset"), "family": family,
            "routing": {"vit": "dense", "mvmoe": "per-image", "vmoe": "per-token"}.get(family, family),
            "router": router_kind(cfg) or "dense",
            "depth": cfg.get("depth"), "width": cfg.get("width"),
            "num_experts": cfg.get("num_experts", 0) or 0, "top_k": cfg.get("top_k") if family != "vit" else None,
            "dataset": card.get("dataset"),
            "accuracy": _get(card, "metrics", "test_accuracy"),
            "macs_active": _get(card, "macs", "active"), "macs_dense": _get(card, "macs", "dense"),
            "params_total": _get(card, "params", "total"), "params_active": _get(card, "params", "active"),
            "path": str(path) if path else None, "source": "card",
            **_seed_columns(card),
        }
        need_macs = recompute or row["macs_active"] is None
        need_acc = recompute or row["accuracy"] is None
        if (need_macs or need_acc) and path is not None:
            model, _ = load_checkpoint(path)
            ds = data(card.get("dataset")) if callable(data) else data
            routing, recomputed = None, []
            if ds is not None and (need_acc or (need_macs and family == "vmoe")):
                n = len(ds.labels) if max_images is None else min(max_images, len(ds.labels))
                if need_acc or family == "vmoe":
                    s = collect_routing(model, ds.images[:n], ds.labels[:n], ds.mean, ds.std, batch_size)
                    routing = s.to_records()
                    if need_acc:
                        row["accuracy"] = s.accuracy
                        recomputed.append("accuracy")
            if need_macs:
                macs = count_macs(model, _input_shape(model), routing=routing)
                row.update(macs_active=macs["active"], macs_dense=macs["dense"],
                           params_total=macs["params_total"], params_active=macs["params_active"])
                recomputed.append("MACs" if routing is not None or family != "vmoe" else "MACs (balanced routing)")
            if recomputed:
                row["source"] = "recomputed: " + ", ".join(recomputed)
        rows.append(row)
    df = pd.DataFrame(rows)
    for col in ("accuracy", "accuracy_mean", "macs_active", "macs_dense"):
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    if len(df):
        df["pareto"] = pareto_frontier(df, y="accuracy_mean")
    return df


def _seed_columns(card: dict) -> dict:
    """The spread over seeds a grid card carries (`seeds`: one entry per seed of the same recipe):
    mean ± std of test accuracy and of the paired differences to dense (on the test images and on
    trained-on images, `fit`), and each seed's paired differences; one seed -> std NaN."""
    seeds = card.get("seeds") or []

    def values(key):
        return [s[key] for s in seeds if s.get(key) is not None]

    def std(xs):
        return float(np.std(xs, ddof=1)) if len(xs) > 1 else float("nan")

    acc, delta, fit = values("test_accuracy"), values("delta_vs_dense"), values("fit_delta_vs_dense")
    return {"n_seeds": len(acc) or 1,
            "seed_accuracies": acc or None,
            "accuracy_mean": float(np.mean(acc)) if acc else _get(card, "metrics", "test_accuracy"),
            "accuracy_std": std(acc),
            "gain_mean": float(np.mean(delta)) if delta else float("nan"), "gain_std": std(delta),
            "seed_gains": delta or None, "n_pairs": len(delta),
            "fit_gain_mean": float(np.mean(fit)) if fit else float("nan"), "fit_gain_std": std(fit),
            "seed_fit_gains": fit or None}


def pareto_frontier(df: pd.DataFrame, x: str = "macs_active", y: str = "accuracy") -> pd.Series:
    """True for rows no other row beats: fewer-or-equal MACs and higher-or-equal accuracy, one strictly."""
    xs, ys = df[x].to_numpy(dtype=float), df[y].to_numpy(dtype=float)
    ok = np.isfinite(xs) & np.isfinite(ys)
    front = np.zeros(len(df), dtype=bool)
    for i in np.flatnonzero(ok):
        dominated = ok & (xs <= xs[i]) & (ys >= ys[i]) & ((xs < xs[i]) | (ys > ys[i]))
        front[i] = not dominated.any()
    return pd.Series(front, index=df.index, name="pareto")


def moe_gains(df: pd.DataFrame) -> pd.DataFrame:
    """Each MoE checkpoint minus the best dense checkpoint of the same depth x width and dataset.

    Columns: name, dense_name, routing, router, dataset, depth, width, macs_active, gain
    (accuracy points as a fraction, MoE - dense), gain_std, n, seed_gains, and fit_gain,
    fit_gain_std, seed_fit_gains (the same on images the models trained on). A grid card with
    seeds gives the mean of the paired per-seed differences (same seed, same data order) and
    their std; otherwise the gain is one difference (n = 1, std NaN, no fit gain).
    """
    cols = ["name", "dense_name", "routing", "router", "dataset", "depth", "width", "macs_active", "gain",
            "gain_std", "n", "seed_gains", "fit_gain", "fit_gain_std", "seed_fit_gains"]
    rows = []
    dense = df[df["routing"] == "dense"].dropna(subset=["accuracy"])
    for _, r in df[df["routing"] != "dense"].dropna(subset=["accuracy"]).iterrows():
        match = dense[(dense["depth"] == r["depth"]) & (dense["width"] == r["width"])
                      & (dense["dataset"] == r["dataset"])]
        if match.empty:
            continue
        best = match.loc[match["accuracy"].idxmax()]
        row = {"name": r["name"], "dense_name": best["name"], "routing": r["routing"],
               "router": r.get("router", r["routing"]), "dataset": r["dataset"], "depth": r["depth"],
               "width": r["width"], "macs_active": r["macs_active"]}
        if r.get("n_pairs", 0) or 0:
            row.update(gain=r["gain_mean"], gain_std=r["gain_std"], n=int(r["n_pairs"]),
                       seed_gains=r["seed_gains"], fit_gain=r.get("fit_gain_mean", float("nan")),
                       fit_gain_std=r.get("fit_gain_std", float("nan")), seed_fit_gains=r.get("seed_fit_gains"))
            row.update(_interval_columns(_seeds(r["seed_gains"])))
            row.update(_interval_columns(_seeds(r.get("seed_fit_gains")), "fit_"))
        else:
            row.update(gain=r["accuracy"] - best["accuracy"], gain_std=float("nan"), n=1, seed_gains=None,
                       fit_gain=float("nan"), fit_gain_std=float("nan"), seed_fit_gains=None,
                       **_interval_columns(_seeds(None)), **_interval_columns(_seeds(None), "fit_"))
        rows.append(row)
    return pd.DataFrame(rows, columns=cols + INTERVAL_COLUMNS + ["fit_" + c for c in INTERVAL_COLUMNS])


INTERVAL_COLUMNS = ["gain_low", "gain_high", "positive", "verdict"]


def _seeds(seed_gains):
    """The paired difference of a row's per-seed gains (none where the row has no seeds)."""
    return paired_difference(seed_gains if isinstance(seed_gains, list) else [])


def _interval_columns(d, prefix: str = "") -> dict:
    """The paired 95 % t-interval of per-seed gains, how many were > 0, and the claim it allows
    (analysis.paired); NaN interval and 'one checkpoint, no claim' without paired seeds."""
    nan = float("nan")
    return {f"{prefix}gain_low": nan if d.low is None else d.low, f"{prefix}gain_high": nan if d.high is None else d.high,
            f"{prefix}positive": d.positive if d.n else nan,
            f"{prefix}verdict": d.verdict if d.n > 1 else "one seed, no claim"}


PAYOFF_KEYS = ["dataset", "size", "router", "E", "init", "recipe"]


def payoff_table(rows: pd.DataFrame) -> pd.DataFrame:
    """What pays off: one row per grid cell (dataset, size, router, E, init, recipe) that has a
    paired baseline, from the grid results (one row per model and seed, `delta_vs_dense` its
    difference to the baseline of the same seed). Columns: the keys, model, baseline, n, gain
    (mean), gain_std, gain_low / gain_high (95 % t-interval), positive (seeds > 0), verdict,
    seed_gains, and gap (mean fit − test accuracy: how much the cell overfits)."""
    cols = PAYOFF_KEYS + ["model", "baseline", "n", "gain", "gain_std", "gain_low", "gain_high", "positive",
                          "verdict", "seed_gains", "gap"]
    out = []
    if rows.empty or "delta_vs_dense" not in rows:
        return pd.DataFrame(out, columns=cols)
    paired = rows.dropna(subset=["delta_vs_dense"]).reindex(columns=list(dict.fromkeys([*rows.columns, *PAYOFF_KEYS])))
    paired[PAYOFF_KEYS] = paired[PAYOFF_KEYS].astype(object).where(paired[PAYOFF_KEYS].notna(), "")
    for key, g in paired.groupby(PAYOFF_KEYS + ["model"], sort=False):
        d = paired_difference(g["delta_vs_dense"].astype(float).tolist())
        gap = (g["fit_accuracy"].astype(float) - g["test_accuracy"].astype(float)).mean() \
            if "fit_accuracy" in g else float("nan")
        out.append({**dict(zip(PAYOFF_KEYS + ["model"], key)), "baseline": g["baseline"].iloc[0]
                    if "baseline" in g else "dense", "n": d.n, "gain": d.mean,
                    "gain_std": float("nan") if d.std is None else d.std,
                    **_interval_columns(d),
                    "seed_gains": g["delta_vs_dense"].astype(float).tolist(), "gap": gap})
    return pd.DataFrame(out, columns=cols)


@functools.lru_cache(maxsize=1)
def _vit_tiny_imagenet_macs() -> float:
    from workbench.flops import count_macs
    from workbench.models import create_model

    m = create_model("vit-12x192", num_classes=1000, img_size=224, in_chans=3, patch_size=32)
    return count_macs(m, (3, 224, 224))["active"]


def paper_reference() -> pd.DataFrame:
    """The Mobile V-MoE abstract's two MoE - dense gains on ImageNet-1k (top-1, points as a fraction).

    - ViT-Tiny: +3.39%. The abstract gives no cost; x is the dense ViT-Tiny at
      224 px / patch 32 (49 tokens, SPEC §2) counted by `workbench.flops` —
      our number, not the paper's.
    - "an even smaller ViT variant with only 54M FLOPs": +4.66%; x = 54e6 as
      stated (the paper's FLOPs are MACs in the DeiT convention).
    """
    return pd.DataFrame([
        {"label": "ViT-Tiny", "gain": 0.0339, "macs": _vit_tiny_imagenet_macs(),
         "macs_source": "dense ViT-Tiny at 224px/patch 32, counted by workbench.flops (not in the abstract)",
         "source": "Mobile V-MoE abstract (arXiv 2309.04354), ImageNet-1k"},
        {"label": "smaller ViT, 54M FLOPs", "gain": 0.0466, "macs": 54e6,
         "macs_source": "54M FLOPs as stated in the abstract",
         "source": "Mobile V-MoE abstract (arXiv 2309.04354), ImageNet-1k"},
    ])
