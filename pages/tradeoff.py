"""Accuracy vs MACs: dense vs per-image vs per-token checkpoints, the Pareto frontier, and routing sweeps."""
from pathlib import Path

import streamlit as st

from workbench.grid import dataset_of_results, read_rows
from workbench.paths import samples_dir

from analysis.tradeoff import checkpoint_table, moe_gains, pareto_frontier, payoff_table, sweep_routing
from pages.figures import payoff_figure, strategy_figure, sweep_figure, tradeoff_figure
from pages.common import (analysis_bf16, available_checkpoints, checkpoint_hash, checkpoint_picker, ckpt_ref,
                          dataset_or_none, eval_subset, max_images, model_copy, need, open_checkpoint)


@st.cache_data(show_spinner="Reading checkpoint cards…", max_entries=16)
def table(keys: tuple, n: int):
    """keys: (path, content key) per checkpoint; missing numbers are recomputed on n test images."""
    return checkpoint_table([p for p, _ in keys], data=dataset_or_none, max_images=n)


def grid_result_files() -> list:
    """The shipped grids' results, one CSV per dataset (`workbench.grid`)."""
    return sorted(samples_dir().glob("*-grid-results.csv"))


@st.cache_data(show_spinner="Reading the grid results…", max_entries=4)
def grid_payoff(paths: tuple):
    import pandas as pd

    rows = [r for p in paths for r in read_rows(Path(p), dataset_of_results(Path(p)))]
    return payoff_table(pd.DataFrame(rows))


@st.cache_data(show_spinner="Sweeping k and capacity (re-running the model for each setting)…", max_entries=32)
def sweep(digest: str, n: int, ratios: tuple, bf16: bool, _path, _ds):
    model = model_copy(_path)
    return sweep_routing(model, _ds.images, _ds.labels, _ds.mean, _ds.std,
                         capacity_ratios=list(ratios) if ratios else None, bf16=bf16)


st.title("Accuracy vs MACs")
st.caption("MACs = multiply-accumulates per image (the unit papers call FLOPs), counting attention, the router and "
           "only the experts that run.")
selected = checkpoint_picker()
need(selected is not None, "No checkpoints yet.")
card, path = open_checkpoint(selected)
items = available_checkpoints()
try:
    df = table(tuple((str(p), checkpoint_hash(p)) for p, _ in items), max_images())
except (ValueError, OSError) as e:  # a card without numbers whose model or data cannot be evaluated here
    st.warning(f"The checkpoint table cannot be built: {e}")
    st.stop()
need(len(df), "No checkpoint could be read.")
df["where"] = [ckpt_ref(p).split("/")[0] for p in df["path"]]

datasets = sorted(df["dataset"].dropna().unique())
default = [card.get("dataset")] if card.get("dataset") in datasets else datasets[:1]
chosen = st.multiselect("Datasets", datasets, default=default,
                        help="Accuracies are only comparable on the same dataset.")
view = df[df["dataset"].isin(chosen)].copy()
need(len(view), "Pick at least one dataset.")
view["pareto"] = pareto_frontier(view, y="accuracy_mean")  # the frontier of what is shown (means over seeds)
c = st.columns(4)
c[0].metric("Checkpoints", len(view))
for col, kind in zip(c[1:], ("dense", "per-image", "per-token")):
    col.metric(kind, int((view["routing"] == kind).sum()))
left, right = st.columns(2)
paper = left.toggle("Show the Mobile V-MoE paper's published gains (ImageNet-1k, for reference)")
seeds = right.toggle("Show every seed", disabled=not (view["n_seeds"] > 1).any(),
                     help="Grid checkpoints are drawn at the mean over their seeds (same recipe) with ± 1 std; "
                          "this adds each seed as a dot.")
st.plotly_chart(tradeoff_figure(view, paper_reference_trace=paper, show_seeds=seeds), key="tradeoff")
cols = ["name", "preset", "routing", "dataset", "accuracy", "n_seeds", "accuracy_mean", "accuracy_std",
        "macs_active", "params_active", "params_total", "pareto", "where", "source"]
st.dataframe(view[cols].sort_values("macs_active"), hide_index=True,
             column_config={"accuracy": st.column_config.NumberColumn("accuracy (this checkpoint)", format="percent"),
                            "n_seeds": st.column_config.NumberColumn("seeds"),
                            "accuracy_mean": st.column_config.NumberColumn("mean over seeds", format="percent"),
                            "accuracy_std": st.column_config.NumberColumn("std over seeds", format="percent"),
                            "macs_active": st.column_config.NumberColumn("MACs per image (active)", format="compact"),
                            "params_active": st.column_config.NumberColumn(format="compact"),
                            "params_total": st.column_config.NumberColumn(format="compact")})
gains = moe_gains(view)
if len(gains):
    st.subheader("MoE gain over the dense model of the same shape")
    st.dataframe(gains, hide_index=True,
                 column_config={"gain": st.column_config.NumberColumn("gain (mean of paired per-seed differences)",
                                                                      format="percent"),
                                "gain_std": st.column_config.NumberColumn("std over seeds", format="percent"),
                                "gain_low": st.column_config.NumberColumn("95 % CI low", format="percent"),
                                "gain_high": st.column_config.NumberColumn("95 % CI high", format="percent"),
                                "positive": st.column_config.NumberColumn("seeds > 0"),
                                "verdict": st.column_config.TextColumn("what the interval allows saying"),
                                "n": st.column_config.NumberColumn("seeds"),
                                "macs_active": st.column_config.NumberColumn(format="compact")},
                 column_order=["name", "dense_name", "routing", "router", "macs_active", "n", "gain", "gain_std",
                               "gain_low", "gain_high", "positive", "verdict"])
    st.subheader("Routers of one shape side by side")
    st.caption("Each MoE minus the dense model of the same depth × width: the mean of the paired per-seed "
               "differences, the bar its 95 % t-interval, each seed a dot; on the test images and, where the cards have it, on "
               "images the models trained on. Rows follow the paper's ranking on ImageNet (per-token > "
               "super-class per-image > end-to-end per-image > dense), so you see where this grid agrees.")
    by_shape = gains.groupby(["dataset", "depth", "width"])
    shape = st.selectbox("Shape", list(by_shape.size().sort_values(ascending=False, kind="stable").index),
                         format_func=lambda t: f"{t[0]}, {t[1]}x{t[2]}", help="The shape with the most routers first.")
    st.plotly_chart(strategy_figure(by_shape.get_group(shape), title=f"{shape[0]}, {shape[1]}x{shape[2]}: gain over dense"),
                    key="strategies")

st.header("What pays off")
payoff = grid_payoff(tuple(str(p) for p in grid_result_files()))
if payoff.empty:
    st.info("No grid results are shipped here (`*-grid-results.csv` in the sample folder).")
else:
    st.caption("Every cell of the shipped grids (router, E, how the MoE starts, training recipe), as the gain over "
               "its paired baseline: the dense model of the same seed, or for an upcycled MoE the dense model "
               "continued as long. The bar is the paired 95 % t-interval over seeds, each dot one seed. Only a "
               "bar that stays clear of 0 is a measured difference: green beats, red trails, blue means no "
               "measurable difference at that number of seeds.")
    st.plotly_chart(payoff_figure(payoff), key="payoff")
    st.dataframe(payoff.drop(columns=["seed_gains"]), hide_index=True,
                 column_config={k: st.column_config.NumberColumn(k.replace("_", " "), format="percent")
                                for k in ("gain", "gain_std", "gain_low", "gain_high", "gap")})

st.header(f"Inference-time sweep of {path.name}")
cfg = card["config"]
need(cfg.get("family") != "vit", "A dense model has no routing to sweep: pick an MoE checkpoint in the sidebar.")
ratios = ()
if cfg.get("family") == "vmoe":
    ratios = tuple(sorted(st.multiselect("Eval capacity ratios", [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0],
                                         default=[0.5, 1.0, 1.5, 2.0])))
    need(ratios, "Pick at least one capacity ratio.")
st.caption("k from 1 to E" + (" × each capacity ratio" if ratios else "") +
           ", changed at inference time on the trained model (no retraining).")
c = st.columns(2)
n_sweep = int(c[0].number_input("Test images per setting", 100, max_images(), min(500, max_images()), step=100,
                                help="Every setting re-runs the model on these images."))
run = c[1].toggle("Run the sweep", help="One pass over the images per setting; results are cached.")
need(run, "Switch on **Run the sweep** to measure accuracy and MACs at every k"
     + (" and capacity ratio" if ratios else "") + ".")
ds = eval_subset(card, n_sweep)
need(ds is not None, "The sweep needs the test images (see the warning above).")
result = sweep(checkpoint_hash(path), len(ds), ratios, analysis_bf16(), path, ds)
st.plotly_chart(sweep_figure(result, title=f"{path.name}: accuracy vs active MACs"), key="sweep")
st.dataframe(result, hide_index=True,
             column_config={"accuracy": st.column_config.NumberColumn(format="percent"),
                            "drop_rate": st.column_config.NumberColumn(format="percent"),
                            "macs_active": st.column_config.NumberColumn(format="compact"),
                            "macs_dense": st.column_config.NumberColumn(format="compact")})
