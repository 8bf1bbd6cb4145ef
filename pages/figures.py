"""Every plotly figure the pages draw, built from the tables and arrays analysis/ returns.

No Streamlit and no statistics here: analysis/ computes, these functions only draw
(so a notebook can call them too). Grouped by the page that shows them.
"""
from __future__ import annotations

from typing import Iterable, Optional, Sequence

import networkx as nx
import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.tradeoff import moe_gains, paper_reference

PALETTE = px.colors.qualitative.Plotly + px.colors.qualitative.Set3 + px.colors.qualitative.Dark24

ROUTING_STYLE = {  # one colour + marker per routing kind, on every accuracy-vs-MACs figure
    "dense": ("#636EFA", "circle"),
    "per-image": ("#EF553B", "diamond"),
    "per-token": ("#00CC96", "square"),
}


# ----------------------------------------------------------------------------- confusion graph
def confusion_graph_figure(g: nx.Graph, pos: dict, groups: Optional[Sequence[int]] = None,
                           group_names: Sequence[str] = (), selected: Optional[int] = None) -> go.Figure:
    """The confusion graph as a plotly network: node size = class accuracy, edge width = confusion
    rate (4 width bins), colour = super-class; nodes carry their class index as customdata."""
    fig = go.Figure()
    edges = sorted(g.edges(data=True), key=lambda e: e[2]["weight"])
    wmax = max((d["weight"] for *_, d in edges), default=1.0) or 1.0
    for lo, hi, width in ((0.0, 0.25, 1), (0.25, 0.5, 2.5), (0.5, 0.75, 4.5), (0.75, 1.01, 7)):
        xs, ys = [], []
        for i, j, d in edges:
            if lo <= d["weight"] / wmax < hi:
                xs += [pos[i][0], pos[j][0], None]
                ys += [pos[i][1], pos[j][1], None]
        if xs:
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=dict(width=width, color="rgba(120,120,120,0.55)"),
                                     hoverinfo="skip", showlegend=False))
    mids = [((pos[i][0] + pos[j][0]) / 2, (pos[i][1] + pos[j][1]) / 2,
             f"{g.nodes[i]['name']} ↔ {g.nodes[j]['name']}<br>rate {d['weight']:.3f} · {d['count']:.0f} images")
            for i, j, d in edges]
    if mids:
        fig.add_trace(go.Scatter(x=[m[0] for m in mids], y=[m[1] for m in mids], mode="markers",
                                 marker=dict(size=6, opacity=0), hovertext=[m[2] for m in mids], hoverinfo="text",
                                 showlegend=False))
    nodes = list(g.nodes)
    acc = [g.nodes[n]["accuracy"] for n in nodes]
    size = [12 + 30 * (a if a == a else 0) for a in acc]
    ngroups = sorted(set(groups)) if groups is not None else [None]
    for grp in ngroups:
        members = [n for n in nodes if groups is None or groups[n] == grp]
        label = "classes" if grp is None else (group_names[grp] if grp < len(group_names) else f"group {grp}")
        fig.add_trace(go.Scatter(
            x=[pos[n][0] for n in members], y=[pos[n][1] for n in members], mode="markers+text",
            text=[g.nodes[n]["name"] for n in members], textposition="top center",
            marker=dict(size=[size[nodes.index(n)] for n in members],
                        color=PALETTE[0 if grp is None else grp % len(PALETTE)],
                        line=dict(width=[4 if n == selected else 1 for n in members],
                                  color=["black" if n == selected else "white" for n in members])),
            customdata=members,
            hovertext=[f"{g.nodes[n]['name']}<br>accuracy {g.nodes[n]['accuracy']:.1%}" for n in members],
            hoverinfo="text", name=f"{grp}: {label}" if grp is not None else label))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, scaleanchor="x")
    fig.update_layout(height=560, margin=dict(l=0, r=0, t=10, b=0), plot_bgcolor="white",
                      legend=dict(orientation="h", y=-0.05))
    return fig


def percent_axis(values, start_at_zero: bool = True) -> dict:
    """Axis settings for a share or rate: from 0 (`rangemode`), with as many decimals as the range
    needs for distinct tick labels (a churn of 0-3 % labelled "0 %, 1 %, 1 %, 2 %" misleads)."""
    v = np.asarray([x for x in np.ravel(values) if x is not None and np.isfinite(x)], dtype=float)
    span = (v.max() - min(0.0, v.min()) if start_at_zero else np.ptp(v)) if len(v) else 1.0
    step = 100 * span / 8 if span > 0 else 1.0          # a generous guess at plotly's tick step, in points
    decimals = max(0, int(np.ceil(-np.log10(step)))) if step < 1 else 0
    return {"tickformat": f".{decimals}%", **({"rangemode": "tozero"} if start_at_zero else {})}


# ----------------------------------------------------------------------------- routing
def heatmap_figure(df: pd.DataFrame, title: str = "", colorbar: str = "") -> go.Figure:
    """A labelled heatmap of a group x expert (or block x block) table of counts, shares or rates.

    The colour scale starts at 0, so an all-zero table (no token dropped) reads as empty, not as the
    middle of the scale; a table of zeros keeps a scale of 0..1."""
    z = df.to_numpy(dtype=float)
    top = float(np.nanmax(z)) if np.isfinite(z).any() else 0.0
    fig = go.Figure(go.Heatmap(
        z=z, x=[str(c) for c in df.columns], y=[str(i) for i in df.index], colorscale="Blues",
        zmin=min(0.0, float(np.nanmin(z)) if np.isfinite(z).any() else 0.0), zmax=top if top > 0 else 1.0,
        colorbar={"title": colorbar}, hovertemplate="%{y} / %{x}: %{z:.3g}<extra></extra>",
    ))
    # categorical axes: block and expert numbers are labels, not positions ("3.5" ticks between blocks 3 and 4)
    fig.update_layout(title=title, xaxis_title=str(df.columns.name or ""), yaxis_title=str(df.index.name or ""),
                      xaxis_type="category", yaxis_type="category", yaxis_autorange="reversed")
    if len(df) > 25:   # e.g. Tiny ImageNet's 200 classes: a readable row each
        fig.update_layout(height=14 * len(df) + 160)
    return fig


def expert_load_figure(load: pd.DataFrame, title: str = "Expert load per MoE block") -> go.Figure:
    """Grouped bars of each expert's share per block, with the uniform share as a dashed line."""
    fig = go.Figure()
    for layer, d in load.groupby("layer"):
        fig.add_bar(x=d["expert"].astype(str), y=d["share"], name=f"block {layer}",
                    customdata=d["count"], hovertemplate="expert %{x}: %{y:.1%} (%{customdata:.0f})<extra></extra>")
    E = load["expert"].nunique() if len(load) else 1
    fig.add_hline(y=1 / E, line_dash="dash", annotation_text="uniform")
    fig.update_layout(title=title, barmode="group", xaxis_title="expert", yaxis_title="share of assignments",
                      yaxis_tickformat=".0%")
    return fig


def spatial_map_figure(image, expert_map, num_experts: int, *, class_token_expert: Optional[int] = None,
                       title: str = "") -> go.Figure:
    """The image in grey with an opaque square on each patch in its expert's colour (an open cross where
    the token was dropped). Opaque markers over the image keep the legend's colours true, which a
    translucent tint over a dark image does not."""
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3:
        img = img.mean(0)                                                  # (C, H, W) -> grey
    H, W = img.shape
    grid = np.asarray(expert_map)
    g = grid.shape[0]
    patch = H / g
    palette = (px.colors.qualitative.Plotly + px.colors.qualitative.Dark24)[:max(num_experts, 1)]
    rows, cols = np.indices(grid.shape)
    centre = lambda idx: (idx + 0.5) * patch - 0.5  # noqa: E731
    size = max(6, int(150 / g))                                            # about 40 % of a patch on screen
    fig = go.Figure()
    fig.add_heatmap(z=img, colorscale="gray", showscale=False, hoverinfo="skip")
    for e in range(num_experts):
        on = grid == e
        if on.any():
            fig.add_scatter(x=centre(cols[on]), y=centre(rows[on]), mode="markers", name=f"expert {e}",
                            marker={"symbol": "square", "size": size, "color": palette[e],
                                    "line": {"width": 1, "color": "white"}},
                            hovertemplate=f"patch (%{{y:.0f}}, %{{x:.0f}}): expert {e}<extra></extra>")
    dropped = grid < 0
    if dropped.any():
        fig.add_scatter(x=centre(cols[dropped]), y=centre(rows[dropped]), mode="markers", name="dropped",
                        marker={"symbol": "x-thin-open", "size": size, "color": "#FF4136", "line": {"width": 2}},
                        hovertemplate="patch (%{y:.0f}, %{x:.0f}): dropped (skips this block)<extra></extra>")
    sub = "" if class_token_expert is None else (
        f" — class token: {'dropped' if class_token_expert < 0 else f'expert {class_token_expert}'}")
    fig.update_layout(title=(title or "Expert per patch") + sub, xaxis_visible=False, yaxis_visible=False,
                      yaxis_autorange="reversed", yaxis_scaleanchor="x", width=420, height=400,
                      legend={"orientation": "h", "y": -0.02})
    return fig


def impact_figure(matrix: pd.DataFrame, title: str = "Accuracy change when an expert is disabled") -> go.Figure:
    """Diverging heatmap of an `impact_matrix` (red: the class loses accuracy)."""
    z = matrix.to_numpy(dtype=float)
    lim = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
    fig = go.Figure(go.Heatmap(z=z, x=[str(c) for c in matrix.columns], y=[str(i) for i in matrix.index],
                               zmin=-lim, zmax=lim, colorscale="RdBu", colorbar={"title": "Δ accuracy"},
                               hovertemplate="class %{y}, expert %{x} off: %{z:+.1%}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="disabled expert", yaxis_title="class", yaxis_autorange="reversed")
    return fig


def embedding_figure(df: pd.DataFrame, color: str = "expert", title: str = ""):
    """Scatter of an `embedding_frame`, coloured by "expert", "class", "superclass" or "correct"."""
    if color not in ("expert", "class", "superclass", "correct"):
        raise ValueError(f"color must be expert, class, superclass or correct, got {color!r}")
    d = df.copy()
    d[color] = d[color].astype(str)                       # categorical colours, also for experts
    fig = px.scatter(d, x="x", y="y", color=color, hover_data=["index", "class", "superclass", "expert", "correct"],
                     render_mode="webgl", opacity=0.7,
                     category_orders={color: sorted(d[color].unique(), key=lambda s: (len(s), s))})
    method = df.attrs.get("method", "")
    fig.update_layout(title=title or f"{method.upper()} of {df.attrs.get('source', '')}",
                      xaxis_title=f"{method} 1", yaxis_title=f"{method} 2")
    fig.update_traces(marker_size=4)
    return fig


# ----------------------------------------------------------------------------- image inspector
# attribution colours: transparent at 0, so the image shows where nothing is attributed, and saturated at
# the scale's ends (red pushes the logit up, blue down)
SIGNED_SCALE = [[0.0, "rgba(5,48,97,1)"], [0.25, "rgba(67,147,195,0.85)"], [0.5, "rgba(255,255,255,0)"],
                [0.75, "rgba(214,96,77,0.85)"], [1.0, "rgba(103,0,31,1)"]]
UNSIGNED_SCALE = [[0.0, "rgba(255,255,255,0)"], [0.5, "rgba(239,59,44,0.8)"], [1.0, "rgba(103,0,13,1)"]]
ATTRIBUTION_CLIP = 99   # percentile of |attribution| at which colours saturate (a few hot pixels set no scale)


def overlay_figure(image, attribution, *, title: str = "", signed: bool = True):
    """The image in grey with the attribution (summed over channels) on top.

    signed=True: diverging colours centred at 0 (red pushes the logit up, blue down); False:
    |attribution|. Zero is transparent and the scale ends at the 99th percentile of |attribution|,
    so the map reads at a glance (a scale set by the largest pixel left everything else pale).
    """
    img = np.asarray(image, dtype=np.float64)
    img = img.reshape(-1, *img.shape[-2:]).mean(0)
    a = np.asarray(attribution, dtype=np.float64)
    a = a.reshape(-1, *a.shape[-2:]).sum(0)
    if not signed:
        a = np.abs(a)
    lim = float(np.percentile(np.abs(a), ATTRIBUTION_CLIP)) or float(np.abs(a).max()) or 1.0
    fig = go.Figure()
    fig.add_heatmap(z=img, colorscale="gray", showscale=False, hoverinfo="skip")
    fig.add_heatmap(z=a, zmin=-lim if signed else 0, zmax=lim, colorscale=SIGNED_SCALE if signed else UNSIGNED_SCALE,
                    colorbar={"title": "attribution"}, hovertemplate="(%{y}, %{x}): %{z:.3g}<extra></extra>")
    fig.update_layout(title=title, xaxis_visible=False, yaxis_visible=False, yaxis_autorange="reversed",
                      yaxis_scaleanchor="x", width=420, height=400)
    return fig


# ----------------------------------------------------------------------------- accuracy vs MACs
def tradeoff_figure(df: pd.DataFrame, *, show_frontier: bool = True, paper_reference_trace: bool = False,
                    show_seeds: bool = False, title: str = "Accuracy vs active MACs per image") -> go.Figure:
    """Accuracy vs active MACs (log x), one colour/marker per routing kind, Pareto frontier.

    A checkpoint whose card carries seeds (the sample grid) is drawn at the mean over its
    seeds with a ± 1 std error bar; `show_seeds` adds every seed as a small dot.
    paper_reference_trace=True adds a lower panel "MoE − dense gain": this
    table's gains (`moe_gains`, paired per seed where the cards have seeds) and,
    clearly labelled, the two gains from the Mobile V-MoE abstract (ImageNet-1k;
    not comparable in absolute terms).
    """
    gains = moe_gains(df) if len(df) else pd.DataFrame()
    two = paper_reference_trace or not gains.empty
    fig = make_subplots(rows=2 if two else 1, cols=1, shared_xaxes=True, row_heights=[0.62, 0.38] if two else None,
                        vertical_spacing=0.14,
                        subplot_titles=[title] + (["MoE − dense accuracy gain (same depth × width)"] if two else []))
    macs = df["macs_active"].astype(float) if len(df) else pd.Series(dtype=float)
    if paper_reference_trace:
        macs = pd.concat([macs, paper_reference()["macs"].astype(float)])
    log_x = len(macs) > 0 and macs.min() > 0 and macs.max() / macs.min() >= LOG_X_RATIO
    x_of = dodge_equal(df["macs_active"].astype(float), log_x) if len(df) else pd.Series(dtype=float)
    for kind, (color, symbol) in ROUTING_STYLE.items():
        d = df[df["routing"] == kind] if len(df) else df
        if d.empty:
            continue
        y, std, n = _seed_stats(d)
        spread = [f"mean of {k} seeds ± {s:.2%}" if k > 1 else "one seed" for k, s in zip(n, std.fillna(0))]
        custom = np.stack([d["name"].astype(str), d["preset"].astype(str), d["top_k"].astype(str),
                           d["params_total"].astype(str), d["params_active"].astype(str), d["source"].astype(str),
                           d["dataset"].astype(str), spread, [f"{m / 1e6:.2f} M" for m in d["macs_active"]]], -1)
        fig.add_scatter(x=x_of[d.index], y=y, mode="markers", name=kind,
                        error_y={"type": "data", "array": std.fillna(0), "visible": bool((n > 1).any()),
                                 "color": color},
                        marker={"color": color, "symbol": symbol, "size": 11, "line": {"width": 1, "color": "white"}},
                        customdata=custom, row=1, col=1,
                        hovertemplate="<b>%{customdata[0]}</b> (%{customdata[1]}, %{customdata[6]})<br>"
                                      "k=%{customdata[2]}<br>%{customdata[8]} MACs/image, accuracy %{y:.2%} "
                                      "(%{customdata[7]})<br>"
                                      "params %{customdata[3]} total, %{customdata[4]} active<br>"
                                      "%{customdata[5]}<extra>" + kind + "</extra>")
        if show_seeds and "seed_accuracies" in d:
            xs, ys = [], []
            for x, accs in zip(x_of[d.index], d["seed_accuracies"]):
                if isinstance(accs, list):
                    xs += [x] * len(accs)
                    ys += accs
            if xs:
                fig.add_scatter(x=xs, y=ys, mode="markers", name=f"{kind}: each seed", row=1, col=1,
                                marker={"color": color, "symbol": "circle-open", "size": 6},
                                hovertemplate="one seed: %{y:.2%}<extra></extra>")
    if show_frontier and "pareto" in df and df["pareto"].any():
        f = df[df["pareto"]].sort_values("macs_active")
        fig.add_scatter(x=x_of[f.index], y=_seed_stats(f)[0], mode="lines", name="Pareto frontier",   # the points drawn
                        line={"dash": "dot", "color": "grey"}, hoverinfo="skip", row=1, col=1)
    if two:
        _gain_panel(fig, gains, paper_reference_trace, x_of, df)
    # models of equal cost read as equal: a linear axis from 0 unless the costs span a decade
    axis = {"type": "log"} if log_x else {"type": "linear", "rangemode": "tozero"}
    fig.update_xaxes(**axis, title_text="active MACs per image" + (" (log)" if log_x else ""), row=2 if two else 1,
                     col=1)
    if two:
        fig.update_xaxes(**axis, row=1, col=1)
    fig.update_yaxes(title_text="accuracy", tickformat=".1%", row=1, col=1)
    fig.update_layout(legend={"orientation": "h", "y": -0.15}, height=650 if two else 450)
    return fig


LOG_X_RATIO = 10   # costs spanning at least a decade get a log axis


def dodge_equal(macs: pd.Series, log_x: bool, step: float = 0.02) -> pd.Series:
    """x positions that keep every marker visible: models of (almost) equal cost, closer than `step`
    of the axis, are spread side by side around their mean cost, cheaper first, so the order of costs
    is kept (hover still says the real MACs)."""
    values = macs.astype(float)
    scale = np.log10(values) if log_x else values
    span = float(scale.max() - (scale.min() if log_x else 0.0)) or 1.0
    ordered = scale.reset_index(drop=True).sort_values(kind="stable")
    out = np.asarray(scale, dtype=float).copy()
    clusters, current = [], [ordered.index[0]] if len(ordered) else []
    for prev, i in zip(ordered.index[:-1], ordered.index[1:]):
        if ordered[i] - ordered[prev] < span * step:
            current.append(i)
        else:
            clusters.append(current)
            current = [i]
    clusters += [current] if current else []
    for members in clusters:
        centre = float(np.mean([ordered[i] for i in members]))
        for rank, i in enumerate(members):
            out[i] = centre + (rank - (len(members) - 1) / 2) * span * step
    out = pd.Series(out, index=macs.index)
    return 10 ** out if log_x else out


def _gain_panel(fig: go.Figure, gains: pd.DataFrame, paper_reference_trace: bool, x_of: pd.Series,
                df: pd.DataFrame) -> None:
    """The lower panel of `tradeoff_figure`: MoE − dense gains (bars: paired 95 % t-intervals), the paper's gains."""
    for kind in ("per-image", "per-token"):
        g = gains[gains["routing"] == kind] if not gains.empty else gains
        if g.empty:
            continue
        color, symbol = ROUTING_STYLE[kind]
        bar = None
        if "gain_low" in g:   # the paired 95 % t-interval (none below two seeds)
            bar = {"type": "data", "symmetric": False, "color": color,
                   "array": ((g["gain_high"] - g["gain"]) * 100).fillna(0),
                   "arrayminus": ((g["gain"] - g["gain_low"]) * 100).fillna(0)}
        x = [x_of[df.index[df["name"] == name][0]] if (df["name"] == name).any() else m
             for name, m in zip(g["name"], g["macs_active"])]
        fig.add_scatter(x=x, y=g["gain"] * 100, mode="markers", name=f"{kind}: gain over dense",
                        marker={"color": color, "symbol": symbol, "size": 9},
                        error_y=bar,
                        customdata=g[["name", "dense_name", "n"]] if "n" in g else g[["name", "dense_name"]],
                        hovertemplate="%{customdata[0]} − %{customdata[1]}: %{y:+.2f} pp"
                                      + (" (paired over %{customdata[2]} seeds)" if "n" in g else "")
                                      + "<extra></extra>",
                        row=2, col=1)
    if paper_reference_trace:
        ref = paper_reference()
        fig.add_scatter(x=ref["macs"], y=ref["gain"] * 100, mode="markers+text", row=2, col=1,
                        name="paper: MoE − dense gain (ImageNet-1k, from the abstract)",
                        marker={"symbol": "star", "size": 13, "color": "black"},
                        text=[f"{lab}: +{g * 100:.2f} pp" for lab, g in zip(ref["label"], ref["gain"])],
                        textposition="top center", customdata=ref[["macs_source"]],
                        hovertemplate="Mobile V-MoE abstract (arXiv 2309.04354), ImageNet-1k<br>"
                                      "%{text}<br>x: %{customdata[0]}<extra></extra>")
    fig.add_hline(y=0, line_color="lightgrey", row=2, col=1)
    fig.update_yaxes(title_text="gain (accuracy points)", row=2, col=1)


# the Mobile V-MoE paper's ranking of routers on ImageNet, best first: rows of `strategy_figure` follow
# it, each router in its colour (a dose of the super-class loss, "superclass, λ = 0.1", in the superclass one)
PAPER_ROUTER_ORDER = ("per-token", "superclass", "end-to-end")
ROUTER_COLORS = (ROUTING_STYLE["per-token"][0], ROUTING_STYLE["per-image"][0], "#FFA15A", "#AB63FA")


def _interval_bar(r, mean: str, color: str) -> dict:
    """The error bar of a gain: its paired 95 % t-interval (none below two seeds)."""
    prefix = "fit_" if mean.startswith("fit") else ""
    low, high = r.get(f"{prefix}gain_low"), r.get(f"{prefix}gain_high")
    if low is None or pd.isna(low):
        return {"type": "data", "array": [0], "visible": False}
    return {"type": "data", "symmetric": False, "array": [100 * (high - r[mean])], "arrayminus": [100 * (r[mean] - low)],
            "color": color}


def _interval_words(r, mean: str) -> str:
    prefix = "fit_" if mean.startswith("fit") else ""
    low, high, n = r.get(f"{prefix}gain_low"), r.get(f"{prefix}gain_high"), int(r["n"])
    if low is None or pd.isna(low):
        return f"{n} paired seed, no interval"
    return (f"mean of {n} paired seeds, 95 % CI [{100 * low:+.2f}, {100 * high:+.2f}], "
            f"{int(r[prefix + 'positive'])}/{n} > 0: {r[prefix + 'verdict']}")


def strategy_figure(gains: pd.DataFrame, title: str = "Gain over the dense model of the same shape") -> go.Figure:
    """The routers of one shape side by side: each MoE's paired gain over dense (the mean, its 95 %
    t-interval as the bar, each seed a dot) on the test images and, where the cards have it, on images the models
    trained on (fit). Rows follow the paper's ranking (per-token, super-class, end-to-end), so a
    reader sees at once where ours agrees; `gains` is `analysis.tradeoff.moe_gains` for one shape."""
    order = {k: i for i, k in enumerate(PAPER_ROUTER_ORDER)}
    g = gains.assign(_rank=[order.get(str(r).split(",")[0], len(order)) for r in gains["router"]])
    g = g.sort_values(["_rank", "router", "name"])
    labels = [f"{r} · {n}" for r, n in zip(g["router"], g["name"])]
    panels = [("gain", "gain_std", "seed_gains", "test images")]
    if g["fit_gain"].notna().any():
        panels.append(("fit_gain", "fit_gain_std", "seed_fit_gains", "trained-on images (fit)"))
    fig = make_subplots(rows=1, cols=len(panels), shared_yaxes=True, horizontal_spacing=0.04,
                        subplot_titles=[p[3] for p in panels])
    for col, (mean, std, seeds, where) in enumerate(panels, start=1):
        for label, (_, r) in zip(labels, g.iterrows()):
            color = ROUTER_COLORS[int(r["_rank"])]
            if pd.isna(r[mean]):
                continue
            fig.add_scatter(x=[r[mean] * 100], y=[label], mode="markers", row=1, col=col, showlegend=False,
                            marker={"color": color, "size": 12, "symbol": "diamond"},
                            error_x=_interval_bar(r, mean, color),
                            hovertemplate=f"{label} − {r['dense_name']}, {where}: %{{x:+.2f}} points ("
                                          + (_interval_words(r, mean) if isinstance(r[seeds], list)
                                             else "one checkpoint each, not paired by seed") + ")<extra></extra>")
            if isinstance(r[seeds], list) and r[seeds]:
                fig.add_scatter(x=[v * 100 for v in r[seeds]], y=[label] * len(r[seeds]), mode="markers",
                                row=1, col=col, showlegend=False,
                                marker={"color": color, "symbol": "circle-open", "size": 7},
                                hovertemplate="one seed: %{x:+.2f} points<extra></extra>")
        fig.add_vline(x=0, line_color="grey", line_dash="dot", row=1, col=col)
        fig.update_xaxes(title_text="MoE − dense (accuracy points)", row=1, col=col)
    fig.update_yaxes(autorange="reversed", type="category", categoryorder="array", categoryarray=labels)
    fig.update_layout(title=title, height=160 + 60 * len(labels))
    return fig


VERDICT_COLORS = {"beats": "#2CA02C", "trails": "#D62728", "no measurable difference": "#636EFA",
                  "one seed, no claim": "#9E9E9E"}


def payoff_figure(table: pd.DataFrame, title: str = "What pays off: paired gain over the baseline") -> go.Figure:
    """One row per grid cell (`analysis.tradeoff.payoff_table`): the mean paired gain over its
    baseline with its 95 % t-interval as the bar, each seed a dot, coloured by what the interval
    allows saying (beats / trails where it excludes 0). A cell of one seed has no bar and says so."""
    fig = go.Figure()
    labels = [f"{r.dataset} {r.size} · {r.router or 'dense'}{f' E={int(r.E)}' if str(r.E) not in ('', 'nan') else ''}"
              f" · {r.init} · {r.recipe}" for r in table.itertuples()]
    for verdict, color in VERDICT_COLORS.items():
        rows = [(label, r) for label, r in zip(labels, table.itertuples()) if r.verdict == verdict]
        if not rows:
            continue
        ys = [label for label, _ in rows]
        mean = [100 * r.gain for _, r in rows]
        plus = [0 if pd.isna(r.gain_high) else 100 * (r.gain_high - r.gain) for _, r in rows]
        minus = [0 if pd.isna(r.gain_low) else 100 * (r.gain - r.gain_low) for _, r in rows]
        text = [f"n = {r.n}, {r.positive}/{r.n} seeds > 0" + ("" if pd.isna(r.gain_low) else
                f", 95 % CI [{100 * r.gain_low:+.2f}, {100 * r.gain_high:+.2f}]") + f", vs {r.baseline}"
                + ("" if pd.isna(r.gap) else f"; fit − test gap {100 * r.gap:.1f} points") for _, r in rows]
        fig.add_scatter(x=mean, y=ys, mode="markers", name=verdict, text=text,
                        marker={"color": color, "size": 12, "symbol": "diamond"},
                        error_x={"type": "data", "symmetric": False, "array": plus, "arrayminus": minus,
                                 "color": color, "thickness": 2},
                        hovertemplate="%{y}<br>gain %{x:+.2f} points<br>%{text}<extra>" + verdict + "</extra>")
        xs = [100 * g for _, r in rows for g in r.seed_gains]
        seed_ys = [label for label, r in rows for _ in r.seed_gains]
        fig.add_scatter(x=xs, y=seed_ys, mode="markers", showlegend=False,
                        marker={"color": color, "symbol": "circle-open", "size": 8},
                        hovertemplate="one seed: %{x:+.2f} points<extra></extra>")
    fig.add_vline(x=0, line_color="grey", line_dash="dot")
    fig.update_xaxes(title_text="gain over the baseline (accuracy points; bar: paired 95 % t-interval)",
                     zeroline=False)
    fig.update_yaxes(autorange="reversed", type="category", categoryorder="array", categoryarray=labels)
    fig.update_layout(title=title, height=200 + 45 * len(labels), legend={"orientation": "h", "y": -0.25},
                      margin={"l": 20})
    return fig


def _seed_stats(d: pd.DataFrame) -> tuple:
    """(y, std, n) to plot: the mean over seeds where the table has it, else the accuracy."""
    if "accuracy_mean" in d:
        y = d["accuracy_mean"].fillna(d["accuracy"])
        return y, d["accuracy_std"].astype(float), d["n_seeds"].fillna(1).astype(int)
    return d["accuracy"], pd.Series(np.nan, index=d.index), pd.Series(1, index=d.index)


def sweep_figure(sweep: pd.DataFrame, title: str = "Inference-time routing sweep") -> go.Figure:
    """Accuracy vs active MACs, one line per capacity ratio, points labelled by k."""
    fig = go.Figure()
    groups = sweep.groupby(sweep["capacity_ratio"].fillna(-1), sort=True)
    for ratio, d in groups:
        name = "per image (no capacity)" if ratio < 0 else f"C = {ratio:g}"
        fig.add_scatter(x=d["macs_active"], y=d["accuracy"], mode="lines+markers+text", name=name,
                        text=[f"k={k}" for k in d["k"]], textposition="top center",
                        customdata=np.stack([d["k"], d["drop_rate"]], -1),
                        hovertemplate="k=%{customdata[0]}, drops %{customdata[1]:.1%}<br>"
                                      "%{x:.3s} MACs, accuracy %{y:.2%}<extra>" + name + "</extra>")
    fig.update_layout(title=title, xaxis_title="active MACs per image", yaxis_title="accuracy",
                      yaxis_tickformat=".1%")
    return fig


# ----------------------------------------------------------------------------- training curves
def metrics_frames(records: Iterable[dict]) -> dict:
    """metrics.jsonl records -> pandas DataFrames for the Train page's curves.

    `train`: one row per train record (step, epoch, loss, ce, aux_<name>, lr, img_per_s, ...);
    `eval`: one row per evaluation (epoch, step, test_accuracy, test_loss);
    `load`: one row per (evaluation, MoE layer, expert) with the expert's share of assignments.
    """
    import pandas as pd

    train, evals, load = [], [], []
    for rec in records:
        kind = rec.get("type")
        if kind == "train":
            row = {k: v for k, v in rec.items() if not isinstance(v, (dict, list))}
            for name, value in (rec.get("aux") or {}).items():
                row[f"aux_{name}"] = value
            train.append(row)
        elif kind == "eval":
            evals.append({k: v for k, v in rec.items() if not isinstance(v, (dict, list))})
            for layer in rec.get("expert_load") or []:
                for expert, share in enumerate(layer.get("fraction") or []):
                    load.append({"epoch": rec.get("epoch"), "step": rec.get("step"), "layer": layer.get("layer"),
                                 "kind": layer.get("kind"), "expert": expert, "share": share,
                                 "dropped": layer.get("dropped")})
    return {"train": pd.DataFrame(train), "eval": pd.DataFrame(evals), "load": pd.DataFrame(load)}



def history_figure(hist: pd.DataFrame, x: Optional[str], columns: list, word: str) -> go.Figure:
    """A card's per-epoch history (loss or accuracy columns): people's labels, not plotly's
    ("variable", "value") or snake_case."""
    fig = px.line(hist, x=x, y=columns, markers=True, title=word, labels={"value": word, "variable": ""})
    fig.for_each_trace(lambda t: t.update(name=t.name.replace("_", " ")))          # train_loss -> train loss
    return fig


def loss_figure(train) -> go.Figure:
    """Total loss and cross-entropy per logged step; auxiliary losses on a second axis."""
    fig = go.Figure()
    aux = [c for c in train.columns if c.startswith("aux_")]
    for col, label in [("loss", "total loss"), ("ce", "cross-entropy")] + [
            (c, c.removeprefix("aux_") + " (aux)") for c in aux]:
        if col in train:
            fig.add_scatter(x=train["step"], y=train[col], mode="lines+markers", name=label,
                            yaxis="y2" if col.startswith("aux_") else "y")
    fig.update_layout(title="Training loss", xaxis_title="step", yaxis_title="loss", height=320,
                      margin=dict(l=10, r=10, t=40, b=10), legend=dict(orientation="h", y=-0.25))
    if aux:   # a right axis only where there is an auxiliary loss to read on it (a dense run has none)
        fig.update_layout(yaxis2=dict(title="auxiliary loss", overlaying="y", side="right", showgrid=False,
                                      rangemode="tozero", tickformat=".2g"))
    return fig


def accuracy_figure(train, evals) -> go.Figure:
    """Batch train accuracy per logged step and test accuracy per evaluation."""
    fig = go.Figure()
    if "train_accuracy" in train:
        fig.add_scatter(x=train["step"], y=100 * train["train_accuracy"], mode="lines+markers", name="train (batch)")
    if "test_accuracy" in evals:
        fig.add_scatter(x=evals["step"], y=100 * evals["test_accuracy"], mode="lines+markers", name="test",
                        marker=dict(size=10), text=[f"epoch {e}" for e in evals["epoch"]])
    fig.update_layout(title="Accuracy", xaxis_title="step", yaxis_title="accuracy (%)", height=320,
                      margin=dict(l=10, r=10, t=40, b=10), legend=dict(orientation="h", y=-0.25))
    return fig


def training_load_figure(load) -> go.Figure:
    """Each expert's share at the last evaluation of a run, one bar group per MoE block."""
    last = load[load["epoch"] == load["epoch"].max()]
    fig = go.Figure()
    for layer, part in last.groupby("layer"):
        fig.add_bar(x=[f"expert {e}" for e in part["expert"]], y=100 * part["share"], name=f"block {layer}")
    n = last["expert"].nunique()
    fig.add_hline(y=100 / max(1, n), line_dash="dash", annotation_text="uniform 1/E")
    kind = last["kind"].iloc[0] if len(last) else "image"
    fig.update_layout(title=f"Expert load at epoch {last['epoch'].max()} ({kind}s per expert, test split)",
                      yaxis_title=f"% of {kind} assignments", barmode="group", height=320,
                      margin=dict(l=10, r=10, t=40, b=10))
    return fig
