"""V-MoE: per-token sparse Mixture-of-Experts ViT.

Paper: Riquelme et al., "Scaling Vision with Sparse Mixture of Experts",
NeurIPS 2021. Each token picks its top-k experts with a noisy router; every
expert has a fixed buffer (capacity) per routing group, and tokens over it
are dropped for that expert and carried by the residual. Batch Priority
Routing (BPR) fills buffers by router confidence instead of position.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from .config import ModelConfig, capacity
from .experts import Experts
from .routing import Router, RoutingRecord, assign_capacity
from .vit import VisionTransformer


class TokenMoE(nn.Module):
    """An MoE MLP layer with a per-token router (V-MoE §2.2)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.router = Router(cfg.width, cfg.num_experts, cfg.top_k, cfg.noise, cfg.disabled_experts)
        self.experts = Experts(cfg.num_experts, cfg.width, cfg.mlp_hidden)
        self.capacity_ratio = cfg.capacity_ratio
        self.eval_capacity_ratio = cfg.eval_capacity_ratio
        self.batch_priority = cfg.batch_priority
        self.group_size = cfg.group_size

    def route(self, x: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """x: (B, T, D) -> (router output on the B*T tokens, which (token, choice) fit capacity)."""
        B, T, D = x.shape
        E, k = self.router.num_experts, self.router.top_k
        r = self.router(x.reshape(B * T, D), add_noise=self.training)
        # routing groups: `group_size` consecutive images share each expert's buffer
        image = torch.arange(B, device=x.device).repeat_interleave(T)
        group = image // self.group_size
        ratio = self.capacity_ratio if self.training else self.eval_capacity_ratio
        # same rule as config.capacity, vectorised over groups (the last one may be smaller)
        group_cap = (k * ratio * torch.bincount(group).double() / E).ceil().clamp(min=1).long()
        return r, assign_capacity(r["experts"], r["gates"], group, E, group_cap, self.batch_priority)

    def forward(self, x: torch.Tensor):
        """x: (B, T, D) -> (out (B, T, D), RoutingRecord, aux losses)."""
        B, T, D = x.shape
        E, k = self.router.num_experts, self.router.top_k
        flat = x.reshape(B * T, D)
        r, kept = self.route(x)
        ratio = self.capacity_ratio if self.training else self.eval_capacity_ratio
        out = self.experts(flat, r["experts"], r["gates"], kept)
        record = RoutingRecord(
            layer=self.layer, kind="token",
            logits=r["logits"].view(B, T, E), probs=r["probs"].view(B, T, E),
            experts=r["experts"].view(B, T, k), gates=r["gates"].view(B, T, k), kept=kept.view(B, T, k),
            capacity=capacity(self.group_size * T, E, k, ratio),
        )
        return out.view(B, T, D), record, r["aux"]


class VMoE(VisionTransformer):
    """ViT whose MLPs at `cfg.moe_layers` are per-token MoE layers."""

    def make_mlp(self, block_index: int) -> nn.Module:
        return TokenMoE(self.cfg, block_index)

    def forward_blocks(self, x: torch.Tensor, labels: Optional[torch.Tensor]):
        routing, aux = [], {}
        imp_w, load_w = self.cfg.importance_loss_weight, self.cfg.load_loss_weight
        for blk in self.blocks:
            if not isinstance(blk.mlp, TokenMoE):
                x = blk(x)
                continue
            x = blk.attend(x)
            y, record, losses = blk.mlp(blk.norm2(x))
            x = x + y
            routing.append(record)
            for name, w in (("importance", imp_w), ("load", load_w)):
                if name in losses:
                    aux[name] = aux.get(name, 0.0) + w * losses[name]
        return x, routing, aux

    def set_routing(self, top_k: Optional[int] = None, eval_capacity_ratio: Optional[float] = None,
                    batch_priority: Optional[bool] = None, disabled_experts: Optional[Sequence[int]] = None,
                    **unknown) -> None:
        """Change k, the eval capacity ratio, BPR or disabled experts without retraining."""
        if unknown:
            raise ValueError(f"per-token models cannot set {sorted(unknown)}")
        if eval_capacity_ratio is not None and eval_capacity_ratio <= 0:
            raise ValueError(f"eval_capacity_ratio must be > 0, got {eval_capacity_ratio}")
        for blk in self.blocks:
            moe = blk.mlp
            if not isinstance(moe, TokenMoE):
                continue
            if disabled_experts is not None:
                moe.router.set_disabled(disabled_experts)
            if top_k is not None:
                moe.router.set_top_k(top_k)
            if eval_capacity_ratio is not None:
                moe.eval_capacity_ratio = float(eval_capacity_ratio)
            if batch_priority is not None:
                moe.batch_priority = bool(batch_priority)
        for name, value in (("top_k", top_k), ("eval_capacity_ratio", eval_capacity_ratio),
                            ("batch_priority", batch_priority)):
            if value is not None:
                setattr(self.cfg, name, value)
        if disabled_experts is not None:
            self.cfg.disabled_experts = sorted(set(int(e) for e in disabled_experts))
