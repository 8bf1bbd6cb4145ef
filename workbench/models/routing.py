"""Routing: which item (token or image) goes to which expert, with what weight.

Implements the noisy top-k router of V-MoE (Riquelme et al., 2021, §2.2 and
appendix A) and is reused by the per-image router of Mobile V-MoE (Daxberger
et al., 2023, §2.2). Routing is kept apart from the experts (experts.py: what
they compute) and from the layers that move items (vmoe.py / mvmoe.py).

- `capacity`      the expert buffer size (the one capacity rule of the project)
- `route_tokens`  a pure function: pre-computed logits [G, S, E] -> `TokenRouting`
- `Router`        the learned part (a bias-free linear map) and the inference-time
                  settings (k, disabled experts, a forced expert, fp32)
- `RoutingRecord` what one MoE block decided, as torch tensors or as a numpy view

The rules follow google-research/vmoe (`vmoe/moe.py`, `vmoe/nn/routing.py`), checked
by tests/test_routing_reference.py against a slow loop written from the rules.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CEIL_OR_ROUND = ("ceil", "round")


def capacity(num_tokens: int, num_experts: int, top_k: int, capacity_ratio: float,
             multiple_of: int = 1, ceil_or_round: str = "ceil") -> int:
    """Expert buffer size per routing group: ceil(k * C * tokens_in_group / E) (V-MoE §2.2).

    `multiple_of` > 1 then rounds it *up* to a multiple of that number, as the
    reference implementation does (its default is 4; our models default to 4,
    see ModelConfig.capacity_multiple_of). `ceil_or_round="round"` rounds
    instead of ceiling the first step, as the reference allows.
    """
    if ceil_or_round not in CEIL_OR_ROUND:
        raise ValueError(f"ceil_or_round must be one of {CEIL_OR_ROUND}, got {ceil_or_round!r}")
    if int(multiple_of) < 1:
        raise ValueError(f"capacity multiple_of must be >= 1 (1 = no rounding), got {multiple_of}")
    share = top_k * capacity_ratio * num_tokens / num_experts
    cap = math.ceil(share) if ceil_or_round == "ceil" else int(round(share))
    if cap < 1:
        raise ValueError(f"capacity must be >= 1: k={top_k}, C={capacity_ratio}, {num_tokens} tokens and "
                         f"E={num_experts} give {cap}; raise the capacity ratio or use ceil")
    return cap + (-cap) % int(multiple_of)


def capacity_rule(num_tokens: int, num_experts: int, top_k: int, capacity_ratio: float,
                  multiple_of: int = 1, ceil_or_round: str = "ceil") -> dict:
    """The capacity rule step by step, for pages that explain why C is what it is.

    Keys: share (k*C*S/E), first (after ceil/round), capacity (after rounding up to a
    multiple), rule ("reference" when rounded to a multiple > 1, else "paper"), formula
    (LaTeX of the rule in use) and text (the numbers, one line).
    """
    share = top_k * capacity_ratio * num_tokens / num_experts
    first = capacity(num_tokens, num_experts, top_k, capacity_ratio, 1, ceil_or_round)
    final = capacity(num_tokens, num_experts, top_k, capacity_ratio, multiple_of, ceil_or_round)
    op = (r"\left\lceil", r"\right\rceil") if ceil_or_round == "ceil" else (r"\operatorname{round}\left(", r"\right)")
    inner = op[0] + r" \frac{k \cdot C \cdot S}{E} " + op[1]
    bracket = "⌈·⌉" if ceil_or_round == "ceil" else "round(·)"
    text = (f"k·C·S/E = {top_k} · {capacity_ratio:g} · {num_tokens} / {num_experts} = {share:.2f}, "
            f"{bracket} → {first}")
    if multiple_of > 1:
        formula = rf"\text{{capacity}} = {multiple_of} \left\lceil \frac{{{inner}}}{{{multiple_of}}} \right\rceil"
        text += f", rounded up to a multiple of {multiple_of} → {final}"
    else:
        formula = rf"\text{{capacity}} = {inner}"
    return {"share": share, "first": first, "capacity": final, "multiple_of": multiple_of,
            "ceil_or_round": ceil_or_round, "rule": "reference" if multiple_of > 1 else "paper",
            "formula": formula, "text": text}


# --------------------------------------------------------------------------- the pure routing function
@dataclass
class TokenRouting:
    """What `route_tokens` decided for G groups of S items. Shapes [G, S, ...].

    A choice is *kept* where `slot >= 0`; a dropped choice does not run and
    contributes nothing, and an item with no kept choice passes the layer
    through the residual only.
    """

    logits: torch.Tensor                # [G, S, E] logits dispatch used (noisy where noise was injected)
    probs: torch.Tensor                 # [G, S, E] softmax(logits): the gates
    expert_index: torch.Tensor          # [G, S, K] chosen experts, best first (ties: lower index first)
    gates: torch.Tensor                 # [G, S, K] probs at the choices, not renormalised (before capacity)
    slot: torch.Tensor                  # [G, S, K] position in the expert's buffer, -1 where dropped
    capacity: int                       # C: buffer size per expert and group
    importance_loss: torch.Tensor       # [G] CV^2 of per-expert summed clean gates (V-MoE eq. 5)
    load_loss: Optional[torch.Tensor]   # [G] CV^2 of per-expert selection probability; only with noise

    @property
    def kept(self) -> torch.Tensor:
        """[G, S, K] bool: the choice fit in its expert's buffer."""
        return self.slot >= 0

    @property
    def weight(self) -> torch.Tensor:
        """[G, S, K] combine weight: the gate where kept, 0 where dropped."""
        return self.gates * self.kept


def top_k_lower_index_first(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries of the last axis; equal values: lower index first.

    NOTE: not `torch.topk`, which gives no order among ties (it put the higher
    index first in about a third of tied rows tried). A stable descending sort
    keeps tied experts in index order on CPU and CUDA alike, as the reference's
    `lax.top_k` does.
    """
    if torch.compiler.is_exporting():
        # ONNX TopK breaks ties by the lower index by specification (onnxruntime follows it), and ONNX
        # has no stable sort: exported graphs keep the same rule through TopK.
        return torch.topk(probs, k, dim=-1)
    values, indices = torch.sort(probs, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k]


def _cv_squared(x: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation along the last axis (0 when perfectly balanced)."""
    return x.var(-1, unbiased=False) / x.mean(-1) ** 2


def _load_loss(clean: torch.Tensor, noisy: torch.Tensor, noise_std: float, k: int) -> torch.Tensor:
    """[G]: CV^2 over experts of P(expert e in the top-k | the noise were redrawn) (V-MoE appendix A).

    Why noise is needed: selection itself is not differentiable; the noise turns
    "is e in the top-k" into a smooth probability that e's clean logit plus fresh
    noise beats the k-th largest noisy logit. Disabled experts (-inf) are left out.
    """
    enabled = torch.isfinite(clean).flatten(0, -2).any(0)                        # [E]
    threshold = noisy.topk(k, dim=-1).values[..., -1:]                           # [G, S, 1] (values: ties do not matter)
    z = (threshold - clean[..., enabled]) / noise_std
    p = 1.0 - torch.distributions.Normal(0.0, 1.0).cdf(z)                        # [G, S, E_enabled]
    return _cv_squared(p.mean(1))


def route_tokens(logits: torch.Tensor, k: int, capacity_factor: Optional[float], *, batch_priority: bool = True,
                 capacity_multiple_of: int = 4, ceil_or_round: str = "ceil", noise: Optional[torch.Tensor] = None,
                 noise_std: float = 0.0) -> TokenRouting:
    """Route G groups of S items on pre-computed router logits [G, S, E] (V-MoE top-k routing).

    The rules, each as google-research/vmoe does it:
    - gates = softmax(logits + noise_std * noise); with no `noise` (eval), of the clean logits.
      `noise_std` is the std of the noise on the logits: V-MoE's 1/E is the reference's
      `noise_std=1.0` divided by E.
    - each item picks its k largest gates; equal gates: the lower expert index first.
    - capacity C = `capacity(S, E, k, capacity_factor, capacity_multiple_of, ceil_or_round)`
      per expert and group; `capacity_factor=None` means no capacity (C = S, nothing drops).
    - priority is k-major: every item's 1st choice is placed before any 2nd choice. Within a
      rank, items go in position order (vanilla) or, with `batch_priority` (BPR), by their top-1
      gate, highest first, with a stable sort (earlier item wins ties); that one order is reused
      for every rank. A choice that finds its buffer full is dropped (slot -1); a dropped 1st
      choice does not promote the 2nd.
    - per-group auxiliary losses: importance = CV^2 of per-expert summed clean gates;
      load = CV^2 of per-expert selection probability under the noise (only with noise).
      A model averages them over groups.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [G, S, E], got shape {tuple(logits.shape)}")
    G, S, E = logits.shape
    if not E >= k >= 1:
        raise ValueError(f"num_experts >= k >= 1, but got num_experts={E}, k={k}")
    clean = logits.float()
    noisy = clean
    if noise is not None:
        if noise.shape != logits.shape:
            raise ValueError(f"noise must have the logits' shape {tuple(logits.shape)}, got {tuple(noise.shape)}")
        if noise_std > 0:
            noisy = clean + noise_std * noise.float()
    probs = noisy.softmax(-1)
    gates, expert_index = top_k_lower_index_first(probs, k)                       # [G, S, K]
    C = S if capacity_factor is None else capacity(S, E, k, capacity_factor, capacity_multiple_of, ceil_or_round)
    slot = _buffer_slots(expert_index, gates[..., 0], E, batch_priority)
    slot = slot.masked_fill(slot >= C, -1)
    importance = _cv_squared(clean.softmax(-1).sum(1))                            # [G]
    load = _load_loss(clean, noisy, noise_std, k) if noise is not None and noise_std > 0 else None
    return TokenRouting(logits=noisy, probs=probs, expert_index=expert_index, gates=gates, slot=slot,
                        capacity=C, importance_loss=importance, load_loss=load)


def _buffer_slots(expert_index: torch.Tensor, top1_gate: torch.Tensor, num_experts: int,
                  batch_priority: bool) -> torch.Tensor:
    """[G, S, K] position of each choice in its expert's queue (before capacity cuts it)."""
    G, S, K = expert_index.shape
    if batch_priority:
        order = top_k_lower_index_first(top1_gate, S)[1] if torch.compiler.is_exporting() else \
            torch.argsort(-top1_gate, dim=1, stable=True)                        # [G, S] priority -> item
    else:
        order = torch.arange(S, device=expert_index.device).expand(G, S)
    queued = expert_index.gather(1, order[..., None].expand(G, S, K))            # items in priority order
    k_major = queued.transpose(1, 2).reshape(G, K * S)                           # all 1st choices, then 2nd, ...
    onehot = F.one_hot(k_major, num_experts)                                     # [G, K*S, E]
    position = ((onehot.cumsum(1) - 1) * onehot).sum(-1)                         # place in that expert's queue
    position = position.view(G, K, S).transpose(1, 2)                            # [G, S, K] priority order
    slot = torch.empty_like(position)
    slot.scatter_(1, order[..., None].expand(G, S, K), position)                 # back to item order
    return slot


# --------------------------------------------------------------------------- the learned router
class Router(nn.Module):
    """A bias-free linear map from items to expert logits, and its inference-time settings.

    Settings (module state, changed through the model's `set_routing`):
    `top_k`; `disabled` experts get logit -inf, so the softmax renormalises over
    the others; `forced_expert` replaces the logits by 0 at that expert and -inf
    elsewhere (every item goes there with gate 1, k = 1) — independent of the
    disabled mechanism, so the two can be checked against each other; `fp32`
    computes the logits in fp32 even under autocast. The noise std is fixed at
    construction (V-MoE: 1/E). `renormalize` divides each item's top-k gates by their
    sum (V-MoE does not); with k = 1 the gate is then 1, so an upcycled MoE computes
    what its dense parent did (Komatsuzaki et al., 2022, sparse upcycling).
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, noise_std: float,
                 disabled_experts: Sequence[int] = (), renormalize: bool = False):
        super().__init__()
        self.proj = nn.Linear(dim, num_experts, bias=False)
        self.num_experts = num_experts
        self.top_k = top_k
        self.noise_std = noise_std
        self.forced_expert: Optional[int] = None
        self.fp32 = False
        self.renormalize = renormalize
        self.register_buffer("disabled", torch.zeros(num_experts, dtype=torch.bool), persistent=False)
        self.disabled[list(disabled_experts)] = True

    @property
    def k(self) -> int:
        """The k routing uses now (1 while an expert is forced)."""
        return 1 if self.forced_expert is not None else self.top_k

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> clean logits (..., E) in fp32, with the settings applied."""
        if self.forced_expert is not None:
            onehot = F.one_hot(torch.tensor(self.forced_expert, device=x.device), self.num_experts).bool()
            return torch.zeros(x.shape[:-1] + (self.num_experts,), device=x.device).masked_fill(~onehot, float("-inf"))
        if self.fp32:
            with torch.autocast(x.device.type, enabled=False):
                logits = F.linear(x.float(), self.proj.weight.float())
        else:
            logits = self.proj(x).float()
        return logits.masked_fill(self.disabled, float("-inf"))        # no branch on data: exportable

    def forward(self, x: torch.Tensor, capacity_factor: Optional[float] = None, **options) -> TokenRouting:
        """x [G, S, D] -> `route_tokens` on its logits, with noise while training.

        options: batch_priority, capacity_multiple_of, ceil_or_round (see `route_tokens`).
        """
        logits = self.logits(x)
        noise = torch.randn_like(logits) if self.training and self.noise_std > 0 else None
        routing = route_tokens(logits, self.k, capacity_factor, noise=noise, noise_std=self.noise_std, **options)
        if self.renormalize:
            routing = dataclasses.replace(routing, gates=routing.gates / routing.gates.sum(-1, keepdim=True))
        return routing


# --------------------------------------------------------------------------- the record
def _is_torch(a) -> bool:
    return isinstance(a, torch.Tensor)


def _to_numpy(a):
    if not _is_torch(a):
        return a
    a = a.detach().cpu()
    if a.is_floating_point():
        a = a.float()
    return a.numpy()


@dataclass
class RoutingRecord:
    """Everything one MoE block decided, for training logs, analysis and the app.

    Arrays are torch tensors from a forward pass, or numpy arrays in the view
    returned by `numpy()` (and in analysis summaries); every property works on
    both. `...` is (N,) for per-image and (N, T) for per-token routing (T = 1 +
    patches; index 0 is the class token). `experts`/`gates` are the top-k
    choices *before* capacity, best first; `kept` says which survived capacity
    (always True per image).
    """

    layer: int                          # block index
    kind: str                           # "image" | "token"
    experts: object                     # (..., k) int chosen experts
    kept: object                        # (..., k) bool, after capacity
    gates: object                       # (..., k) combine weights = probs at the choices
    probs: object                       # (..., E) softmax over the enabled experts
    logits: object = None               # (..., E) router logits (noisy in training); optional in views
    capacity: Optional[int] = None      # per-expert buffer of a full group (token routing)
    router_input: object = None         # (N, D) what the router read, per image: the summary of an image
                                        # router, the mean patch token entering a token MoE layer

    def __post_init__(self) -> None:
        if not _is_torch(self.experts):  # a numpy view: accept lists, and 0/1 for kept
            self.experts, self.gates, self.probs = (np.asarray(a) for a in (self.experts, self.gates, self.probs))
            self.kept = np.asarray(self.kept, dtype=bool)
        if tuple(self.experts.shape) != tuple(self.kept.shape) or tuple(self.experts.shape) != tuple(self.gates.shape):
            raise ValueError(f"experts, kept and gates must have one shape, got {tuple(self.experts.shape)}, "
                             f"{tuple(self.kept.shape)}, {tuple(self.gates.shape)}")

    @property
    def num_experts(self) -> int:
        return int(self.probs.shape[-1])

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[-1])

    @property
    def per_token(self) -> bool:
        return self.kind == "token"

    @property
    def top1(self):
        """(...) the router's first choice, before capacity."""
        return self.experts[..., 0]

    @property
    def top1_kept(self):
        """(...) the first choice where it survived capacity, else -1."""
        xp = torch if _is_torch(self.experts) else np
        return xp.where(self.kept[..., 0], self.experts[..., 0], -1)

    @property
    def dropped_assignments(self) -> int:
        """(item, choice) pairs removed by capacity."""
        return int((~self.kept).sum())

    @property
    def dropped_tokens(self) -> int:
        """Items that lost every choice: they skip the layer through the residual."""
        return int((~self.kept.any(-1)).sum())

    def numpy(self) -> "RoutingRecord":
        """The same record with numpy arrays (floats as float32, experts as int32)."""
        arrays = {f.name: _to_numpy(getattr(self, f.name)) for f in dataclasses.fields(self)}
        arrays["experts"] = np.asarray(arrays["experts"]).astype(np.int32, copy=False)
        arrays["kept"] = np.asarray(arrays["kept"], dtype=bool)
        return RoutingRecord(**arrays)

    @classmethod
    def concat(cls, records: Sequence["RoutingRecord"]) -> "RoutingRecord":
        """Join the numpy views of one block's records over consecutive batches."""
        views = [r.numpy() for r in records]
        joined = {}
        for f in dataclasses.fields(cls):
            values = [getattr(v, f.name) for v in views]
            joined[f.name] = np.concatenate(values) if isinstance(values[0], np.ndarray) else values[0]
        return cls(**joined)
