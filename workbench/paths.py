"""The folders the workbench reads and writes, and the rule that keeps it inside them.

The app may only load checkpoints from the shipped samples and the runs folder,
and only write under the runs folder; every user-supplied name goes through
`inside()` so '../' or absolute paths cannot escape. Data named by a checkpoint
card (`imagefolder:...`) must lie in one of `data_roots()`; cards store it
relative to its data root, so moving the data means re-pointing a root, not
editing cards.
"""
from __future__ import annotations

import contextlib
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


def data_roots() -> list[Path]:
    """Folders that data named by a checkpoint card may come from, in search order.

    $WORKBENCH_DATA (the dataset search path), the folders listed in
    $WORKBENCH_DATA_ROOTS (os.pathsep-separated, for data kept elsewhere),
    ./data in the working directory, the repository's data/ and the runs folder.
    """
    listed = [os.environ.get("WORKBENCH_DATA", "")] + os.environ.get("WORKBENCH_DATA_ROOTS", "").split(os.pathsep)
    roots = [Path(p).expanduser() for p in listed if p.strip()]
    roots += [Path.cwd() / "data", REPO_ROOT / "data", runs_dir()]
    out: list[Path] = []
    for root in roots:
        root = root.resolve()
        if root not in out:
            out.append(root)
    return out


IMAGEFOLDER = "imagefolder:"


class DataLocationError(ValueError):
    """A checkpoint card names data outside the folders the app may read."""


def card_data_ref(name: str) -> str:
    """The dataset reference a new card stores: `imagefolder:<path relative to its data root>`.

    A folder outside every data root is stored by its folder name, so that
    putting it under a root (or listing its parent in $WORKBENCH_DATA_ROOTS)
    re-points the checkpoint. Other dataset names are stored unchanged.
    """
    if not isinstance(name, str) or not name.lower().startswith(IMAGEFOLDER):
        return name
    folder = Path(name[len(IMAGEFOLDER):]).expanduser().resolve()
    for root in data_roots():
        if folder != root and root in folder.parents:
            return IMAGEFOLDER + folder.relative_to(root).as_posix()
    return IMAGEFOLDER + folder.name


def data_folder(folder: str) -> Path:
    """An image folder the app may train on: an existing folder inside one of `data_roots()` (absolute,
    or relative to a root, first match); DataLocationError naming the roots otherwise. The same rule
    that lets a card find its data again, applied before the run instead of after it."""
    roots = data_roots()
    text = str(folder).strip()
    try:
        path = Path(text).expanduser()
        candidates = [path] if path.is_absolute() else [root / path for root in roots]
        for candidate in candidates:
            for root in roots:
                with contextlib.suppress(ValueError):
                    found = inside(root, candidate)
                    if found != root and found.is_dir():
                        return found
    except (OSError, ValueError):   # names too long for the file system, NUL bytes, ...
        pass
    shown = text if len(text) <= 200 else text[:200] + "…"
    raise DataLocationError(f"image folder {shown!r} is not a folder inside a data folder "
                            f"({', '.join(map(str, roots))}); put it there, or add the folder that holds it "
                            "to WORKBENCH_DATA_ROOTS.")


def resolve_card_data(name: str) -> str:
    """The dataset name to load for a card's `dataset`; DataLocationError when it lies outside `data_roots()`.

    `imagefolder:REL` is looked up under each data root in turn. An absolute
    path (cards written before references were relative) is used when it lies
    inside a data root, else its folder name is looked up under the roots.
    """
    if not isinstance(name, str) or not name.lower().startswith(IMAGEFOLDER):
        return name
    ref = name[len(IMAGEFOLDER):].strip()
    roots = data_roots()
    hint = (f"Data named by a checkpoint must lie in one of the data folders ({', '.join(map(str, roots))}); "
            "put the image folder there, or add the folder that holds it to WORKBENCH_DATA_ROOTS.")
    try:
        path = Path(ref).expanduser()
        candidates = [path] if path.is_absolute() else []
        rel = path.name if path.is_absolute() else ref
        candidates += [root / rel for root in roots] if rel not in ("", ".", "..") else []
        for candidate in candidates:
            for root in roots:
                try:
                    folder = inside(root, candidate)
                except ValueError:
                    continue
                if folder != root and folder.is_dir():
                    return IMAGEFOLDER + str(folder)
    except (OSError, ValueError):   # names too long for the file system, NUL bytes, ...
        pass
    shown = ref if len(ref) <= 200 else ref[:200] + "…"
    raise DataLocationError(f"the checkpoint's dataset {IMAGEFOLDER}{shown} is not in a data folder. {hint}")


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
