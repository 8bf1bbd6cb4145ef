"""Models: dense ViT, per-token V-MoE and per-image Mobile V-MoE.

Start here: `create_model("mvmoe-12x192-e10k1", num_classes=10)`.
- vit.py     dense ViT (the baseline and the shared skeleton)
- vmoe.py    per-token MoE (V-MoE): TokenMoE layer, capacity, BPR
- mvmoe.py   per-image MoE (Mobile V-MoE): ImageRouter, super-class loss
- routing.py route_tokens (capacity, priority, BPR, aux losses), Router, RoutingRecord
- experts.py stacked expert MLPs and index-based dispatch
- config.py  ModelConfig and preset names
"""
from __future__ import annotations

import torch.nn as nn

from .config import ModelConfig, paper_grid_presets, parse_preset
from .mvmoe import ImageDecision, ImageMoE, ImageRouter, MobileVMoE
from .routing import Router, RoutingRecord, TokenRouting, capacity, capacity_rule, route_tokens
from .vit import ModelOutput, VisionTransformer, weigh_aux_losses
from .vmoe import TokenMoE, VMoE

_FAMILY_CLASS = {"vit": VisionTransformer, "vmoe": VMoE, "mvmoe": MobileVMoE}


def build_model(cfg: ModelConfig) -> nn.Module:
    """Instantiate the model family named by `cfg.family`."""
    return _FAMILY_CLASS[cfg.family](cfg)


def create_model(name: str, num_classes: int = 10, img_size: int = 28, in_chans: int = 1, **overrides) -> nn.Module:
    """A model from a preset name plus any `ModelConfig` field as an override.

    Raises ValueError for unknown names, unknown fields or invalid combinations.
    """
    fields = parse_preset(name)
    known = set(ModelConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown model option(s) {unknown}; valid options: {sorted(known)}")
    clash = sorted(k for k in fields if k in overrides and overrides[k] != fields[k])
    if clash:
        raise ValueError(f"{clash} contradict preset {name!r}; choose another preset instead")
    fields.update(num_classes=num_classes, img_size=img_size, in_chans=in_chans)
    fields.update(overrides)
    return build_model(ModelConfig(**fields))


__all__ = [
    "ModelConfig", "ModelOutput", "RoutingRecord", "VisionTransformer", "VMoE", "MobileVMoE",
    "TokenMoE", "ImageMoE", "ImageRouter", "ImageDecision", "Router", "TokenRouting", "route_tokens", "capacity", "capacity_rule",
    "weigh_aux_losses",
    "build_model", "create_model", "parse_preset", "paper_grid_presets",
]
