"""Super-classes: cluster the confusion graph into E groups live, judge the grouping, export it for training."""
import json

import numpy as np
import pandas as pd
import streamlit as st

from analysis.superclass_choice import AUTO, PAPER_METHOD, candidates_table, choose_superclasses, router_input_features
from analysis.superclasses import (METHODS, cluster_superclasses, clustering_quality, compare_methods,
                                   superclass_map)
from pages.common import (SUPERCLASS_MAP_KEY, checkpoint_hash, checkpoint_picker, confusion_picker, eval_subset,
                          get_model, load_eval_data, md, need, open_checkpoint, to_pil)

METHOD_HELP = {
    AUTO: "router-aware: the candidate the router can learn best (table below)",
    "spectral": "spectral clustering on the confusion affinity (precomputed kernel); the paper's procedure",
    "greedy-modularity": "networkx greedy modularity, merged down to exactly E communities",
    "kernighan-lin": "recursive Kernighan–Lin bisection (balanced halves)",
    "agglomerative": "average-linkage agglomerative clustering on 1 − affinity",
    "agglomerative-complete": "complete linkage: compact groups",
    "greedy-modularity-coarse": "greedy modularity at resolution 0.5: fewer, larger communities",
    "agglomerative-single": "single linkage: chains, the least balanced",
}


@st.cache_data(show_spinner="Clustering…", max_entries=128)
def run_clustering(cm: tuple, num_groups: int, method: str, seed: int) -> list:
    return cluster_superclasses(np.array(cm), num_groups, method=method, seed=seed).tolist()


@st.cache_data(show_spinner="Comparing methods…", max_entries=32)
def run_comparison(cm: tuple, num_groups: int, reference, seed: int) -> pd.DataFrame:
    return compare_methods(np.array(cm), num_groups, reference=list(reference) if reference else None, seed=seed)


@st.cache_data(show_spinner="Scoring candidate groupings…", max_entries=32)
def run_choice(cm: tuple, num_groups: int, names: tuple, reference, seed: int, probe_key, _features, _labels):
    """`probe_key` names the features (checkpoint hash, image count) so the cache can tell them apart."""
    return choose_superclasses(np.array(cm), num_groups, features=_features, labels=_labels,
                               reference=list(reference) if reference else None, class_names=list(names), seed=seed)


@st.cache_data(show_spinner="Reading the features at the router's input…", max_entries=8)
def probe_features(digest: str, n: int, _model, _ds, moe_preset: str):
    return router_input_features(_model, _ds, moe_preset), _ds.labels.numpy()


st.title("Super-classes")
st.caption("Mobile V-MoE trains its per-image router to predict *super-classes*: groups of classes that a dense "
           "baseline confuses. Cluster the confusion graph into E groups (one per expert), check the grouping, "
           "and download the map for training.")
card, path = open_checkpoint(checkpoint_picker())
classes = [str(c) for c in card.get("classes") or []]
need(len(classes) >= 2, "Super-classes need a checkpoint with at least two classes.")
cm, source = confusion_picker(card, path)
if card["config"].get("family") != "vit" and source.endswith("(from the card)"):
    st.caption("Note: the paper clusters the confusion of a *dense* baseline; this is the selected checkpoint's.")

ds = load_eval_data(card, quiet=True)
reference = list(ds.reference_groups) if ds is not None and getattr(ds, "reference_groups", None) else None

c = st.columns([1.2, 1, 1])
method = c[0].selectbox("Method", [AUTO, *METHODS], format_func=lambda m: "auto (router-aware)" if m == AUTO else m,
                        help="; ".join(f"{k}: {v}" for k, v in METHOD_HELP.items() if k in METHODS or k == AUTO))
if not 2 <= st.session_state.get("w_num_groups", 2) <= len(classes):
    del st.session_state["w_num_groups"]  # left over from a checkpoint with more classes
default_e = int(card["config"].get("num_experts") or 0) or min(4, len(classes))
if len(classes) > 2:
    num_groups = c[1].slider("Number of super-classes E", 2, len(classes), min(max(default_e, 2), len(classes)),
                             key="w_num_groups", help="E = number of experts of the Mobile V-MoE to train.")
else:
    num_groups = 2
    c[1].metric("Number of super-classes E", 2)
seed = int(c[2].number_input("Seed", 0, 10_000, 0, step=1))

key_cm = tuple(map(tuple, cm.tolist()))
cfg = card["config"]
probe_ok = cfg.get("family") in ("vit", "mvmoe") and ds is not None and (cfg.get("depth") or 0) >= 2
use_probe = st.toggle("Score groupings with the router probe", value=False, disabled=not probe_ok,
                      help="Fit a linear classifier on this model's features at the MoE router's input "
                           "(mean patch token before the last 2 blocks) to predict each grouping, on the test "
                           "images (the pipeline uses the held-out split). Without it, groupings are scored by "
                           "how often the model's own prediction lands in the true class's group.")
features = labels = None
probe_key = None
if use_probe:
    sub = eval_subset(card)
    moe_preset = f"mvmoe-{cfg['depth']}x{cfg['width']}-e{num_groups}k1"
    features, labels = probe_features(checkpoint_hash(path), len(sub), get_model(path), sub, moe_preset)
    probe_key = (checkpoint_hash(path), len(sub))
choice = run_choice(key_cm, num_groups, tuple(classes), tuple(reference) if reference else None, seed, probe_key,
                    features, labels)
assignment = choice.assignment if method == AUTO else run_clustering(key_cm, num_groups, method, seed)
method = choice.method if method == AUTO else method
mapping = superclass_map(assignment, classes, str(card.get("dataset")), method)
st.session_state[SUPERCLASS_MAP_KEY] = mapping  # the Train page and the other views offer this map

quality = clustering_quality(cm, assignment, reference)
q = st.columns(5 if reference else 3)
q[0].metric("Confusion kept inside groups", f"{quality['within_share']:.1%}",
            help="Share of all off-diagonal confusion (image counts) between classes of the same group: "
                 "the mistakes the router can leave to one expert.")
q[1].metric("Balance", f"{quality['balance']:.2f}", help="Entropy of the group sizes / log E (1 = equal sizes).")
q[2].metric("Group sizes", " · ".join(map(str, quality["sizes"])))
if reference:
    q[3].metric("ARI vs reference", f"{quality['ari']:.3f}",
                help=f"Adjusted Rand index against the dataset's reference hierarchy "
                     f"({getattr(ds, 'reference_source', '') or 'documented groups'}).")
    q[4].metric("NMI vs reference", f"{quality['nmi']:.3f}")

st.subheader(f"{num_groups} groups")
rows = []
for g, label in enumerate(mapping["groups"]):
    members = [classes[i] for i, a in enumerate(assignment) if a == g]
    rows.append({"group": g, "label": label, "size": len(members), "classes": ", ".join(members)})
st.dataframe(pd.DataFrame(rows), hide_index=True, key="groups_table")

if ds is not None:
    with st.expander("Example test images per group", expanded=True):
        labels = np.asarray(ds.labels)
        for g in range(num_groups):
            members = [i for i, a in enumerate(assignment) if a == g][:6]
            picks = [int(np.flatnonzero(labels == ci)[0]) for ci in members if (labels == ci).any()]
            cols = st.columns([1] + [1] * 6)
            cols[0].markdown(f"**{g}**: {md(mapping['groups'][g])}")
            for col, idx in zip(cols[1:], picks):
                col.image(to_pil(ds.images[idx]), caption=classes[int(labels[idx])], width=64)
else:
    st.caption("Example images appear when the test data of this dataset is available.")

st.subheader("Use it")
st.download_button("Download super-class map (JSON)", json.dumps(mapping, indent=2),
                   file_name=f"superclasses-{card.get('dataset')}-{method}-e{num_groups}.json".replace(":", "_"),
                   mime="application/json")
st.caption(f"The **Train** page offers this map (E = {num_groups}) for a `mvmoe-…-e{num_groups}k1` run; "
           "from a shell: `python -m workbench.train --superclasses FILE …`.")

st.subheader("Which grouping can the router learn?")
st.caption(f"Every clustering method at E = {num_groups}, identical groupings merged. ✓ = the router-aware choice "
           f"({choice.criterion}); the paper's procedure is `{PAPER_METHOD}`. {md(choice.reason)}.")
st.dataframe(candidates_table(choice), hide_index=True, key="candidates_table")

if st.toggle("Compare all methods at this E"):
    table = run_comparison(key_cm, num_groups, tuple(reference) if reference else None, seed)
    show = [c for c in ("method", "within_share", "balance", "min_size", "max_size", "modularity", "ari", "nmi",
                        "seconds") if c in table]
    st.dataframe(table[show], hide_index=True)
