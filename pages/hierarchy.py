"""Super-classes vs a human hierarchy: does the confusion graph recover semantic categories (e.g. WordNet)?"""
import numpy as np
import plotly.express as px
import streamlit as st

from analysis.hierarchy import compare_groupings, group_members
from analysis.superclasses import METHODS, cluster_superclasses, group_names
from pages.common import checkpoint_picker, confusion_picker, load_eval_data, need, open_checkpoint
from workbench.wordnet import path_text, read_table, wnids_of, wordnet_groups


@st.cache_resource(show_spinner=False)
def wordnet_table() -> dict:
    return read_table()


@st.cache_data(show_spinner=False)
def wordnet_reference(classes: tuple, k: int):
    """(group per class, group names, path per class) from the shipped WordNet table, or None."""
    table = wordnet_table()
    wnids = wnids_of(classes, table)
    if wnids is None:
        return None
    paths = [table[w]["paths"] for w in wnids]
    groups, names = wordnet_groups(paths, k)
    return groups, names, [path_text(p) for p in paths]


@st.cache_data(show_spinner="Clustering…", max_entries=64)
def clustered(cm: tuple, k: int, method: str) -> list:
    return cluster_superclasses(np.array(cm), k, method=method).tolist()


st.title("Super-classes vs a human hierarchy")
st.caption("The paper's super-classes come from what a dense model confuses, not from labels. Where the dataset "
           "has a human hierarchy — WordNet for Tiny ImageNet's 200 ImageNet classes — we can ask whether the "
           "confusion graph recovers it.")
card, path = open_checkpoint(checkpoint_picker())
classes = [str(c) for c in card.get("classes") or []]
need(len(classes) >= 2, "This needs a checkpoint with at least two classes.")
sc = card.get("superclasses") or {}

# ----------------------------------------------------------------------------- the discovered groups
sources = (["the checkpoint's super-class map"] if sc.get("assignment") else []) + ["cluster the confusion graph now"]
c = st.columns(3)
source = c[0].radio("Discovered super-classes", sources)
if source == sources[0] and sc.get("assignment"):
    discovered = [int(g) for g in sc["assignment"]]
    names = list(sc.get("names") or group_names(discovered, classes))
    st.caption(f"Method: {sc.get('method', 'unknown')}.")
else:
    cm, _ = confusion_picker(card, path)
    k = c[1].slider("E (groups)", 2, len(classes), min(max(int(card["config"].get("num_experts") or 10), 2),
                                                          len(classes)))
    method = c[2].selectbox("Method", list(METHODS), format_func=lambda m: m.replace("_", " "))
    discovered = clustered(tuple(map(tuple, cm.tolist())), k, method)
    names = group_names(discovered, classes)
E = max(discovered) + 1

# ----------------------------------------------------------------------------- the reference
if wnids_of(classes, wordnet_table()) is not None:
    k_ref = st.slider("Reference groups (WordNet cut into k groups)", 2, min(len(classes), 40), min(E, len(classes)),
                      help="WordNet is a tree of hypernyms; it is cut into exactly k groups by clustering classes "
                           "on the depth of their deepest common hypernym (workbench/wordnet.py).")
    reference, ref_names, detail = wordnet_reference(tuple(classes), k_ref)
    ref_source = f"WordNet 3.0 cut into {k_ref} groups"
else:
    ds = load_eval_data(card, quiet=True)
    need(ds is not None and ds.reference_groups is not None,
         "This dataset has no human hierarchy to compare with (Tiny ImageNet has WordNet, CIFAR-100 its coarse "
         "classes, synthetic its designed groups, Fashion-MNIST an unofficial 4-group map), or its data is not "
         "available here.")
    reference, ref_names, detail = list(ds.reference_groups), list(ds.reference_group_names), None
    ref_source = ds.reference_source

result = compare_groupings(discovered, reference, names, ref_names)
m = st.columns(3)
m[0].metric("ARI", f"{result['ari']:.3f}", help="adjusted Rand index: 0 = chance agreement, 1 = the same grouping")
m[1].metric("NMI", f"{result['nmi']:.3f}", help="normalised mutual information: 0 = independent, 1 = the same")
m[2].metric("Purity", f"{result['purity']:.1%}", help="share of classes whose discovered group's most common "
            "reference group is their own")
st.caption(f"Reference: {ref_source}.")
fig = px.imshow(result["contingency"], text_auto=True, aspect="auto", color_continuous_scale="Blues", zmin=0,
                labels={"color": "classes"}, title="Classes per discovered group (rows) and reference group (columns)")
st.plotly_chart(fig.update_layout(height=max(320, 28 * E + 160)), key="contingency")
st.subheader("Classes per discovered group")
st.dataframe(group_members(discovered, classes, reference, ref_names, detail), hide_index=True)
