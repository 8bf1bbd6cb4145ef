"""MACs per image, counted analytically and measured, in the DeiT/ViT convention.

Papers quote "FLOPs" that are multiply-accumulates (DeiT-Ti = 1.3 G), so we
report MACs and label them as such. The count includes the patch embedding,
the attention matmuls (QK^T and AV), every linear layer, the router(s) and the
head, and for MoE blocks only the experts that actually run: k per image for
per-image routing, the (token, choice) assignments that survived capacity for
per-token routing. Norms, GELU, softmax and additions are not counted (they
are a rounding error next to the matmuls and papers leave them out too).

`measure_macs` checks the analytic count with torch's FlopCounterMode.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from .models.config import ModelConfig

__all__ = ["count_macs", "measure_macs", "count_params"]


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """2 matmuls (QK^T, AV) of 2*b*h*s*t*d FLOPs each."""
    b, h, s, d = query_shape
    t = key_shape[-2]
    dv = value_shape[-1]
    return 2 * b * h * s * t * d + 2 * b * h * s * t * dv


# NOTE: FlopCounterMode counts 0 for attention on CPU (torch 2.13): its kernel,
# aten._scaled_dot_product_flash_attention_for_cpu, has no formula. Register one.
_cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
if _cpu_sdpa is not None:
    try:
        register_flop_formula(_cpu_sdpa)(_sdpa_cpu_flops)
    except Exception:  # already registered (re-import, or a newer torch has one)
        pass


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _shape(cfg: ModelConfig, input_shape: Sequence[int]) -> None:
    chw = tuple(int(s) for s in input_shape[-3:])
    if len(input_shape) not in (3, 4) or chw != (cfg.in_chans, cfg.img_size, cfg.img_size):
        raise ValueError(
            f"input_shape must be (C, H, W) or (B, C, H, W) = ({cfg.in_chans}, {cfg.img_size}, {cfg.img_size}), "
            f"got {tuple(input_shape)}"
        )


def count_macs(model: nn.Module, input_shape: Sequence[int], routing: Optional[list] = None) -> dict:
    """Analytic MACs per image at the model's current routing settings (`model.routing_settings()`).

    routing: RoutingRecords of a real forward pass (torch, or their numpy view).
    For per-token models they give the assignments actually processed (after
    capacity) and the experts actually touched per image; without them we
    assume balanced routing, where a group processes min(k * tokens,
    E_enabled * capacity) assignments, with the layer's own `capacity()`.
    Returns active/dense MACs, parameter counts and a per-part breakdown.
    """
    cfg: ModelConfig = model.cfg
    _shape(cfg, input_shape)
    D, H, T, E = cfg.width, cfg.mlp_hidden, cfg.num_patches + 1, cfg.num_experts
    settings = model.routing_settings() if cfg.is_moe else {}
    forced = settings.get("force_expert") is not None
    k = 1 if forced else settings.get("top_k", cfg.top_k)
    enabled = 1 if forced else E - len(settings.get("disabled_experts", []))
    mlp = 2 * T * D * H
    expert_params = 2 * D * H + H + D
    records = {r.layer: r.numpy() for r in (routing or [])}
    token_layers = {blk_i: blk.mlp for blk_i, blk in enumerate(model.blocks) if hasattr(blk.mlp, "capacity")}

    parts = {
        "patch_embed": cfg.num_patches * cfg.in_chans * cfg.patch_size ** 2 * D,
        "attention": cfg.depth * (T * D * 3 * D + 2 * T * T * D + T * D * D),
        "mlp": 0, "experts": 0, "router": 0,
        "head": D * cfg.num_classes,
    }
    inactive_params = 0.0
    moe = set(cfg.moe_block_indices())
    for i in range(cfg.depth):
        if i not in moe:
            parts["mlp"] += mlp
            continue
        if cfg.family == "mvmoe":
            parts["experts"] += k * mlp
            inactive_params += (E - k) * expert_params
            continue
        # per token: router on every token, experts on the assignments that fit
        parts["router"] += T * D * E
        rec = records.get(i)
        if rec is not None:
            B = rec.kept.shape[0]
            processed = float(rec.kept.sum()) / B
            chosen = np.where(rec.kept, rec.experts, -1).reshape(B, -1)
            touched = sum(len(set(row.tolist()) - {-1}) for row in chosen) / B
        else:
            layer = token_layers[i]
            S = layer.group_size * T
            processed = min(k * S, enabled * layer.capacity(tokens_per_image=T)) / layer.group_size
            touched = min(enabled, k * T)
        parts["experts"] += processed * 2 * D * H
        inactive_params += (E - touched) * expert_params
    if cfg.family == "mvmoe":
        n_routers = len(moe) if cfg.per_layer_routers else 1
        parts["router"] += n_routers * D * E

    total_params = count_params(model)
    dense = parts["patch_embed"] + parts["attention"] + cfg.depth * mlp + parts["head"]
    return {
        "active": float(sum(parts.values())),
        "dense": float(dense),
        "params_total": int(total_params),
        "params_active": int(round(total_params - inactive_params)),
        "breakdown": {name: float(v) for name, v in parts.items()},
        "unit": "MACs per image",
    }


def measure_macs(model: nn.Module, x: torch.Tensor, **forward_kwargs) -> float:
    """MACs per image of one forward pass on x, measured by FlopCounterMode (FLOPs / 2)."""
    with FlopCounterMode(display=False) as counter:
        model(x, **forward_kwargs)
    return counter.get_total_flops() / 2 / x.shape[0]
