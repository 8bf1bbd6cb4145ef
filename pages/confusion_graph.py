"""Confusion graph: which classes the model mixes up, as a network and as a heatmap ordered by super-class."""
import numpy as np
import pandas as pd
import plotly.express as px
import streamlit as st

from analysis.confusion import normalize_rows, off_diagonal, per_class_accuracy
from analysis.superclasses import confusion_graph, confusion_graph_layout, order_by_groups
from pages.figures import confusion_graph_figure
from pages.common import (checkpoint_picker, confusion_picker, group_sources, linked_selectbox, load_eval_data, md,
                          need, open_checkpoint, set_selection)

@st.cache_data(show_spinner=False, max_entries=64)
def graph_layout(cm: tuple, names: tuple, seed: int = 0) -> dict:
    return confusion_graph_layout(np.array(cm), list(names), seed)


st.title("Confusion graph")
card, path = open_checkpoint(checkpoint_picker())
classes = [str(c) for c in card.get("classes") or []]
need(classes, "This checkpoint's card lists no class names.")

cm, source = confusion_picker(card, path)

colourings = group_sources(card, load_eval_data(card, quiet=True))  # reference groups are optional
colour_by = st.sidebar.selectbox("Colour nodes by", list(colourings) + ["nothing"])
groups, group_names = colourings.get(colour_by, (None, []))

weights = normalize_rows(cm)
off = weights[~np.eye(len(cm), dtype=bool)]
top = float(max(off.max() if off.size else 0.0, 1e-6))
threshold = st.slider("Edge threshold (symmetrised confusion rate)", 0.0, top, value=min(0.01, top / 2),
                      step=top / 200, format="%.4f",
                      help="Show an edge when (rate i→j + rate j→i) / 2 exceeds this.")
g = confusion_graph(cm, classes, threshold=threshold)
pos = graph_layout(tuple(map(tuple, cm.tolist())), tuple(classes))

selected = linked_selectbox("Class", list(range(len(classes))), key="class", format_func=lambda i: classes[i],
                            container=st.sidebar)
acc = per_class_accuracy(cm)
c = st.columns(4)
c[0].metric("Classes", len(classes))
c[1].metric("Edges shown", g.number_of_edges())
c[2].metric("Images in matrix", int(cm.sum()))
c[3].metric(f"Accuracy of {md(classes[selected])}", f"{acc[selected]:.1%}" if acc[selected] == acc[selected] else "n/a")

left, right = st.columns([1.1, 1])
with left:
    st.subheader("Network")
    st.caption("Node size = per-class accuracy; edge width = confusion rate; colour = super-class. "
               "Click a node to select its class on every page.")
    event = st.plotly_chart(confusion_graph_figure(g, pos, groups, group_names, selected), key="graph",
                            on_select="rerun", selection_mode="points")
    picked = [p.get("customdata") for p in (event.selection.points if event else []) if "customdata" in p]
    picked = [int(p[0] if isinstance(p, list) else p) for p in picked if p is not None]
    if picked and picked[0] != st.session_state.get("_graph_pick") and 0 <= picked[0] < len(classes):
        st.session_state["_graph_pick"] = picked[0]  # a click, not the same selection replayed on a rerun
        set_selection("class", picked[0])
        st.rerun()
with right:
    st.subheader("Confusion matrix (row-normalised)")
    order = order_by_groups(groups) if groups is not None else list(range(len(classes)))
    labels = [classes[i] + (f" [{groups[i]}]" if groups is not None else "") for i in order]
    confusions = off_diagonal(weights[np.ix_(order, order)])      # the scale is the confusions' own
    heat = px.imshow(confusions, x=labels, y=labels, color_continuous_scale="Blues",
                     labels=dict(x="predicted", y="true", color="rate"), aspect="equal", zmin=0,
                     zmax=float(np.nanmax(confusions)) if np.isfinite(confusions).any() else 1.0)
    heat.update_layout(height=560, margin=dict(l=0, r=0, t=10, b=0))
    st.plotly_chart(heat, key="heatmap")
    st.caption("Only the confusions are coloured (the diagonal, the correct predictions, is left blank so that "
               "its 85-99 % do not wash out the few-percent confusions that define the super-classes). "
               "Rows and columns are sorted by super-class, so well-chosen groups show as blocks on the diagonal."
               if groups is not None else "Pick a super-class colouring to sort the matrix into blocks.")

st.subheader(f"Most confused with {md(classes[selected])}")
nbrs = sorted(((j, d["weight"], d["count"]) for j, d in confusion_graph(cm, classes)[selected].items()),
              key=lambda t: -t[1])[:8]
if nbrs:
    st.dataframe(pd.DataFrame([{"class": classes[j], "symmetrised rate": round(w, 4), "images confused": int(n),
                                "same super-class": (groups[j] == groups[selected]) if groups is not None else None}
                               for j, w, n in nbrs]), hide_index=True)
else:
    st.info(f"{md(classes[selected])} is never confused with another class in this matrix.")
