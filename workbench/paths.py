"""The folders the workbench reads and writes, and the rule that keeps it inside them.

The app may only load checkpoints from the shipped samples and the runs folder,
and only write under the runs folder; every user-supplied name goes through
`inside()` so '../' or absolute paths cannot escape.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def samples_dir() -> Path:
    """Shipped sample checkpoints (override with WORKBENCH_SAMPLES)."""
    return Path(os.environ.get("WORKBENCH_SAMPLES", REPO_ROOT / "sample_checkpoints")).resolve()


def runs_dir() -> Path:
    """User training runs started from the CLI or the app (override with WORKBENCH_RUNS)."""
    return Path(os.environ.get("WORKBENCH_RUNS", REPO_ROOT / "runs")).resolve()


def cache_dir() -> Path:
    """Disk cache for analysis results such as embeddings (override with WORKBENCH_CACHE)."""
    return Path(os.environ.get("WORKBENCH_CACHE", REPO_ROOT / ".cache")).resolve()


def inside(root: Path, path: str | os.PathLike) -> Path:
    """Resolve `path` (relative to `root`, or absolute) and refuse anything outside `root`."""
    root = Path(root).resolve()
    p = Path(path)
    resolved = (p if p.is_absolute() else root / p).resolve()
    if resolved != root and root not in resolved.parents:
        raise ValueError(f"{path} is outside {root}")
    return resolved


def safe_run_name(name: str, max_len: int = 64) -> str:
    """A run name usable as one folder name: letters, digits, '-', '_', '.' only."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name.strip()).strip(".-")[:max_len]
    if not cleaned:
        raise ValueError(f"run name {name!r} has no usable characters")
    return cleaned
