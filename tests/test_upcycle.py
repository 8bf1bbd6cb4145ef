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


def test_what_pays_off_gives_every_cell_its_interval_and_verdict(tmp_path):
    import pandas as pd

    from analysis.tradeoff import payoff_table
    from pages.figures import VERDICT_COLORS, payoff_figure
    from workbench.grid import read_rows

    rows = []
    for seed, (dense, moe, up, cont) in enumerate([(0.26, 0.27, 0.285, 0.275), (0.27, 0.275, 0.29, 0.28),
                                                    (0.28, 0.279, 0.301, 0.29)]):
        common = {"dataset": "tiny-imagenet", "size": "6x64", "seed": seed, "E": "", "recipe": "regularised: 40 ep"}
        rows += [{**common, "model": "dense", "router": "", "init": "scratch", "test_accuracy": dense},
                 {**common, "model": "moe", "router": "superclass", "E": 10, "init": "scratch", "baseline": "dense",
                  "test_accuracy": moe, "delta_vs_dense": moe - dense},
                 {**common, "model": "cont", "router": "", "init": "continue", "test_accuracy": cont,
                  "baseline": "dense", "delta_vs_dense": cont - dense},
                 {**common, "model": "up", "router": "superclass", "E": 10, "init": "upcycle", "baseline": "cont",
                  "test_accuracy": up, "delta_vs_dense": up - cont}]
    path = tmp_path / "tin-grid-results.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    table = payoff_table(pd.DataFrame(read_rows(path, "tiny-imagenet"))).set_index("model")
    assert table.loc["up", "verdict"] == "beats" and table.loc["up", "positive"] == 3
    assert table.loc["up", "gain_low"] > 0 and table.loc["up", "baseline"] == "cont"
    assert table.loc["moe", "verdict"] == "no measurable difference" and table.loc["moe", "positive"] == 2
    assert table.loc["moe", "gain_low"] < 0 < table.loc["moe", "gain_high"]
    fig = payoff_figure(table.reset_index())
    drawn = {t.name: t for t in fig.data if t.showlegend is not False}
    assert set(drawn) <= set(VERDICT_COLORS) and drawn["beats"].marker.color == VERDICT_COLORS["beats"]
    # rows written before the init column: MoEs that did not share their dense twin's initial weights
    pd.DataFrame([{k: v for k, v in r.items() if k not in ("init", "recipe", "baseline")} for r in rows[:2]]) \
        .assign(family=["vit", "mvmoe"], epochs=15).to_csv(path, index=False)
    old = read_rows(path, "tiny-imagenet")
    assert [r["init"] for r in old] == ["scratch", "scratch, unshared init"]
    assert old[0]["recipe"] == "plain: 15 ep, flip"


def test_the_jobs_api_refuses_an_upcycling_parent_of_another_shape_before_starting(tmp_path):
    from workbench import jobs
    from workbench.train_config import TrainConfig

    assert train_main(["--model", "vit-2x32", "--dataset", "synthetic", "--max-steps", "1", "--quiet",
                       "--out", str(tmp_path / "dense")]) == 0
    cfg = TrainConfig(model=model_from_preset("mvmoe-3x32-e2k1", {}), dataset="synthetic",
                      init_from=str(tmp_path / "dense"))
    with pytest.raises(ValueError, match=re.escape("depth 2 (parent) vs 3")):
        jobs.check_training(cfg)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        jobs.check_training(dataclasses.replace(cfg, init_from=str(tmp_path)))


def test_a_router_warmup_moves_only_the_router(tmp_path):
    from workbench.checkpoint import load_checkpoint

    common = ["--dataset", "synthetic", "--quiet", "--threads", "1", "--precision", "fp32"]
    assert train_main(["--model", "vit-2x32", "--max-steps", "2", "--out", str(tmp_path / "dense"), *common]) == 0
    assert train_main(["--model", "mvmoe-2x32-e4k1", "--set", "moe_layers=[1]", "--superclasses", "reference",
                       "--init-from", str(tmp_path / "dense"), "--epochs", "1", "--router-warmup-epochs", "1",
                       "--out", str(tmp_path / "moe"), *common]) == 0
    moe, card = load_checkpoint(tmp_path / "moe")
    start = upcycle(load_checkpoint(tmp_path / "dense")[0], moe.cfg, seed=0).state_dict()
    moved = {n for n, t in moe.state_dict().items() if not torch.equal(t, start[n])}
    assert moved and all(n.startswith("routers.") for n in moved), moved
    assert card["training"]["router_warmup_epochs"] == 1
    assert train_main(["--model", "vit-2x32", "--router-warmup-epochs", "1", "--out", str(tmp_path / "x"),
                       *common]) == 2
