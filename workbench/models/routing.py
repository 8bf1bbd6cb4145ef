"""Routers: which item (token or image) goes to which expert, and with what weight.

Implements the noisy top-k router of V-MoE (Riquelme et al., 2021, §2.2 and
appendix A) and the per-image router of Mobile V-MoE (Daxberger et al., 2023,
§2.2). Routing is kept apart from the experts (experts.py: what they compute)
and from the block that moves items (vmoe.py / mvmoe.py), so each can be read
and tested alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class RoutingRecord:
    """Everything one MoE block decided, for analysis and the app.

    Shapes use `...` for the routed items: (B,) for per-image, (B, T) for
    per-token routing. `experts`/`gates` are the top-k choices *before*
    capacity; `kept` says which survived capacity (always True per image).
    """

    layer: int                      # block index
    kind: str                       # "image" | "token"
    logits: torch.Tensor            # (..., E) router logits (noisy in training)
    probs: torch.Tensor             # (..., E) softmax over enabled experts
    experts: torch.Tensor           # (..., k) chosen experts, best first
    gates: torch.Tensor             # (..., k) combine weights = probs at the choices
    kept: torch.Tensor              # (..., k) bool, after capacity
    capacity: Optional[int] = None  # per-expert buffer of a full group (token routing)
    router_input: Optional[torch.Tensor] = None  # (B, D) per-image summary the router read

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    @property
    def dropped_assignments(self) -> int:
        """(item, choice) pairs removed by capacity."""
        return int((~self.kept).sum())

    @property
    def dropped_tokens(self) -> int:
        """Items that lost every choice: they skip the layer through the residual."""
        return int((~self.kept.any(-1)).sum())


def cv_squared(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation of a vector (0 when perfectly balanced)."""
    x = x.float()
    return x.var(unbiased=False) / (x.mean() ** 2 + eps)


def importance_loss(probs: torch.Tensor) -> torch.Tensor:
    """CV^2 of per-expert summed gates (V-MoE eq. 5). probs: (N, E)."""
    return cv_squared(probs.sum(0))


def load_loss(clean_logits: torch.Tensor, noisy_logits: torch.Tensor, noise_std: float, k: int) -> torch.Tensor:
    """CV^2 of each expert's probability of being selected under the noise (V-MoE appendix A).

    Why noise is needed: selection itself is not differentiable; the noise turns
    "is expert e in the top-k" into a smooth probability of the clean logit
    beating the k-th largest noisy logit.
    """
    threshold = noisy_logits.topk(k, dim=-1).values[..., -1:]           # (N, 1) k-th largest noisy logit
    z = (threshold - clean_logits) / noise_std                          # noise needed to win
    p = 1.0 - torch.distributions.Normal(0.0, 1.0).cdf(z.float())       # (N, E)
    return cv_squared(p.mean(0))


class Router(nn.Module):
    """Noisy top-k router on (N, D) items: bias-free linear -> (noise) -> softmax -> top-k.

    Gates are the softmax probabilities at the chosen experts, not
    renormalised over the top-k (as in V-MoE). Disabled experts get -inf
    logits, so the softmax renormalises over the remaining ones.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, noise_std: float,
                 disabled_experts: Sequence[int] = ()):
        super().__init__()
        self.proj = nn.Linear(dim, num_experts, bias=False)
        self.num_experts = num_experts
        self.top_k = top_k
        self.noise_std = noise_std
        self.register_buffer("disabled", torch.zeros(num_experts, dtype=torch.bool), persistent=False)
        self.set_disabled(disabled_experts)

    def set_disabled(self, experts: Sequence[int]) -> None:
        experts = sorted(set(int(e) for e in experts))
        if any(not 0 <= e < self.num_experts for e in experts):
            raise ValueError(f"disabled experts must be in 0..{self.num_experts - 1}, got {experts}")
        if self.num_experts - len(experts) < self.top_k:
            raise ValueError(f"disabling {experts} leaves fewer than top_k={self.top_k} experts")
        self.disabled.zero_()
        self.disabled[experts] = True

    def set_top_k(self, k: int) -> None:
        if not self.num_experts - int(self.disabled.sum()) >= k >= 1:
            raise ValueError(f"num_experts (enabled) >= top_k >= 1, but got top_k={k}")
        self.top_k = k

    def forward(self, x: torch.Tensor, add_noise: bool):
        """x: (N, D) -> dict with logits, noisy logits, probs, experts, gates, aux losses."""
        clean = self.proj(x).float()                                   # router math in fp32
        clean = clean.masked_fill(self.disabled, float("-inf"))         # no branch on data: exportable
        noisy = clean
        if add_noise and self.noise_std > 0:
            noisy = clean + self.noise_std * torch.randn_like(clean)
        # NOTE: dispatch uses the softmax of the *noisy* logits in training (V-MoE);
        # the importance loss uses the clean ones.
        probs = noisy.softmax(-1)
        gates, experts = probs.topk(self.top_k, dim=-1)
        aux = {"importance": importance_loss(clean.softmax(-1))}
        if add_noise and self.noise_std > 0:
            enabled = ~self.disabled
            aux["load"] = load_loss(clean[:, enabled], noisy[:, enabled], self.noise_std, self.top_k)
        return {"logits": noisy, "probs": probs, "experts": experts, "gates": gates, "aux": aux}


def assign_capacity(experts: torch.Tensor, gates: torch.Tensor, group: torch.Tensor, num_experts: int,
                    group_capacity: torch.Tensor, batch_priority: bool) -> torch.Tensor:
    """Which (token, choice) assignments fit in their expert's buffer.

    experts, gates: (N, k) top-k choices of N tokens; group: (N,) routing group
    of each token (tokens of a group are contiguous and in position order);
    group_capacity: (G,) buffer size per expert in each group.

    Priority inside a group: every 1st choice before any 2nd choice; within a
    choice rank, tokens in position order (vanilla) or by their top-1 gate,
    highest first (Batch Priority Routing; stable, earlier token wins ties).
    The same token order is used for every choice rank, and a dropped 1st
    choice does not promote the 2nd. Returns kept: (N, k) bool.
    """
    N, k = experts.shape
    device = experts.device
    pos = torch.arange(N, device=device)
    # rank of each token inside its group, in priority order
    if batch_priority:
        order = torch.argsort(-gates[:, 0].float(), stable=True)
        order = order[torch.argsort(group[order], stable=True)]     # group-major, gate-descending
    else:
        order = pos                                                  # already group-major, position order
    group_start = torch.zeros(int(group.max()) + 2, dtype=torch.long, device=device)
    group_start[1:].copy_(torch.bincount(group, minlength=int(group.max()) + 1).cumsum(0))
    rank = torch.empty_like(pos)
    rank[order] = pos - group_start[group[order]]
    # priority key of assignment (token, choice): choice-major, then token rank
    prio = torch.arange(k, device=device) * N + rank[:, None]                      # (N, k)
    segment = group[:, None] * num_experts + experts                             # (N, k) one buffer per (group, expert)
    key = segment.reshape(-1) * (k * N) + prio.reshape(-1)
    perm = torch.argsort(key)
    seg_sorted = segment.reshape(-1)[perm]
    counts = torch.bincount(seg_sorted, minlength=int(segment.max()) + 1)
    starts = counts.cumsum(0) - counts
    slot = torch.empty_like(perm)
    slot[perm] = torch.arange(perm.numel(), device=device) - starts[seg_sorted]   # position in the buffer
    cap = group_capacity[group][:, None].expand(N, k).reshape(-1)
    return (slot < cap).view(N, k)
