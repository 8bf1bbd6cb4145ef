"""The Routing page from the card alone: what a checkpoint's `routing_tables` show without the images.

Shipped checkpoints trained on data we may not redistribute (Tiny ImageNet)
carry their test split's class x expert counts; everything that needs
per-image choices (inference-time knobs, capacity, ablation, patch maps,
embeddings) waits for the data.
"""
from typing import Optional

import streamlit as st

from analysis.card_routing import (card_expert_load, card_load_balance, card_router_accuracy, card_tables,
                                   group_expert_table)
from pages import figures as F
from pages.common import linked_selectbox, md
from workbench.checkpoint import router_score


def show(card: dict, reason: Optional[str] = None) -> None:
    """Draw the card-level routing views; `reason`: why the images cannot be used (said once, here)."""
    tables = card_tables(card)
    cfg, meta = card["config"], card["routing_tables"]
    classes = [str(c) for c in card["classes"]]
    sc = card.get("superclasses") or {}
    unit = meta.get("unit", "image")
    st.info((f"{reason[0].upper()}{reason[1:]}. " if reason else "")
            + f"Shown instead: the routing stored in the card, class × expert counts of every {unit} assignment on "
            f"the {md(meta.get('split', 'test'))} split" + (f" at epoch {meta['epoch']}" if meta.get("epoch") else "")
            + ". Inference-time routing, capacity, expert ablation, patch maps and embeddings need the images.")
    metrics = card.get("metrics") or {}
    m = st.columns(3)
    router = router_score(metrics)
    router_label = "Router purity vs super-classes" if router == "router_superclass_purity" \
        else "Router accuracy vs super-classes"
    for col, (key, label) in zip(m, [("test_accuracy", "Test accuracy (card)"), (router, router_label),
                                     ("oracle_routing_accuracy", "Accuracy with a perfect router")]):
        if isinstance(metrics.get(key), (int, float)):
            col.metric(label, f"{metrics[key]:.2%}")

    st.header("Who goes where")
    c = st.columns(3)
    layer = linked_selectbox("MoE block", sorted(tables), key="layer", container=c[0])
    by = c[1].radio("Rows", ["class"] + (["superclass"] if sc.get("assignment") else []), horizontal=True)
    norm = c[2].radio("Normalise", ["row", "column", "counts"], horizontal=True,
                      help="row: where a class goes, P(expert | class); column: what an expert sees, P(class | expert).")
    table = group_expert_table(tables[layer], classes, by=by, superclasses=sc.get("assignment"),
                               superclass_names=sc.get("names"), normalize=None if norm == "counts" else norm,
                               layer=layer)
    st.plotly_chart(F.heatmap_figure(table, title=f"{by} × expert, block {layer}",
                                     colorbar="count" if norm == "counts" else "share"), key="card_cxe")
    st.dataframe(table.round(4), key="card_routing_table")

    st.header("Expert load and balance")
    left, right = st.columns([1.3, 1])
    left.plotly_chart(F.expert_load_figure(card_expert_load(tables)), key="card_load")
    bal = card_load_balance(tables, superclasses=cfg.get("superclasses"))
    right.dataframe(bal[["layer", "min_share", "max_share", "cv2", "gini", "entropy_norm", "flag"]].round(3),
                    hide_index=True)
    if cfg.get("family") == "mvmoe" and sc.get("assignment"):
        st.header("Router vs super-classes")
        st.dataframe(card_router_accuracy(tables, sc["assignment"], int(cfg.get("top_k") or 1)).round(4),
                     hide_index=True)
        st.caption("accuracy: share of test images whose expert is their super-class's (expert g is trained on "
                   "super-class g); purity: the same after mapping each expert to the super-class it sees most.")
