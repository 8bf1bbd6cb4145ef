"""The card's routing tables: written where the data is, and the same numbers as the image-level analysis."""
import json

import numpy as np
import pytest
import torch

from analysis.card_routing import (card_expert_load, card_load_balance, card_router_accuracy, card_tables,
                                   group_expert_table)
from analysis.collect import collect_routing
from analysis.routing import class_expert_counts, expert_load, load_balance, router_superclass_accuracy
from workbench.checkpoint import CheckpointError, validate_card
from workbench.data import load_dataset
from workbench.evaluate import eval_stats, routing_tables
from workbench.models import create_model

SUPERCLASSES = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]   # synthetic's 16 classes
N = len(SUPERCLASSES)


@pytest.fixture(scope="module")
def test_set():
    ds = load_dataset("synthetic", "test")
    return ds.subset(range(300))


def _model(preset: str, **overrides):
    torch.manual_seed(0)
    return create_model(preset, num_classes=N, img_size=28, in_chans=1, patch_size=7, **overrides).eval()


def _card(model, tables, superclasses=None) -> dict:
    return {"preset": "p", "config": model.cfg.to_dict(), "dataset": "synthetic", "classes": [str(i) for i in range(N)],
            "superclasses": None if superclasses is None else {"assignment": superclasses},
            "metrics": None, "macs": None, "params": None, "routing_tables": tables}


@pytest.mark.parametrize("preset, overrides", [("mvmoe-2x32-e4k1", {"superclasses": SUPERCLASSES}),
                                               ("vmoe-4x32-e4k2", {})])
def test_card_tables_give_the_numbers_the_images_give(test_set, preset, overrides):
    model = _model(preset, **overrides)
    B = 128    # per-token capacity is per batch: the same batches on both sides
    tables = routing_tables(eval_stats(model, test_set, batch_size=B), epoch=3)
    card = _card(model, tables, overrides.get("superclasses"))
    validate_card(json.loads(json.dumps(card)))          # what training writes, the card validator accepts
    parsed = card_tables(card)
    summary = collect_routing(model, test_set.images, test_set.labels, test_set.mean, test_set.std, batch_size=B,
                              superclasses=overrides.get("superclasses"))
    assert sorted(parsed) == summary.layer_indices
    classes = [str(i) for i in range(N)]
    for layer in summary.layer_indices:
        images = class_expert_counts(summary, layer)
        cards = group_expert_table(parsed[layer], classes, layer=layer)
        np.testing.assert_allclose(cards.to_numpy(), images.to_numpy())
        np.testing.assert_allclose(group_expert_table(parsed[layer], classes, normalize="column").to_numpy(),
                                   class_expert_counts(summary, layer, normalize="column").to_numpy())
    pd_load = card_expert_load(parsed)
    np.testing.assert_allclose(pd_load["share"], expert_load(summary)["share"])
    balance = load_balance(summary)
    cards_balance = card_load_balance(parsed)
    assert list(cards_balance["layer"]) == list(balance["layer"]) and list(cards_balance["flag"]) == list(balance["flag"])
    np.testing.assert_allclose(cards_balance["gini"], balance["gini"])
    if "superclasses" in overrides:
        by_sc = group_expert_table(parsed[summary.layer_indices[0]], classes, by="superclass",
                                   superclasses=SUPERCLASSES)
        assert by_sc.shape == (4, 4) and by_sc.to_numpy().sum() == len(test_set)
        np.testing.assert_allclose(card_router_accuracy(parsed, SUPERCLASSES)["accuracy"],
                                   router_superclass_accuracy(summary)["accuracy"])


@pytest.mark.parametrize("breakage, rule", [
    (lambda t: t["layers"][0].update(counts=t["layers"][0]["counts"][:-1]), "table"),
    (lambda t: t["layers"][0]["counts"][0].__setitem__(0, -1), "non-negative"),
    (lambda t: t["layers"][0]["counts"][0].__setitem__(0, 1.5), "integer"),
    (lambda t: t["layers"][0].update(layer=99), "block index"),
    (lambda t: t["layers"].append(dict(t["layers"][0])), "repeated"),
    (lambda t: t.update(unit="pixel"), "unit"),
    (lambda t: t.update(layers="all"), "layers"),
])
def test_a_broken_routing_table_is_refused_with_the_rule(test_set, breakage, rule):
    model = _model("mvmoe-2x32-e4k1")
    tables = json.loads(json.dumps(routing_tables(eval_stats(model, test_set))))
    breakage(tables)
    with pytest.raises(CheckpointError, match=rule):
        validate_card(_card(model, tables))
