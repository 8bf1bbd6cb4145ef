"""Discovered super-classes vs a human hierarchy: scores, and the page from a card alone (no images)."""
from __future__ import annotations

import numpy as np
import pytest

from analysis.hierarchy import compare_groupings, group_members
from conftest import save_tiny_checkpoint


def test_the_same_partition_under_other_labels_scores_one():
    r = compare_groupings([0, 0, 1, 1, 2, 2], [2, 2, 0, 0, 1, 1])
    assert r["ari"] == pytest.approx(1.0) and r["nmi"] == pytest.approx(1.0) and r["purity"] == 1.0
    assert r["contingency"].to_numpy().sum() == 6


def test_an_unrelated_partition_scores_near_zero_and_the_table_shows_where():
    r = compare_groupings([0, 1, 0, 1, 0, 1, 0, 1], [0, 0, 0, 0, 1, 1, 1, 1], ["a", "b"], ["x", "y"])
    assert r["ari"] < 0.1 and r["nmi"] < 0.1
    assert r["contingency"].loc["a", "x"] == 2 and r["contingency"].loc["b", "y"] == 2


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="one discovered and one reference group per class"):
        compare_groupings([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="group names"):
        compare_groupings([0, 1], [0, 1], ["only one"])


def test_members_are_listed_by_group_with_their_reference():
    df = group_members([1, 0], ["cat", "teapot"], [0, 1], ["animal", "artifact"], ["a › cat", "b › teapot"])
    assert df["class"].tolist() == ["teapot", "cat"] and df["reference group"].tolist() == ["artifact", "animal"]


@pytest.fixture(scope="module")
def tiny_imagenet_card(tmp_path_factory):
    """A per-image MoE card over 12 real Tiny ImageNet classes; the dataset itself is absent."""
    import torch

    from workbench.checkpoint import save_checkpoint
    from workbench.flops import count_macs
    from workbench.models import create_model
    from workbench.wordnet import read_table

    table = read_table()
    dogs = ["n02085620", "n02094433", "n02099601", "n02106662"]                 # four dog breeds
    things = ["n03400231", "n04398044", "n02795169", "n03804744"]              # frying pan, teapot, barrel, nail
    fish_frogs = ["n01443537", "n01641577", "n01644900", "n01629819"]          # goldfish, frogs, salamander
    wnids = dogs + things + fish_frogs
    names = [table[w]["name"].split(",")[0] for w in wnids]
    assignment = [0] * 4 + [1] * 4 + [2] * 4
    torch.manual_seed(0)
    model = create_model("mvmoe-2x32-e3k1", num_classes=12, img_size=32, in_chans=3, patch_size=4,
                         superclasses=assignment).eval()
    macs = count_macs(model, (3, 32, 32))
    out = tmp_path_factory.mktemp("tin") / "tin-mvmoe"
    cm = (np.eye(12) * 40 + 1).astype(int).tolist()
    save_checkpoint(out, model, {
        "preset": "mvmoe-2x32-e3k1", "dataset": "tiny-imagenet", "classes": names,
        "superclasses": {"assignment": assignment, "names": ["dogs", "things", "water"], "method": "test"},
        "metrics": {"test_accuracy": 0.3}, "macs": macs,
        "params": {"total": macs["params_total"], "active": macs["params_active"]},
        "confusion": {"split": "heldout", "matrix": cm}})
    return out.parent


def test_the_page_judges_a_card_against_wordnet_without_the_images(tiny_imagenet_card, open_page, monkeypatch,
                                                                     tmp_path):
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "no-data"))
    at = open_page(tiny_imagenet_card, "tin-mvmoe", "pages/hierarchy.py")
    assert not at.exception, at.exception
    ari = float(at.metric[0].value)
    assert ari > 0.5                                     # dogs / artifacts / water animals is close to WordNet
    members = at.dataframe[0].value
    assert "hierarchy" in members.columns and members["hierarchy"].str.contains("dog").any()
    at.slider[0].set_value(6).run()                      # a finer WordNet cut: different score, no error
    assert not at.exception and float(at.metric[0].value) != ari


def test_the_page_uses_the_dataset_hierarchy_elsewhere(open_page, tmp_path):
    """The synthetic dataset's designed groups are the reference for a synthetic checkpoint."""
    from workbench.data import load_dataset

    ds = load_dataset("synthetic", "test")
    groups = list(ds.reference_groups)
    cm = np.full((ds.num_classes, ds.num_classes), 1) + np.eye(ds.num_classes, dtype=int) * 50
    for i in range(ds.num_classes):
        for j in range(ds.num_classes):
            if i != j and groups[i] == groups[j]:
                cm[i, j] = 10
    save_tiny_checkpoint(tmp_path / "s" / "dense", "vit-2x32", ds,
                         confusion={"split": "heldout", "matrix": cm.tolist()})
    at = open_page(tmp_path / "s", "dense", "pages/hierarchy.py")
    assert not at.exception, at.exception
    at.slider[0].set_value(len(set(groups))).run()
    assert float(at.metric[0].value) == pytest.approx(1.0)     # the designed groups, recovered exactly
