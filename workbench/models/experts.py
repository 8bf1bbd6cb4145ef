"""Experts: E feed-forward MLPs stored as stacked weights, run only where routed.

The weights are stacked (E x ...) so that an MoE layer holds exactly the
parameters of E dense `Mlp`s (expert e's fc1 weight equals a dense fc1.weight
in shape and layout), and a dense checkpoint can seed every expert.
Dispatch is index-based: assignments are sorted by expert and each expert runs
once on its own contiguous slice. Nothing is computed for experts that were
not chosen, and there is no tokens x E x capacity one-hot tensor.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class Experts(nn.Module):
    """E expert MLPs (Linear -> GELU -> Linear) with stacked parameters."""

    def __init__(self, num_experts: int, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.num_experts = num_experts
        self.dropout = dropout   # expert dropout (V-MoE), placed as in the dense Mlp
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, hidden))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, dim))
        nn.init.trunc_normal_(self.fc1_weight, std=0.02)
        nn.init.trunc_normal_(self.fc2_weight, std=0.02)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e on x (..., D)."""
        h = F.dropout(F.gelu(F.linear(x, self.fc1_weight[e], self.fc1_bias[e])), self.dropout, self.training)
        return F.dropout(F.linear(h, self.fc2_weight[e], self.fc2_bias[e]), self.dropout, self.training)

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                kept: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Sum over each item's kept choices c of weights[:, c] * expert_c(x[item]).

        x: (N, ...) items (tokens (N, D) or whole images (N, T, D));
        experts, weights, kept: (N, k) choices, combine weights, and which
        choices survived capacity (None: all). Items with no kept choice come
        back as zeros, so the residual carries them unchanged.
        """
        if torch.compiler.is_exporting():
            return self.forward_gathered(x, experts, weights, kept)
        N, k = experts.shape
        if N * k == 1 and kept is None:
            # one item, one choice (a per-image MoE at batch 1, the mobile case): run that expert
            # directly; no sort, gather or scatter around a single call
            y = self.expert(int(experts.reshape(())), x)
            return y.to(x.dtype) * weights.reshape(()).to(x.dtype)
        assignment = torch.arange(N * k, device=x.device)              # item * k + choice
        if kept is not None:
            assignment = assignment[kept.reshape(-1)]
        chosen = experts.reshape(-1)[assignment]
        order = torch.argsort(chosen, stable=True)
        assignment = assignment[order]
        counts = torch.bincount(chosen, minlength=self.num_experts).tolist()
        # gather every routed item once, then run each expert on its contiguous slice
        routed = x.index_select(0, assignment // k)
        outputs = [self.expert(e, part) for e, part in enumerate(routed.split(counts)) if part.shape[0]]
        y = torch.cat(outputs) if outputs else routed
        y = y.to(x.dtype) * weights.reshape(-1)[assignment].view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
        # NOTE: write into a (N * k) buffer and sum over k instead of index_add_:
        # each slot is written once, so the sum is deterministic on every device
        # (CUDA's index_add_ uses atomics). On the 2-core CPU the two are at parity
        # (index_add_ 3-6 % faster; `python -m benchmarks`, per-token dispatch rows).
        buffer = x.new_zeros((N * k, *x.shape[1:]))
        buffer[assignment] = y
        buffer = buffer.view(N, k, *x.shape[1:])
        return buffer[:, 0] if k == 1 else buffer.sum(1)

    def forward_gathered(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                         kept: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The same sum as `forward`, with each item's experts' weights gathered: no data-dependent shapes.

        Used while exporting (ONNX, torch.export): every expert's weights stay in
        the graph and the router's choice indexes them at run time, so nothing
        is specialised to the example input. Whole images (per-image MoE): each
        image gathers its k experts' weights and runs only them. Single tokens
        (per-token MoE): gathering two experts' weights per token would copy
        k x 2 x hidden x width floats per token (30 GB for 256 images of 50
        tokens at 12x192, which onnxruntime did run out of memory on), so every
        expert runs on every token instead and the gates (zero for unchosen or
        dropped choices) combine them: E/k times the MLP arithmetic, memory
        tokens x E x hidden.
        """
        N, k = experts.shape
        w = weights.to(x.dtype) if kept is None else weights.to(x.dtype) * kept.to(x.dtype)
        if x.dim() == 2:                                                       # (N, D) tokens
            gate = (F.one_hot(experts, self.num_experts).to(x.dtype) * w[:, :, None]).sum(1)   # (N, E)
            h = F.gelu(torch.einsum("nd,ehd->neh", x, self.fc1_weight) + self.fc1_bias)
            y = torch.einsum("neh,edh->ned", h, self.fc2_weight) + self.fc2_bias
            return torch.einsum("ne,ned->nd", gate, y)
        # whole images, computed transposed (W @ x^T) so that the gathered weights are used as stored:
        # only the activations are transposed. Batched MatMul rather than Einsum: in onnxruntime the
        # per-image 12x192 model went from 1.19x to 1.04x the dense model's time at batch 256
        # (1.14x -> 1.08x at batch 1; `python -m benchmarks --only latency`).
        items_t = x.reshape(N, 1, -1, x.shape[-1]).transpose(-1, -2)                       # (N, 1, D, S)
        h = torch.matmul(self.fc1_weight[experts], items_t) + self.fc1_bias[experts][..., None]   # (N, k, H, S)
        y = torch.matmul(self.fc2_weight[experts], F.gelu(h)) + self.fc2_bias[experts][..., None]  # (N, k, D, S)
        return (y * w[:, :, None, None]).sum(1).transpose(-1, -2).reshape(x.shape)
