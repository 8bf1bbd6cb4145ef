"""One batched pass that records everything the routing analyses need.

`collect_routing` runs a model over a split once, under `torch.inference_mode()`
in eval mode, and keeps per MoE layer the routing records of every batch,
joined into their numpy view (`RoutingRecord.numpy()`: experts before capacity,
the kept mask, gates, probabilities and what the router read), plus predictions
and final class-token features. Every statistic in `analysis/routing.py`, the
embeddings and the sweeps read this `RoutingSummary`, so the model runs once.

Also here: `routing_overrides` (change k / capacity / BPR / disabled experts
for a block of code and restore them), `force_expert` and `predict_logits`,
shared by ablation.py and tradeoff.py. All of it goes through the models'
public API (`model(x, return_routing=True)`, `routing_settings`, `set_routing`);
nothing here patches or hooks a model.

Why fp32 by default: bf16 autocast is ~2-3x faster on this project's CPU but
flips a few near-tied router decisions and predictions of an untrained model
(see benchmarks/analysis_speed.py). `bf16=True` opts in; the routers then
still run in fp32 on the bf16 backbone's output (`set_routing(router_fp32=True)`),
so only the backbone rounds.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from workbench.data import normalize
from workbench.models import RoutingRecord

__all__ = [
    "RoutingSummary", "collect_routing", "predict_logits",
    "routing_overrides", "force_expert", "routing_kind", "normalize_images",
]


def normalize_images(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, C, H, W) -> normalised float; float input is taken as already normalised."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8:
        return images.float()
    return normalize(images, mean, std)


def routing_kind(model: nn.Module) -> str:
    """'dense' | 'per-image' | 'per-token' from `model.cfg.family`."""
    return {"vit": "dense", "mvmoe": "per-image", "vmoe": "per-token"}[model.cfg.family]


# --------------------------------------------------------------------------- containers
@dataclass
class RoutingSummary:
    """Routing of every MoE layer plus predictions and features over one split."""

    family: str                        # "vit" | "vmoe" | "mvmoe"
    layers: list                       # list[RoutingRecord] (numpy views), in block order (empty for dense)
    labels: np.ndarray                 # (N,) int64
    predictions: np.ndarray            # (N,) int64
    features: np.ndarray               # (N, D) final class-token features
    router_inputs: Optional[np.ndarray]  # (N, D) per-image summary read by the first router
    num_classes: int
    classes: list = field(default_factory=list)       # class names
    superclasses: Optional[np.ndarray] = None         # (num_classes,) class -> super-class
    superclass_names: Optional[list] = None
    grid: int = 0                      # patches per side (token maps)
    settings: dict = field(default_factory=dict)      # routing settings the pass ran with

    @property
    def kind(self) -> str:
        return {"vit": "dense", "mvmoe": "per-image", "vmoe": "per-token"}[self.family]

    @property
    def num_experts(self) -> int:
        return self.layers[0].num_experts if self.layers else 0

    @property
    def layer_indices(self) -> list:
        return [lr.layer for lr in self.layers]

    @property
    def accuracy(self) -> float:
        return float((self.predictions == self.labels).mean()) if len(self.labels) else float("nan")

    def layer(self, layer: Optional[int] = None) -> RoutingRecord:
        """The routing of block `layer` (None: the first MoE block)."""
        if not self.layers:
            raise ValueError("a dense model has no routing to analyse")
        if layer is None:
            return self.layers[0]
        for lr in self.layers:
            if lr.layer == layer:
                return lr
        raise ValueError(f"block {layer} is not an MoE block; MoE blocks are {self.layer_indices}")

    def class_names(self) -> list:
        return list(self.classes) if self.classes else [str(c) for c in range(self.num_classes)]

    def superclass_labels(self) -> np.ndarray:
        if self.superclasses is None:
            raise ValueError("no super-class map: pass superclasses= to collect_routing (or use a model trained with one)")
        return np.asarray(self.superclasses)[self.labels]

    def to_records(self) -> list:
        """The per-layer records (numpy views), e.g. for `count_macs(..., routing=...)`."""
        return list(self.layers)


# --------------------------------------------------------------------------- routing settings
@contextlib.contextmanager
def routing_overrides(model: nn.Module, **settings) -> Iterator[nn.Module]:
    """Temporarily `model.set_routing(**settings)`; the previous settings come back on exit.

    Settings left as None are not changed. Per-image models accept only
    `top_k`, `disabled_experts`, `force_expert` and `router_fp32`.
    """
    settings = {k: v for k, v in settings.items() if v is not None}
    if not settings:
        yield model
        return
    if model.cfg.family == "vit":
        raise ValueError("a dense model has no router to adjust")
    before = model.routing_settings()
    model.set_routing(**settings)
    try:
        yield model
    finally:
        model.set_routing(**before)


@contextlib.contextmanager
def force_expert(model: nn.Module, expert: int) -> Iterator[nn.Module]:
    """Route every image/token to `expert` with gate 1 (k = 1), whatever the router says.

    Uses the routers' forced-expert setting, which is independent of the
    `disabled_experts` mechanism, so that the two can be checked against each
    other (disabling all experts but e must give the same model).
    Capacity still applies to per-token routing.
    """
    E = model.cfg.num_experts
    if not 0 <= expert < E:
        raise ValueError(f"expert must be in 0..{E - 1}, got {expert}")
    with routing_overrides(model, force_expert=int(expert)):
        yield model


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _fp32_routers(model: nn.Module, enabled: bool):
    """Under autocast, run the routers (summary, norm, projection) in fp32."""
    if not enabled or model.cfg.family == "vit":
        return contextlib.nullcontext()
    return routing_overrides(model, router_fp32=True)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def predict_logits(model: nn.Module, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                   batch_size: int = 256, *, bf16: bool = False) -> np.ndarray:
    """Logits (N, classes) float32 of a batched eval-mode pass (no routing kept)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images = torch.as_tensor(images)
    device = _device(model)
    out = np.empty((len(images), model.cfg.num_classes), dtype=np.float32)
    with _eval_mode(model), _fp32_routers(model, bf16), torch.inference_mode():
        for s in range(0, len(images), batch_size):
            x = normalize_images(images[s:s + batch_size], mean, std).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
            out[s:s + len(x)] = logits.float().cpu().numpy()
    return out


# --------------------------------------------------------------------------- the pass
def collect_routing(
    model: nn.Module,
    images: torch.Tensor,
    labels,
    mean: Sequence[float] = (0.5,),
    std: Sequence[float] = (0.5,),
    batch_size: int = 256,
    *,
    superclasses: Optional[Sequence[int]] = None,
    classes: Optional[Sequence[str]] = None,
    superclass_names: Optional[Sequence[str]] = None,
    bf16: bool = False,
) -> RoutingSummary:
    """Run `model` once over `images` and keep every layer's routing as numpy arrays.

    images: uint8 (N, C, H, W) (normalised here with `mean`/`std`, as
    `workbench.data.normalize` does) or float already normalised. labels: (N,).
    superclasses: class -> super-class map (default: the model's own map, if any).
    Memory: per-token probabilities are N x T x E float32 per layer (10k images,
    50 tokens, 10 experts: 20 MB).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images = torch.as_tensor(images)
    labels = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64).reshape(-1)
    N = len(images)
    if N == 0 or len(labels) != N:
        raise ValueError(f"need as many labels as images (and at least one), got {N} images, {len(labels)} labels")
    cfg = model.cfg
    device = _device(model)
    preds = np.empty(N, dtype=np.int64)
    features = None
    batches: dict = {}        # layer -> list of per-batch numpy records
    with _eval_mode(model), _fp32_routers(model, bf16), torch.inference_mode():
        for s in range(0, N, batch_size):
            x = normalize_images(images[s:s + batch_size], mean, std).to(device)
            e = s + len(x)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(x, return_routing=True)
            preds[s:e] = out.logits.float().argmax(-1).cpu().numpy()
            f = out.features.float().cpu().numpy()
            if features is None:
                features = np.empty((N, f.shape[1]), dtype=np.float32)
            features[s:e] = f
            for rec in out.routing:
                view = dataclasses.replace(rec, logits=None).numpy()   # logits: not needed, saves memory
                batches.setdefault(rec.layer, []).append(view)
    layers = [RoutingRecord.concat(batches[layer]) for layer in sorted(batches)]
    if superclasses is None and getattr(cfg, "superclasses", None) is not None:
        superclasses = cfg.superclasses
    return RoutingSummary(
        family=cfg.family, layers=layers, labels=labels, predictions=preds, features=features,
        router_inputs=layers[0].router_input if layers else None, num_classes=cfg.num_classes,
        classes=list(classes) if classes is not None else [],
        superclasses=None if superclasses is None else np.asarray(superclasses, dtype=np.int64),
        superclass_names=list(superclass_names) if superclass_names is not None else None,
        grid=cfg.grid, settings={**_settings(model), "bf16": bf16},
    )


def _settings(model: nn.Module) -> dict:
    """The routing settings a pass ran with (without the analysis-only fp32 switch)."""
    settings = dict(model.routing_settings())
    settings.pop("router_fp32", None)
    return settings
