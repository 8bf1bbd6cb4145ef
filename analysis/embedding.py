"""2-D maps of what the router reads and of the final features (UMAP, PCA fallback).

`embed` turns an (N, D) array into (N, 2) with UMAP (McInnes et al., 2018,
umap-learn), seeded, or with PCA when there are too few points for a
neighbour graph or UMAP fails. `embedding_frame` does this for a
`RoutingSummary` (source "router_input": the per-image summary the first
router read; "features": the final class token) and returns a DataFrame with
x, y, class, super-class, expert and whether the prediction was right, ready for
`pages.figures.embedding_figure`. Results are cached on disk as .npy + .json (never pickle),
keyed by checkpoint sha256, split and every setting.
"""
from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path
from typing import Optional, Union

import numpy as np
import pandas as pd

from workbench.runs import atomic_write_bytes, atomic_write_json

from .collect import RoutingSummary

__all__ = ["embed", "embedding_frame", "default_cache_dir", "MIN_UMAP_POINTS"]

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


def _embedding_input(summary: RoutingSummary, source: str, layer: Optional[int]) -> np.ndarray:
    """The vectors to embed: the router input of block `layer`, or the final class token."""
    if source == "features":
        return summary.features
    if source == "router_input":
        lr = summary.layer(layer)
        if lr.router_input is None:
            raise ValueError(f"block {lr.layer} recorded no router input")
        return lr.router_input
    raise ValueError(f"source must be 'router_input' or 'features', got {source!r}")


def _cached_embed(x: np.ndarray, settings: dict, cache_dir: Optional[Path], **embed_args) -> tuple:
    """`embed(x)`, read from / written to `cache_dir` as <key>.npy + <key>.json when given.

    -> (xy, method used, whether it came from the cache). An unreadable or
    mismatched entry is recomputed and overwritten.
    """
    if cache_dir is None:
        return (*embed(x, **embed_args), False)
    key = _cache_key(settings)
    npy, meta = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    if npy.is_file() and meta.is_file():
        try:
            info = json.loads(meta.read_text())
            arr = np.load(npy, allow_pickle=False)
            if info.get("settings") == json.loads(json.dumps(settings)) and arr.shape == (len(x), 2):
                return arr, info["method_used"], True
        except (OSError, ValueError, KeyError):
            pass                                            # unreadable cache entry: recompute
    xy, used = embed(x, **embed_args)
    cache_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.save(buf, xy, allow_pickle=False)
    atomic_write_bytes(npy, buf.getvalue())
    atomic_write_json(meta, {"settings": settings, "method_used": used})
    return xy, used, False


def _image_expert(summary: RoutingSummary, layer: Optional[int]) -> np.ndarray:
    """Each image's first-choice expert at block `layer` (per token: its most frequent first
    choice over patch tokens); -1 for a dense model."""
    if not summary.layers:
        return np.full(len(summary.labels), -1)
    lr = summary.layer(layer)
    top1 = lr.top1
    if lr.per_token:
        counts = np.zeros((len(top1), lr.num_experts), dtype=np.int64)
        np.add.at(counts, (np.repeat(np.arange(len(top1)), top1.shape[1] - 1), top1[:, 1:].ravel()), 1)
        top1 = counts.argmax(1)
    return top1.astype(int)


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
    x = _embedding_input(summary, source, layer)
    settings = {"checkpoint": checkpoint_sha, "split": split, "source": source, "layer": layer, "method": method,
                "n_neighbors": n_neighbors, "min_dist": min_dist, "seed": seed, "n": int(len(x)),
                "routing": summary.settings, "version": 1}
    folder = None
    if checkpoint_sha:
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    xy, used, cached = _cached_embed(x, settings, folder, method=method, n_neighbors=n_neighbors,
                                     min_dist=min_dist, seed=seed)
    names = summary.class_names()
    df = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "index": np.arange(len(xy))})
    df["class"] = [names[c] for c in summary.labels]
    if summary.superclasses is not None:
        sc = np.asarray(summary.superclasses)[summary.labels]
        gnames = summary.superclass_names
        df["superclass"] = [gnames[g] if gnames else str(g) for g in sc]
    else:
        df["superclass"] = "—"
    df["expert"] = _image_expert(summary, layer)
    df["correct"] = summary.predictions == summary.labels
    df.attrs.update(method=used, source=source, cached=cached)
    return df
