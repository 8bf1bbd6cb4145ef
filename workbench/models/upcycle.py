"""Starting a model from another model's tensors: the dense twin (real pairing) and sparse upcycling.

- `paired_model(cfg, seed)`: the model a run of seed `seed` starts from. A MoE starts from exactly
  the initial weights of its *dense twin* (the dense ViT of the same shape built with the same
  seed) for every tensor they share: patch and position embeddings, class token, attention, norms,
  the dense MLPs, the head. Only the experts and the routers are new. A paired difference between
  a MoE and its twin then measures the MoE, not two draws of the shared weights.
- `upcycle(parent, cfg, seed)`: sparse upcycling (Komatsuzaki et al., "Sparse Upcycling: Training
  Mixture-of-Experts from Dense Checkpoints", ICLR 2023; google-research/vmoe's
  `initialization/` rules): a MoE from a *trained* dense model of the same shape. Every shared
  tensor is copied, every expert of a MoE block starts as that block's dense MLP, and the router
  is new. With one expert forced (or k = 1 and `renormalize_gates`) and a gate of 1, the MoE
  computes exactly what its parent computes. A dense `cfg` continues the parent: every tensor copied.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import ModelConfig

# ModelConfig fields a dense twin / an upcycling parent must share with the MoE
SHAPE_FIELDS = ("img_size", "patch_size", "in_chans", "num_classes", "depth", "width", "mlp_ratio")
# stacked expert tensor <- the dense Mlp tensor each expert copies
_EXPERT_FROM_MLP = {"fc1_weight": "fc1.weight", "fc1_bias": "fc1.bias", "fc2_weight": "fc2.weight",
                    "fc2_bias": "fc2.bias"}


def dense_twin(cfg: ModelConfig) -> ModelConfig:
    """The dense ViT of `cfg`'s shape (same heads and MLP dropout): what a MoE is paired with."""
    return ModelConfig(family="vit", num_heads=cfg.heads, mlp_dropout=cfg.mlp_dropout,
                       **{f: getattr(cfg, f) for f in SHAPE_FIELDS})


def shared_names(dense: nn.Module, model: nn.Module) -> list[str]:
    """Names of the tensors `model` has exactly as the dense model has them (name and shape)."""
    theirs = dense.state_dict()
    return [n for n, t in model.state_dict().items() if n in theirs and theirs[n].shape == t.shape]


def paired_model(cfg: ModelConfig, seed: int) -> nn.Module:
    """The model of `cfg` as a run of `seed` initialises it: a dense model as always
    (`torch.manual_seed(seed)`, then build), a MoE with every tensor it shares with its dense
    twin taken from the twin built with the same seed."""
    from . import build_model

    torch.manual_seed(seed)
    if not cfg.is_moe:
        return build_model(cfg)
    twin = build_model(dense_twin(cfg))
    model = build_model(cfg)              # the experts and routers: the next draws of the same seed
    _copy(twin.state_dict(), model, shared_names(twin, model))
    return model


def check_parent(parent: ModelConfig, cfg: ModelConfig) -> None:
    """A dense parent of `cfg`'s shape, or ValueError naming what differs."""
    if parent.family != "vit":
        raise ValueError(f"--init-from: the parent must be a dense ViT, got a {parent.family} model")
    differ = [f"{f} {getattr(parent, f)} (parent) vs {getattr(cfg, f)}" for f in SHAPE_FIELDS + ("heads",)
              if getattr(parent, f) != getattr(cfg, f)]
    if differ:
        raise ValueError("--init-from: the parent's shape differs from the model's: " + "; ".join(differ))


def upcycle(parent: nn.Module, cfg: ModelConfig, seed: int) -> nn.Module:
    """The model of `cfg` started from the trained dense `parent` (see the module docstring); the
    router (the only new tensors) is drawn as a run of `seed` would draw it."""
    check_parent(parent.cfg, cfg)
    model = paired_model(cfg, seed)
    weights = parent.state_dict()
    _copy(weights, model, shared_names(parent, model))
    if cfg.is_moe:
        experts = {}
        for i in cfg.moe_block_indices():
            for stacked, dense in _EXPERT_FROM_MLP.items():
                source = weights[f"blocks.{i}.mlp.{dense}"]
                experts[f"blocks.{i}.mlp.experts.{stacked}"] = source.expand(cfg.num_experts, *source.shape)
        _copy(experts, model, list(experts))
    return model


def _copy(source: dict, model: nn.Module, names: list) -> None:
    state = model.state_dict()
    with torch.no_grad():
        for n in names:
            state[n].copy_(source[n])

