"""Experts: E feed-forward MLPs stored as stacked weights, run only where routed.

The weights are stacked (E x ...) so that an MoE layer holds exactly the
parameters of E dense `Mlp`s (expert e's fc1 weight equals a dense fc1.weight
in shape and layout), and a dense checkpoint can seed every expert.
Dispatch is index-based: assignments are sorted by expert and each expert runs
once on its own contiguous slice. Nothing is computed for experts that were
not chosen, and there is no tokens x E x capacity one-hot tensor.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Experts(nn.Module):
    """E expert MLPs (Linear -> GELU -> Linear) with stacked parameters."""

    def __init__(self, num_experts: int, dim: int, hidden: int):
        super().__init__()
        self.num_experts = num_experts
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, hidden))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, dim))
        nn.init.trunc_normal_(self.fc1_weight, std=0.02)
        nn.init.trunc_normal_(self.fc2_weight, std=0.02)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on x (..., D)."""
        h = F.gelu(F.linear(x, self.fc1_weight[e], self.fc1_bias[e]))
        return F.linear(h, self.fc2_weight[e], self.fc2_bias[e])

    def forward(self, x: torch.Tensor, rows: torch.Tensor, experts: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
        """Sum over assignments of weight * expert(x[row]).

        x: (N, ...) rows (tokens (N, D) or whole images (N, T, D));
        rows, experts, weights: (A,) one entry per kept assignment.
        Rows with no assignment come back as zeros (the residual carries them).
        """
        order = torch.argsort(experts, stable=True)
        rows, weights = rows[order], weights[order]
        counts = torch.bincount(experts, minlength=self.num_experts).tolist()
        out = torch.zeros_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            r = rows[start:start + n]
            w = weights[start:start + n].view(-1, *([1] * (x.dim() - 1)))
            y = self.expert(e, x.index_select(0, r)) * w
            out.index_add_(0, r, y.to(out.dtype))
            start += n
        return out
