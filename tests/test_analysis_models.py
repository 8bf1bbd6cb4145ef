"""Analyses that run models: the routing pass, attributions, ablation, sweeps, embeddings, trade-off table.

Tiny models (8x8 images, 2x2 patches) on random data keep this file fast.
"""
import numpy as np
import pytest
import torch

from analysis.ablation import expert_ablation, forced_vs_disabled_gap, impact_matrix, oracle_routing
from analysis.attribution import METHODS, class_attribution, region_share, router_attribution
from analysis.collect import collect_routing, force_expert, routing_overrides
from analysis.embedding import embed, embedding_frame
from analysis.routing import compare_batch_priority
from analysis.tradeoff import checkpoint_table, moe_gains, pareto_frontier, sweep_routing
from pages.figures import overlay_figure, strategy_figure, tradeoff_figure
from workbench.flops import count_macs
from workbench.models import create_model

MEAN, STD = (0.5,), (0.5,)


def tiny(name, **kw):
    torch.manual_seed(0)
    kw.setdefault("moe_layers", [0, 1])
    return create_model(name, num_classes=4, img_size=8, patch_size=2, **kw)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (48, 1, 8, 8), dtype=torch.uint8, generator=g), torch.randint(0, 4, (48,), generator=g)


def forward(model, images, **kw):
    x = (images.float() / 255 - 0.5) / 0.5
    with torch.inference_mode():
        return model.eval()(x, return_routing=True, **kw)


# ---------------------------------------------------------------- the routing pass
@pytest.mark.parametrize("name,items", [("mvmoe-2x64-e4k1", ()), ("vmoe-2x64-e4k2", (17,))])
def test_collect_routing_keeps_every_layers_decisions_as_arrays(name, items, data):
    images, labels = data
    model = tiny(name)
    s = collect_routing(model, images, labels, MEAN, STD, batch_size=20)
    out = forward(model, images)
    assert s.layer_indices == [0, 1]
    for lr, rec in zip(s.layers, out.routing):
        k = model.cfg.top_k
        assert lr.experts.shape == lr.kept.shape == lr.gates.shape == (48, *items, k)
        assert lr.probs.shape == (48, *items, 4) and lr.router_input.shape == (48, 64)
        np.testing.assert_array_equal(lr.experts, rec.experts.numpy())
    np.testing.assert_array_equal(s.predictions, out.logits.argmax(1).numpy())
    assert s.features.shape == (48, 64)


def test_collect_routing_restores_training_mode(data):
    model = tiny("mvmoe-2x64-e4k1").train()
    collect_routing(model, *data, MEAN, STD)
    assert model.training


# ---------------------------------------------------------------- attributions
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["mvmoe-2x64-e4k1", "vmoe-2x64-e4k2"])
def test_attributions_have_the_inputs_shape_and_are_finite(name, method, data):
    model = tiny(name)
    image = data[0][0]                                                   # (C, H, W)
    for attr in (class_attribution(model, image, MEAN, STD, method=method, n_steps=8),
                 router_attribution(model, image, MEAN, STD, expert=1, method=method, n_steps=8)):
        assert attr.shape == image.shape and np.isfinite(attr).all() and np.abs(attr).sum() > 0
    batch = router_attribution(model, data[0][:3], MEAN, STD, method=method, n_steps=8)
    assert batch.shape == (3, 1, 8, 8)
    assert overlay_figure(image, attr).data                             # a drawable figure


TOP_LEFT = np.zeros((8, 8), bool)
TOP_LEFT[:4, :4] = True


def quadrant_router_model():
    """A per-image MoE whose router genuinely reads only the top-left quadrant.

    The MoE block is block 0, so the router reads the embedded tokens before
    any attention has mixed patches; a pre-hook zeroes the tokens of patches
    outside the quadrant (2x2 of the 4x4 patch grid), so the router's input
    is a function of those 16 pixels alone. Everything after the router still
    sees the whole image.
    """
    model = tiny("mvmoe-2x64-e4k1", moe_layers=[0])
    keep = torch.zeros(17, 1)
    for p in range(16):
        if p // 4 < 2 and p % 4 < 2:
            keep[1 + p] = 1

    def only_quadrant(module, args):
        return (args[0] * keep,)

    model.routers[0].register_forward_pre_hook(only_quadrant)
    return model


@pytest.mark.parametrize("method", METHODS)
def test_router_attribution_concentrates_on_the_quadrant_the_router_reads(method, data):
    model = quadrant_router_model()
    for image in data[0][:3]:
        attr = router_attribution(model, image, MEAN, STD, method=method, n_steps=16)
        assert region_share(attr, TOP_LEFT) > 0.8


def test_the_class_logit_of_that_model_still_reads_the_whole_image(data):
    model = quadrant_router_model()
    attr = class_attribution(model, data[0][0], MEAN, STD, method="saliency")
    assert region_share(attr, TOP_LEFT) < 0.6


def test_per_token_router_attribution_follows_the_chosen_tokens_when_attention_is_off(data):
    # with block 0's attention output zeroed, a token's router input depends on its own patch only
    model = tiny("vmoe-2x64-e4k1", moe_layers=[0])
    torch.nn.init.zeros_(model.blocks[0].attn.proj.weight)
    torch.nn.init.zeros_(model.blocks[0].attn.proj.bias)
    attr = router_attribution(model, data[0][0], MEAN, STD, expert=0, tokens=[0, 1, 4, 5], method="ig")
    assert region_share(attr, TOP_LEFT) > 0.99


# ---------------------------------------------------------------- ablation
@pytest.mark.parametrize("name", ["mvmoe-2x64-e4k1", "vmoe-2x64-e4k2"])
def test_disabling_all_but_one_expert_equals_forcing_that_expert(name, data):
    model = tiny(name)
    for e in range(4):
        assert forced_vs_disabled_gap(model, data[0], MEAN, STD, e) < 1e-5
    # and forcing is not a no-op: different experts give different models
    with force_expert(model, 0):
        a = forward(model, data[0]).logits
    with force_expert(model, 1):
        b = forward(model, data[0]).logits
    assert (a - b).abs().max() > 1e-4
    s = model.routing_settings()
    assert s["top_k"] == (1 if name.startswith("mvmoe") else 2) and s["disabled_experts"] == []
    assert s["force_expert"] is None


def test_oracle_routing_sends_each_image_to_its_super_class_expert(data):
    images, labels = data
    superclasses = [0, 1, 2, 3]                      # class -> super-class = expert
    model = tiny("mvmoe-2x64-e4k1", superclasses=superclasses)
    r = oracle_routing(model, images, labels, MEAN, STD)
    # the oracle, assembled by hand from forced passes of each super-class's images
    expected = np.zeros(len(labels), dtype=bool)
    for g in range(4):
        idx = np.flatnonzero(np.asarray(superclasses)[labels.numpy()] == g)
        with force_expert(model, g):
            expected[idx] = forward(model, images[idx]).logits.argmax(1).numpy() == labels.numpy()[idx]
    assert r["oracle_accuracy"] == pytest.approx(expected.mean())
    # routed accuracy splits exactly into router-right and router-wrong images
    s = collect_routing(model, images, labels, MEAN, STD)
    assert r["routed_accuracy"] == pytest.approx((s.predictions == labels.numpy()).mean())
    assert oracle_routing(model, images, labels, MEAN, STD, summary=s) == r   # a pass at hand is reused
    right = r["router_accuracy"]
    parts = [right * r["accuracy_when_router_right"] if right > 0 else 0.0,
             (1 - right) * r["accuracy_when_router_wrong"] if right < 1 else 0.0]
    assert sum(parts) == pytest.approx(r["routed_accuracy"])
    with pytest.raises(ValueError, match="per-image"):
        oracle_routing(tiny("vmoe-2x64-e4k2"), images, labels, MEAN, STD, superclasses=superclasses)
    with pytest.raises(ValueError, match="super-class map"):
        oracle_routing(tiny("mvmoe-2x64-e4k1"), images, labels, MEAN, STD)


def test_expert_ablation_reports_per_class_changes_and_restores_the_model(data):
    model = tiny("vmoe-2x64-e4k2")
    ab = expert_ablation(model, *data, MEAN, STD)
    m = impact_matrix(ab)
    assert m.shape == (4, 4) and np.isfinite(m.to_numpy()).all()
    assert set(ab[ab["class"] == "all"]["expert"]) == {0, 1, 2, 3}
    assert model.routing_settings()["disabled_experts"] == [] and all(
        not blk.mlp.router.disabled.any() for blk in model.blocks)


def test_routing_overrides_restore_k_capacity_and_priority():
    model = tiny("vmoe-2x64-e4k2")
    with routing_overrides(model, top_k=1, eval_capacity_ratio=0.5, batch_priority=False, disabled_experts=[0, 1, 2]):
        assert model.blocks[0].mlp.router.top_k == 1 and model.blocks[0].mlp.eval_capacity_ratio == 0.5
    moe = model.blocks[0].mlp
    assert (moe.router.top_k, moe.eval_capacity_ratio, moe.batch_priority) == (2, 2.0, True)
    assert not moe.router.disabled.any()


def test_bpr_drops_less_gate_mass_than_vanilla_at_tight_capacity(data):
    # one MoE block, so both priorities route the very same tokens
    model = tiny("vmoe-2x64-e4k1", moe_layers=[1])
    cmp = compare_batch_priority(model, *data, MEAN, STD, eval_capacity_ratio=0.5).set_index("priority")
    assert cmp.loc["BPR", "dropped"] == cmp.loc["vanilla", "dropped"] > 0         # as many drops...
    assert cmp.loc["BPR", "dropped_gate_share"] < cmp.loc["vanilla", "dropped_gate_share"]  # ...of less confident ones
    s = model.routing_settings()
    assert s["batch_priority"] is True and s["eval_capacity_ratio"] == 2.0


# ---------------------------------------------------------------- sweeps and MACs
@pytest.mark.parametrize("name", ["mvmoe-2x64-e4k1", "vmoe-2x64-e4k2"])
def test_k_sweep_macs_match_count_macs_of_a_real_forward(name, data):
    model = tiny(name)
    ratios = None if name.startswith("mvmoe") else [0.5, 2.0]
    sweep = sweep_routing(model, *data, MEAN, STD, capacity_ratios=ratios)
    assert sorted(set(sweep["k"])) == [1, 2, 3, 4]
    for _, row in sweep.iterrows():
        ratio = None if np.isnan(row["capacity_ratio"]) else row["capacity_ratio"]
        with routing_overrides(model, top_k=int(row["k"]), eval_capacity_ratio=ratio):
            out = forward(model, data[0])
            expected = count_macs(model, (1, 8, 8), routing=out.routing)["active"]
            acc = (out.logits.argmax(1) == data[1]).float().mean().item()
        assert row["macs_active"] == pytest.approx(expected)
        assert row["accuracy"] == pytest.approx(acc)
    assert model.routing_settings()["top_k"] == int(name[-1])


# ---------------------------------------------------------------- embeddings
def test_pca_and_umap_give_one_2d_point_per_sample():
    x = np.random.default_rng(0).normal(size=(30, 8))
    xy, used = embed(x[:5])                                              # too few points for UMAP
    assert xy.shape == (5, 2) and used == "pca"
    xy, used = embed(x, "umap", n_neighbors=5)
    assert xy.shape == (30, 2) and used == "umap" and np.isfinite(xy).all()


def test_embedding_frame_labels_every_image_and_is_cached_on_disk(tmp_path, data):
    model = tiny("mvmoe-2x64-e4k1", superclasses=[0, 1, 2, 3])
    s = collect_routing(model, *data, MEAN, STD)
    kw = dict(method="pca", checkpoint_sha="deadbeef", split="test", cache_dir=tmp_path)
    first = embedding_frame(s, "router_input", **kw)
    again = embedding_frame(s, "router_input", **kw)
    assert len(first) == 48 and {"x", "y", "class", "superclass", "expert"} <= set(first.columns)
    assert not first.attrs["cached"] and again.attrs["cached"]
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".npy"]
    np.testing.assert_array_equal(first[["x", "y"]], again[["x", "y"]])
    assert (first["expert"].to_numpy() == s.layers[0].top1).all()


# ---------------------------------------------------------------- trade-off table
def card(name, family, acc, macs, depth=2, width=64):
    return {"name": name, "preset": name, "config": {"family": family, "depth": depth, "width": width,
                                                     "num_experts": 0 if family == "vit" else 4, "top_k": 1},
            "dataset": "synthetic", "metrics": {"test_accuracy": acc}, "macs": {"active": macs, "dense": macs},
            "params": {"total": 1, "active": 1}}


def test_pareto_frontier_keeps_the_points_nothing_beats():
    t = checkpoint_table([card("a", "vit", 0.80, 100), card("b", "mvmoe", 0.85, 110),
                          card("c", "vmoe", 0.84, 200), card("d", "vit", 0.70, 50)])
    assert t.set_index("name")["pareto"].to_dict() == {"a": True, "b": True, "c": False, "d": True}
    assert pareto_frontier(t).tolist() == t["pareto"].tolist()
    assert t["routing"].tolist() == ["dense", "per-image", "per-token", "dense"]


def test_tradeoff_figure_labels_the_paper_reference_as_the_abstracts_gain():
    t = checkpoint_table([card("dense", "vit", 0.80, 100), card("moe", "mvmoe", 0.83, 101)])
    fig = tradeoff_figure(t, paper_reference_trace=True)
    names = [tr.name for tr in fig.data]
    assert {"dense", "per-image", "Pareto frontier"} <= set(names)
    ref = [tr for tr in fig.data if tr.name.startswith("paper")]
    assert len(ref) == 1 and "abstract" in ref[0].name
    assert sorted(np.round(ref[0].y, 2)) == [3.39, 4.66]
    gain = [tr for tr in fig.data if tr.name == "per-image: gain over dense"][0]
    assert gain.y[0] == pytest.approx(3.0)
    assert not any(tr.name.startswith("paper") for tr in tradeoff_figure(t).data)   # optional


def seeded(c, test, fit=None, **config):
    """A grid card: each seed's test accuracy and paired differences to the dense model of its seed."""
    c["config"].update(config)
    c["seeds"] = [{"seed": i, "test_accuracy": 0.8 + d, "delta_vs_dense": d,
                   "fit_delta_vs_dense": None if fit is None else fit[i]} for i, d in enumerate(test)]
    return c


def test_routers_of_one_shape_are_compared_paired_and_in_the_papers_order():
    t = checkpoint_table([
        seeded(card("e2e", "mvmoe", 0.80, 100), [-0.01, 0.01, 0.0], [0.01, 0.0, 0.02]),
        seeded(card("dense", "vit", 0.80, 100), [], None),
        seeded(card("moe", "mvmoe", 0.79, 100), [-0.02, 0.0, -0.01], [-0.02, -0.01, -0.03], superclasses=[0, 1]),
        seeded(card("dose", "mvmoe", 0.80, 100), [0.0, 0.0, 0.03], [0.0, 0.0, 0.0],
               superclasses=[0, 1], superclass_loss_weight=0.1),
        card("token", "vmoe", 0.85, 120)])                        # no seeds: one unpaired difference
    assert t.set_index("name")["router"].to_dict() == {"e2e": "end-to-end", "dense": "dense", "moe": "superclass",
                                                       "dose": "superclass, λ = 0.1", "token": "per-token"}
    gains = moe_gains(t).set_index("name")
    assert gains.loc["moe", "gain"] == pytest.approx(-0.01) and gains.loc["moe", "n"] == 3
    assert gains.loc["moe", "fit_gain"] == pytest.approx(-0.02) and gains.loc["moe", "fit_gain_std"] == pytest.approx(0.01)
    assert gains.loc["token", "n"] == 1 and np.isnan(gains.loc["token", "fit_gain"])
    fig = strategy_figure(moe_gains(t))
    means = [tr for tr in fig.data if tr.marker.symbol == "diamond"]
    # per-token > super-class (its doses beside it) > end-to-end, top down, on the test and the fit panel
    assert [tr.y[0].split(" · ")[0] for tr in means if tr.xaxis == "x"] == [
        "per-token", "superclass", "superclass, λ = 0.1", "end-to-end"]
    assert [tr.y[0].split(" · ")[0] for tr in means if tr.xaxis == "x2"] == [
        "superclass", "superclass, λ = 0.1", "end-to-end"]          # the per-token card has no fit numbers
    moe = next(tr for tr in means if tr.y[0] == "superclass · moe" and tr.xaxis == "x")
    half = 4.302653 / 3 ** 0.5                    # t(0.975, 2) * std (1 point) / sqrt(n): the 95 % interval
    assert moe.x[0] == pytest.approx(-1.0) and moe.error_x.array[0] == pytest.approx(half, rel=1e-4)
    dots = next(tr for tr in fig.data if tr.marker.symbol == "circle-open" and tr.y[0] == "superclass · moe")
    assert list(np.round(dots.x, 6)) == [-2.0, 0.0, -1.0]
    token = next(tr for tr in means if tr.y[0].startswith("per-token"))
    assert token.x[0] == pytest.approx(5.0) and "not paired" in token.hovertemplate


def test_the_frontier_joins_the_seed_means_that_are_drawn():
    # the shipped checkpoint is one seed; the marker is the mean over seeds, and so is the frontier
    t = checkpoint_table([seeded(card("dense", "vit", 0.80, 100), [0.0, 0.02, 0.04]),
                          seeded(card("big", "vit", 0.83, 200), [0.03, 0.05, 0.04])])
    fig = tradeoff_figure(t)
    dense = next(tr for tr in fig.data if tr.name == "dense")
    frontier = next(tr for tr in fig.data if tr.name == "Pareto frontier")
    assert list(np.round(frontier.y, 6)) == list(np.round(dense.y, 6)) == [0.82, 0.84]
    assert fig.layout.yaxis.tickformat == ".1%"     # accuracies half a point apart get distinct labels


def test_checkpoint_table_recomputes_what_the_card_lacks(tmp_path, data):
    from workbench.checkpoint import save_checkpoint

    model = tiny("vmoe-2x64-e4k2")
    c = card("x", "vmoe", None, None)
    c.update(config=model.cfg.to_dict(), classes=list("abcd"), superclasses=None)
    save_checkpoint(tmp_path / "x", model, c)

    class DS:  # what load_dataset returns, as far as the table needs
        images, labels, mean, std = data[0], data[1], MEAN, STD

    row = checkpoint_table([tmp_path / "x"], data=DS()).iloc[0]
    out = forward(model, data[0])
    assert row["accuracy"] == pytest.approx((out.logits.argmax(1) == data[1]).float().mean().item())
    assert row["macs_active"] == pytest.approx(count_macs(model, (1, 8, 8), routing=out.routing)["active"])
    assert row["source"].startswith("recomputed")
