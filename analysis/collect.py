"""One batched pass that records everything the routing analyses need.

`collect_routing` runs a model over a split once, under `torch.inference_mode()`
in eval mode, and keeps per MoE layer and per image (or per token) the router
decisions as numpy arrays: experts before capacity, the kept mask, gates,
probabilities and the per-image summary the router read; plus predictions and
final class-token features. Every statistic in `analysis/routing.py`, the
embeddings and the sweeps read this `RoutingSummary`, so the model runs once.

Also here: `routing_overrides` (change k / capacity / BPR / disabled experts
for a block of code and restore them), `force_expert` and `predict_logits`,
shared by ablation.py and tradeoff.py.

Why fp32 by default: bf16 autocast is ~2-3x faster on this project's CPU but
flips a few near-tied router decisions and predictions of an untrained model
(see benchmarks/analysis_speed.py). `bf16=True` opts in; the routers then
still run in fp32 on the bf16 backbone's output, so only the backbone rounds.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from workbench.data import normalize

__all__ = [
    "LayerRouting", "RoutingSummary", "collect_routing", "predict_logits",
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
class LayerRouting:
    """The routing of one MoE block over a whole split, as numpy arrays.

    `...` is (N,) for per-image and (N, T) for per-token routing (token 0 is the
    class token). `experts`/`gates` are the top-k choices before capacity,
    best first; `kept` says which survived capacity.
    """

    layer: int                         # block index
    kind: str                          # "image" | "token"
    experts: np.ndarray                # (..., k) int
    kept: np.ndarray                   # (..., k) bool
    gates: np.ndarray                  # (..., k) float32
    probs: np.ndarray                  # (..., E) float32
    capacity: Optional[int] = None     # per-expert buffer of a group (token routing)
    router_input: Optional[np.ndarray] = None  # (N, D) per-image summary the router read

    def __post_init__(self) -> None:
        self.experts = np.asarray(self.experts)
        self.kept = np.asarray(self.kept, dtype=bool)
        if self.experts.shape != self.kept.shape or self.experts.shape != np.shape(self.gates):
            raise ValueError(f"experts, kept and gates must have one shape, got {self.experts.shape}, "
                             f"{self.kept.shape}, {np.shape(self.gates)}")

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    @property
    def top_k(self) -> int:
        return self.experts.shape[-1]

    @property
    def per_token(self) -> bool:
        return self.kind == "token"

    @property
    def top1(self) -> np.ndarray:
        """(...) the router's first choice, before capacity."""
        return self.experts[..., 0]

    @property
    def top1_kept(self) -> np.ndarray:
        """(...) the first choice where it survived capacity, else -1."""
        return np.where(self.kept[..., 0], self.experts[..., 0], -1)

    def to_record(self):
        """A `workbench.models.RoutingRecord` (torch tensors sharing this memory), e.g. for count_macs."""
        from workbench.models import RoutingRecord

        t = torch.from_numpy
        return RoutingRecord(
            layer=self.layer, kind=self.kind, logits=t(np.log(np.maximum(self.probs, 1e-30))),
            probs=t(self.probs), experts=t(self.experts.astype(np.int64)), gates=t(self.gates),
            kept=t(self.kept), capacity=self.capacity,
            router_input=None if self.router_input is None else t(self.router_input),
        )


@dataclass
class RoutingSummary:
    """Routing of every MoE layer plus predictions and features over one split."""

    family: str                        # "vit" | "vmoe" | "mvmoe"
    layers: list                       # list[LayerRouting], in block order (empty for dense)
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

    def layer(self, layer: Optional[int] = None) -> LayerRouting:
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
        return [lr.to_record() for lr in self.layers]


# --------------------------------------------------------------------------- routing settings
def _routing_state(model: nn.Module) -> dict:
    cfg = model.cfg
    state = {"top_k": cfg.top_k, "disabled_experts": list(cfg.disabled_experts)}
    if cfg.family == "vmoe":
        state.update(eval_capacity_ratio=cfg.eval_capacity_ratio, batch_priority=cfg.batch_priority)
    return state


def _apply_routing(model: nn.Module, state: dict) -> None:
    # NOTE: order matters. Enabling every expert first means neither a smaller k
    # with more disabled experts nor a larger k with fewer is ever rejected halfway.
    model.set_routing(disabled_experts=[])
    model.set_routing(**{k: v for k, v in state.items() if k != "disabled_experts"})
    model.set_routing(disabled_experts=state.get("disabled_experts", []))


@contextlib.contextmanager
def routing_overrides(model: nn.Module, **settings) -> Iterator[nn.Module]:
    """Temporarily `model.set_routing(**settings)`; the previous settings come back on exit.

    Settings left as None are not changed. Per-image models accept only
    `top_k` and `disabled_experts`.
    """
    if model.cfg.family == "vit":
        if any(v is not None for v in settings.values()):
            raise ValueError("a dense model has no router to adjust")
        yield model
        return
    before = _routing_state(model)
    after = dict(before)
    after.update({k: v for k, v in settings.items() if v is not None})
    try:
        _apply_routing(model, after)
        yield model
    finally:
        _apply_routing(model, before)


def _routers(model: nn.Module) -> list:
    from workbench.models import Router

    return [m for m in model.modules() if isinstance(m, Router)]


@contextlib.contextmanager
def force_expert(model: nn.Module, expert: int) -> Iterator[nn.Module]:
    """Route every image/token to `expert` with gate 1 (k = 1), whatever the router says.

    Implemented by overriding each router's output, independently of the
    `disabled_experts` mechanism, so that the two can be checked against each
    other (disabling all experts but e must give the same model).
    Capacity still applies to per-token routing.
    """
    E = model.cfg.num_experts
    if not 0 <= expert < E:
        raise ValueError(f"expert must be in 0..{E - 1}, got {expert}")

    def override(module, args, out):
        logits = out["logits"]
        onehot = torch.zeros_like(logits, dtype=torch.bool)
        onehot[..., expert] = True
        forced = dict(out)
        forced["logits"] = logits.masked_fill(~onehot, float("-inf"))
        forced["probs"] = onehot.to(out["probs"].dtype)
        forced["experts"] = torch.full(logits.shape[:-1] + (1,), expert, dtype=torch.long, device=logits.device)
        forced["gates"] = torch.ones(logits.shape[:-1] + (1,), dtype=out["gates"].dtype, device=logits.device)
        return forced

    with routing_overrides(model, top_k=1, disabled_experts=[]):
        handles = [r.register_forward_hook(override) for r in _routers(model)]
        try:
            yield model
        finally:
            for h in handles:
                h.remove()


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _fp32_routers(model: nn.Module, enabled: bool):
    """Under autocast, run the routers (summary, norm, projection) in fp32."""
    if not enabled:
        yield
        return
    from workbench.models import ImageRouter, Router

    patched = []
    for m in model.modules():
        if isinstance(m, (Router, ImageRouter)):
            orig = m.forward

            def fp32_forward(x, *args, _orig=orig, **kwargs):
                with torch.autocast(x.device.type, enabled=False):
                    return _orig(x.float(), *args, **kwargs)

            m.forward = fp32_forward
            patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


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

    # per-token routers read the normalised tokens entering the MoE MLP: keep their patch mean
    token_inputs: dict = {}
    hooks = []
    if cfg.family == "vmoe":
        from workbench.models import TokenMoE

        for m in model.modules():
            if isinstance(m, TokenMoE):
                def grab(module, args, _layer=m.layer):
                    token_inputs[_layer] = args[0][:, 1:].float().mean(1)
                hooks.append(m.register_forward_pre_hook(grab))

    preds = np.empty(N, dtype=np.int64)
    features = None
    store: dict = {}          # layer -> dict of arrays
    meta: dict = {}           # layer -> (kind, capacity)
    try:
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
                    ri = rec.router_input if rec.router_input is not None else token_inputs.get(rec.layer)
                    arrays = {
                        "experts": rec.experts.to(torch.int32), "kept": rec.kept, "gates": rec.gates.float(),
                        "probs": rec.probs.float(), "router_input": None if ri is None else ri.float(),
                    }
                    if rec.layer not in store:
                        meta[rec.layer] = (rec.kind, rec.capacity)
                        store[rec.layer] = {
                            k: None if v is None else np.empty((N,) + tuple(v.shape[1:]), dtype=v.cpu().numpy().dtype)
                            for k, v in arrays.items()
                        }
                    for k, v in arrays.items():
                        if v is not None:
                            store[rec.layer][k][s:e] = v.cpu().numpy()
    finally:
        for h in hooks:
            h.remove()

    layers = []
    for layer in sorted(store):
        kind, cap = meta[layer]
        a = store[layer]
        layers.append(LayerRouting(layer=layer, kind=kind, experts=a["experts"], kept=a["kept"], gates=a["gates"],
                                   probs=a["probs"], capacity=cap, router_input=a["router_input"]))
    if superclasses is None and getattr(cfg, "superclasses", None) is not None:
        superclasses = cfg.superclasses
    return RoutingSummary(
        family=cfg.family, layers=layers, labels=labels, predictions=preds, features=features,
        router_inputs=layers[0].router_input if layers else None, num_classes=cfg.num_classes,
        classes=list(classes) if classes is not None else [],
        superclasses=None if superclasses is None else np.asarray(superclasses, dtype=np.int64),
        superclass_names=list(superclass_names) if superclass_names is not None else None,
        grid=cfg.grid, settings={**(_routing_state(model) if cfg.family != "vit" else {}), "bf16": bf16},
    )
