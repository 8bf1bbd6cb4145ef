"""Behaviour of the three model families: shapes, routing invariants, equivalence to a slow reference."""

import pytest
import torch
import torch.nn.functional as F

from workbench.models import ModelConfig, create_model
from workbench.models.experts import Experts
from workbench.models.vit import Mlp

FAMILIES = ["vit-4x64", "vmoe-4x64-e4k2", "mvmoe-4x64-e4k1"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def images(b=6, c=1, s=28):
    return torch.randn(b, c, s, s)


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_shape_and_dtype_for_every_family(name):
    model = create_model(name, num_classes=7).eval()
    x = images()
    logits = model(x)
    assert logits.shape == (6, 7) and logits.dtype == torch.float32
    out = model(x, return_routing=True)
    assert torch.equal(out.logits, logits)
    assert out.features.shape == (6, 64)


@pytest.mark.parametrize("name", FAMILIES)
def test_rgb_and_other_sizes_work(name):
    model = create_model(name, num_classes=3, img_size=32, in_chans=3, patch_size=8).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize("name", FAMILIES)
def test_bf16_autocast_forward_is_finite(name):
    model = create_model(name).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images(), return_routing=True, labels=torch.zeros(6, dtype=torch.long))
    assert torch.isfinite(out.logits.float()).all()


def test_heads_default_to_width_over_64():
    assert create_model("vit-12x192").cfg.heads == 3
    assert create_model("vit-6x64").cfg.heads == 1
    assert create_model("vit-6x96").cfg.heads == 1


def test_moe_block_has_exactly_the_parameters_of_E_dense_mlps():
    dense = sum(p.numel() for p in Mlp(96, 384).parameters())
    experts = sum(p.numel() for p in Experts(4, 96, 384).parameters())
    assert experts == 4 * dense


def test_placements_follow_each_paper():
    assert ModelConfig(family="vmoe", depth=12, num_experts=8, top_k=2).moe_block_indices() == [9, 11]
    assert ModelConfig(family="mvmoe", depth=12, num_experts=8).moe_block_indices() == [10, 11]
    cfg = ModelConfig(family="vmoe", depth=6, num_experts=4, moe_layers="every-2")
    assert cfg.moe_block_indices() == [1, 3, 5]
    assert ModelConfig(family="vmoe", depth=6, num_experts=4, moe_layers=[0, 4]).moe_block_indices() == [0, 4]


# ----------------------------------------------------------------- per image
def test_per_image_routing_picks_one_expert_set_per_image_used_in_every_moe_block():
    model = create_model("mvmoe-4x64-e4k2", moe_layers="last-3").eval()
    out = model(images(), return_routing=True)
    assert len(out.routing) == 3
    first = out.routing[0]
    assert first.experts.shape == (6, 2) and first.kind == "image"
    for rec in out.routing[1:]:
        assert torch.equal(rec.experts, first.experts)
    assert first.kept.all() and first.router_input.shape == (6, 64)


def test_per_layer_routers_decide_independently():
    model = create_model("mvmoe-4x64-e4k1", per_layer_routers=True).eval()
    assert len(model.routers) == 2
    out = model(images(32), return_routing=True)
    assert not torch.equal(out.routing[0].probs, out.routing[1].probs)


def test_router_reads_the_output_of_the_last_dense_block():
    model = create_model("mvmoe-3x64-e4k1", router_input="cls").eval()
    out = model.forward_intermediates(images(), indices=[0])
    assert torch.allclose(out.routing[0].router_input, out.intermediates[0][:, 0])


def test_superclass_router_loss_is_lambda_times_cross_entropy():
    sc = [0, 0, 1, 1, 2, 2, 3, 3, 3, 3]
    model = create_model("mvmoe-3x64-e4k1", superclasses=sc, superclass_loss_weight=0.3).train()
    y = torch.tensor([0, 2, 4, 6, 8, 9])
    out = model(images(), return_routing=True, labels=y)
    target = torch.tensor(sc)[y]
    expected = 0.3 * F.cross_entropy(out.routing[0].logits, target)
    assert set(out.aux_loss) == {"superclass"}
    assert torch.allclose(out.aux_loss["superclass"], expected)


def test_end_to_end_per_image_router_uses_balancing_losses():
    model = create_model("mvmoe-3x64-e4k1").train()
    out = model(images(), return_routing=True)
    assert set(out.aux_loss) == {"importance", "load"}


def slow_reference_moe(x, experts: Experts, chosen, weights, kept):
    """Loop over items and choices, one expert call each."""
    out = torch.zeros_like(x)
    for i in range(x.shape[0]):
        for c in range(chosen.shape[1]):
            if kept[i, c]:
                out[i] += weights[i, c] * experts.expert(int(chosen[i, c]), x[i])
    return out


def test_per_image_moe_equals_a_slow_loop_over_experts():
    model = create_model("mvmoe-2x64-e4k2", moe_layers=[1]).eval()
    x = model.embed(images())
    x, _, _ = model.blocks[0](x)
    blk = model.blocks[1]
    decision = model.routers[0](x)
    h = blk.norm2(x + blk.attn(blk.norm1(x)))
    fast, record, _ = blk.mlp(h, decision)
    ref = slow_reference_moe(h, blk.mlp.experts, decision.experts, decision.gates,
                             torch.ones_like(decision.experts, dtype=torch.bool))
    assert torch.equal(record.experts, decision.experts) and record.kept.all()
    assert torch.allclose(fast, ref, atol=1e-5)


def test_per_token_moe_equals_a_slow_loop_over_experts_including_drops():
    model = create_model("vmoe-2x64-e4k2", moe_layers=[1], eval_capacity_ratio=0.5).eval()
    moe = model.blocks[1].mlp
    h = torch.randn(3, 50, 64)
    fast, rec, _ = moe(h)
    assert rec.dropped_assignments > 0
    flat = h.reshape(-1, 64)
    ref = slow_reference_moe(flat, moe.experts, rec.experts.reshape(-1, 2), rec.gates.reshape(-1, 2),
                             rec.kept.reshape(-1, 2))
    assert torch.allclose(fast.reshape(-1, 64), ref, atol=1e-5)


@pytest.mark.parametrize("expert", [0, 3])
def test_batch_one_fast_path_equals_the_general_dispatch(expert):
    """One image, k = 1 (the mobile case) skips the sort/gather/scatter: same numbers, same gradients."""
    experts = Experts(4, 16, 32)
    x = torch.randn(1, 5, 16, requires_grad=True)
    chosen, gate = torch.tensor([[expert]]), torch.tensor([[0.7]])
    fast = experts(x, chosen, gate)
    ref = slow_reference_moe(x.detach(), experts, chosen, gate, torch.ones(1, 1, dtype=torch.bool))
    assert torch.allclose(fast, ref, atol=1e-6)
    fast.sum().backward()
    assert experts.fc1_weight.grad[expert].abs().sum() > 0
    assert experts.fc1_weight.grad[[e for e in range(4) if e != expert]].abs().sum() == 0


def test_dispatch_never_runs_unselected_experts():
    model = create_model("mvmoe-2x64-e4k1").eval()
    calls = []
    experts = model.blocks[1].mlp.experts
    original = experts.expert
    experts.expert = lambda e, x: (calls.append((e, x.shape[0])), original(e, x))[1]
    model.set_routing(disabled_experts=[1, 2, 3])
    model(images(5))
    assert calls == [(0, 5)]


# ----------------------------------------------------------------- gradients and losses
@pytest.mark.parametrize("name", ["vmoe-2x64-e4k2", "mvmoe-2x64-e4k1"])
def test_gradients_reach_router_and_experts(name):
    model = create_model(name, moe_layers=[1]).train()
    out = model(images(8), return_routing=True)
    (F.cross_entropy(out.logits, torch.arange(8) % 10) + out.total_aux_loss).backward()
    router = model.blocks[1].mlp.router.proj if name.startswith("vmoe") else model.routers[0].router.proj
    experts = model.blocks[1].mlp.experts
    assert router.weight.grad.abs().sum() > 0
    assert experts.fc1_weight.grad.abs().sum() > 0


def _set_router(model, weight):
    with torch.no_grad():
        model.blocks[1].mlp.router.proj.weight.copy_(weight)


def test_balancing_losses_are_near_zero_for_a_uniform_router_and_large_for_a_collapsed_one():
    model = create_model("vmoe-2x64-e4k1", moe_layers=[1]).train()
    _set_router(model, torch.zeros(4, 64))
    uniform = model(images(16), return_routing=True).aux_loss
    collapsed_w = torch.zeros(4, 64)
    collapsed_w[0] = 5.0  # expert 0 wins for every token whose features sum > 0 ... make it all tokens:
    model.blocks[1].norm2.weight.data.zero_()
    model.blocks[1].norm2.bias.data.fill_(1.0)
    _set_router(model, collapsed_w)
    collapsed = model(images(16), return_routing=True).aux_loss
    for name in ("importance", "load"):
        assert uniform[name] < 1e-4
        assert collapsed[name].item() > 100 * max(uniform[name].item(), 1e-6)
        assert collapsed[name] / 0.005 > 1.0  # CV^2 of one-hot loads over 4 experts is 3


# ----------------------------------------------------------------- inference-time overrides
def test_disabled_experts_are_never_chosen_and_router_renormalises():
    model = create_model("vmoe-2x64-e4k2", moe_layers=[1]).eval()
    model.set_routing(disabled_experts=[0, 3])
    rec = model(images(), return_routing=True).routing[0]
    assert set(rec.experts.unique().tolist()) <= {1, 2}
    assert torch.allclose(rec.probs.sum(-1), torch.ones(6, 50))
    assert (rec.probs[..., [0, 3]] == 0).all()


def test_top_k_can_change_without_retraining():
    model = create_model("mvmoe-2x64-e4k1").eval()
    model.set_routing(top_k=3)
    rec = model(images(), return_routing=True).routing[0]
    assert rec.experts.shape == (6, 3)
    with pytest.raises(ValueError, match="top_k"):
        model.set_routing(top_k=5)


def test_set_routing_is_module_state_and_leaves_the_config_as_built():
    model = create_model("vmoe-2x64-e4k2", moe_layers=[1]).eval()
    built = model.cfg.to_dict()
    model.set_routing(top_k=1, eval_capacity_ratio=0.5, batch_priority=False, disabled_experts=[2],
                      capacity_multiple_of=1)
    assert model.cfg.to_dict() == built
    s = model.routing_settings()
    assert (s["top_k"], s["eval_capacity_ratio"], s["batch_priority"], s["disabled_experts"],
            s["capacity_multiple_of"]) == (1, 0.5, False, [2], 1)
    rec = model(images(), return_routing=True).routing[0]
    assert rec.experts.shape[-1] == 1 and rec.capacity == 7   # ceil(1 * 0.5 * 50 / 4), no rounding
    with pytest.raises(ValueError, match="top_k"):
        model.set_routing(top_k=1, disabled_experts=[0, 1, 2, 3])
    assert model.routing_settings() == s                       # a refused change changes nothing


def test_forcing_an_expert_sends_everything_there_with_gate_one():
    model = create_model("vmoe-2x64-e4k2", moe_layers=[1]).eval()
    model.set_routing(force_expert=3)
    rec = model(images(), return_routing=True).routing[0]
    assert (rec.experts == 3).all() and (rec.gates == 1).all() and rec.experts.shape[-1] == 1
    model.set_routing(force_expert=None)
    assert model(images(), return_routing=True).routing[0].experts.shape[-1] == 2


def test_every_block_answers_the_same_call():
    for name in ("vit-2x64", "vmoe-2x64-e4k2", "mvmoe-2x64-e4k1"):
        model = create_model(name, **({} if name.startswith("vit") else {"moe_layers": [1]})).eval()
        x = model.embed(images())
        decision = None
        for i, blk in enumerate(model.blocks):
            decision, _ = model.decide(i, x, decision, None)
            x, record, aux = blk(x, decision)
            assert x.shape == (6, 50, 64) and isinstance(aux, dict)
            assert (record is None) == (i not in model.moe_block_indices)


def test_forward_intermediates_keeps_block_outputs_and_can_stop_early():
    model = create_model("vmoe-4x64-e4k1", moe_layers=[1, 3]).eval()
    x = images()
    full = model.forward_intermediates(x, indices=2)
    assert sorted(full.intermediates) == [2, 3] and torch.allclose(full.logits, model(x))
    early = model.forward_intermediates(x, indices=[1], stop_early=True)
    assert early.logits is None and [r.layer for r in early.routing] == [1]
    assert torch.equal(model.router_logits(x, 1), early.routing[0].logits)
    with pytest.raises(ValueError, match="not an MoE block"):
        model.router_logits(x, 0)


def test_per_image_models_refuse_capacity_settings():
    with pytest.raises(ValueError, match="capacity"):
        create_model("mvmoe-2x64-e4k1").set_routing(eval_capacity_ratio=0.5)


# ----------------------------------------------------------------- invalid configs
@pytest.mark.parametrize("name, overrides, message", [
    ("vmoe-6x96-e4k5", {}, "num_experts >= top_k"),
    ("vit-6x100", {"num_heads": 3}, "not divisible by num_heads"),
    ("vit-6x96", {"img_size": 30}, "not divisible by patch_size"),
    ("vmoe-6x96-e4k1", {"moe_layers": [7]}, "out of range"),
    ("vmoe-6x96-e4k1", {"moe_layers": "last-5"}, "odd blocks"),
    ("mvmoe-6x96-e4k1", {"superclasses": [0, 1, 2]}, "10 classes"),
    ("mvmoe-6x96-e4k1", {"superclasses": [0] * 10}, "one per expert"),
    ("mvmoe-6x96-e4k1", {"router_input": "max"}, "router_input"),
    ("vit-6x96", {"bogus": 1}, "unknown model option"),
    ("vit-6x96", {"depth": 7}, "contradict preset"),
    ("resnet-50", {}, "unknown preset"),
    ("vit-6x96", {"num_classes": 0}, "num_classes"),
    ("vit-6x96", {"mlp_ratio": -1.0}, "mlp_ratio must be a number > 0"),
    ("vit-6x96", {"mlp_ratio": 0}, "mlp_ratio must be a number > 0"),
    ("vit-6x96", {"mlp_ratio": float("nan")}, "mlp_ratio"),
    ("mvmoe-6x96-e4k1", {"superclass_loss_weight": -0.1}, "superclass_loss_weight must be a number >= 0"),
    ("vmoe-6x96-e4k1", {"importance_loss_weight": float("inf")}, "importance_loss_weight"),
    ("vmoe-6x96-e4k1", {"load_loss_weight": -1}, "load_loss_weight"),
    ("vmoe-6x96-e4k1", {"noise_std": -0.5}, "noise_std"),
    ("vmoe-6x96-e4k1", {"eval_capacity_ratio": 0}, "eval_capacity_ratio must be a number > 0"),
    ("vmoe-6x96-e4k1", {"group_size": 0}, "group_size must be an integer >= 1"),
    ("vmoe-6x96-e4k1", {"capacity_multiple_of": 0}, "capacity_multiple_of"),
    ("vmoe-6x96-e4k1", {"capacity_ceil_or_round": "floor"}, "capacity_ceil_or_round"),
    ("vit-6x96", {"num_classes": 2.5}, "num_classes must be an integer"),
    ("vit-6x96", {"superclasses": [0] * 10}, "super-class map only guides the per-image"),
])
def test_invalid_configurations_raise_clear_errors(name, overrides, message):
    with pytest.raises(ValueError, match=message):
        create_model(name, **overrides)


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="expected input"):
        create_model("vit-2x64")(torch.randn(2, 3, 28, 28))


def test_a_config_saved_before_capacity_rounding_keeps_the_papers_rule():
    old = create_model("vmoe-6x96-e8k2").cfg.to_dict()
    del old["capacity_multiple_of"], old["capacity_ceil_or_round"]
    assert ModelConfig.from_dict(old).capacity_multiple_of == 1
    assert create_model("vmoe-6x96-e8k2").cfg.capacity_multiple_of == 4   # new models match the reference


def test_config_round_trips_through_a_plain_dict():
    model = create_model("vmoe-6x96-e8k2", batch_priority=False)
    again = ModelConfig.from_dict(model.cfg.to_dict())
    assert again == model.cfg
    with pytest.raises(ValueError, match=r"unknown model config field\(s\)"):
        ModelConfig.from_dict({**model.cfg.to_dict(), "extra": 1})


def test_written_out_cpu_attention_equals_the_fused_kernel(monkeypatch):
    """The CPU path (matmul-softmax-matmul, faster to train) and torch's fused kernel are one function."""
    from workbench.models.vit import Attention

    torch.manual_seed(0)
    attn = Attention(64, 4)
    x = torch.randn(8, 50, 64, requires_grad=True)
    results = []
    for limit in (Attention.EXPLICIT_MAX_TOKENS, 0):   # written out, then fused
        monkeypatch.setattr(Attention, "EXPLICIT_MAX_TOKENS", limit)
        y = attn(x)
        results.append((y, *torch.autograd.grad(y.square().sum(), [x, attn.qkv.weight])))
    for written, fused in zip(*results):
        torch.testing.assert_close(written, fused, rtol=1e-4, atol=1e-5)
