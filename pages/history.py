"""Routing over training: churn, load and router accuracy per epoch; two models' routing compared after matching."""

import numpy as np
import pandas as pd
import plotly.express as px
import streamlit as st

from analysis.collect import collect_routing
from analysis.history import (load_over_time, matched_agreement, router_accuracy_over_time, routing_churn,
                              settling_epoch)
from pages.common import (analysis_bf16, available_checkpoints, checkpoint_hash, checkpoint_picker, eval_subset,
                          linked_selectbox, load_card, model_copy, need, need_moe, open_checkpoint)
from pages.figures import percent_axis
from workbench.snapshots import SnapshotError, load_history


@st.cache_data(show_spinner=False, max_entries=16)
def history_of(path: str, digest: str):
    return load_history(path)


@st.cache_data(show_spinner="Routing the test images through both models…", max_entries=8)
def top1_of(digest: str, n: int, bf16: bool, _path, _ds) -> dict:
    """{block: top-1 expert after capacity} of the first MoE block(s) over the evaluation subset."""
    summary = collect_routing(model_copy(_path), _ds.images, _ds.labels, _ds.mean, _ds.std, bf16=bf16)
    return {lr.layer: lr.top1_kept for lr in summary.layers}


st.title("Routing over training")
card, path = open_checkpoint(checkpoint_picker())
cfg = card["config"]
need_moe(card)
E = int(cfg["num_experts"])

st.subheader("Across epochs")
try:
    history = history_of(str(path), checkpoint_hash(path))
except SnapshotError as e:
    history = None
    st.error(f"The routing snapshots of this checkpoint cannot be read: {e}")
if history is None:
    st.info("This checkpoint has no routing snapshots. Training writes one at the end of every epoch (the expert "
            "each of a fixed set of held-out probe images goes to, in `routing/epoch-NNNN.npz` of the run "
            "folder); checkpoints trained before snapshots existed have none. Train a model on the **Train** page "
            "to see how its routing settles.")
else:
    layer = linked_selectbox("MoE block", history.layers, key="layer", container=st.columns([1, 3])[0])
    churn = routing_churn(history, layer)
    threshold = st.slider("Settled when churn stays at or below", 0.0, 0.2, 0.02, 0.01, format="%.2f",
                          help="Share of probe items whose expert changed since the previous epoch.")
    settled = settling_epoch(churn, threshold)
    unit = "tokens" if history.experts[layer].ndim == 3 else "images"
    m = st.columns(3)
    m[0].metric("Epochs with snapshots", len(history.epochs))
    m[1].metric(f"Probe {unit}", int(np.prod(history.experts[layer].shape[1:])))
    m[2].metric("Routing settled at epoch", "not yet" if settled is None else settled)
    left, right = st.columns(2)
    if len(churn):
        fig = px.line(churn, x="epoch", y="churn", markers=True, title=f"Routing churn ({unit} that changed expert)")
        fig.add_hline(y=threshold, line_dash="dash", annotation_text="settled threshold")
        left.plotly_chart(fig.update_yaxes(**percent_axis([*churn["churn"], threshold])), key="churn")
    else:
        left.caption("Churn needs at least two epochs of snapshots.")
    load = load_over_time(history, E, layer).reset_index().melt("epoch", var_name="expert", value_name="share")
    right.plotly_chart(px.area(load, x="epoch", y="share", color="expert", title="Load per expert over training")
                       .update_layout(yaxis_tickformat=".0%"), key="load_time")
    sc = (card.get("superclasses") or {}).get("assignment")
    if sc and unit == "images":
        acc = router_accuracy_over_time(history, sc, layer)
        st.plotly_chart(px.line(acc, x="epoch", y="router accuracy", markers=True,
                                title="Router accuracy vs super-classes (expert g = super-class g)")
                        .update_yaxes(**percent_axis(acc["router accuracy"])), key="router_acc_time")

st.subheader("Compare with another model")
st.caption("Two routers can learn the same partition under different expert numbers; the agreement below is "
           "measured after the best one-to-one matching of experts (Hungarian matching), on the same test images.")
others = [(p, label) for p, label in available_checkpoints() if p != path]
candidates = []
for p, label in others:
    try:
        c = load_card(p)
    except ValueError:
        continue
    oc = c.get("config") or {}
    if c.get("dataset") == card.get("dataset") and oc.get("family") in ("vmoe", "mvmoe") and \
            int(oc.get("num_experts", -1)) == E:
        candidates.append((p, label))
need(candidates, f"No other checkpoint routes the same data to {E} experts.")
other = st.selectbox("Other checkpoint", [p for p, _ in candidates], format_func=dict(candidates).get)
ds = eval_subset(card)
need(ds is not None, "Comparing routing needs the test images (see the warning above).")
mine = top1_of(checkpoint_hash(path), len(ds), analysis_bf16(), path, ds)
theirs = top1_of(checkpoint_hash(other), len(ds), analysis_bf16(), other, ds)
rows = []
for la, a in mine.items():
    for lb, b in theirs.items():
        if a.shape == b.shape:
            agree, mapping = matched_agreement(a, b, E)
            raw = float((a.ravel() == b.ravel()).mean())
            rows.append({"this block": la, "other block": lb, "agreement after matching": agree,
                         "agreement of raw indices": raw, "matching (this → other)": ", ".join(
                             f"{i}→{j}" for i, j in enumerate(mapping))})
need(rows, "The two models route different items (per image vs per token): nothing to compare one to one.")
st.dataframe(pd.DataFrame(rows), hide_index=True, column_config={
    "agreement after matching": st.column_config.ProgressColumn(format="percent", min_value=0.0, max_value=1.0),
    "agreement of raw indices": st.column_config.NumberColumn(format="percent")})
