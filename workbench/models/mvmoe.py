"""Mobile V-MoE: per-image sparse Mixture-of-Experts ViT.

Paper: Daxberger et al., "Mobile V-MoEs: Scaling Down Vision Transformers via
Sparse Mixture-of-Experts", arXiv 2309.04354 (2023), §2.2.
Dense blocks come first; one router reads a summary of the whole image (the
output of the last dense block) and picks k experts that the image uses in
every MoE block. The router is trained to predict the image's *super-class*
(groups of classes found by clustering the dense model's confusion graph),
which keeps experts balanced and semantically specialised:
L = L_cls + lambda * CE(router_logits, superclass). Without a super-class map
the router is trained end to end with V-MoE's balancing losses (ablation).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .experts import Experts
from .routing import Router, RoutingRecord
from .vit import VisionTransformer


class ImageRouter(nn.Module):
    """One routing decision per image, from the mean patch token or the class token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.router_input = cfg.router_input
        self.norm = nn.LayerNorm(cfg.width)
        # a super-class-guided router learns from its labels and needs no exploration noise
        noise = 0.0 if cfg.superclasses is not None else cfg.noise
        self.router = Router(cfg.width, cfg.num_experts, cfg.top_k, noise, cfg.disabled_experts)

    def summarize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) tokens -> (B, D) per-image summary."""
        return x[:, 1:].mean(1) if self.router_input == "mean" else x[:, 0]

    def forward(self, x: torch.Tensor):
        summary = self.summarize(x)
        return summary, self.router(self.norm(summary), add_noise=self.training)


class ImageMoE(nn.Module):
    """An MoE MLP layer that runs each image through its router-chosen experts."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.experts = Experts(cfg.num_experts, cfg.width, cfg.mlp_hidden)

    def forward(self, x: torch.Tensor, experts: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D); experts, gates: (B, k). Groups whole images by expert."""
        return self.experts(x, experts, gates)


class MobileVMoE(VisionTransformer):
    """ViT with per-image MoE blocks at `cfg.moe_layers` (default: the last 2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        n_routers = len(self.moe_block_indices) if cfg.per_layer_routers else 1
        self.routers = nn.ModuleList(ImageRouter(cfg) for _ in range(n_routers))
        if cfg.superclasses is not None:
            self.register_buffer("superclass_of", torch.tensor(cfg.superclasses, dtype=torch.long), persistent=False)
        else:
            self.superclass_of = None

    def make_mlp(self, block_index: int) -> nn.Module:
        return ImageMoE(self.cfg)

    def forward_blocks(self, x: torch.Tensor, labels: Optional[torch.Tensor]):
        cfg = self.cfg
        routing, router_losses, balance = [], [], {}
        decision = None
        for i, blk in enumerate(self.blocks):
            if not isinstance(blk.mlp, ImageMoE):
                x = blk(x)
                continue
            if decision is None or cfg.per_layer_routers:
                # the router reads the residual stream entering this block:
                # for the shared router, the output of the last dense block
                summary, decision = self.routers[len(routing) if cfg.per_layer_routers else 0](x)
                if self.superclass_of is not None and labels is not None:
                    router_losses.append(F.cross_entropy(decision["logits"], self.superclass_of[labels]))
                elif self.superclass_of is None:
                    for name, value in decision["aux"].items():
                        balance[name] = balance.get(name, 0.0) + value
            x = blk.attend(x)
            x = x + blk.mlp(blk.norm2(x), decision["experts"], decision["gates"])
            routing.append(RoutingRecord(
                layer=i, kind="image", logits=decision["logits"], probs=decision["probs"],
                experts=decision["experts"], gates=decision["gates"],
                kept=torch.ones_like(decision["experts"], dtype=torch.bool), router_input=summary,
            ))
        aux = {}
        if router_losses:
            aux["superclass"] = cfg.superclass_loss_weight * torch.stack(router_losses).mean()
        if "importance" in balance:
            aux["importance"] = cfg.importance_loss_weight * balance["importance"]
        if "load" in balance:
            aux["load"] = cfg.load_loss_weight * balance["load"]
        return x, routing, aux

    def set_routing(self, top_k: Optional[int] = None, disabled_experts: Optional[Sequence[int]] = None,
                    **unknown) -> None:
        """Change k or disable experts without retraining (capacity does not apply per image)."""
        unknown = {n: v for n, v in unknown.items() if v is not None}
        if unknown:
            raise ValueError(f"per-image models cannot set {sorted(unknown)} (no capacity or token priority)")
        for r in self.routers:
            if disabled_experts is not None:
                r.router.set_disabled(disabled_experts)
            if top_k is not None:
                r.router.set_top_k(top_k)
        if top_k is not None:
            self.cfg.top_k = top_k
        if disabled_experts is not None:
            self.cfg.disabled_experts = sorted(set(int(e) for e in disabled_experts))
