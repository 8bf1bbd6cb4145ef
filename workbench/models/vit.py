"""Dense Vision Transformer, the baseline and the skeleton of both MoE families.

Papers:
- "An Image is Worth 16x16 Words" (Dosovitskiy et al., 2021): pre-norm ViT with
  a class token and learned position embeddings.
- "Training data-efficient image transformers" (Touvron et al., 2021): the
  ViT-Tiny shape (12 blocks, width 192, 3 heads).

The MoE families subclass `VisionTransformer`: they place expert layers
(`make_mlp`) and, per image, make routing decisions before a block (`decide`).
A `Block` takes its MLP layer as an argument and every MLP layer answers the
same call, so dense and MoE blocks run through one loop.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .routing import CEIL_OR_ROUND, Router


@dataclass
class ModelOutput:
    """What `model(x, return_routing=True)` and `model.forward_intermediates(x)` return."""

    logits: Optional[torch.Tensor]                 # None when forward_intermediates stopped early
    aux_loss: dict = field(default_factory=dict)   # name -> weighted scalar loss
    routing: list = field(default_factory=list)    # one RoutingRecord per MoE block that ran
    features: Optional[torch.Tensor] = None        # final class-token features (B, D)
    intermediates: dict = field(default_factory=dict)  # block index -> tokens (B, T, D) after that block

    @property
    def total_aux_loss(self) -> torch.Tensor:
        if not self.aux_loss:
            return self.logits.new_zeros(())
        return sum(self.aux_loss.values())


def weigh_aux_losses(losses: Sequence[dict], cfg: ModelConfig) -> dict:
    """The one place auxiliary losses are weighted: name -> weight * (sum over MoE layers).

    Balancing losses (importance, load) are summed over the layers (routers) that
    report them, as in V-MoE; the super-class loss is averaged over the routers
    that report it (one shared router, or one per block as an ablation), then
    weighted by lambda: L = L_cls + lambda * L_router (Mobile V-MoE).
    """
    weights = {"importance": cfg.importance_loss_weight, "load": cfg.load_loss_weight,
               "superclass": cfg.superclass_loss_weight}
    gathered: dict = {}
    for layer_losses in losses:
        for name, value in layer_losses.items():
            gathered.setdefault(name, []).append(value)
    out = {}
    for name, values in gathered.items():
        total = torch.stack(values).mean() if name == "superclass" else sum(values)
        out[name] = weights[name] * total
    return out


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens with a strided convolution."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection.

    On CPU, for up to `EXPLICIT_MAX_TOKENS` tokens, the attention is written out (two
    matmuls and a softmax): torch's fused CPU kernel has a slow backward that took a
    third of a bf16 training step, and the written-out form trains vit-6x64 1.7x and
    vit-12x192 1.5x faster in bf16 (`python -m benchmarks --only training`). Longer
    sequences (whose T x T scores would not fit) and GPUs use the fused kernel.
    """
    EXPLICIT_MAX_TOKENS = 1024

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        if x.device.type == "cpu" and T <= self.EXPLICIT_MAX_TOKENS:
            x = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    """The dense feed-forward layer: Linear -> GELU -> Linear.

    It answers the MLP-layer call of every block, `(x, decision) -> (y, record, aux)`,
    with no routing record and no auxiliary loss, so a block treats it and an
    expert layer alike.
    """

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = dropout   # after the GELU and after fc2, as timm's Mlp (drop1, drop2)

    def forward(self, x: torch.Tensor, decision=None) -> tuple:
        h = F.dropout(F.gelu(self.fc1(x)), self.dropout, self.training)
        return F.dropout(self.fc2(h), self.dropout, self.training), None, {}


class Block(nn.Module):
    """Pre-norm transformer block; `mlp` is any MLP layer (dense `Mlp`, `TokenMoE`, `ImageMoE`).

    Every MLP layer answers `mlp(x, decision) -> (y, RoutingRecord | None, aux losses)`;
    `decision` is a per-image routing decision made before the block (Mobile V-MoE)
    or None. Like timm's `Block(mlp_layer=...)`, experts drop in without forking the block.
    """

    def __init__(self, dim: int, num_heads: int, mlp: nn.Module):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, decision=None) -> tuple:
        x = x + self.attn(self.norm1(x))
        y, record, aux = self.mlp(self.norm2(x), decision)
        return x + y, record, aux


_KEEP = object()


class VisionTransformer(nn.Module):
    """Dense ViT. Subclasses place experts (`make_mlp`) and, per image, routers (`decide`).

    Public API beyond `forward`: `forward_intermediates` (per-block tokens and routing,
    optionally stopping early), `router_logits` (what a router computed, for
    attributions), `routing_settings` / `set_routing` (inference-time routing state).
    """

    LAYER_SETTINGS: tuple = ()           # per-layer routing settings a subclass exposes (per token)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        self.patch_embed = PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, D))
        moe = set(cfg.moe_block_indices())
        self.blocks = nn.ModuleList(
            Block(D, cfg.heads, self.make_mlp(i) if i in moe else Mlp(D, cfg.mlp_hidden, cfg.mlp_dropout)) for i in range(cfg.depth)
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

    def decide(self, block_index: int, x: torch.Tensor, previous, labels: Optional[torch.Tensor]) -> tuple:
        """A per-image routing decision for block `block_index` from the tokens entering it,
        and its router's (unweighted) losses. Models without per-image routing: (None, {})."""
        return None, {}

    def forward_blocks(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None, keep: Sequence[int] = (),
                       stop_after: Optional[int] = None) -> tuple:
        """Run the blocks -> (tokens, routing records, weighted aux losses, {block: tokens kept})."""
        routing, losses, kept = [], [], {}
        decision = None
        for i, blk in enumerate(self.blocks):
            decision, router_losses = self.decide(i, x, decision, labels)
            x, record, aux = blk(x, decision)
            losses += [d for d in (router_losses, aux) if d]
            if record is not None:
                routing.append(record)
            if i in keep:
                kept[i] = x
            if stop_after is not None and i >= stop_after:
                break
        return x, routing, weigh_aux_losses(losses, self.cfg), kept

    def forward(self, x: torch.Tensor, return_routing: bool = False, labels: Optional[torch.Tensor] = None):
        """Logits, or a `ModelOutput` with aux losses and routing when `return_routing`.

        `labels` (class indices (B,), or class probabilities (B, C) under mixup) let a super-class-guided
        router compute its loss.
        """
        tokens, routing, aux, _ = self.forward_blocks(self.embed(x), labels)
        features = self.norm(tokens)[:, 0]
        logits = self.head(features)
        if not return_routing:
            return logits
        return ModelOutput(logits=logits, aux_loss=aux, routing=routing, features=features)

    def forward_intermediates(self, x: torch.Tensor, indices: Union[int, Sequence[int], None] = None,
                              stop_early: bool = False, labels: Optional[torch.Tensor] = None) -> ModelOutput:
        """A forward pass that also keeps the tokens (B, T, D) after some blocks (timm's name).

        indices: block indices, an int n for the last n blocks, or None for all.
        stop_early: stop after the last kept block (then `logits` and `features` are None).
        """
        depth = self.cfg.depth
        keep = list(range(depth - indices, depth)) if isinstance(indices, int) else \
            list(range(depth)) if indices is None else [int(i) for i in indices]
        if not keep or any(not 0 <= i < depth for i in keep):
            raise ValueError(f"indices must name blocks in 0..{depth - 1}, got {indices!r}")
        stop = max(keep) if stop_early else None
        tokens, routing, aux, kept = self.forward_blocks(self.embed(x), labels, keep=keep, stop_after=stop)
        out = ModelOutput(logits=None, aux_loss=aux, routing=routing, intermediates=kept)
        if stop is None or stop == depth - 1:
            out.features = self.norm(tokens)[:, 0]
            out.logits = self.head(out.features)
        return out

    def router_logits(self, x: torch.Tensor, layer: Optional[int] = None) -> torch.Tensor:
        """The logits the router of MoE block `layer` (None: the first) computed on x:
        (B, E) per image, (B, T, E) per token. The model runs only up to that block.
        In training mode they include the router noise."""
        blocks = self.moe_block_indices
        if not blocks:
            raise ValueError("a dense model has no router")
        layer = blocks[0] if layer is None else int(layer)
        if layer not in blocks:
            raise ValueError(f"block {layer} is not an MoE block; MoE blocks are {blocks}")
        return self.forward_intermediates(x, [layer], stop_early=True).routing[-1].logits

    # ------------------------------------------------------------------ inference-time routing
    def router_modules(self) -> list:
        """Every `Router` of the model (empty for a dense model)."""
        return [m for m in self.modules() if isinstance(m, Router)]

    def routing_settings(self) -> dict:
        """The routing settings in force now (module state, not the config the model was built from)."""
        routers = self.router_modules()
        if not routers:
            return {}
        r = routers[0]
        settings = {"top_k": r.top_k, "disabled_experts": r.disabled.nonzero().flatten().tolist(),
                    "force_expert": r.forced_expert, "router_fp32": r.fp32}
        settings.update(self._layer_settings())
        return settings

    def set_routing(self, *, top_k: Optional[int] = None, disabled_experts: Optional[Sequence[int]] = None,
                    force_expert=_KEEP, router_fp32: Optional[bool] = None, **layer_settings) -> None:
        """Change routing at inference time, without retraining; the config is left as built.

        top_k; disabled_experts (the router renormalises over the others); force_expert (an
        expert index: every item goes there with gate 1, k = 1; None: no forced expert;
        omitted: unchanged); router_fp32 (router logits in fp32 under autocast). Per-token
        models also take eval_capacity_ratio, batch_priority, capacity_multiple_of and
        capacity_ceil_or_round. Other settings left as None are unchanged.
        """
        unknown = sorted(n for n, v in layer_settings.items() if v is not None and n not in self.LAYER_SETTINGS)
        if unknown:
            raise ValueError(f"a {self.cfg.family} model cannot set {unknown}" +
                             (" (no capacity or token priority per image)" if self.cfg.family == "mvmoe" else ""))
        changes = {n: v for n, v in dict(top_k=top_k, disabled_experts=disabled_experts, router_fp32=router_fp32,
                                           **layer_settings).items() if v is not None}
        if force_expert is not _KEEP:
            changes["force_expert"] = force_expert
        if not changes:
            return
        if not self.router_modules():
            raise ValueError(f"{self.cfg.family} model has no router to adjust")
        new = {**self.routing_settings(), **changes}
        _validate_routing(new, self.cfg.num_experts)
        for r in self.router_modules():
            r.top_k = int(new["top_k"])
            r.disabled.zero_()
            r.disabled[list(new["disabled_experts"])] = True
            r.forced_expert = None if new["force_expert"] is None else int(new["force_expert"])
            r.fp32 = bool(new["router_fp32"])
        self._apply_layer_settings({n: new[n] for n in self.LAYER_SETTINGS})

    def _layer_settings(self) -> dict:
        return {}

    def _apply_layer_settings(self, settings: dict) -> None:
        pass


def _validate_routing(s: dict, num_experts: int) -> None:
    disabled = sorted(set(int(e) for e in s["disabled_experts"]))
    if any(not 0 <= e < num_experts for e in disabled):
        raise ValueError(f"disabled experts must be in 0..{num_experts - 1}, got {disabled}")
    s["disabled_experts"] = disabled
    k = s["top_k"]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not num_experts - len(disabled) >= k >= 1:
        raise ValueError(f"enabled experts >= top_k >= 1, but got top_k={k!r} with {num_experts} experts, "
                         f"{len(disabled)} disabled")
    f = s["force_expert"]
    if f is not None and (isinstance(f, bool) or not isinstance(f, numbers.Integral) or not 0 <= f < num_experts):
        raise ValueError(f"force_expert must be None or an expert index in 0..{num_experts - 1}, got {f!r}")
    if "eval_capacity_ratio" in s:
        ratio = s["eval_capacity_ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not math.isfinite(ratio) or ratio <= 0:
            raise ValueError(f"eval_capacity_ratio must be a number > 0, got {ratio!r}")
        m = s["capacity_multiple_of"]
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
            raise ValueError(f"capacity_multiple_of must be an integer >= 1 (1 = no rounding), got {m!r}")
        if s["capacity_ceil_or_round"] not in CEIL_OR_ROUND:
            raise ValueError(f"capacity_ceil_or_round must be one of {CEIL_OR_ROUND}, "
                             f"got {s['capacity_ceil_or_round']!r}")


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
