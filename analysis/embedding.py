"""2-D maps of what the router reads and of the final features (UMAP, PCA fallback).

`embed` turns an (N, D) array into (N, 2) with UMAP (McInnes et al., 2018,
umap-learn), seeded, or with PCA when there are too few points for a
neighbour graph or UMAP fails. `embedding_frame` does this for a
`RoutingSummary` (source "router_input": the per-image summary the first
router read; "features": the final class token) and returns a DataFrame with
x, y, class, super-class, expert and whether the prediction was right, ready for
`embedding_figure`. Results are cached on disk as .npy + .json (never pickle),
keyed by checkpoint sha256, split and every setting.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd
import plotly.express as px

from .collect import RoutingSummary

__all__ = ["embed", "embedding_frame", "embedding_figure", "default_cache_dir", "MIN_UMAP_POINTS"]

MIN_UMAP_POINTS = 20       # below this a k-NN graph says little: use PCA


def default_cache_dir() -> Path:
    """`.cache/embeddings` in the repository (or under WORKBENCH_CACHE)."""
    try:
        from workbench.paths import cache_dir
        return cache_dir() / "embeddings"
    except ImportError:  # pragma: no cover
        return Path(__file__).resolve().parents[1] / ".cache" / "embeddings"


def _pca(x: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    out = np.zeros((len(x), 2), dtype=np.float32)
    n = min(2, x.shape[0], x.shape[1])
    if n > 0 and len(x) > 1:
        out[:, :n] = PCA(n_components=n, random_state=seed).fit_transform(x)
    return out


def embed(x, method: str = "auto", *, n_neighbors: int = 15, min_dist: float = 0.1, metric: str = "euclidean",
          seed: int = 0) -> tuple:
    """(N, D) -> ((N, 2) float32, method used: "umap" | "pca").

    method "auto": UMAP with min(n_neighbors, N - 1) neighbours when N >=
    MIN_UMAP_POINTS, else PCA; a UMAP failure falls back to PCA with a warning.
    UMAP is seeded (random_state), which also makes it single-threaded.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"embed needs an (N, D) array, got shape {x.shape}")
    if method not in ("auto", "umap", "pca"):
        raise ValueError(f"method must be 'auto', 'umap' or 'pca', got {method!r}")
    if method == "pca" or (method == "auto" and len(x) < MIN_UMAP_POINTS):
        return _pca(x, seed), "pca"
    if len(x) < 4:
        raise ValueError(f"UMAP needs at least 4 points, got {len(x)}; use method='pca'")
    try:
        import umap
        from sklearn.neighbors import NearestNeighbors

        k = max(2, min(n_neighbors, len(x) - 1))
        # exact k-NN from scikit-learn: as fast as UMAP's NN-descent at these sizes, deterministic,
        # and it skips compiling NN-descent with numba (seconds on a cold start)
        dist, idx = NearestNeighbors(n_neighbors=k, metric=metric).fit(x).kneighbors(x)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*n_jobs.*")            # seeding forces one thread
            warnings.filterwarnings("ignore", message=".*knn_search_index.*")  # we never .transform() new data
            reducer = umap.UMAP(n_components=2, n_neighbors=k, min_dist=min_dist, metric=metric, random_state=seed,
                                precomputed_knn=(idx, dist.astype(np.float32), None))
            y = reducer.fit_transform(x)
        return np.asarray(y, dtype=np.float32), "umap"
    except Exception as err:  # noqa: BLE001 - any UMAP/numba failure: fall back, say so
        if method == "umap":
            raise
        warnings.warn(f"UMAP failed ({type(err).__name__}: {err}); using PCA instead")
        return _pca(x, seed), "pca"


def _cache_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


def embedding_frame(
    summary: RoutingSummary,
    source: str = "router_input",
    *,
    method: str = "auto",
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    seed: int = 0,
    layer: Optional[int] = None,
    checkpoint_sha: Optional[str] = None,
    split: Optional[str] = None,
    cache_dir: Union[str, Path, None] = None,
) -> pd.DataFrame:
    """One row per image: x, y, class, superclass, expert, correct, index.

    source: "router_input" (what the router of block `layer` read; default the
    first MoE block) or "features" (final class token; works for dense models).
    expert: the image's first-choice expert (per-token: its most frequent
    first choice over patch tokens); -1 for dense models.
    With `checkpoint_sha` (the card's weights sha256) the 2-D coordinates are
    cached under `cache_dir` (default `.cache/embeddings`), keyed by the sha,
    `split`, the source and every setting, as <key>.npy + <key>.json.
    """
    if source == "features":
        x = summary.features
    elif source == "router_input":
        lr = summary.layer(layer)
        x = lr.router_input
        if x is None:
            raise ValueError(f"block {lr.layer} recorded no router input")
    else:
        raise ValueError(f"source must be 'router_input' or 'features', got {source!r}")
    settings = {"checkpoint": checkpoint_sha, "split": split, "source": source, "layer": layer, "method": method,
                "n_neighbors": n_neighbors, "min_dist": min_dist, "seed": seed, "n": int(len(x)),
                "routing": summary.settings, "version": 1}
    xy = used = None
    path = None
    if checkpoint_sha:
        path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        key = _cache_key(settings)
        npy, meta = path / f"{key}.npy", path / f"{key}.json"
        if npy.is_file() and meta.is_file():
            try:
                info = json.loads(meta.read_text())
                arr = np.load(npy, allow_pickle=False)
                if info.get("settings") == json.loads(json.dumps(settings)) and arr.shape == (len(x), 2):
                    xy, used = arr, info["method_used"]
            except (OSError, ValueError, KeyError):
                xy = None                                   # unreadable cache entry: recompute
    cached = xy is not None
    if xy is None:
        xy, used = embed(x, method, n_neighbors=n_neighbors, min_dist=min_dist, seed=seed)
        if path is not None:
            path.mkdir(parents=True, exist_ok=True)
            tmp = path / f".{key}.{np.random.randint(1 << 30)}.npy"
            np.save(tmp, xy, allow_pickle=False)
            tmp.replace(npy)
            meta.write_text(json.dumps({"settings": settings, "method_used": used}, sort_keys=True))

    names = summary.class_names()
    df = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "index": np.arange(len(xy))})
    df["class"] = [names[c] for c in summary.labels]
    if summary.superclasses is not None:
        sc = np.asarray(summary.superclasses)[summary.labels]
        gnames = summary.superclass_names
        df["superclass"] = [gnames[g] if gnames else str(g) for g in sc]
    else:
        df["superclass"] = "—"
    if summary.layers:
        lr = summary.layer(layer)
        top1 = lr.top1
        if lr.per_token:                                   # an image's most frequent first choice
            counts = np.zeros((len(top1), lr.num_experts), dtype=np.int64)
            np.add.at(counts, (np.repeat(np.arange(len(top1)), top1.shape[1] - 1), top1[:, 1:].ravel()), 1)
            top1 = counts.argmax(1)
        df["expert"] = top1.astype(int)
    else:
        df["expert"] = -1
    df["correct"] = summary.predictions == summary.labels
    df.attrs.update(method=used, source=source, cached=cached)
    return df


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
