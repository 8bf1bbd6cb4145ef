"""Learn MoE: a teaching page on sparse Mixture-of-Experts for vision, with live examples."""
import pandas as pd
import streamlit as st
import torch

from analysis.collect import collect_routing, routing_overrides
from analysis.routing import drop_summary, keep_difference, spatial_expert_maps
from pages.common import (available_checkpoints, checkpoint_hash, checkpoint_picker, dataset_or_none, load_card,
                          load_eval_data, load_model, md, need)
from pages.figures import spatial_map_figure
from workbench.checkpoint import CheckpointError

st.title("Learn MoE")
st.markdown("""
A **Mixture-of-Experts (MoE)** layer replaces one MLP of a transformer block by **E expert MLPs** and a small
**router** that decides which experts run. Only the chosen experts compute, so the model has many more
parameters than it spends compute on — *sparse* activation. Vision transformers cut an image into patches
(here 28×28 pixels → 7×7 = 49 patches of 4×4, plus a class token) and process them as a sequence of tokens.
There are two ways to route them.
""")
a, b = st.columns(2)
a.markdown("""
#### Per-token routing (V-MoE)
*Riquelme et al., 2021.* In every MoE block, **each token** asks the router for its top-k experts.
Different patches of the same image can go to different experts, and every token
pays for a router call. Experts see a mix of patches from many images.
""")
b.markdown("""
#### Per-image routing (Mobile V-MoE)
*Daxberger et al., 2023.* **One router looks at the whole image** (a summary of its tokens after the
dense blocks) and picks the experts that *all* tokens of the image use in every MoE block.
Cheaper routing and a simple job for each expert — ideal for small models.
""")

# ----------------------------------------------------------------------------- capacity and BPR
st.header("Capacity, token dropping and Batch Priority Routing")
st.markdown("""
With per-token routing an expert could be chosen by far more tokens than others. To keep compute fixed,
every expert gets a **buffer of fixed size** — its *capacity*:
""")
st.latex(r"\text{capacity} = \left\lceil \frac{k \cdot C \cdot S}{E} \right\rceil")
st.markdown("""
where **C** is the *capacity ratio* and **S** the number of tokens in a routing group. C = 1 means room for
exactly a fair share. The reference implementation (google-research/vmoe) then rounds the capacity **up to a
multiple of 4**; new models here do the same, so they route exactly like it (older checkpoints keep the paper's
formula without rounding — each model's card says which rule it uses). Tokens that arrive at a full
expert are **dropped** for that expert: they skip the layer through the residual connection.

*Who arrives first?* All first choices are placed before any second choice. Within a rank,
**vanilla** routing takes tokens in position order (top-left patch first), so the bottom of the image is dropped
first. **Batch Priority Routing (BPR)** sorts tokens by the router's confidence (top-1 gate) instead, so the
tokens the router is sure about — usually the informative ones — are kept. Move the slider and compare.
""")


def _per_token_checkpoint(selected):
    """The selected checkpoint if per-token, else the first per-token one available, else None."""
    candidates = ([selected] if selected is not None else []) + [p for p, _ in available_checkpoints()]
    for p in candidates:
        try:
            if load_card(p)["config"].get("family") == "vmoe":
                return p
        except Exception:  # an unreadable card is skipped here; the picker reports it
            continue
    return None


@st.cache_resource(show_spinner=False, max_entries=4)
def fresh_model(num_classes: int, img_size: int, in_chans: int, experts: int):
    from workbench.models import create_model

    torch.manual_seed(0)
    return create_model(f"vmoe-4x64-e{experts}k1", num_classes=num_classes, img_size=img_size, in_chans=in_chans,
                        moe_layers=[1, 3]).eval()


@st.cache_data(show_spinner=False, max_entries=256)
def route_one(digest: str, index: int, capacity_ratio: float, bpr: bool, top_k: int, layer: int, multiple_of: int,
              _model, _ds) -> dict:
    sub = _ds.subset([index])
    with routing_overrides(_model, eval_capacity_ratio=capacity_ratio, batch_priority=bpr, top_k=top_k,
                           capacity_multiple_of=multiple_of):
        summary = collect_routing(_model, sub.images, sub.labels, sub.mean, sub.std)
    maps, cls_token = spatial_expert_maps(summary, layer, [0])
    drops = drop_summary(summary).set_index("layer").loc[layer]
    return {"grid": maps[0], "class_token": int(cls_token[0]), "capacity": int(drops["capacity"]),
            "dropped_tokens": int(drops["items_dropped"]), "dropped_assignments": int(drops["dropped"]),
            "tokens": int(summary.layer(layer).kept.shape[1])}


selected = checkpoint_picker()
token_path = _per_token_checkpoint(selected)
card = None
if selected is not None:
    try:
        card = load_card(selected)
    except (CheckpointError, OSError) as e:   # as on every page: say so, and teach with another model
        st.warning(f"The selected checkpoint cannot be opened: {md(e)}. This page uses another model.")
if token_path is not None:
    token_card = load_card(token_path)
    model, digest = load_model(token_path), checkpoint_hash(token_path)
    st.caption(f"Using the per-token checkpoint `{token_path.name}` ({token_card.get('preset')}, "
               f"trained on {token_card.get('dataset')}).")
    ds = load_eval_data(token_card)
else:
    source_card = card or {"dataset": "synthetic"}
    ds = load_eval_data(source_card, quiet=True) or dataset_or_none("synthetic")  # synthetic is always there
    need(ds is not None, "This example needs test images, and none could be loaded.")
    c, h, _ = ds.image_shape
    experts = 4
    model, digest = fresh_model(ds.num_classes, h, c, experts), f"fresh-{ds.name}-{experts}"
    st.caption(f"No per-token (V-MoE) checkpoint is available, so this example uses a **small freshly initialised** "
               f"`vmoe-4x64-e{experts}k1` model on {ds.name} images: its router is random, so which expert a patch "
               "chooses means nothing yet — but capacity and dropping work exactly as in a trained model.")
need(ds is not None, "This example needs test images (see the warning above).")

moe_layers = model.cfg.moe_block_indices()
c = st.columns(4)
index = int(c[0].number_input("Test image", 0, len(ds) - 1, 0, step=1))
capacity_ratio = c[1].slider("Capacity ratio C", 0.1, 2.0, 0.5, 0.05)
top_k = c[2].radio("k (experts per token)", [1, 2] if model.cfg.num_experts >= 2 else [1], horizontal=True)
layer = c[3].selectbox("MoE block", moe_layers)
rounded = st.toggle("Round the capacity up to a multiple of 4, as the reference implementation does", False,
                    key="learn_rounded",
                    help="Off: the paper's formula, so every step of the slider can change the capacity. On: "
                         "google-research/vmoe's rounding (capacity stays at 4 over a wide range of small C).")
multiple_of = 4 if rounded else 1

results = {}
for name, bpr in (("Vanilla (position order)", False), ("BPR (confidence order)", True)):
    results[name] = route_one(digest, index, float(capacity_ratio), bpr, int(top_k), int(layer), multiple_of,
                              model, ds)
first = next(iter(results.values()))
with routing_overrides(model, capacity_multiple_of=multiple_of):
    rule = model.capacity_rule(top_k=int(top_k), capacity_ratio=float(capacity_ratio))
st.markdown(f"Image **{index}** ({md(ds.classes[int(ds.labels[index])])}): {first['tokens']} tokens, "
            f"{model.cfg.num_experts} experts, k = {top_k}, C = {capacity_ratio:.2f} → "
            f"**capacity {first['capacity']} tokens per expert**. This model uses the "
            f"{'reference (rounded)' if rule['rule'] == 'reference' else 'paper (unrounded)'} rule:")
st.latex(rule["formula"])
st.caption(rule["text"])
cols = st.columns(2)
for col, (name, r) in zip(cols, results.items()):
    fig = spatial_map_figure(ds.images[index], r["grid"], model.cfg.num_experts, class_token_expert=r["class_token"],
                             title=name)
    fig.update_layout(width=None, height=380)
    col.plotly_chart(fig, key=f"learn_{name}")
    col.metric(f"{name}: tokens dropped", f"{r['dropped_tokens']} of {r['tokens']}",
               help="Tokens that lost every choice and skip this block.")
vanilla, bpr_r = results.values()
diff = keep_difference(vanilla["grid"], bpr_r["grid"])
if int(top_k) == 1:
    st.info(f"With k = 1 both orders always drop the same **number** of tokens: each expert keeps at most "
            f"{first['capacity']} of the tokens that chose it, whatever the order. The lesson is **which** tokens: "
            f"here {diff['kept_only_b']} patches kept by BPR were dropped by vanilla, and {diff['kept_only_a']} the "
            "other way round.")
else:
    st.caption(f"{diff['kept_only_b']} patches keep their first choice under BPR only, {diff['kept_only_a']} under "
               "vanilla only.")
st.caption("Each square is a patch token's first-choice expert; a red cross lost it to capacity. "
           "With C ≥ about 1.5 nearly nothing is dropped; with small C, vanilla drops the bottom rows while BPR "
           "keeps the tokens the router is most confident about.")

# ----------------------------------------------------------------------------- super-class routing
st.header("Super-class routing (Mobile V-MoE)")
st.markdown("""
A per-image router can be trained end to end, but Mobile V-MoE found a better signal: **semantic
super-classes**. Train a dense model first, see which classes it confuses (its *confusion graph*), and cluster
the classes into E groups of look-alikes. Each group becomes one expert's job, and the router is trained with
an extra cross-entropy loss to predict the image's group: L = L_cls + λ·L_router (λ = 0.3).
The experts then specialise in telling apart classes that are hard to tell apart.
""")
sc = (card or {}).get("superclasses") if card else None
if card is not None and sc and sc.get("assignment"):
    classes = card.get("classes") or []
    names = sc.get("names") or []
    rows = [{"expert / super-class": g, "name": names[g] if g < len(names) else "",
             "classes": ", ".join(str(classes[i]) for i, a in enumerate(sc["assignment"]) if a == g)}
            for g in range(max(sc["assignment"]) + 1)]
    st.markdown(f"The selected checkpoint **{md(selected.name)}** routes with these groups "
                f"(found by *{sc.get('method', 'clustering')}*):")
    st.dataframe(pd.DataFrame(rows), hide_index=True)
    st.caption("See them on the **Confusion graph** page, recompute them on **Super-classes**, and check what the "
               "router really does on **Routing**.")
else:
    st.info("The selected checkpoint has no super-class map. Pick a Mobile V-MoE checkpoint trained with "
            "super-classes in the sidebar to see its groups here, or find groups on the **Super-classes** page.")
