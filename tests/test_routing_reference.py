"""`route_tokens` against a slow, obviously correct loop written from the rules (issue 14).

The loop is plain Python over numpy arrays, one item and one choice at a time,
following the rules as google-research/vmoe states them: top-k with the lower
expert index first on ties; capacity ceil (or round) of k * C * S / E, rounded
up to a multiple; k-major priority; BPR by the top-1 gate with a stable sort,
that one order reused for every choice rank; per-group CV^2 losses.
Both sides get the same gates (the softmax is not what is being tested).
"""
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from workbench.models import route_tokens


def slow_capacity(S, E, k, cf, multiple_of, ceil_or_round):
    share = S * k * cf / E
    c = math.ceil(share) if ceil_or_round == "ceil" else round(share)
    while c % multiple_of:
        c += 1
    return c


def slow_route(probs, k, cf, bpr, multiple_of, ceil_or_round):
    """probs [G, S, E] numpy -> (expert_index, slot) [G, S, K] lists, capacity."""
    G, S, E = probs.shape
    C = slow_capacity(S, E, k, cf, multiple_of, ceil_or_round)
    experts = np.zeros((G, S, k), np.int64)
    slots = np.full((G, S, k), -1, np.int64)
    for g in range(G):
        for s in range(S):
            ranked = sorted(range(E), key=lambda e: (-probs[g, s, e], e))   # ties: lower index first
            experts[g, s] = ranked[:k]
        if bpr:
            order = sorted(range(S), key=lambda s: -probs[g, s, experts[g, s, 0]])  # Python's sort is stable
        else:
            order = list(range(S))
        filled = [0] * E
        for rank in range(k):                    # every 1st choice before any 2nd choice
            for s in order:
                e = experts[g, s, rank]
                if filled[e] < C:
                    slots[g, s, rank] = filled[e]
                    filled[e] += 1
    return experts, slots, C


def slow_losses(clean, noisy, noise_std, k):
    clean, noisy = clean.astype(np.float64), noisy.astype(np.float64)
    gates = np.exp(clean - clean.max(-1, keepdims=True))
    gates /= gates.sum(-1, keepdims=True)
    importance = gates.sum(1)                                    # [G, E]
    imp = importance.var(-1) / importance.mean(-1) ** 2
    threshold = np.sort(noisy, -1)[..., -k][..., None]           # k-th largest noisy logit
    p = 1 - norm.cdf((threshold - clean) / noise_std)
    load = p.mean(1)
    return imp, load.var(-1) / load.mean(-1) ** 2


CASES = [  # G, S, E, k, capacity factor, BPR, multiple_of, ceil_or_round
    (3, 50, 8, 2, 1.05, True, 4, "ceil"),
    (3, 50, 8, 2, 1.05, False, 1, "ceil"),
    (2, 98, 8, 1, 1.05, True, 4, "ceil"),
    (4, 20, 4, 1, 0.5, True, 1, "round"),
    (2, 64, 16, 4, 0.75, True, 4, "round"),
    (5, 30, 3, 3, 1.0, False, 4, "ceil"),
]


@pytest.mark.parametrize("G, S, E, k, cf, bpr, multiple_of, rounding", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_route_tokens_equals_the_slow_loop(G, S, E, k, cf, bpr, multiple_of, rounding, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(G, S, E, generator=gen) * 2
    logits = logits.bfloat16().float()            # bf16 rounding makes exact ties, as under autocast
    noise = torch.randn(G, S, E, generator=gen)
    noise_std = 1.0 / E
    r = route_tokens(logits, k, cf, batch_priority=bpr, capacity_multiple_of=multiple_of, ceil_or_round=rounding,
                     noise=noise, noise_std=noise_std)
    probs = (logits + noise_std * noise).softmax(-1)          # the gates both sides route on
    assert torch.equal(r.probs, probs)
    experts, slots, C = slow_route(probs.numpy(), k, cf, bpr, multiple_of, rounding)
    assert r.capacity == C
    assert np.array_equal(r.expert_index.numpy(), experts)
    assert np.array_equal(r.slot.numpy(), slots)
    assert np.array_equal(r.gates.numpy(), np.take_along_axis(probs.numpy(), experts, -1))
    imp, load = slow_losses(logits.numpy(), (logits + noise_std * noise).numpy(), noise_std, k)
    assert np.allclose(r.importance_loss.numpy(), imp, rtol=1e-4, atol=1e-7)
    assert np.allclose(r.load_loss.numpy(), load, rtol=1e-3, atol=1e-6)


def test_ties_occur_in_these_cases_so_the_tie_rule_is_exercised():
    logits = (torch.randn(3, 50, 8, generator=torch.Generator().manual_seed(0)) * 2).bfloat16().float()
    top2 = logits.softmax(-1).sort(-1, descending=True).values[..., :3]
    assert (top2[..., :-1] == top2[..., 1:]).any()
