"""The capacity rule and Batch Priority Routing, on hand-built examples (V-MoE §2.2, §4.1)."""
import math

import torch

from workbench.models import assign_capacity, capacity, create_model


def test_capacity_formula():
    assert capacity(50, 8, 2, 1.05) == math.ceil(2 * 1.05 * 50 / 8) == 14
    assert capacity(50, 8, 1, 0.01) == 1  # never zero


def route(experts, gates, cap, bpr, group=None):
    experts, gates = torch.tensor(experts), torch.tensor(gates)
    group = torch.zeros(len(experts), dtype=torch.long) if group is None else torch.tensor(group)
    caps = torch.full((int(group.max()) + 1,), cap)
    return assign_capacity(experts, gates, group, 2, caps, bpr)


def test_vanilla_fills_buffers_in_position_order():
    # 4 tokens all want expert 0 first; capacity 2 -> the first two positions win
    kept = route([[0], [0], [0], [0]], [[0.6], [0.9], [0.7], [0.8]], cap=2, bpr=False)
    assert kept[:, 0].tolist() == [True, True, False, False]


def test_bpr_keeps_the_highest_top1_gates():
    kept = route([[0], [0], [0], [0]], [[0.6], [0.9], [0.7], [0.8]], cap=2, bpr=True)
    assert kept[:, 0].tolist() == [False, True, False, True]


def test_bpr_ties_go_to_the_earlier_token():
    kept = route([[0], [0], [0]], [[0.5], [0.5], [0.5]], cap=1, bpr=True)
    assert kept[:, 0].tolist() == [True, False, False]


def test_every_first_choice_is_placed_before_any_second_choice():
    # token 0's 2nd choice is expert 1; tokens 1 and 2 pick expert 1 first.
    # capacity 2: both 1st choices fit, token 0's 2nd choice is dropped although it comes first by position
    kept = route([[0, 1], [1, 0], [1, 0]], [[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]], cap=2, bpr=False)
    assert kept.tolist() == [[True, False], [True, True], [True, False]]


def test_dropped_first_choice_does_not_promote_the_second():
    # B loses expert 0 to A; its 2nd choice (expert 1) still queues behind C's 1st choice
    kept = route([[0, 1], [0, 1], [1, 0]], [[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]], cap=1, bpr=False)
    assert kept.tolist() == [[True, False], [False, False], [True, False]]


def test_groups_have_separate_buffers():
    kept = route([[0], [0], [0], [0]], [[0.5], [0.5], [0.5], [0.5]], cap=1, bpr=False, group=[0, 0, 1, 1])
    assert kept[:, 0].tolist() == [True, False, True, False]


def test_no_expert_ever_exceeds_its_capacity_in_a_model():
    model = create_model("vmoe-2x64-e4k2", moe_layers=[1], eval_capacity_ratio=0.5, group_size=2).eval()
    rec = model(torch.randn(6, 1, 28, 28), return_routing=True).routing[0]
    assert rec.capacity == capacity(2 * 50, 4, 2, 0.5)
    assert rec.dropped_assignments > 0
    for g in range(3):
        chosen = rec.experts[2 * g:2 * g + 2][rec.kept[2 * g:2 * g + 2]]
        assert torch.bincount(chosen, minlength=4).max() <= rec.capacity


def test_bpr_drops_the_least_confident_tokens_in_a_model():
    model = create_model("vmoe-2x64-e4k1", moe_layers=[1], eval_capacity_ratio=0.5).eval()
    rec = model(torch.randn(1, 1, 28, 28), return_routing=True).routing[0]
    top1, kept = rec.gates[0, :, 0], rec.kept[0, :, 0]
    for e in range(4):
        mine = rec.experts[0, :, 0] == e
        if kept[mine].all() or not kept[mine].any():
            continue
        assert top1[mine & kept].min() >= top1[mine & ~kept].max()


def test_smaller_capacity_drops_more_tokens():
    model = create_model("vmoe-2x64-e4k2", moe_layers=[1]).eval()
    x = torch.randn(4, 1, 28, 28)
    drops = []
    for ratio in (2.0, 1.0, 0.5, 0.25):
        model.set_routing(eval_capacity_ratio=ratio)
        drops.append(model(x, return_routing=True).routing[0].dropped_assignments)
    assert drops == sorted(drops) and drops[-1] > drops[0]


def test_dropped_tokens_pass_through_the_residual_unchanged():
    model = create_model("vmoe-2x64-e4k1", moe_layers=[1], eval_capacity_ratio=0.1).eval()
    moe = model.blocks[1].mlp
    h = torch.randn(1, 50, 64)
    out, rec, _ = moe(h)
    dropped = ~rec.kept[0, :, 0]
    assert dropped.any()
    assert (out[0][dropped] == 0).all()  # block adds nothing: x + 0


def test_capacity_rule_matches_a_gshard_one_hot_cumsum_reference():
    """Vanilla order == GShard's dense formulation: position in buffer = cumsum of one-hot choices."""
    torch.manual_seed(1)
    G, S, E, k, cap = 5, 30, 4, 2, 9
    experts = torch.stack([torch.randperm(E)[:k] for _ in range(G * S)])
    gates = torch.rand(G * S, k)
    group = torch.arange(G).repeat_interleave(S)
    kept = assign_capacity(experts, gates, group, E, torch.full((G,), cap), batch_priority=False)
    mask = torch.nn.functional.one_hot(experts.view(G, S, k), E)             # (G, S, k, E)
    choice_major = mask.transpose(1, 2).reshape(G, k * S, E)
    pos = (choice_major.cumsum(1) - 1).view(G, k, S, E).transpose(1, 2)
    reference = ((pos < cap) & (mask == 1)).any(-1).view(G * S, k)
    assert torch.equal(kept, reference)
