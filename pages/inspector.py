"""Image inspector: one image through the model — prediction, routing and what the class and the router look at."""
import hashlib

import numpy as np
import pandas as pd
import plotly.express as px
import streamlit as st
import torch

from analysis.attribution import METHODS, class_attribution, router_attribution
from analysis.collect import collect_routing
from analysis.confusion import predict
from analysis.routing import image_expert_counts, spatial_expert_maps
from pages.figures import overlay_figure, spatial_map_figure
from pages.common import (MAX_UPLOAD_BYTES, checkpoint_hash, checkpoint_picker, get_model, index_selection,
                          linked_selectbox, load_eval_data, md, model_copy, need, open_checkpoint,
                          read_uploaded_image, set_selection, to_pil)

METHOD_NAMES = {"ig": "Integrated Gradients", "saliency": "Saliency (|gradient|)", "occlusion": "Occlusion"}


@st.cache_data(show_spinner=False, max_entries=256)
def inspect(digest: str, image_key: str, _path, image: np.ndarray, mean: tuple, std: tuple, label: int) -> dict:
    """Prediction and routing of one image (on a private copy: routing collection hooks the model)."""
    _model = model_copy(_path)
    x = torch.as_tensor(image).unsqueeze(0)
    _, probs = predict(_model, x, mean, std)
    out = {"probs": probs[0].numpy()}
    if _model.cfg.family != "vit":
        summary = collect_routing(_model, x, [label], mean, std)
        out["layers"] = {}
        for lr in summary.layers:
            maps, cls_tok = spatial_expert_maps(summary, lr.layer, [0])
            out["layers"][lr.layer] = {
                "probs": lr.probs[0], "experts": lr.experts[0], "gates": lr.gates[0], "kept": lr.kept[0],
                "per_expert": image_expert_counts(lr)[0], "map": maps[0], "class_token": int(cls_tok[0]),
                "kind": lr.kind}
    return out


@st.cache_data(show_spinner="Computing attributions (captum)…", max_entries=128)
def attributions(digest: str, image_key: str, method: str, target_class: int, expert, layer, n_steps: int,
                 _path, image: np.ndarray, mean: tuple, std: tuple) -> dict:
    model = model_copy(_path)  # attribution hooks the router: keep them off the shared model
    out = {"class": class_attribution(model, image, mean, std, target_class, method=method, n_steps=n_steps)}
    if expert is not None:
        out["router"] = router_attribution(model, image, mean, std, expert, layer=layer, method=method,
                                           n_steps=n_steps)
    return out


st.title("Image inspector")
card, path = open_checkpoint(checkpoint_picker())
cfg = card["config"]
family = cfg.get("family")
classes = [str(c) for c in card.get("classes") or []]
get_model(path)  # a clear message now if the weights cannot be loaded
digest = checkpoint_hash(path)
shape = (cfg["in_chans"], cfg["img_size"], cfg["img_size"])

ds = load_eval_data(card)
sources = (["Test image"] if ds is not None else []) + ["Upload an image"]
top_row = st.columns([1, 1, 2])
source = top_row[0].radio("Image", sources, horizontal=True, key="w_image_source")
if source == "Test image":
    index = int(top_row[1].number_input(f"Test image index (0–{len(ds) - 1})", 0, len(ds) - 1,
                                        index_selection("image", len(ds)), step=1))
    set_selection("image", index)
    image, label = np.asarray(ds.images[index]), int(ds.labels[index])
    image_key = f"test-{card.get('dataset')}-{index}"
    mean, std = tuple(ds.mean), tuple(ds.std)
else:
    up = st.file_uploader(f"PNG or JPEG (resized to {shape[2]}×{shape[1]} pixels, "
                          f"{'grey' if shape[0] == 1 else 'RGB'}; at most {MAX_UPLOAD_BYTES // 1024} KB)",
                          type=["png", "jpg", "jpeg"])
    need(up is not None, "Upload a PNG or JPEG image (for example one of the dataset's own files) to inspect it.")
    try:
        image, notes = read_uploaded_image(up.getvalue(), shape)
    except ValueError as e:
        st.error(f"This file cannot be used: {md(e)}")
        st.stop()
    for note in notes:
        st.caption(note)
    label = -1
    image_key = "upload-" + hashlib.sha256(up.getvalue()).hexdigest()
    need(ds is not None, "Uploads are normalised with the dataset's statistics, which need its test data.")
    mean, std = tuple(ds.mean), tuple(ds.std)
need(tuple(image.shape) == shape, f"The image has shape {tuple(image.shape)}, the model expects {shape}.")

res = inspect(digest, image_key, path, image, mean, std, max(label, 0))
probs = res["probs"]
pred = int(np.argmax(probs))
c = st.columns([1, 2])
c[0].image(to_pil(image).resize((shape[2] * 6, shape[1] * 6), resample=0),
           caption=f"true class: {classes[label]}" if label >= 0 else "uploaded image")
with c[1]:
    m = st.columns(3)
    m[0].metric("Prediction", classes[pred])
    m[1].metric("Confidence", f"{probs[pred]:.1%}")
    m[2].metric("Correct" if label >= 0 else "True class", ("yes" if pred == label else "no") if label >= 0 else "unknown")
    top = np.argsort(-probs)[:min(5, len(probs))]
    st.plotly_chart(px.bar(x=[probs[i] for i in top][::-1], y=[classes[i] for i in top][::-1], orientation="h",
                           labels={"x": "probability", "y": ""}, height=220).update_layout(
        margin=dict(l=0, r=0, t=0, b=0)), key="class_probs")

layer = None
if family != "vit":
    st.subheader("Routing")
    layers = list(res["layers"])
    layer = linked_selectbox("MoE block", layers, key="layer", container=st.columns([1, 3])[0])
    r = res["layers"][layer]
    E = len(r["per_expert"])
    if r["kind"] == "image":
        chosen = pd.DataFrame({"rank": np.arange(1, len(r["experts"]) + 1), "expert": r["experts"],
                               "gate": np.round(r["gates"], 4)})
        sc = card.get("superclasses") or {}
        if sc.get("assignment") and label >= 0:
            st.caption(f"Super-class of the true class: {sc['assignment'][label]} "
                       f"({(sc.get('names') or [''] * E)[sc['assignment'][label]]}). Expert g is trained on super-class g.")
        left, right = st.columns(2)
        left.plotly_chart(px.bar(x=[str(e) for e in range(E)], y=r["probs"], labels={"x": "expert", "y": "router probability"},
                                 height=260).update_layout(margin=dict(l=0, r=0, t=10, b=0)), key="router_probs")
        right.markdown("**Chosen experts** (the whole image uses them in every MoE block)")
        right.dataframe(chosen, hide_index=True)
    else:
        left, right = st.columns(2)
        fig = spatial_map_figure(image, r["map"], E, class_token_expert=r["class_token"], title=f"Block {layer}")
        fig.update_layout(width=None, height=320)
        left.plotly_chart(fig, key="token_map")
        right.markdown("**Tokens per expert** (after capacity) and mean router probability over tokens")
        right.dataframe(pd.DataFrame({"expert": range(E), "tokens": r["per_expert"].astype(int),
                                      "mean probability": np.round(r["probs"].mean(0), 4)}), hide_index=True)

st.subheader("Attributions")
c = st.columns(4)
method = c[0].selectbox("Method", list(METHODS), format_func=lambda m: METHOD_NAMES.get(m, m))
target = c[1].selectbox("Class to explain", list(range(len(classes))), index=pred, format_func=lambda i: classes[i])
expert = None
if family != "vit":
    E = cfg["num_experts"]
    enabled = [e for e in range(E)]
    default_expert = int(res["layers"][layer]["experts"].reshape(-1)[0]) if r["kind"] == "image" else \
        int(np.argmax(res["layers"][layer]["per_expert"]))
    expert = c[2].selectbox("Router decision for expert", enabled, index=enabled.index(default_expert),
                            format_func=lambda e: f"expert {e}")
n_steps = c[3].slider("IG steps", 8, 64, 16, 8, disabled=method != "ig")
with st.spinner("Computing attributions…"):
    attr = attributions(digest, image_key, method, int(target), expert, layer, int(n_steps), path, image, mean, std)
cols = st.columns(2)
f = overlay_figure(image, attr["class"], title=f"Class logit: {classes[target]}")
f.update_layout(width=None, height=380)
cols[0].plotly_chart(f, key="attr_class")
if "router" in attr:
    f = overlay_figure(image, attr["router"], title=f"Router logit: expert {expert} (block {layer})")
    f.update_layout(width=None, height=380)
    cols[1].plotly_chart(f, key="attr_router")
    st.caption("Red pixels push the logit up, blue pixels push it down. Left: what makes the model say the class; "
               "right: what sends this image" + (" (its patch tokens, on average)" if family == "vmoe" else "") +
               " to the expert.")
else:
    cols[1].info("A dense model has no router, so there is no routing decision to explain.")
