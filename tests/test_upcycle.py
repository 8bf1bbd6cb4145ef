"""Real pairing, sparse upcycling and the regularised recipe (mixup, MLP dropout)."""
import dataclasses
import json
import math
import re

import pytest
import torch

from workbench.models.config import ModelConfig
from workbench.models.upcycle import dense_twin, paired_model, shared_names, upcycle
from workbench.train import main as train_main, mixup
from workbench.train_config import model_from_preset

SHAPE = {"num_classes": 6, "img_size": 16, "in_chans": 3, "patch_size": 4}


def _cfg(preset: str, **overrides) -> ModelConfig:
    return dataclasses.replace(model_from_preset(preset, {}), **SHAPE, **overrides)


@pytest.mark.parametrize("preset", ["mvmoe-4x32-e4k1", "vmoe-4x32-e4k2"])
def test_a_moe_starts_from_its_dense_twins_initial_weights(preset):
    moe_cfg = _cfg(preset)
    moe, dense = paired_model(moe_cfg, seed=7), paired_model(dense_twin(moe_cfg), seed=7)
    shared = shared_names(dense, moe)
    dense_state, moe_state = dense.state_dict(), moe.state_dict()
    # every dense tensor except the MLPs the experts replace is shared, and equal
    replaced = {n for n in dense_state if any(n.startswith(f"blocks.{i}.mlp.") for i in moe_cfg.moe_block_indices())}
    assert set(shared) == set(dense_state) - replaced
    assert all(torch.equal(moe_state[n], dense_state[n]) for n in shared)
    # only the experts and routers are new, and another seed draws other shared weights
    assert all(".experts." in n or "router" in n for n in set(moe_state) - set(shared))
    other = paired_model(moe_cfg, seed=8).state_dict()
    assert not torch.equal(other["pos_embed"], moe_state["pos_embed"])


def test_a_dense_model_is_built_as_before_pairing():
    torch.manual_seed(3)
    from workbench.models import build_model

    before = build_model(_cfg("vit-4x32")).state_dict()
    assert all(torch.equal(before[n], t) for n, t in paired_model(_cfg("vit-4x32"), 3).state_dict().items())


def test_an_upcycled_moe_computes_what_its_dense_parent_computes():
    parent = paired_model(_cfg("vit-4x32"), seed=0)
    with torch.no_grad():                       # a "trained" parent: not its init
        for p in parent.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(5, 3, 16, 16)
    want = parent.eval()(x)
    moe = upcycle(parent, _cfg("mvmoe-4x32-e4k1"), seed=1).eval()
    for e in range(4):                          # the router forced to any expert, gate 1
        moe.set_routing(force_expert=e)
        assert torch.allclose(moe(x), want, atol=1e-6)
    # k = 1 with renormalised gates: whatever the new router picks, the gate is 1
    renormalised = upcycle(parent, _cfg("mvmoe-4x32-e4k1", renormalize_gates=True), seed=1).eval()
    assert torch.allclose(renormalised(x), want, atol=1e-6)
    # the softmax gate of a fresh router scales each expert's output down: not the parent
    assert not torch.allclose(upcycle(parent, _cfg("mvmoe-4x32-e4k1"), seed=1).eval()(x), want, atol=1e-3)


@pytest.mark.parametrize("preset, error", [
    ("mvmoe-3x32-e4k1", "depth 4 (parent) vs 3"),
    ("mvmoe-4x64-e4k1", "width 32 (parent) vs 64"),
])
def test_upcycling_refuses_a_parent_of_another_shape(preset, error):
    parent = paired_model(_cfg("vit-4x32"), seed=0)
    with pytest.raises(ValueError, match=re.escape(error)):
        upcycle(parent, _cfg(preset), seed=0)
    with pytest.raises(ValueError, match="must be a dense ViT"):
        upcycle(paired_model(_cfg("mvmoe-4x32-e4k1"), 0), _cfg("mvmoe-4x32-e4k1"), seed=0)


def test_mixup_blends_images_and_labels_alike_and_is_a_function_of_its_seed():
    x, y = torch.randn(8, 3, 4, 4), torch.arange(8) % 4
    xm, t = mixup(x, y, 4, 0.2, seed=11)
    assert t.shape == (8, 4) and torch.allclose(t.sum(1), torch.ones(8))
    lam = t[torch.arange(8), y].min()          # each image keeps lam (or more, when paired with its class)
    assert 0 <= lam <= 1
    xm2, t2 = mixup(x, y, 4, 0.2, seed=11)
    assert torch.equal(xm, xm2) and torch.equal(t, t2)
    assert mixup(x, y, 4, 0.0, seed=11)[1] is y


def test_a_guided_router_learns_the_same_blend_of_super_classes_under_mixup():
    model = paired_model(_cfg("mvmoe-4x32-e2k1", superclasses=[0, 0, 0, 1, 1, 1]), seed=0)
    labels = torch.tensor([0, 4])
    soft = torch.tensor([[0.7, 0, 0, 0.3, 0, 0], [0, 0, 0, 0, 1.0, 0]])
    assert torch.equal(model.superclass_targets(labels), torch.tensor([0, 1]))
    assert torch.allclose(model.superclass_targets(soft), torch.tensor([[0.7, 0.3], [0.0, 1.0]]))


def test_mlp_dropout_acts_in_training_only_in_dense_mlps_and_experts():
    for preset in ("vit-2x32", "mvmoe-2x32-e2k1"):
        model = paired_model(_cfg(preset, mlp_dropout=0.5, moe_layers=[1]) if "moe" in preset
                             else _cfg(preset, mlp_dropout=0.5), 0)
        x = torch.randn(4, 3, 16, 16)
        model.train()
        assert not torch.equal(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))
    with pytest.raises(ValueError, match=r"mlp_dropout must be a number in \[0, 1\)"):
        ModelConfig(mlp_dropout=1.0)


def test_train_upcycles_from_a_dense_checkpoint_and_the_card_names_its_parent(tmp_path, capsys):
    common = ["--dataset", "synthetic", "--epochs", "1", "--quiet", "--threads", "1", "--max-steps", "3"]
    assert train_main(["--model", "vit-2x32", "--out", str(tmp_path / "dense"), *common]) == 0
    moe = ["--model", "mvmoe-2x32-e2k1", "--set", "moe_layers=[1]", "--set", "renormalize_gates=true",
           "--init-from", str(tmp_path / "dense"), "--mixup-alpha", "0.2", "--out", str(tmp_path / "moe"), *common]
    assert train_main(moe) == 0
    card = json.loads((tmp_path / "moe" / "card.json").read_text())
    parent = json.loads((tmp_path / "dense" / "card.json").read_text())
    assert card["parent"]["sha256"] == parent["weights"]["sha256"] and card["parent"]["epochs"] == 1
    assert card["training"]["init"] == "upcycled" and card["training"]["mixup_alpha"] == 0.2
    assert "--init-from" in card["command"]
    # a parent that is not a dense checkpoint of the same shape: one clear line, nothing written
    bad = ["--model", "mvmoe-3x32-e2k1", "--init-from", str(tmp_path / "dense"), "--out", str(tmp_path / "bad"),
           *common]
    assert train_main(bad) == 2
    assert "depth 2 (parent) vs 3" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    missing = ["--model", "vit-2x32", "--init-from", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m2"), *common]
    assert train_main(missing) == 2
    assert "--init-from" in capsys.readouterr().err


@pytest.mark.parametrize("flags, error", [
    (["--mixup-alpha", "-1"], "--mixup-alpha must be in [0, inf]"),
    (["--mixup-alpha", "nan"], "--mixup-alpha must be a finite number"),
    (["--set", "mlp_dropout=1.5"], "mlp_dropout must be a number in [0, 1)"),
])
def test_bad_regularisation_options_are_refused(flags, error, tmp_path, capsys):
    assert train_main(["--dataset", "synthetic", "--out", str(tmp_path / "r"), "--quiet", *flags]) == 2
    assert error in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_paired_intervals_follow_the_statistics_rule():
    from analysis.paired import paired_difference

    d = paired_difference([0.0032, 0.0044])          # the Tiny ImageNet pair of the README
    assert d.n == 2 and d.positive == 2 and d.verdict == "no measurable difference"
    assert (round(100 * d.low, 2), round(100 * d.high, 2)) == (-0.38, 1.14)
    assert paired_difference([0.01, 0.012, 0.011]).verdict == "beats"
    assert paired_difference([-0.01, -0.012, -0.011]).verdict == "trails"
    one = paired_difference([0.02, None])
    assert one.n == 1 and one.low is None and "no interval" in one.text()
    assert math.isnan(paired_difference([]).mean)
