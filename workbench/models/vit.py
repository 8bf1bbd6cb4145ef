"""Dense Vision Transformer, the baseline and the skeleton of both MoE families.

Papers:
- "An Image is Worth 16x16 Words" (Dosovitskiy et al., 2021): pre-norm ViT with
  a class token and learned position embeddings.
- "Training data-efficient image transformers" (Touvron et al., 2021): the
  ViT-Tiny shape (12 blocks, width 192, 3 heads).

The MoE families subclass `VisionTransformer` and override `forward_blocks`;
a `Block` takes its MLP as an argument, so an expert layer drops in without
forking the block.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig


@dataclass
class ModelOutput:
    """What `model(x, return_routing=True)` returns."""

    logits: torch.Tensor
    aux_loss: dict = field(default_factory=dict)   # name -> weighted scalar loss
    routing: list = field(default_factory=list)    # one RoutingRecord per MoE block
    features: Optional[torch.Tensor] = None        # final class-token features (B, D)

    @property
    def total_aux_loss(self) -> torch.Tensor:
        if not self.aux_loss:
            return self.logits.new_zeros(())
        return sum(self.aux_loss.values())


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens with a strided convolution."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    """The dense feed-forward layer: Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; `mlp` is a dense `Mlp` or an expert layer."""

    def __init__(self, dim: int, num_heads: int, mlp: nn.Module):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The attention half: x + attn(norm1(x))."""
        return x + self.attn(self.norm1(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attend(x)
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """Dense ViT. Subclasses replace some MLPs by experts (see vmoe.py, mvmoe.py)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, D))
        moe = set(cfg.moe_block_indices())
        self.blocks = nn.ModuleList(
            Block(D, cfg.heads, self.make_mlp(i) if i in moe else Mlp(D, cfg.mlp_hidden)) for i in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, cfg.num_classes)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def make_mlp(self, block_index: int) -> nn.Module:
        raise NotImplementedError  # only MoE subclasses place experts

    @property
    def moe_block_indices(self) -> list[int]:
        return self.cfg.moe_block_indices()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != (self.cfg.in_chans, self.cfg.img_size, self.cfg.img_size):
            raise ValueError(
                f"expected input (B, {self.cfg.in_chans}, {self.cfg.img_size}, {self.cfg.img_size}), "
                f"got {tuple(x.shape)}"
            )
        tokens = self.patch_embed(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        return torch.cat([cls, tokens], dim=1) + self.pos_embed

    def forward_blocks(self, x: torch.Tensor, labels: Optional[torch.Tensor]):
        """Run all blocks -> (tokens, routing records, aux losses). Dense: no routing."""
        for blk in self.blocks:
            x = blk(x)
        return x, [], {}

    def forward(self, x: torch.Tensor, return_routing: bool = False, labels: Optional[torch.Tensor] = None):
        """Logits, or a `ModelOutput` with aux losses and routing when `return_routing`.

        `labels` (class indices) let a super-class-guided router compute its loss.
        """
        tokens, routing, aux = self.forward_blocks(self.embed(x), labels)
        features = self.norm(tokens)[:, 0]
        logits = self.head(features)
        if not return_routing:
            return logits
        return ModelOutput(logits=logits, aux_loss=aux, routing=routing, features=features)

    def set_routing(self, **settings) -> None:
        """Inference-time routing overrides (k, capacity, BPR, disabled experts)."""
        raise ValueError(f"{self.cfg.family} model has no router to adjust")


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
