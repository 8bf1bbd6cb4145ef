"""Expert gallery: the test images an expert receives, the ones it gets wrong, the classes it owns."""

import numpy as np
import streamlit as st

from analysis.collect import collect_routing
from analysis.gallery import expert_classes, expert_gallery, highlight_patches, patch_mask
from pages.common import (analysis_bf16, checkpoint_hash, checkpoint_picker, linked_selectbox, load_eval_data,
                          max_images, model_copy, need, need_moe, open_checkpoint, set_selection, to_pil)

COLUMNS = 6


@st.cache_data(show_spinner="Routing the test images…", max_entries=8)
def routing_of_first(digest: str, n: int, bf16: bool, _path, _ds, _card):
    """Routing of the first `n` test images (so a row's index is the image's index in the test split)."""
    model = model_copy(_path)
    sub = _ds.subset(np.arange(n))
    sc = _card.get("superclasses") or {}
    return collect_routing(model, sub.images, sub.labels, sub.mean, sub.std, classes=_card.get("classes"),
                           superclass_names=sc.get("names"), bf16=bf16)


def show_grid(frame, ds, classes, summary, expert, layer, per_token: bool, key: str) -> None:
    """Images in rows of COLUMNS, captioned, each with a link that opens it in the Image inspector."""
    if frame.empty:
        st.caption("None.")
        return
    for start in range(0, len(frame), COLUMNS):
        cols = st.columns(COLUMNS)
        for col, row in zip(cols, frame.iloc[start:start + COLUMNS].itertuples()):
            image = np.asarray(ds.images[row.index])
            if per_token:
                picture = highlight_patches(image, patch_mask(summary, row.index, expert, layer))
                score = f"{row.score:.0%} of patches"
            else:
                picture = np.asarray(to_pil(image).convert("RGB"))
                score = f"margin {row.score:+.1f}"
            mark = "✓" if row.label == row.prediction else f"✗ said {classes[row.prediction]}"
            col.image(picture, caption=f"#{row.index} {classes[row.label]} {mark} · {score}", width=96)
            if col.button("Inspect", key=f"{key}_{row.index}", help="Open this image in the Image inspector"):
                set_selection("image", int(row.index))
                st.switch_page("../pages/inspector.py")


st.title("Expert gallery")
card, path = open_checkpoint(checkpoint_picker())
cfg = card["config"]
family = cfg.get("family")
need_moe(card, "experts")
ds = load_eval_data(card)
need(ds is not None, "The gallery needs the test images (see the warning above).")
n = min(max_images(), len(ds))
summary = routing_of_first(checkpoint_hash(path), n, analysis_bf16(), path, ds, card)
classes = summary.class_names()
per_token = family == "vmoe"

top = st.columns([1, 1, 2])
layer = linked_selectbox("MoE block", summary.layer_indices, key="layer", container=top[0])
expert = linked_selectbox("Expert", list(range(summary.num_experts)), key="expert", container=top[1],
                          format_func=lambda e: f"expert {e}")
g = expert_gallery(summary, expert, layer, n=2 * COLUMNS)
owned = expert_classes(summary, expert, layer)
top[2].markdown(
    f"Of the first **{n}** test images, expert {expert} of block {layer} receives **{g['received']}** "
    + ("(at least one patch)" if per_token else "") + f" and gets **{g['errors']}** of them wrong.")
if per_token:
    st.caption("Per-token routing: the highlighted patches are the ones this expert processed; images are ranked "
               "by the share of their patches it took.")
else:
    st.caption("Per-image routing: the whole image goes to the expert in every MoE block; images are ranked by "
               "how sure the router was, its margin: the log-odds of this expert over the next best one (+5 means "
               "e⁵ ≈ 150 times more likely).")

st.subheader("Highest-scored images")
show_grid(g["top"], ds, classes, summary, expert, layer, per_token, "top")
st.subheader("Received and misclassified")
show_grid(g["wrong"], ds, classes, summary, expert, layer, per_token, "wrong")
st.subheader("Classes")
st.caption("A class is owned by the expert that receives the largest share of it"
           + (": per token, the share of the class's patches this expert processed (every expert sees a patch of "
              "nearly every image)." if per_token else ": the share of the class's images routed here."))
st.dataframe(owned, hide_index=True, column_config={
    "share of class": st.column_config.ProgressColumn(format="percent", min_value=0.0, max_value=1.0),
    "share of expert": st.column_config.ProgressColumn(format="percent", min_value=0.0, max_value=1.0)})
