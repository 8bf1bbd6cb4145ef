"""Routing snapshots: which expert a fixed probe set of images goes to, saved at the end of each epoch.

Final routing says what a router learned; the snapshots say *when*: how much
the routing still changes from epoch to epoch, when it settles, how the load
and the router's super-class accuracy evolve (analysis/history.py reads them).

Format (owned here): `<run>/routing/epoch-NNNN.npz`, numpy arrays only (read
with `allow_pickle=False`): `probe` (N,) indices of the probe images in their
split, `labels` (N,), and per MoE block `layer_<i>`: the top-1 expert after
capacity, int16, (N,) per image or (N, T) per token, -1 = dropped. A 256-image
per-image probe with two MoE blocks is ~1 KB per epoch.
"""
from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn as nn

from workbench.runs import atomic_write_bytes

PathLike = Union[str, Path]
FOLDER = "routing"
PROBE_SIZE = 256
MAX_SNAPSHOT_BYTES = 64 * 1024 * 1024   # refuse to read anything bigger: these files are KBs
MAX_SNAPSHOT_ARRAY_BYTES = 64 * 1024 * 1024   # and anything that inflates past this once decompressed
MAX_SNAPSHOT_ARRAYS = 64
_NAME = re.compile(r"epoch-(\d{4,6})\.npz")

__all__ = ["FOLDER", "PROBE_SIZE", "RoutingHistory", "probe_indices", "routing_snapshot", "save_snapshot",
           "load_epoch", "load_history", "churn", "epoch_summary", "SnapshotError"]


class SnapshotError(ValueError):
    """A routing snapshot folder that cannot be read (the message says which file and why)."""


def probe_indices(n: int, size: int = PROBE_SIZE, seed: int = 0) -> np.ndarray:
    """A fixed, sorted sample of `size` indices out of `n` (the same probe every epoch and every run)."""
    if n < 1:
        raise ValueError(f"need at least one image to probe, got {n}")
    return np.sort(np.random.default_rng(seed).permutation(n)[:min(size, n)])


@torch.inference_mode()
def routing_snapshot(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> dict[int, np.ndarray]:
    """Top-1 expert after capacity per MoE block for normalised images `x`; {} for a dense model.

    Runs in eval mode (no router noise) and restores the model's mode.
    """
    was_training = model.training
    model.eval()
    out: dict[int, list] = {}
    try:
        for s in range(0, len(x), batch_size):
            for rec in model(x[s:s + batch_size], return_routing=True).routing:
                top = torch.where(rec.kept[..., 0], rec.experts[..., 0], -1)
                out.setdefault(rec.layer, []).append(top.to(torch.int16).cpu().numpy())
    finally:
        model.train(was_training)
    return {layer: np.concatenate(parts) for layer, parts in out.items()}


def save_snapshot(run_dir: PathLike, epoch: int, probe: np.ndarray, labels: np.ndarray,
                  layers: dict[int, np.ndarray]) -> Path:
    """Write one epoch's snapshot atomically (a rerun of the epoch replaces it)."""
    if not layers:
        raise ValueError("a dense model has no routing to snapshot")
    buf = io.BytesIO()
    np.savez_compressed(buf, probe=np.asarray(probe, np.int64), labels=np.asarray(labels, np.int64),
                        **{f"layer_{k}": np.asarray(v, np.int16) for k, v in layers.items()})
    path = Path(run_dir) / FOLDER / f"epoch-{int(epoch):04d}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


@dataclass
class RoutingHistory:
    """Snapshots of one run, in epoch order: `experts[layer]` is (epochs, N) or (epochs, N, T)."""

    epochs: list
    probe: np.ndarray
    labels: np.ndarray
    experts: dict

    @property
    def layers(self) -> list:
        return sorted(self.experts)


def _read(path: Path) -> dict:
    if path.stat().st_size > MAX_SNAPSHOT_BYTES:
        raise SnapshotError(f"{path}: {path.stat().st_size} bytes is too big for a routing snapshot")
    try:
        _check_array_sizes(path)
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except SnapshotError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise SnapshotError(f"{path}: not a readable routing snapshot ({e})") from e


def _check_array_sizes(path: Path) -> None:
    """Refuse a snapshot whose arrays would inflate past MAX_SNAPSHOT_ARRAY_BYTES in all, judged from
    the .npy headers alone (a few compressed bytes each) before any array is decompressed: a 1 MB file
    can hold a 1 GiB array of zeros."""
    total = 0
    with zipfile.ZipFile(path) as z:
        members = z.infolist()
        if len(members) > MAX_SNAPSHOT_ARRAYS:
            raise SnapshotError(f"{path}: {len(members)} arrays; a routing snapshot has a few")
        for info in members:
            with z.open(info) as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(f)
            if dtype.hasobject:
                raise SnapshotError(f"{path}: {info.filename} holds Python objects")
            total += int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if total > MAX_SNAPSHOT_ARRAY_BYTES:
                raise SnapshotError(f"{path}: its arrays would take more than {MAX_SNAPSHOT_ARRAY_BYTES >> 20} MB "
                                    "in memory; a routing snapshot takes kilobytes")


def load_epoch(run_dir: PathLike, epoch: int) -> dict[int, np.ndarray] | None:
    """{block: top-1 experts} of one epoch's snapshot, or None when there is none (or it is unreadable)."""
    path = Path(run_dir) / FOLDER / f"epoch-{int(epoch):04d}.npz"
    if epoch < 1 or not path.is_file():
        return None
    try:
        snap = _read(path)
    except SnapshotError:
        return None
    return {int(k[6:]): v for k, v in snap.items() if k.startswith("layer_")}


def churn(before: np.ndarray, after: np.ndarray) -> float:
    """Share of probe items (images or tokens) whose expert changed; a drop (-1) counts as a route."""
    before, after = np.asarray(before).ravel(), np.asarray(after).ravel()
    return float((before != after).mean()) if len(before) else float("nan")


def epoch_summary(layers: dict, labels: np.ndarray, superclasses=None, previous: dict | None = None) -> dict:
    """The per-epoch scalars training logs: churn since the last epoch, router accuracy vs super-classes.

    First MoE block only (a per-image router is shared; a per-token model's
    first block is the representative one); router accuracy only for per-image
    routing with a super-class map (expert g is trained on super-class g).
    """
    first = min(layers)
    out = {"block": int(first)}
    if previous is not None and first in previous and previous[first].shape == layers[first].shape:
        out["churn"] = round(churn(previous[first], layers[first]), 5)
    if superclasses is not None and layers[first].ndim == 1:
        target = np.asarray(superclasses)[np.asarray(labels)]
        out["router_accuracy"] = round(float((layers[first] == target).mean()), 5)
    return out


def load_history(run_dir: PathLike) -> RoutingHistory | None:
    """All snapshots of a run or checkpoint folder, or None when it has none."""
    folder = Path(run_dir) / FOLDER
    files = sorted((int(m.group(1)), p) for p in folder.glob("epoch-*.npz") if (m := _NAME.fullmatch(p.name)))
    if not files:
        return None
    snaps = [_read(p) for _, p in files]
    first = snaps[0]
    keys = sorted(k for k in first if k.startswith("layer_"))
    for (epoch, path), snap in zip(files, snaps):
        if sorted(k for k in snap if k.startswith("layer_")) != keys or not np.array_equal(snap.get("probe"),
                                                                                          first.get("probe")):
            raise SnapshotError(f"{path}: its probe images or MoE blocks differ from epoch {files[0][0]}'s")
        for k in keys:
            if snap[k].shape != first[k].shape or snap[k].dtype.kind not in "iu":
                raise SnapshotError(f"{path}: {k} has shape {snap[k].shape}, expected {first[k].shape} integers")
    return RoutingHistory(epochs=[e for e, _ in files], probe=first["probe"], labels=first["labels"],
                          experts={int(k[6:]): np.stack([s[k] for s in snaps]).astype(np.int64) for k in keys})
