"""The Train page's curves: metrics.jsonl records -> pandas frames -> plotly figures (no Streamlit here)."""
from __future__ import annotations

from typing import Iterable

import plotly.graph_objects as go


def metrics_frames(records: Iterable[dict]) -> dict:
    """metrics.jsonl records -> pandas DataFrames for the Train page's curves.

    `train`: one row per train record (step, epoch, loss, ce, aux_<name>, lr, img_per_s, ...);
    `eval`: one row per evaluation (epoch, step, test_accuracy, test_loss);
    `load`: one row per (evaluation, MoE layer, expert) with the expert's share of assignments.
    """
    import pandas as pd

    train, evals, load = [], [], []
    for rec in records:
        kind = rec.get("type")
        if kind == "train":
            row = {k: v for k, v in rec.items() if not isinstance(v, (dict, list))}
            for name, value in (rec.get("aux") or {}).items():
                row[f"aux_{name}"] = value
            train.append(row)
        elif kind == "eval":
            evals.append({k: v for k, v in rec.items() if not isinstance(v, (dict, list))})
            for layer in rec.get("expert_load") or []:
                for expert, share in enumerate(layer.get("fraction") or []):
                    load.append({"epoch": rec.get("epoch"), "step": rec.get("step"), "layer": layer.get("layer"),
                                 "kind": layer.get("kind"), "expert": expert, "share": share,
                                 "dropped": layer.get("dropped")})
    return {"train": pd.DataFrame(train), "eval": pd.DataFrame(evals), "load": pd.DataFrame(load)}



def loss_figure(train) -> go.Figure:
    fig = go.Figure()
    for col, label in [("loss", "total loss"), ("ce", "cross-entropy")] + [
            (c, c.removeprefix("aux_") + " (aux)") for c in train.columns if c.startswith("aux_")]:
        if col in train:
            fig.add_scatter(x=train["step"], y=train[col], mode="lines+markers", name=label,
                            yaxis="y2" if col.startswith("aux_") else "y")
    fig.update_layout(title="Training loss", xaxis_title="step", yaxis_title="loss", height=320,
                      yaxis2=dict(title="auxiliary loss", overlaying="y", side="right", showgrid=False),
                      margin=dict(l=10, r=10, t=40, b=10), legend=dict(orientation="h", y=-0.25))
    return fig


def accuracy_figure(train, evals) -> go.Figure:
    fig = go.Figure()
    if "train_accuracy" in train:
        fig.add_scatter(x=train["step"], y=100 * train["train_accuracy"], mode="lines+markers", name="train (batch)")
    if "test_accuracy" in evals:
        fig.add_scatter(x=evals["step"], y=100 * evals["test_accuracy"], mode="lines+markers", name="test",
                        marker=dict(size=10), text=[f"epoch {e}" for e in evals["epoch"]])
    fig.update_layout(title="Accuracy", xaxis_title="step", yaxis_title="accuracy (%)", height=320,
                      margin=dict(l=10, r=10, t=40, b=10), legend=dict(orientation="h", y=-0.25))
    return fig


def load_figure(load) -> go.Figure:
    last = load[load["epoch"] == load["epoch"].max()]
    fig = go.Figure()
    for layer, part in last.groupby("layer"):
        fig.add_bar(x=[f"expert {e}" for e in part["expert"]], y=100 * part["share"], name=f"block {layer}")
    n = last["expert"].nunique()
    fig.add_hline(y=100 / max(1, n), line_dash="dash", annotation_text="uniform 1/E")
    kind = last["kind"].iloc[0] if len(last) else "image"
    fig.update_layout(title=f"Expert load at epoch {last['epoch'].max()} ({kind}s per expert, test split)",
                      yaxis_title=f"% of {kind} assignments", barmode="group", height=320,
                      margin=dict(l=10, r=10, t=40, b=10))
    return fig
