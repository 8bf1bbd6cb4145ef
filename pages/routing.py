"""Routing: what the routers learned — who goes where, balance, drops, layer agreement, maps, embeddings."""

import pandas as pd
import streamlit as st

from analysis import routing as R
from analysis.ablation import expert_ablation, impact_matrix
from analysis.collect import collect_routing, routing_overrides
from analysis.embedding import embedding_frame
from pages import figures as F, routing_card
from pages.common import (analysis_bf16, checkpoint_hash, checkpoint_picker, eval_subset, forget_on_checkpoint_change,
                          linked_selectbox, load_eval_data, load_model, md, missing_data_reason, model_copy, need,
                          need_moe, open_checkpoint, subset_indices)


@st.cache_data(show_spinner="Routing the test images…", max_entries=24)
def routing_analysis(digest: str, n: int, top_k: int, capacity_ratio, bpr, disabled: tuple,
                     max_share: float, bf16: bool, _path, _ds, _card) -> dict:
    """One pass of a private copy of the model at these settings, and every statistic of it."""
    from workbench.flops import count_macs

    model = model_copy(_path)  # never change the shared cached model
    sc = _card.get("superclasses") or {}
    with routing_overrides(model, top_k=top_k, eval_capacity_ratio=capacity_ratio, batch_priority=bpr,
                           disabled_experts=list(disabled)):
        summary = collect_routing(model, _ds.images, _ds.labels, _ds.mean, _ds.std,
                                  classes=_card.get("classes"), superclass_names=sc.get("names"), bf16=bf16)
        macs = count_macs(model, _ds.image_shape, routing=summary.to_records())
    report = R.routing_report(summary, max_share=max_share, guided=model.cfg.superclasses is not None)
    return {"summary": summary, "report": report, "macs": macs, "accuracy": summary.accuracy}


def capacity_rule(path, top_k: int, capacity_ratio: float) -> dict:
    """The capacity rule of the checkpoint's model at these settings (formula and numbers)."""
    return load_model(path).capacity_rule(top_k=top_k, capacity_ratio=capacity_ratio)


@st.cache_data(show_spinner="Comparing BPR with vanilla priority…", max_entries=16)
def bpr_comparison(digest: str, n: int, top_k: int, capacity_ratio: float, disabled: tuple, bf16: bool, _path, _ds):
    model = model_copy(_path)
    with routing_overrides(model, top_k=top_k, disabled_experts=list(disabled)):
        return R.compare_batch_priority(model, _ds.images, _ds.labels, _ds.mean, _ds.std,
                                        eval_capacity_ratio=capacity_ratio, bf16=bf16)


@st.cache_data(show_spinner="Disabling each expert in turn…", max_entries=16)
def ablation(digest: str, n: int, top_k: int, capacity_ratio, bpr, disabled: tuple, bf16: bool, _path, _ds,
             _classes):
    model = model_copy(_path)
    with routing_overrides(model, top_k=top_k, eval_capacity_ratio=capacity_ratio, batch_priority=bpr,
                           disabled_experts=list(disabled)):
        return expert_ablation(model, _ds.images, _ds.labels, _ds.mean, _ds.std, classes=_classes, bf16=bf16)


@st.cache_data(show_spinner="Computing the 2-D embedding (UMAP)…", max_entries=16)
def embedding(digest: str, key: tuple, source: str, layer: int, _summary) -> pd.DataFrame:
    return embedding_frame(_summary, source, layer=layer, checkpoint_sha=digest, split="test")


st.title("Routing")
card, path = open_checkpoint(checkpoint_picker())
cfg = card["config"]
family = cfg.get("family")
need_moe(card)
forget_on_checkpoint_change("routing", "w_disabled", "w_topk", "w_capacity", "w_bpr", "w_max_share")
ds = eval_subset(card, quiet=bool(card.get("routing_tables")))
if ds is None and card.get("routing_tables"):
    routing_card.show(card, missing_data_reason(card))   # says once what is missing and what is shown instead
    st.stop()
need(ds is not None, "Routing statistics need the test images (see the warning above).")
E = int(cfg["num_experts"])

# ----------------------------------------------------------------------------- inference-time knobs
with st.sidebar.expander("Inference-time routing", expanded=True):
    disabled = st.multiselect("Disabled experts", list(range(E)), key="w_disabled",
                              help="The router renormalises over the remaining experts (expert ablation).")
    k_max = max(1, E - len(disabled))
    if k_max > 1:
        if not 1 <= st.session_state.get("w_topk", 0) <= k_max:
            st.session_state["w_topk"] = min(int(cfg["top_k"]), k_max)
        top_k = st.slider("k (experts per " + ("token" if family == "vmoe" else "image") + ")", 1, k_max,
                          key="w_topk")
    else:
        top_k = 1
        st.caption("k = 1 (only one expert left enabled)")
    capacity_ratio = bpr = None
    if family == "vmoe":
        capacity_ratio = st.slider("Capacity ratio C (eval)", 0.25, 4.0,
                                   min(max(float(cfg.get("eval_capacity_ratio", 2.0)), 0.25), 4.0),
                                   0.05, key="w_capacity")
        bpr = st.toggle("Batch Priority Routing", bool(cfg.get("batch_priority", True)), key="w_bpr")
    max_share = st.slider("Imbalance flag: max share of one expert", 0.05, 1.0, float(min(0.75, 2.0 / E)), 0.01,
                          key="w_max_share", help="Flag a block when one expert takes more than this share.")

need(len(disabled) < E, "Leave at least one expert enabled.")
res = routing_analysis(checkpoint_hash(path), len(ds), int(top_k), capacity_ratio, bpr, tuple(sorted(disabled)),
                       float(max_share), analysis_bf16(), path, ds, card)
summary, report = res["summary"], res["report"]
layers = summary.layer_indices
classes = summary.class_names()

acc = (card.get("metrics") or {}).get("test_accuracy")
m = st.columns(4)
m[0].metric(f"Accuracy on {len(ds)} test images", f"{res['accuracy']:.2%}",
            delta=f"{100 * (res['accuracy'] - acc):+.2f} pts vs the card (full test split)" if isinstance(acc, (int, float)) else None)
m[1].metric("MACs per image (at these settings)", f"{res['macs']['active'] / 1e6:.2f} M")
m[2].metric("Params active", f"{res['macs']['params_active'] / 1e6:.3f} M")
flag_row = report["balance"].iloc[-1]
if cfg.get("superclasses") is not None:   # a super-class router's load follows its super-classes by design
    limits = (f"expert shares {flag_row['min_share']:.1%}–{flag_row['max_share']:.1%}, each compared with its "
              f"super-class's share of these images: flagged when more than {max_share - 1 / E:.1%} above it "
              "(sidebar) or below a quarter of it")
else:
    limits = (f"expert shares {flag_row['min_share']:.1%}–{flag_row['max_share']:.1%}; a block is flagged when one "
              f"expert takes more than {flag_row['highest_allowed']:.1%} (sidebar) or less than "
              f"{flag_row['lowest_allowed']:.1%}, collapsed at 90 %")
m[3].metric("Load balance", str(flag_row["flag"]), help=limits)
if flag_row["flag"] != "ok":
    st.warning(f"Expert load is **{flag_row['flag']}**: {flag_row['reason']}")
else:
    st.caption(f"Load balance ok: {limits}.")

# ----------------------------------------------------------------------------- class x expert
st.header("Who goes where")
c = st.columns([1, 1, 1, 1])
layer = linked_selectbox("MoE block", layers, key="layer", container=c[0])
by_options = ["class"] + (["superclass"] if summary.superclasses is not None else [])
by = c[1].radio("Rows", by_options, horizontal=True)
norm = c[2].radio("Normalise", ["row", "column", "counts"], horizontal=True,
                  help="row: where a class goes, P(expert | class); column: what an expert sees, P(class | expert).")
tokens = c[3].radio("Tokens", ["all", "patches", "cls"], horizontal=True) if family == "vmoe" else "all"
table = R.class_expert_counts(summary, layer, by=by, normalize=None if norm == "counts" else norm, tokens=tokens)
left, right = st.columns([1.3, 1])
left.plotly_chart(F.heatmap_figure(table, title=f"{by} × expert, block {layer}",
                                   colorbar="count" if norm == "counts" else "share"), key="cxe")
with right:
    cls = linked_selectbox("Class", list(range(len(classes))), key="class", format_func=lambda i: classes[i])
    exp = linked_selectbox("Expert", list(range(E)), key="expert", format_func=lambda e: f"expert {e}")
    rows = R.class_expert_counts(summary, layer, normalize="row", tokens=tokens)
    cols = R.class_expert_counts(summary, layer, normalize="column", tokens=tokens)
    st.markdown(f"**{md(classes[cls])}** goes to: " + ", ".join(
        f"expert {e} ({v:.0%})" for e, v in rows.iloc[cls].sort_values(ascending=False).items() if v > 0.005))
    top = cols[exp].sort_values(ascending=False)
    st.markdown(f"**Expert {exp}** sees: " + (", ".join(f"{md(k)} ({v:.0%})" for k, v in top.items() if v > 0.005)
                                              or "nothing (unused or disabled)"))
st.caption("Routing table (class × expert, the numbers behind the heatmap):")
st.dataframe(table.round(4), key="routing_table")

# ----------------------------------------------------------------------------- balance
st.header("Expert load and balance")
left, right = st.columns([1.3, 1])
left.plotly_chart(F.expert_load_figure(report["load"]), key="load")
with right:
    bal = report["balance"][["layer", "min_share", "max_share", "lowest_allowed", "highest_allowed", "cv2", "gini",
                             "entropy_norm", "flag"]]
    st.dataframe(bal.round(3), hide_index=True)
    st.dataframe(report["entropy"][["layer", "mean_entropy", "marginal_entropy", "top1_entropy"]].round(3),
                 hide_index=True)
    st.caption("Entropies in bits. mean: how unsure the router is per item (low = confident); "
               "marginal: how evenly experts are used overall (high = balanced).")

# ----------------------------------------------------------------------------- capacity
if family == "vmoe":
    st.header("Capacity: pre- vs post-capacity")
    rule = capacity_rule(path, int(top_k), float(capacity_ratio))
    which = (f"google-research/vmoe's, rounded up to a multiple of {rule['multiple_of']}"
             if rule["rule"] == "reference" else "the paper's formula, not rounded")
    st.markdown(f"Capacity rule of this model ({which}); S = tokens per routing group:")
    st.latex(rule["formula"])
    st.caption(rule["text"] + " tokens per expert and group.")
    st.dataframe(report["drop_summary"].round(4), hide_index=True)
    drops = report["drops"]
    d = drops[drops.layer == layer].pivot_table(index="expert", columns="rank", values="drop_rate")
    st.plotly_chart(F.heatmap_figure(d, title=f"Drop rate per expert and choice rank, block {layer}",
                                     colorbar="drop rate"), key="drops")
    if st.toggle("Compare BPR with vanilla (runs the model twice)"):
        st.dataframe(bpr_comparison(checkpoint_hash(path), len(ds), int(top_k), float(capacity_ratio),
                                    tuple(sorted(disabled)), analysis_bf16(), path, ds).round(4), hide_index=True)
else:
    st.caption("Per-image routing has no capacity: every image runs its chosen experts, nothing is dropped.")

# ----------------------------------------------------------------------------- structure
if len(layers) > 1:
    st.header("Layer-to-layer agreement")
    if family == "mvmoe" and not cfg.get("per_layer_routers"):
        st.caption(f"One shared router picks each image's experts for all MoE blocks ({', '.join(map(str, layers))}), "
                   "so the blocks agree by construction (agreement 1). Train with per-layer routers "
                   "(`--set per_layer_routers=true`) to see whether separate routers agree.")
    else:
        st.plotly_chart(F.heatmap_figure(report["agreement"], title="P(top-1 of column block | top-1 of row block), "
                                                                    "best expert mapping", colorbar="agreement"),
                        key="agreement")
        st.caption("Experts of different blocks are different networks, so each row block's experts are first "
                   "mapped to the column block's expert they co-occur with most; 1 = the column block's choice "
                   "is a function of the row block's." + (" Items are tokens at the same position."
                                                         if family == "vmoe" else ""))
if "router_accuracy" in report:
    st.header("Router vs super-classes")
    st.dataframe(report["router_accuracy"].round(4), hide_index=True)
    st.caption("accuracy: top-1 expert = the image's super-class (expert g is trained on super-class g); "
               "topk_hit: super-class among the k choices.")
st.header("Expert specialisation")
spec = report["specialisation"]
st.dataframe(spec[spec.layer == layer].round(3), hide_index=True)

st.header("Expert ablation")
enabled_left = E - len(disabled)
if enabled_left - 1 < top_k:
    st.caption(f"Disabling one more expert would leave fewer than k = {top_k} experts.")
elif st.toggle("Disable each expert in turn (one pass per expert)",
               help="Per-class accuracy change when an expert is switched off; the router renormalises."):
    abl = ablation(checkpoint_hash(path), len(ds), int(top_k), capacity_ratio, bpr, tuple(sorted(disabled)),
                   analysis_bf16(), path, ds, classes)
    st.plotly_chart(F.impact_figure(impact_matrix(abl)), key="ablation")
    overall = abl[abl["class"] == "all"][["expert", "base_accuracy", "ablated_accuracy", "delta", "changed"]]
    st.dataframe(overall.round(4), hide_index=True)

# ----------------------------------------------------------------------------- spatial maps
if family == "vmoe":
    st.header("Patch → expert maps")
    n_show = st.slider("Images", 1, 8, 4)
    test_index = subset_indices(len(ds), len(load_eval_data(card, quiet=True)))   # subset position -> test number
    start = int(st.number_input("From the analysed images, starting at", 0, max(0, len(ds) - n_show), 0,
                                help="The analysed images are a fixed sample of the test split; each map is "
                                     "titled with its test-split number, as on the other pages."))
    idx = list(range(start, start + n_show))
    maps, cls_tok = R.spatial_expert_maps(summary, layer, idx)
    cols = st.columns(min(n_show, 4))
    for i, (j, grid) in enumerate(zip(idx, maps)):
        fig = F.spatial_map_figure(ds.images[j], grid, E, class_token_expert=int(cls_tok[i]),
                                   title=f"#{int(test_index[j])} {classes[int(ds.labels[j])]}")
        fig.update_layout(width=None, height=300, showlegend=False, margin=dict(l=0, r=0, t=40, b=0))
        cols[i % len(cols)].plotly_chart(fig, key=f"map{j}")
    st.caption("A red cross marks a patch whose first choice was dropped by capacity in this block.")

# ----------------------------------------------------------------------------- embeddings
st.header("Embedding of the router's input")
c = st.columns(3)
source = c[0].radio("Points", ["router_input", "features"], horizontal=True,
                    format_func=lambda s: {"router_input": "router input", "features": "final features"}[s])
colour_opts = ["expert", "class"] + (["superclass"] if summary.superclasses is not None else []) + ["correct"]
colour = c[1].radio("Colour by", colour_opts, horizontal=True)
if c[2].toggle("Compute UMAP", help="UMAP takes a few seconds the first time (more for thousands of points); "
                                   "results are cached on disk per checkpoint and setting."):
    emb = embedding(checkpoint_hash(path), (len(ds), int(top_k), capacity_ratio, bpr, tuple(sorted(disabled))),
                    source, int(layer), summary)
    st.plotly_chart(F.embedding_figure(emb, colour), key="umap")
