"""V-MoE: per-token sparse Mixture-of-Experts ViT.

Paper: Riquelme et al., "Scaling Vision with Sparse Mixture of Experts",
NeurIPS 2021. Each token picks its top-k experts with a noisy router; every
expert has a fixed buffer (capacity) per routing group, and tokens over it
are dropped for that expert and carried by the residual. Batch Priority
Routing (BPR) fills buffers by router confidence instead of position.
The routing rules themselves live in `routing.route_tokens`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .config import ModelConfig
from .experts import Experts
from .routing import Router, RoutingRecord, TokenRouting, capacity, capacity_rule
from .vit import VisionTransformer


class TokenMoE(nn.Module):
    """An MoE MLP layer with a per-token router (V-MoE §2.2).

    Routing groups: `group_size` consecutive images share each expert's buffer;
    when the batch does not divide into groups, the last group is smaller and
    gets its own (smaller) capacity.
    """

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.router = Router(cfg.width, cfg.num_experts, cfg.top_k, cfg.noise, cfg.disabled_experts,
                             renormalize=cfg.renormalize_gates)
        self.experts = Experts(cfg.num_experts, cfg.width, cfg.mlp_hidden, cfg.mlp_dropout)
        self.group_size = cfg.group_size
        self.capacity_ratio = cfg.capacity_ratio
        # inference-time settings (changed through the model's set_routing)
        self.eval_capacity_ratio = cfg.eval_capacity_ratio
        self.batch_priority = cfg.batch_priority
        self.capacity_multiple_of = cfg.capacity_multiple_of
        self.capacity_ceil_or_round = cfg.capacity_ceil_or_round

    @property
    def ratio(self) -> float:
        """The capacity ratio in force: training C, or the (larger) eval C."""
        return self.capacity_ratio if self.training else self.eval_capacity_ratio

    def capacity(self, images_in_group: Optional[int] = None, tokens_per_image: int = 1) -> int:
        """Per-expert buffer of a group of `images_in_group` images (default: a full group)."""
        S = (images_in_group or self.group_size) * tokens_per_image
        return capacity(S, self.router.num_experts, self.router.k, self.ratio,
                        self.capacity_multiple_of, self.capacity_ceil_or_round)

    def route(self, x: torch.Tensor) -> TokenRouting:
        """x (B, T, D) -> the routing of its B*T tokens, shapes (B, T, ...); losses per group (G,)."""
        B, T, D = x.shape
        options = dict(batch_priority=self.batch_priority, capacity_multiple_of=self.capacity_multiple_of,
                       ceil_or_round=self.capacity_ceil_or_round)
        gs = self.group_size
        full = B - B % gs
        parts = [x[:full].reshape(full // gs, gs * T, D)] if full else []
        if full < B:
            parts.append(x[full:].reshape(1, (B - full) * T, D))
        routed = [self.router(p, self.ratio, **options) for p in parts]
        return _join(routed, B, T)

    def forward(self, x: torch.Tensor, decision=None):
        """x: (B, T, D) -> (out (B, T, D), RoutingRecord, aux losses averaged over groups)."""
        if decision is not None:
            raise ValueError("a per-token MoE layer routes its own tokens; it takes no per-image decision")
        B, T, D = x.shape
        r = self.route(x)
        k = r.expert_index.shape[-1]
        kept = r.kept
        out = self.experts(x.reshape(B * T, D), r.expert_index.reshape(-1, k), r.gates.reshape(-1, k),
                           kept.reshape(-1, k))
        record = RoutingRecord(
            layer=self.layer, kind="token", experts=r.expert_index, kept=kept, gates=r.gates, probs=r.probs,
            logits=r.logits, capacity=self.capacity(tokens_per_image=T), router_input=x[:, 1:].float().mean(1),
        )
        aux = {"importance": r.importance_loss.mean()}
        if r.load_loss is not None:
            aux["load"] = r.load_loss.mean()
        return out.view(B, T, D), record, aux


def _join(parts: list, B: int, T: int) -> TokenRouting:
    """Routings of consecutive groups -> one routing with shapes (B, T, ...) and per-group losses."""
    def cat(name):
        return torch.cat([getattr(p, name).reshape(-1, *getattr(p, name).shape[2:]) for p in parts]).view(B, T, -1)

    loads = [p.load_loss for p in parts]
    return TokenRouting(
        logits=cat("logits"), probs=cat("probs"), expert_index=cat("expert_index"), gates=cat("gates"),
        slot=cat("slot"), capacity=parts[0].capacity,
        importance_loss=torch.cat([p.importance_loss for p in parts]),
        load_loss=None if loads[0] is None else torch.cat(loads),
    )


class VMoE(VisionTransformer):
    """ViT whose MLPs at `cfg.moe_layers` are per-token MoE layers."""

    LAYER_SETTINGS = ("eval_capacity_ratio", "batch_priority", "capacity_multiple_of", "capacity_ceil_or_round")

    def make_mlp(self, block_index: int) -> nn.Module:
        return TokenMoE(self.cfg, block_index)

    def moe_layers(self) -> list:
        return [m for m in self.modules() if isinstance(m, TokenMoE)]

    def capacity_rule(self, top_k: Optional[int] = None, capacity_ratio: Optional[float] = None) -> dict:
        """`routing.capacity_rule` for a full routing group at the current settings (eval capacity
        ratio unless training), optionally at another k or capacity ratio."""
        layer = self.moe_layers()[0]
        return capacity_rule(self.cfg.group_size * (self.cfg.num_patches + 1), self.cfg.num_experts,
                             top_k or layer.router.k, capacity_ratio or layer.ratio, layer.capacity_multiple_of,
                             layer.capacity_ceil_or_round)

    def _layer_settings(self) -> dict:
        first = self.moe_layers()[0]
        return {name: getattr(first, name) for name in self.LAYER_SETTINGS}

    def _apply_layer_settings(self, settings: dict) -> None:
        for layer in self.moe_layers():
            layer.eval_capacity_ratio = float(settings["eval_capacity_ratio"])
            layer.batch_priority = bool(settings["batch_priority"])
            layer.capacity_multiple_of = int(settings["capacity_multiple_of"])
            layer.capacity_ceil_or_round = str(settings["capacity_ceil_or_round"])
