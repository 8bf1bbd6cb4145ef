"""The routing rules of V-MoE (§2.2, §4.1, appendix A) on hand-built examples, one rule each.

`route_tokens` is the function `TokenMoE` runs; tests/test_routing_reference.py
compares it with a slow loop on random inputs.
"""
import math

import pytest
import torch

from workbench.models import capacity, create_model, route_tokens


def gates_to_logits(rows):
    """Logits whose softmax is (up to rounding) the given gate rows; [S, E] -> [1, S, E]."""
    return torch.tensor(rows, dtype=torch.float32).log()[None]


def route(rows, k=1, cf=None, C=None, bpr=False, **kw):
    """Route one group; C (a target capacity) is turned into the capacity factor that gives it."""
    logits = gates_to_logits(rows)
    S, E = logits.shape[1:]
    if C is not None:
        cf = C * E / (k * S)
    r = route_tokens(logits, k, cf, batch_priority=bpr, capacity_multiple_of=1, **kw)
    if C is not None:
        assert r.capacity == C
    return r


# ----------------------------------------------------------------- capacity
def test_capacity_is_the_papers_formula_when_not_rounded():
    assert capacity(50, 8, 2, 1.05) == math.ceil(2 * 1.05 * 50 / 8) == 14
    assert capacity(50, 8, 1, 0.01) == 1


def test_reference_rule_rounds_capacity_up_to_a_multiple_of_4():
    # the example of issue 14: E=8, k=1, C=1.05 over 98 tokens
    assert capacity(98, 8, 1, 1.05, multiple_of=1) == 13
    assert capacity(98, 8, 1, 1.05, multiple_of=4) == 16
    assert capacity(50, 8, 2, 2.0, multiple_of=4) == 28      # ceil(25) -> 28
    assert capacity(64, 8, 1, 1.0, multiple_of=4) == 8       # already a multiple: unchanged


def test_round_instead_of_ceil_and_a_capacity_below_one_is_refused():
    assert capacity(10, 4, 1, 1.0, ceil_or_round="round") == 2        # round(2.5) = 2 (Python rounds half to even)
    assert capacity(10, 4, 1, 1.0, ceil_or_round="ceil") == 3
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        capacity(10, 8, 1, 0.1, ceil_or_round="round")
    with pytest.raises(ValueError, match="ceil_or_round"):
        capacity(10, 8, 1, 1.0, ceil_or_round="floor")


def test_the_model_uses_the_rule_of_its_config():
    x = torch.randn(2, 1, 28, 28)
    for multiple, expected in ((4, 28), (1, 25)):
        model = create_model("vmoe-2x64-e8k2", moe_layers=[1], capacity_multiple_of=multiple).eval()
        assert model(x, return_routing=True).routing[0].capacity == expected == model.blocks[1].mlp.capacity(
            tokens_per_image=50)


# ----------------------------------------------------------------- top-k and ties
def test_equal_gates_go_to_the_lower_expert_index_first():
    r = route_tokens(torch.tensor([[[0.0, 1.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0]]]), 2, None)
    assert r.expert_index[0].tolist() == [[1, 2], [0, 1]]
    many = torch.zeros(1, 200, 8)               # every row fully tied
    assert (route_tokens(many, 3, None).expert_index == torch.tensor([0, 1, 2])).all()


def test_gates_are_the_softmax_at_the_choices_not_renormalised():
    r = route([[0.5, 0.3, 0.2]], k=2)
    assert r.gates[0, 0].tolist() == pytest.approx([0.5, 0.3])
    assert r.weight[0, 0].tolist() == pytest.approx([0.5, 0.3])


# ----------------------------------------------------------------- priority
FOUR_WANT_EXPERT_0 = [[0.6, 0.4], [0.9, 0.1], [0.7, 0.3], [0.8, 0.2]]


def test_vanilla_fills_buffers_in_position_order():
    assert route(FOUR_WANT_EXPERT_0, C=2).kept[0, :, 0].tolist() == [True, True, False, False]


def test_bpr_keeps_the_highest_top1_gates():
    assert route(FOUR_WANT_EXPERT_0, C=2, bpr=True).kept[0, :, 0].tolist() == [False, True, False, True]


def test_bpr_ties_go_to_the_earlier_token():
    assert route([[0.5, 0.5]] * 3, C=1, bpr=True).kept[0, :, 0].tolist() == [True, False, False]


def test_every_first_choice_is_placed_before_any_second_choice():
    # token 0's 2nd choice is expert 1; tokens 1 and 2 pick expert 1 first. With C = 2 both 1st choices fit
    # and token 0's 2nd choice is dropped, although token 0 comes first by position.
    r = route([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7]], k=2, C=2)
    assert r.kept[0].tolist() == [[True, False], [True, True], [True, False]]
    assert r.slot[0].tolist() == [[0, -1], [0, 1], [1, -1]]


def test_a_dropped_first_choice_does_not_promote_the_second():
    # B loses expert 0 to A; its 2nd choice (expert 1) still queues behind C's 1st choice
    r = route([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]], k=2, C=1)
    assert r.kept[0].tolist() == [[True, False], [False, False], [True, False]]


def test_bpr_reuses_the_top1_order_for_the_second_choice():
    # both tokens' 2nd choice is expert 2 (C = 1). Token 1 is more confident at its 1st choice, so under BPR
    # its 2nd choice goes first, although token 0's 2nd gate (0.45) is higher than token 1's (0.06).
    rows = [[0.5, 0.05, 0.45], [0.04, 0.9, 0.06]]
    assert route(rows, k=2, C=1, bpr=True).kept[0, :, 1].tolist() == [False, True]
    assert route(rows, k=2, C=1, bpr=False).kept[0, :, 1].tolist() == [True, False]


def test_groups_have_separate_buffers():
    logits = gates_to_logits([[0.5, 0.5]] * 4).view(2, 2, 2)
    r = route_tokens(logits, 1, 0.5, batch_priority=False, capacity_multiple_of=1)
    assert r.capacity == 1 and r.kept[..., 0].tolist() == [[True, False], [True, False]]


def test_a_token_with_every_choice_dropped_has_zero_weight():
    r = route([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]], k=2, C=1)
    assert r.slot[0, 1].tolist() == [-1, -1] and r.weight[0, 1].tolist() == [0.0, 0.0]


# ----------------------------------------------------------------- noise and auxiliary losses
def test_injected_noise_moves_the_logits_by_noise_std_and_enables_the_load_loss():
    logits = torch.tensor([[[1.0, 0.0, 0.0, 0.0]]])
    noise = torch.tensor([[[0.0, 8.0, 0.0, 0.0]]])
    r = route_tokens(logits, 1, None, noise=noise, noise_std=0.25)
    assert torch.allclose(r.logits, logits + 0.25 * noise) and r.expert_index.item() == 1
    assert r.load_loss is not None and route_tokens(logits, 1, None).load_loss is None


def test_the_models_router_noise_std_is_one_over_e():
    model = create_model("vmoe-2x64-e8k1", moe_layers=[1])
    assert model.blocks[1].mlp.router.noise_std == pytest.approx(1 / 8)   # the reference's noise_std=1 / E


def cv2(x):
    return x.var(unbiased=False) / x.mean() ** 2


def test_importance_loss_is_computed_per_group_and_changes_with_the_grouping():
    torch.manual_seed(0)
    logits = torch.randn(4, 10, 4) * 2
    per_group = route_tokens(logits, 1, None).importance_loss
    assert per_group.shape == (4,)
    for g in range(4):
        assert per_group[g] == pytest.approx(cv2(logits[g].softmax(-1).sum(0)).item(), rel=1e-5)
    pooled = route_tokens(logits.reshape(1, 40, 4), 1, None).importance_loss
    assert pooled.shape == (1,) and abs(per_group.mean() - pooled[0]) > 0.01


def test_model_aux_losses_are_averaged_over_groups_and_depend_on_group_size():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28)
    losses = {}
    for gs in (1, 4):
        torch.manual_seed(1)
        model = create_model("vmoe-2x64-e4k1", moe_layers=[1], group_size=gs).eval()
        out = model(x, return_routing=True)
        r = model.blocks[1].mlp.route(model.blocks[1].norm2(torch.randn(4, 50, 64)))
        assert r.importance_loss.shape == (4 // gs,)
        losses[gs] = out.aux_loss["importance"].item()
    assert losses[1] != pytest.approx(losses[4], rel=1e-3)


# ----------------------------------------------------------------- in a model
def test_no_expert_ever_exceeds_its_capacity_in_a_model():
    model = create_model("vmoe-2x64-e4k2", moe_layers=[1], eval_capacity_ratio=0.5, group_size=2).eval()
    rec = model(torch.randn(6, 1, 28, 28), return_routing=True).routing[0]
    assert rec.capacity == capacity(2 * 50, 4, 2, 0.5, multiple_of=4)
    assert rec.dropped_assignments > 0
    for g in range(3):
        chosen = rec.experts[2 * g:2 * g + 2][rec.kept[2 * g:2 * g + 2]]
        assert torch.bincount(chosen, minlength=4).max() <= rec.capacity


def test_a_smaller_last_group_gets_its_own_capacity():
    model = create_model("vmoe-2x64-e4k1", moe_layers=[1], eval_capacity_ratio=0.3, group_size=2,
                         capacity_multiple_of=1).eval()
    rec = model(torch.randn(3, 1, 28, 28), return_routing=True).routing[0]
    last = rec.experts[2][rec.kept[2]]
    assert torch.bincount(last, minlength=4).max() <= capacity(50, 4, 1, 0.3)


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


def test_vanilla_order_matches_a_gshard_one_hot_cumsum():
    """Vanilla order == GShard's dense formulation: position in buffer = cumsum of one-hot choices."""
    torch.manual_seed(1)
    G, S, E, k = 5, 30, 4, 2
    r = route_tokens(torch.randn(G, S, E), k, 1.0, batch_priority=False, capacity_multiple_of=1)
    mask = torch.nn.functional.one_hot(r.expert_index, E)                  # (G, S, k, E)
    choice_major = mask.transpose(1, 2).reshape(G, k * S, E)
    pos = (choice_major.cumsum(1) - 1).view(G, k, S, E).transpose(1, 2)
    reference = ((pos < r.capacity) & (mask == 1)).any(-1)
    assert torch.equal(r.kept, reference)
