"""Pixel attributions with captum.attr: for a class logit, and for a ROUTER logit.

"Which pixels sent this image to expert e?" `router_attribution` wraps the
model up to the router of one MoE block (`RouterLogits`: `model.router_logits`
runs the model only up to that block) and attributes expert e's router logit —
per-image routing: the image's logit; per-token routing: the mean logit of e
over the chosen tokens of that block. `class_attribution` does the same for a
class logit of the full model. Methods (captum.attr, not the deprecated
Captum Insights): Integrated Gradients (Sundararajan et al., 2017), Saliency
(|gradient|, Simonyan et al., 2014) and Occlusion (Zeiler & Fergus, 2014).

Attributions are w.r.t. the normalised input and come back with the shape of
the image passed in; `pages.figures.overlay_figure` draws one over the image in grey.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from .collect import _eval_mode, normalize_images

__all__ = ["RouterLogits", "attribute", "class_attribution", "router_attribution",
           "region_share", "METHODS"]

METHODS = ("ig", "saliency", "occlusion")


def _moe_block(model: nn.Module, layer: Optional[int]) -> int:
    """MoE block `layer` (None: the first), checked."""
    blocks = model.cfg.moe_block_indices()
    if not blocks:
        raise ValueError("a dense model has no router")
    layer = blocks[0] if layer is None else int(layer)
    if layer not in blocks:
        raise ValueError(f"block {layer} is not an MoE block; MoE blocks are {blocks}")
    return layer


class RouterLogits(nn.Module):
    """x (B, C, H, W) normalised -> (B, E) router logits of one MoE block.

    The model runs only up to that block (`model.router_logits`).
    Per-token routers: the mean logit over `tokens` of the block — "patches"
    (default), "all", "cls", or a list of patch indices (row-major in the
    patch grid). Disabled experts have logit -inf.
    """

    def __init__(self, model: nn.Module, layer: Optional[int] = None,
                 tokens: Union[str, Sequence[int]] = "patches"):
        super().__init__()
        self.model = model
        self.layer = _moe_block(model, layer)
        self.per_token = model.cfg.family == "vmoe"
        T = model.cfg.num_patches + 1
        if isinstance(tokens, str):
            sel = {"patches": list(range(1, T)), "all": list(range(T)), "cls": [0]}.get(tokens)
            if sel is None:
                raise ValueError(f"tokens must be 'patches', 'all', 'cls' or patch indices, got {tokens!r}")
        else:
            sel = [1 + int(p) for p in tokens]
            if not sel or any(not 1 <= t < T for t in sel):
                raise ValueError(f"patch indices must be in 0..{T - 2}, got {list(tokens)}")
        self.register_buffer("token_index", torch.tensor(sel), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model.router_logits(x, self.layer)
        if self.per_token:
            B = x.shape[0]
            logits = logits.view(B, -1, logits.shape[-1]).index_select(1, self.token_index).mean(1)
        return logits


def _prepare(image, mean, std, model) -> tuple:
    x = torch.as_tensor(image)
    shape = tuple(x.shape)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise ValueError(f"image must be (C, H, W) or (B, C, H, W), got {shape}")
    x = normalize_images(x, mean, std).to(next(model.parameters()).device)
    return x, shape


def _baseline(kind, x: torch.Tensor, mean, std) -> torch.Tensor:
    if kind == "black":           # pixel value 0 (the background of Fashion-MNIST)
        return normalize_images(torch.zeros(x.shape[1:], dtype=torch.uint8).unsqueeze(0), mean, std).to(x.device)
    if kind == "mean":            # the dataset mean: 0 after normalisation
        return torch.zeros_like(x[:1])
    raise ValueError(f"baseline must be 'black' or 'mean', got {kind!r}")


def attribute(forward: nn.Module, x: torch.Tensor, target, method: str = "ig", *, baseline: torch.Tensor,
              n_steps: int = 32, internal_batch_size: Optional[int] = None, window: int = 4,
              stride: Optional[int] = None) -> torch.Tensor:
    """Run one captum.attr method on `forward` (x -> (B, outputs)) for output `target` (int or (B,))."""
    from captum.attr import IntegratedGradients, Occlusion, Saliency

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    x = x.detach().clone().requires_grad_(method != "occlusion")
    base = baseline.expand_as(x).contiguous()
    if method == "ig":
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        ig = IntegratedGradients(forward)
        return ig.attribute(x, baselines=base, target=target, n_steps=n_steps,
                            internal_batch_size=internal_batch_size or n_steps * x.shape[0])
    if method == "saliency":
        return Saliency(forward).attribute(x, target=target, abs=True)
    C = x.shape[1]
    stride = stride or window
    with torch.no_grad():
        return Occlusion(forward).attribute(x, sliding_window_shapes=(C, window, window), strides=(C, stride, stride),
                                            baselines=base, target=target, perturbations_per_eval=64)


def _run(model, forward, image, mean, std, target_fn, method, baseline, **kw) -> np.ndarray:
    x, shape = _prepare(image, mean, std, model)
    with _eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        with torch.no_grad():
            target = target_fn(forward(x))
        attr = attribute(forward, x, target, method, baseline=_baseline(baseline, x, mean, std),
                         window=kw.pop("window", None) or model.cfg.patch_size, **kw)
    return attr.detach().float().cpu().numpy().reshape(shape)


def _pick(index, what: str, n: int):
    def target_fn(out: torch.Tensor):
        if index is None:
            return out.argmax(-1)                       # the predicted class / the top-1 expert
        idx = torch.as_tensor(index).to(out.device)
        if (idx < 0).any() or (idx >= n).any():
            raise ValueError(f"{what} must be in 0..{n - 1}, got {index}")
        if torch.isinf(out.gather(-1, idx.view(-1, 1).expand(out.shape[0], 1))).any():
            raise ValueError(f"{what} {index} is disabled: its router logit is -inf")
        return idx.expand(out.shape[0]) if idx.ndim == 0 else idx
    return target_fn


def class_attribution(model: nn.Module, image, mean: Sequence[float], std: Sequence[float], target_class=None, *,
                      method: str = "ig", baseline: str = "black", n_steps: int = 32,
                      internal_batch_size: Optional[int] = None, window: Optional[int] = None,
                      stride: Optional[int] = None) -> np.ndarray:
    """Attribution of a class logit (default: the predicted class) to the input pixels.

    image: uint8 or normalised float, (C, H, W) or (B, C, H, W); the result has
    the same shape. baseline: "black" (pixel 0) or "mean" (dataset mean) for IG
    and occlusion. Occlusion slides a window (default one patch) with `stride`.
    """
    kw = {"n_steps": n_steps, "internal_batch_size": internal_batch_size, "window": window, "stride": stride}
    return _run(model, model, image, mean, std, _pick(target_class, "target_class", model.cfg.num_classes),
                method, baseline, **kw)


def router_attribution(model: nn.Module, image, mean: Sequence[float], std: Sequence[float], expert=None, *,
                       layer: Optional[int] = None, tokens: Union[str, Sequence[int]] = "patches",
                       method: str = "ig", baseline: str = "black", n_steps: int = 32,
                       internal_batch_size: Optional[int] = None, window: Optional[int] = None,
                       stride: Optional[int] = None) -> np.ndarray:
    """Attribution of expert `expert`'s router logit (default: the top-1 expert) to the pixels.

    layer: MoE block index (None: the first). Per-token models attribute the
    mean router logit of the expert over `tokens` (see `RouterLogits`).
    Same shapes and options as `class_attribution`.
    """
    forward = RouterLogits(model, layer, tokens)
    kw = {"n_steps": n_steps, "internal_batch_size": internal_batch_size, "window": window, "stride": stride}
    return _run(model, forward, image, mean, std, _pick(expert, "expert", model.cfg.num_experts),
                method, baseline, **kw)


def region_share(attribution, mask) -> float:
    """Fraction of the total |attribution| that falls where `mask` (H, W) is True."""
    a = np.abs(np.asarray(attribution, dtype=np.float64))
    a = a.reshape(-1, *a.shape[-2:]).sum(0)
    total = a.sum()
    return float(a[np.asarray(mask, dtype=bool)].sum() / total) if total > 0 else 0.0
