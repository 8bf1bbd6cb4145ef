"""Overview: the selected checkpoint's model card and a diagram of its blocks."""
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from analysis.paired import card_seed_differences
from pages.common import checkpoint_picker, get_model, md, open_checkpoint
from pages.figures import history_figure
from workbench import runs

FAMILY_TEXT = {
    "vit": "Dense ViT: every block runs its MLP on every token (the baseline).",
    "vmoe": "V-MoE (Riquelme et al., 2021): per-**token** routing — each token picks its top-k experts "
            "in every MoE block, subject to expert capacity.",
    "mvmoe": "Mobile V-MoE (Daxberger et al., 2023): per-**image** routing — one router reads a summary of "
             "the image and picks the experts the whole image uses in every MoE block.",
}
COLORS = {"dense": "#b9cde0", "moe": "#f0a868", "io": "#e4e4e4", "router": "#1f4e96"}


def _fmt(n, digits: int = 4) -> str:
    """1234567 -> "1.235M" (`digits` significant digits)."""
    if not isinstance(n, (int, float)):
        return "n/a"
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.{digits}g}{unit}"
    return f"{n:.0f}"


def block_diagram(cfg: dict, moe_blocks: list[int]) -> go.Figure:
    """Patch embed -> blocks (dense / MoE) -> head, with an arrow where the router reads."""
    depth = cfg["depth"]
    fig = go.Figure()
    items = [("Patch embed", "io")] + [
        (f"Block {i}<br>{'MoE' if i in moe_blocks else 'dense'}", "moe" if i in moe_blocks else "dense")
        for i in range(depth)] + [("Head", "io")]
    for x, (text, kind) in enumerate(items):
        fig.add_shape(type="rect", x0=x - 0.42, x1=x + 0.42, y0=0, y1=1, fillcolor=COLORS[kind],
                      line=dict(color="#555", width=1), layer="below")
        fig.add_annotation(x=x, y=0.5, text=f"<b>{text}</b>", showarrow=False,      # dark and bold: readable
                           font=dict(size=14, color="#111"))
        if x:
            fig.add_annotation(x=x - 0.42, y=0.5, ax=x - 0.58, ay=0.5, xref="x", yref="y", axref="x", ayref="y",
                               showarrow=True, arrowhead=2, text="")
    family = cfg["family"]
    if family == "mvmoe" and moe_blocks:
        readers = moe_blocks if cfg.get("per_layer_routers") else moe_blocks[:1]
        for b in readers:
            x = b + 1 - 0.5  # between the previous block and this MoE block
            fig.add_annotation(x=x, y=1.0, ax=x, ay=1.6, xref="x", yref="y", axref="x", ayref="y",
                               text="", showarrow=True, arrowhead=0, arrowcolor=COLORS["router"], startstandoff=0)
        x0 = moe_blocks[0] + 0.5
        fig.add_annotation(x=x0, y=1.75, showarrow=False, font=dict(color=COLORS["router"], size=14),
                           text=f"image router reads the {cfg.get('router_input', 'mean')} token summary "
                                f"→ top-{cfg['top_k']} of {cfg['num_experts']} experts for all MoE blocks"
                           if not cfg.get("per_layer_routers") else "one image router per MoE block")
    elif family == "vmoe":
        for b in moe_blocks:
            fig.add_annotation(x=b + 1, y=1.0, ax=b + 1, ay=1.5, xref="x", yref="y", axref="x", ayref="y",
                               text="", showarrow=True, arrowhead=2, arrowcolor=COLORS["router"])
        fig.add_annotation(x=(moe_blocks[0] + moe_blocks[-1]) / 2 + 1, y=1.7, showarrow=False,
                           font=dict(color=COLORS["router"], size=14),
                           text=f"token router in each MoE block: every token → top-{cfg['top_k']} of "
                                f"{cfg['num_experts']} experts (capacity ratio {cfg.get('eval_capacity_ratio')} at eval)")
    fig.update_xaxes(visible=False, range=[-0.6, len(items) - 0.4])
    fig.update_yaxes(visible=False, range=[-0.2, 2.0])
    fig.update_layout(height=260, margin=dict(l=10, r=10, t=10, b=10), plot_bgcolor="white")
    return fig


st.title("Overview")
card, path = open_checkpoint(checkpoint_picker())
cfg = card["config"]
family = cfg.get("family", "vit")
st.caption(f"`{path.name}` · {FAMILY_TEXT.get(family, family)}")

macs = card.get("macs") or {}
params = card.get("params") or {}
acc = (card.get("metrics") or {}).get("test_accuracy")

# names can be long (presets, image-folder datasets): a table row wraps them, where metric tiles cut them off
facts = {"Family": family, "Preset": card.get("preset") or "n/a",
         "Experts E / k": f"{cfg['num_experts']} / {cfg['top_k']}" if family != "vit" else "dense",
         "Dataset": card.get("dataset"),
         "Test accuracy": f"{100 * acc:.2f} %" if isinstance(acc, (int, float)) else "n/a"}
st.markdown("| " + " | ".join(facts) + " |\n" + "|---" * len(facts) + "|\n| "
            + " | ".join(md(v).replace("|", "\\|") for v in facts.values()) + " |")
parent = card.get("parent")
if parent:   # sparse upcycling, or a dense model continued from another
    how = "Upcycled" if family != "vit" else "Continued"
    st.info(f"{how} from the dense checkpoint `{md(parent.get('path'))}` ({md(parent.get('preset') or 'dense')}, "
            f"{parent.get('epochs')} epochs, test accuracy "
            + (f"{100 * parent['test_accuracy']:.2f} %" if isinstance(parent.get("test_accuracy"), (int, float))
               else "n/a") + f"; weights sha256 `{str(parent.get('sha256'))[:12]}…`), then trained "
            f"{(card.get('training') or {}).get('epochs')} more epochs.")
differences = card_seed_differences(card)
if differences:
    named = (card.get("seeds") or [{}])[0].get("baseline") or "dense"
    base = "the dense model of the same seed" if named == "dense" else f"{named} of the same seed"
    st.markdown(f"**Over seeds, against {md(base)}** (paired: same data order and initial weights): "
                f"test accuracy {differences['test'].text()} points: "
                f"{differences['test'].sentence('this model', 'its baseline')}."
                + (f" On trained-on images: {differences['fit'].text()} points." if differences["fit"].n else ""))
c = st.columns(3)
active, dense = macs.get("active"), macs.get("dense")
c[0].metric("MACs per image (active)", _fmt(active),
            help="Multiply-accumulates per image actually run: attention, router and only the active experts.")
c[1].metric("MACs per image (dense equivalent)", _fmt(dense),
            delta=f"{100 * (active / dense - 1):+.1f}% active vs dense" if active and dense else None,
            delta_color="off", help="The same-shape dense ViT.")
c[2].metric("Parameters active / total",
            f"{_fmt(params.get('active', macs.get('params_active')), 3)} / "
            f"{_fmt(params.get('total', macs.get('params_total')), 3)}")

st.subheader("Architecture")
model = get_model(path)
moe_blocks = model.cfg.moe_block_indices()
st.plotly_chart(block_diagram(cfg, moe_blocks))
st.caption(f"{cfg['depth']} blocks of width {cfg['width']}, patch {cfg['patch_size']} on "
           f"{cfg['img_size']}×{cfg['img_size']}×{cfg['in_chans']} inputs; MoE blocks: {moe_blocks or 'none'}.")

st.subheader("Super-classes")
sc = card.get("superclasses")
classes = card.get("classes") or []
if sc and sc.get("assignment"):
    names = sc.get("names") or [f"group {g}" for g in range(max(sc["assignment"]) + 1)]
    rows = [{"super-class": g, "name": names[g] if g < len(names) else f"group {g}",
             "classes": ", ".join(str(classes[i]) for i, a in enumerate(sc["assignment"]) if a == g and i < len(classes))}
            for g in range(len(names))]
    if cfg.get("superclasses") is not None:
        st.caption(f"Router trained to predict these groups (method: {md(sc.get('method', 'n/a'))}). "
                   "Expert e serves super-class e.")
    else:  # the pipeline records the groups found from this model's confusion; this model does not use them
        st.caption(f"Super-classes found from the confusion of the pipeline's dense baseline (method: "
                   f"{md(sc.get('method', 'n/a'))}). This model does not use them: "
                   + ("it has no router." if family == "vit" else "its router was trained without them."))
    st.dataframe(pd.DataFrame(rows), hide_index=True)
elif family == "mvmoe":
    st.info("This per-image model was trained end to end (router with balancing losses, no super-class map).")
else:
    st.info("No super-class map: only per-image (mvmoe) models use one. "
            "Find super-classes on the **Super-classes** page.")

history = card.get("history") or []
if history:
    st.subheader("Training history")
    hist = pd.DataFrame(history)
    x = "epoch" if "epoch" in hist else None
    numeric = [col for col in hist.columns if col != x and pd.api.types.is_numeric_dtype(hist[col])]
    cols = st.columns(2)
    for col, word in zip(cols, ("loss", "accuracy")):
        ys = [c for c in numeric if word in c]
        if ys:
            col.plotly_chart(history_figure(hist, x, ys, word), key=f"history_{word}")

pipeline_report = runs.pipeline_report(path.parent)   # a model of a pipeline run: that run's report
if pipeline_report is not None and path.name in runs.pipeline_checkpoints(path.parent):
    with st.expander(f"Report of the pipeline run `{path.parent.name}` that trained this model"):
        st.markdown(pipeline_report.replace("# ", "#### ", 1) if pipeline_report.startswith("# ") else pipeline_report)

with st.expander("Full card (JSON)"):
    st.json({k: v for k, v in card.items() if k not in ("confusion", "history")}, expanded=False)
