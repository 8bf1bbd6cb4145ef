"""One config dataclass for all three families, and preset names.

A preset name fixes the shape (`vit-12x192`, `mvmoe-12x192-e10k1`,
`vmoe-12x192-e8k2`); every other choice is a field of `ModelConfig` that can be
overridden by keyword. The config is plain data (JSON-serialisable) so that a
checkpoint card can rebuild the exact model without pickle.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from .routing import CEIL_OR_ROUND

FAMILIES = ("vit", "vmoe", "mvmoe")
PAPER_DEPTHS = (12, 9, 6)
PAPER_WIDTHS = (384, 192, 96, 64)
ALIASES = {"vit-tiny": "vit-12x192", "vit-small": "vit-12x384"}

_PRESET_RE = re.compile(r"^(vit)-(\d+)x(\d+)$|^(vmoe|mvmoe)-(\d+)x(\d+)-e(\d+)k(\d+)$")


@dataclass
class ModelConfig:
    """Every architectural and routing choice of a model."""

    family: str = "vit"                 # "vit" (dense) | "vmoe" (per token) | "mvmoe" (per image)
    img_size: int = 28                  # square input side in pixels
    patch_size: int = 4                 # 28/4 -> 7x7 = 49 patches, like 224/32 in the paper
    in_chans: int = 1                   # 1 grey, 3 RGB
    num_classes: int = 10
    depth: int = 12                     # number of transformer blocks
    width: int = 192                    # embedding dimension D
    num_heads: Optional[int] = None     # None -> max(1, width // 64) (head dim 64)
    mlp_ratio: float = 4.0              # hidden = mlp_ratio * width, for dense MLPs and experts
    mlp_dropout: float = 0.0            # dropout after the MLP's GELU and output, dense MLPs and experts alike
    #                                     (V-MoE's expert dropout; the same rate in a dense twin's MLPs)

    # --- shared MoE fields ---
    num_experts: int = 0                # E
    top_k: int = 1                      # k experts per token (vmoe) or per image (mvmoe)
    moe_layers: Union[str, Sequence[int]] = "last-2"
    # "last-n": vmoe -> the last n odd (0-based) blocks, V-MoE's convention;
    #           mvmoe -> the last n blocks, Mobile V-MoE's convention.
    # "every-n": blocks i with (i + 1) % n == 0.  Or an explicit list of indices.
    importance_loss_weight: float = 0.005
    load_loss_weight: float = 0.005
    noise_std: Optional[float] = None   # router noise in training; None -> 1/E (V-MoE)
    disabled_experts: Sequence[int] = ()  # inference-time ablation; router renormalises
    renormalize_gates: bool = False     # divide each item's top-k gates by their sum. With k = 1 every gate
    #                                     is 1: an upcycled MoE then starts exactly at its dense parent, and
    #                                     its router learns only from its own loss (super-classes, balancing)

    # --- per-token (V-MoE) ---
    capacity_ratio: float = 1.05        # C in training
    eval_capacity_ratio: float = 2.0    # C at eval (V-MoE evaluates with a larger C)
    batch_priority: bool = True         # BPR: order by top-1 gate instead of position
    group_size: int = 1                 # images whose tokens share one capacity budget
    capacity_multiple_of: int = 4       # round capacity up to a multiple of this (1: the paper's formula)
    capacity_ceil_or_round: str = "ceil"  # first step of the capacity rule: "ceil" or "round"
    # Why 4 by default: google-research/vmoe rounds every capacity up to a multiple of 4,
    # so with 4 our per-token routing matches the reference bit for bit on the same gates.
    # A saved config without this field predates it and keeps the paper's rule (see from_dict).

    # --- per-image (Mobile V-MoE) ---
    router_input: str = "mean"          # "mean" of patch tokens | "cls" token
    per_layer_routers: bool = False     # ablation: one router per MoE block
    superclass_loss_weight: float = 0.3  # lambda in L = L_cls + lambda * L_router
    superclasses: Optional[Sequence[int]] = None  # class index -> super-class index

    def __post_init__(self) -> None:
        if isinstance(self.moe_layers, (list, tuple)):
            self.moe_layers = [int(i) for i in self.moe_layers]
        self.disabled_experts = [int(e) for e in self.disabled_experts]
        if self.superclasses is not None:
            self.superclasses = [int(s) for s in self.superclasses]
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def heads(self) -> int:
        return self.num_heads if self.num_heads else max(1, self.width // 64)

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def is_moe(self) -> bool:
        return self.family in ("vmoe", "mvmoe")

    @property
    def noise(self) -> float:
        if self.noise_std is not None:
            return float(self.noise_std)
        return 1.0 / self.num_experts if self.num_experts else 0.0

    def moe_block_indices(self) -> list[int]:
        """Resolve `moe_layers` to sorted block indices (empty for dense)."""
        if not self.is_moe:
            return []
        spec = self.moe_layers
        if isinstance(spec, str):
            m = re.fullmatch(r"(last|every)-(\d+)", spec)
            if not m:
                raise ValueError(f"moe_layers must be 'last-n', 'every-n' or a list of block indices, got {spec!r}")
            kind, n = m.group(1), int(m.group(2))
            if n < 1:
                raise ValueError(f"moe_layers {spec!r}: n must be >= 1")
            if kind == "every":
                idx = [i for i in range(self.depth) if (i + 1) % n == 0]
            elif self.family == "vmoe":
                idx = [i for i in range(self.depth) if i % 2 == 1][-n:]
                if len(idx) < n:
                    raise ValueError(f"moe_layers {spec!r}: depth {self.depth} has only {len(idx)} odd blocks")
            else:
                if n > self.depth:
                    raise ValueError(f"moe_layers {spec!r}: only {self.depth} blocks")
                idx = list(range(self.depth - n, self.depth))
            return idx
        idx = sorted(set(int(i) for i in spec))
        return idx

    # --------------------------------------------------------------- validation
    def validate(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        for name in ("img_size", "patch_size", "in_chans", "num_classes", "depth", "width", "top_k", "group_size",
                     "capacity_multiple_of"):
            _require(name, getattr(self, name), _is_int(getattr(self, name)) and getattr(self, name) >= 1,
                     "an integer >= 1")
        _require("num_experts", self.num_experts, _is_int(self.num_experts) and self.num_experts >= 0,
                 "an integer >= 0")
        _require("mlp_ratio", self.mlp_ratio, _is_real(self.mlp_ratio) and self.mlp_ratio > 0
                 and self.width * self.mlp_ratio >= 1, "a number > 0 (with width * mlp_ratio >= 1)")
        for name in ("capacity_ratio", "eval_capacity_ratio"):
            _require(name, getattr(self, name), _is_real(getattr(self, name)) and getattr(self, name) > 0,
                     "a number > 0")
        for name in ("importance_loss_weight", "load_loss_weight", "superclass_loss_weight"):
            _require(name, getattr(self, name), _is_real(getattr(self, name)) and getattr(self, name) >= 0,
                     "a number >= 0")
        _require("mlp_dropout", self.mlp_dropout, _is_real(self.mlp_dropout) and 0 <= self.mlp_dropout < 1,
                 "a number in [0, 1)")
        _require("renormalize_gates", self.renormalize_gates, isinstance(self.renormalize_gates, bool),
                 "true or false")
        if self.noise_std is not None:
            _require("noise_std", self.noise_std, _is_real(self.noise_std) and self.noise_std >= 0,
                     "None (1/E) or a number >= 0")
        if self.capacity_ceil_or_round not in CEIL_OR_ROUND:
            raise ValueError(f"capacity_ceil_or_round must be one of {CEIL_OR_ROUND}, got {self.capacity_ceil_or_round!r}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.num_heads is not None and self.num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {self.num_heads}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.heads}")
        if self.superclasses is not None and self.family != "mvmoe":
            raise ValueError(f"a super-class map only guides the per-image (mvmoe) router, not a {self.family} model")
        if not self.is_moe:
            return
        if not self.num_experts >= self.top_k >= 1:  # the one place this rule is checked
            raise ValueError(f"num_experts >= top_k >= 1, but got num_experts={self.num_experts}, top_k={self.top_k}")
        layers = self.moe_block_indices()
        if not layers:
            raise ValueError("an MoE model needs at least one MoE block")
        bad = [i for i in layers if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"MoE block index out of range for depth {self.depth}: {bad}")
        if self.router_input not in ("mean", "cls"):
            raise ValueError(f"router_input must be 'mean' or 'cls', got {self.router_input!r}")
        bad = [e for e in self.disabled_experts if not 0 <= e < self.num_experts]
        if bad:
            raise ValueError(f"disabled_experts out of range 0..{self.num_experts - 1}: {bad}")
        if self.num_experts - len(set(self.disabled_experts)) < self.top_k:
            raise ValueError(
                f"disabling {sorted(set(self.disabled_experts))} leaves fewer than top_k={self.top_k} experts"
            )
        if self.superclasses is not None:
            if len(self.superclasses) != self.num_classes:
                raise ValueError(
                    f"super-class map has {len(self.superclasses)} entries but the model has {self.num_classes} classes"
                )
            groups = set(self.superclasses)
            if groups != set(range(self.num_experts)):
                raise ValueError(
                    f"super-class map must use groups 0..{self.num_experts - 1} (one per expert), got {sorted(groups)}"
                )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """Rebuild a saved config. One saved before `capacity_multiple_of` existed used the
        paper's capacity formula without rounding, and keeps it (capacity_multiple_of=1)."""
        check_fields(cls, d, "model config")
        d = dict(d)
        d.setdefault("capacity_multiple_of", 1)
        return cls(**d)


def check_fields(cls, d, what: str) -> None:
    """`d` is a JSON object naming only fields of the dataclass `cls` (a config file); ValueError if not.
    Shared by ModelConfig, TrainConfig and PipelineConfig files."""
    if not isinstance(d, dict):
        raise ValueError(f"a {what} must be a JSON object, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"unknown {what} field(s) {unknown}; valid: {sorted(known)}")


def parse_preset(name: str) -> dict:
    """`vit-12x192` / `mvmoe-12x192-e10k1` / `vmoe-12x192-e8k2` -> config fields."""
    key = ALIASES.get(name, name)
    m = _PRESET_RE.match(key)
    if not m:
        raise ValueError(
            f"unknown preset {name!r}: use vit-<L>x<D>, mvmoe-<L>x<D>-e<E>k<K> or vmoe-<L>x<D>-e<E>k<K> "
            f"(e.g. vit-12x192, mvmoe-12x192-e10k1) or one of {sorted(ALIASES)}"
        )
    if m.group(1):
        return {"family": "vit", "depth": int(m.group(2)), "width": int(m.group(3))}
    return {
        "family": m.group(4),
        "depth": int(m.group(5)),
        "width": int(m.group(6)),
        "num_experts": int(m.group(7)),
        "top_k": int(m.group(8)),
    }


def preset_name(family: str, depth: int, width: int, num_experts: int = 0, top_k: int = 1) -> str:
    """The preset for a shape (the inverse of `parse_preset`): vit-<L>x<D> or <family>-<L>x<D>-e<E>k<K>."""
    if family == "vit":
        return f"vit-{int(depth)}x{int(width)}"
    return f"{family}-{int(depth)}x{int(width)}-e{int(num_experts)}k{int(top_k)}"


def router_kind(config: dict) -> str:
    """How a model (its card's config) routes, as tables and charts name it: '' (dense), 'per-token',
    'end-to-end', or 'superclass' (with its lambda where that is not the default, so a dose of the
    super-class loss is its own cell)."""
    if config.get("family") == "vmoe":
        return "per-token"
    if config.get("family") != "mvmoe":
        return ""
    if not config.get("superclasses"):
        return "end-to-end"
    weight = config.get("superclass_loss_weight", ModelConfig.superclass_loss_weight)
    return "superclass" if weight == ModelConfig.superclass_loss_weight else f"superclass, λ = {weight:g}"


def default_moe_blocks(family: str, depth: int) -> list[int]:
    """The MoE blocks a form offers first for this family and depth: the family's 'last-2' where the
    depth allows it (per token: the last two odd blocks), else 'last-1', else the last block."""
    for spec in ("last-2", "last-1"):
        try:
            return ModelConfig(family=family, depth=depth, num_experts=2, moe_layers=spec).moe_block_indices()
        except ValueError:
            continue
    return [depth - 1]


def paper_grid_presets() -> list[str]:
    """The Mobile V-MoE paper's dense grid: depth x width."""
    return [f"vit-{l}x{d}" for l in PAPER_DEPTHS for d in PAPER_WIDTHS]


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _require(name: str, value, ok: bool, rule: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {rule}, got {value!r}")
