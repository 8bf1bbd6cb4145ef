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

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .experts import Experts
from .routing import Router, RoutingRecord, TokenRouting
from .vit import VisionTransformer


@dataclass
class ImageDecision:
    """One per-image routing decision, shared by the MoE blocks it serves."""

    router_input: torch.Tensor          # (B, D) the per-image summary the router read
    routing: TokenRouting               # the routing of the B images as one group, no capacity

    @property
    def logits(self) -> torch.Tensor:   # (B, E)
        return self.routing.logits[0]

    @property
    def probs(self) -> torch.Tensor:    # (B, E)
        return self.routing.probs[0]

    @property
    def experts(self) -> torch.Tensor:  # (B, k)
        return self.routing.expert_index[0]

    @property
    def gates(self) -> torch.Tensor:    # (B, k)
        return self.routing.gates[0]


class ImageRouter(nn.Module):
    """One routing decision per image, from the mean patch token or the class token."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.router_input = cfg.router_input
        self.norm = nn.LayerNorm(cfg.width)
        # a super-class-guided router learns from its labels and needs no exploration noise
        noise = 0.0 if cfg.superclasses is not None else cfg.noise
        self.router = Router(cfg.width, cfg.num_experts, cfg.top_k, noise, cfg.disabled_experts,
                             renormalize=cfg.renormalize_gates)

    def summarize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) tokens -> (B, D) per-image summary."""
        return x[:, 1:].mean(1) if self.router_input == "mean" else x[:, 0]

    def forward(self, x: torch.Tensor) -> ImageDecision:
        """(B, T, D) tokens entering the block -> the images' decision (the batch is one group)."""
        # with fp32 routers, the summary and its norm run in fp32 too: only the backbone rounds
        fp32 = self.router.fp32
        with torch.autocast(x.device.type, enabled=False) if fp32 else contextlib.nullcontext():
            summary = self.summarize(x.float() if fp32 else x)
            return ImageDecision(summary, self.router(self.norm(summary)[None], capacity_factor=None))


class ImageMoE(nn.Module):
    """An MoE MLP layer that runs each image through the experts its decision chose."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.experts = Experts(cfg.num_experts, cfg.width, cfg.mlp_hidden, cfg.mlp_dropout)

    def forward(self, x: torch.Tensor, decision: ImageDecision):
        """x: (B, T, D) -> (out, RoutingRecord, {}): whole images grouped by expert.
        The decision's losses belong to its router; the model counts them once."""
        if decision is None:
            raise ValueError("a per-image MoE layer needs the routing decision made before its block")
        out = self.experts(x, decision.experts, decision.gates)
        record = RoutingRecord(
            layer=self.layer, kind="image", experts=decision.experts, kept=torch.ones_like(decision.experts, dtype=torch.bool),
            gates=decision.gates, probs=decision.probs, logits=decision.logits, router_input=decision.router_input,
        )
        return out, record, {}


class MobileVMoE(VisionTransformer):
    """ViT with per-image MoE blocks at `cfg.moe_layers` (default: the last 2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self._moe_blocks = self.moe_block_indices
        n_routers = len(self._moe_blocks) if cfg.per_layer_routers else 1
        self.routers = nn.ModuleList(ImageRouter(cfg) for _ in range(n_routers))
        if cfg.superclasses is not None:
            self.register_buffer("superclass_of", torch.tensor(cfg.superclasses, dtype=torch.long), persistent=False)
        else:
            self.superclass_of = None

    def make_mlp(self, block_index: int) -> nn.Module:
        return ImageMoE(self.cfg, block_index)

    def decide(self, block_index: int, x: torch.Tensor, previous, labels: Optional[torch.Tensor]) -> tuple:
        """The router reads the residual stream entering an MoE block: for the shared router,
        the output of the last dense block. Later blocks reuse that decision."""
        if block_index not in self._moe_blocks or (previous is not None and not self.cfg.per_layer_routers):
            return previous, {}
        router = self.routers[self._moe_blocks.index(block_index) if self.cfg.per_layer_routers else 0]
        decision = router(x)
        return decision, self.router_losses(decision, labels)

    def superclass_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Class indices (B,) -> super-class indices; class probabilities (B, C), e.g. mixup's
        blend of two images' labels -> super-class probabilities (B, E), the same blend."""
        if labels.dim() == 1:
            return self.superclass_of[labels]
        onehot = F.one_hot(self.superclass_of, self.cfg.num_experts).to(labels.dtype)   # (C, E)
        return labels @ onehot

    def router_losses(self, decision: ImageDecision, labels: Optional[torch.Tensor]) -> dict:
        """Super-class guided: CE(router logits, super-class of the label) (needs labels).
        End to end: V-MoE's balancing losses over the batch."""
        if self.superclass_of is not None:
            if labels is None:
                return {}
            return {"superclass": F.cross_entropy(decision.logits, self.superclass_targets(labels))}
        losses = {"importance": decision.routing.importance_loss.mean()}
        if decision.routing.load_loss is not None:
            losses["load"] = decision.routing.load_loss.mean()
        return losses
