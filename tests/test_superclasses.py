"""Super-class discovery (SPEC section 2): confusion matrix -> confusion graph -> E groups -> map file."""
from __future__ import annotations

import json
from types import SimpleNamespace

import networkx as nx
import numpy as np
import pytest
import torch

from analysis.confusion import confusion_matrix, model_confusion, normalize_rows, per_class_accuracy, predict
from analysis.superclasses import (
    METHODS,
    clustering_quality,
    cluster_superclasses,
    compare_methods,
    confusion_graph,
    group_names,
    load_superclass_map,
    order_by_groups,
    save_superclass_map,
    superclass_map,
)
from sklearn.metrics import adjusted_rand_score
from workbench.models import create_model

ALL_METHODS = sorted(METHODS)


def block_confusion(sizes, seed=0, within=30.0, noise=1, correct=500):
    """A confusion matrix with heavy confusion inside shuffled blocks and tiny noise elsewhere."""
    rng = np.random.default_rng(seed)
    blocks = rng.permutation(np.repeat(np.arange(len(sizes)), sizes))
    cm = rng.integers(0, noise + 1, (len(blocks), len(blocks))).astype(float)
    cm += within * (blocks[:, None] == blocks[None, :]) * rng.uniform(0.5, 1.5, cm.shape)
    np.fill_diagonal(cm, correct)
    return np.round(cm).astype(np.int64), blocks


# ----------------------------------------------------------------------------- clustering

@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_recovers_obvious_blocks(method):
    cm, blocks = block_confusion([3, 3, 3, 3])
    assignment = cluster_superclasses(cm, 4, method=method, seed=0)
    assert adjusted_rand_score(blocks, assignment) == 1.0


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_returns_exactly_e_nonempty_groups(method):
    cm, _ = block_confusion([4, 4, 4], seed=1, within=5.0, noise=3)
    for e in (2, 3, 5, 7, 11, 12):
        assignment = cluster_superclasses(cm, e, method=method, seed=0)
        assert assignment.shape == (12,)
        assert sorted(set(assignment.tolist())) == list(range(e))


@pytest.mark.parametrize("method", ALL_METHODS)
def test_clustering_is_deterministic_for_a_seed(method):
    cm, _ = block_confusion([4, 4, 4], seed=2, within=5.0, noise=3)
    first = cluster_superclasses(cm, 5, method=method, seed=3)
    again = cluster_superclasses(cm, 5, method=method, seed=3)
    np.testing.assert_array_equal(first, again)


def test_groups_are_numbered_in_order_of_first_appearance():
    cm, _ = block_confusion([3, 3, 3, 3], seed=4)
    assignment = cluster_superclasses(cm, 4, method="spectral")
    first_seen = list(dict.fromkeys(assignment.tolist()))
    assert first_seen == [0, 1, 2, 3]


@pytest.mark.parametrize("num_groups", [0, 1, 13])
def test_num_groups_outside_2_to_num_classes_is_a_clear_error(num_groups):
    cm, _ = block_confusion([3, 3, 3, 3])
    with pytest.raises(ValueError, match=r"2 <= num_groups <= number of classes \(12\)"):
        cluster_superclasses(cm, num_groups)


def test_unknown_method_is_a_clear_error():
    cm, _ = block_confusion([3, 3, 3, 3])
    with pytest.raises(ValueError, match="unknown clustering method 'louvain'.*spectral"):
        cluster_superclasses(cm, 4, method="louvain")


@pytest.mark.parametrize("method", ALL_METHODS)
def test_isolated_classes_and_zero_confusion_still_give_e_groups(method):
    isolated = np.diag([10.0] * 6)
    isolated[0, 1] = isolated[1, 0] = 3  # one confused pair, four classes never confused
    for cm in (np.diag([10] * 8), isolated):
        for e in (2, 3, 5):
            assignment = cluster_superclasses(cm, e, method=method)
            assert sorted(set(assignment.tolist())) == list(range(e))


def test_a_method_returning_the_wrong_group_count_is_repaired(monkeypatch):
    cm, _ = block_confusion([3, 3, 3, 3])
    monkeypatch.setitem(METHODS, "too-few", lambda aff, e, seed: np.zeros(len(aff), dtype=int))
    monkeypatch.setitem(METHODS, "too-many", lambda aff, e, seed: np.arange(len(aff)))
    for name in ("too-few", "too-many"):
        assignment = cluster_superclasses(cm, 4, method=name)
        assert sorted(set(assignment.tolist())) == [0, 1, 2, 3]


def test_too_many_groups_are_repaired_by_merging_the_most_confused(monkeypatch):
    cm, blocks = block_confusion([3, 3, 3, 3])
    halves = np.array([b * 2 + (i % 2) for i, b in enumerate(blocks)])  # each block cut in two
    monkeypatch.setitem(METHODS, "split-blocks", lambda aff, e, seed: halves)
    assignment = cluster_superclasses(cm, 4, method="split-blocks")
    assert adjusted_rand_score(blocks, assignment) == 1.0


def test_kernighan_lin_gives_balanced_groups_even_when_blocks_are_not():
    cm, _ = block_confusion([2, 3, 7])
    sizes = np.bincount(cluster_superclasses(cm, 3, method="kernighan-lin"))
    assert sorted(sizes.tolist()) == [4, 4, 4]


# ----------------------------------------------------------------------------- graph

def test_confusion_graph_weights_are_symmetrised_row_rates():
    cm = np.array([[8, 2, 0], [1, 9, 0], [0, 0, 10]])
    g = confusion_graph(cm, ["a", "b", "c"])
    assert [g.nodes[i]["name"] for i in g] == ["a", "b", "c"]
    assert g.nodes[0]["accuracy"] == pytest.approx(0.8)
    assert g[0][1]["weight"] == pytest.approx((0.2 + 0.1) / 2)
    assert g[0][1]["count"] == 3
    assert not g.has_edge(0, 2) and g.number_of_edges() == 1  # never-confused pairs have no edge


def test_confusion_graph_threshold_and_top_m_prune_edges_for_display():
    cm, _ = block_confusion([3, 3, 3, 3], noise=2)
    full = confusion_graph(cm, [str(i) for i in range(12)])
    thresholded = confusion_graph(cm, [str(i) for i in range(12)], threshold=0.01)
    top1 = confusion_graph(cm, [str(i) for i in range(12)], top_m=1)
    assert full.number_of_nodes() == thresholded.number_of_nodes() == top1.number_of_nodes() == 12
    assert all(d["weight"] > 0.01 for *_, d in thresholded.edges(data=True))
    assert thresholded.number_of_edges() < full.number_of_edges()
    assert top1.number_of_edges() <= 12 and min(d for _, d in top1.degree()) >= 1


# ----------------------------------------------------------------------------- quality

def test_quality_on_a_hand_checkable_case():
    cm = np.array([[8, 2, 0, 0], [1, 9, 0, 0], [0, 1, 7, 2], [0, 0, 3, 7]])
    q = clustering_quality(cm, [0, 0, 1, 1], reference=[1, 1, 0, 0])
    assert q["within_share"] == pytest.approx(8 / 9)  # off-diagonal mass 9, of which 1 (row 2 -> col 1) crosses
    rates = (0.2 + 0.1 + 0.2 + 0.3) / (0.2 + 0.1 + 0.1 + 0.2 + 0.3)
    assert q["within_share_rate"] == pytest.approx(rates)
    assert q["sizes"] == [2, 2] and q["min_size"] == q["max_size"] == 2 and q["balance"] == pytest.approx(1.0)
    assert q["ari"] == pytest.approx(1.0) and q["nmi"] == pytest.approx(1.0)


def test_quality_modularity_matches_networkx_and_balance_drops_for_uneven_sizes():
    cm, _ = block_confusion([3, 3, 3, 3])
    assignment = [0] * 9 + [1] * 3
    q = clustering_quality(cm, assignment)
    g = confusion_graph(cm, [str(i) for i in range(12)])
    assert q["modularity"] == pytest.approx(nx.community.modularity(g, [set(range(9)), set(range(9, 12))]))
    assert 0 < q["balance"] < 1 and "ari" not in q


def test_compare_methods_has_one_row_per_method():
    cm, blocks = block_confusion([3, 3, 3, 3])
    table = compare_methods(cm, 4, reference=blocks)
    assert table["method"].tolist() == list(METHODS)
    assert (table["num_groups"] == 4).all() and (table["ari"] == 1.0).all()


# ----------------------------------------------------------------------------- names, map file, order

def test_group_names_join_member_names_and_count_the_rest():
    names = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal"]
    assert group_names([0, 1, 0, 0, 0, 1], names) == ["T-shirt / Pullover / Dress +1", "Trouser / Sandal"]


def test_superclass_map_round_trips_through_the_file(tmp_path):
    names = ["T-shirt", "Trouser", "Sandal", "Sneaker"]
    mapping = superclass_map([0, 1, 2, 2], names, dataset="fashion-mnist", method="spectral")
    path = tmp_path / "maps" / "superclasses.json"
    save_superclass_map(path, mapping)
    on_disk = json.loads(path.read_text())
    assert on_disk["num_groups"] == 3 and on_disk["groups"][2] == "Sandal / Sneaker"
    assert set(on_disk) == {"dataset", "method", "num_groups", "classes", "groups"}
    assert load_superclass_map(path, names) == [0, 1, 2, 2]
    assert [p.name for p in path.parent.iterdir()] == ["superclasses.json"]  # no temp file left


def test_loading_a_map_for_other_classes_names_the_missing_and_extra_ones(tmp_path):
    path = tmp_path / "map.json"
    save_superclass_map(path, superclass_map([0, 1, 1], ["cat", "dog", "wolf"], "x", "spectral"))
    with pytest.raises(ValueError, match=r"missing \['fox'\], extra \['wolf'\]"):
        load_superclass_map(path, ["cat", "dog", "fox"])


def test_loading_a_map_with_gaps_in_group_indices_is_an_error(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"classes": {"cat": 0, "dog": 2}}))
    with pytest.raises(ValueError, match="0..E-1"):
        load_superclass_map(path, ["cat", "dog"])


def test_loading_malformed_json_is_a_clear_error(tmp_path):
    path = tmp_path / "map.json"
    path.write_text('{"classes": {"cat": 0,')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_superclass_map(path, ["cat"])


def test_order_by_groups_lists_each_group_as_one_block():
    assert order_by_groups([1, 0, 1, 2, 0]) == [1, 4, 0, 2, 3]


# ----------------------------------------------------------------------------- confusion matrix

def test_confusion_matrix_rows_are_true_classes_and_columns_predictions():
    cm = confusion_matrix(torch.tensor([0, 0, 1, 2]), np.array([0, 1, 1, 1]), num_classes=4)
    expected = np.zeros((4, 4), dtype=int)
    expected[0, 0] = expected[0, 1] = expected[1, 1] = expected[2, 1] = 1
    np.testing.assert_array_equal(cm, expected)


def test_confusion_matrix_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match="0..2"):
        confusion_matrix([0, 3], [0, 1], num_classes=3)


def test_row_normalisation_and_per_class_accuracy():
    cm = np.array([[3, 1], [0, 0]])
    np.testing.assert_allclose(normalize_rows(cm), [[0.75, 0.25], [0.0, 0.0]])
    acc = per_class_accuracy(cm)
    assert acc[0] == pytest.approx(0.75) and np.isnan(acc[1])  # a class with no samples has no accuracy


def tiny_model_and_images(n=10):
    torch.manual_seed(0)
    model = create_model("vit-2x64", num_classes=4, img_size=8, patch_size=4)
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8)
    return model, images


def test_predict_batches_normalises_and_returns_probabilities():
    model, images = tiny_model_and_images()
    model.train()
    preds, probs = predict(model, images, mean=[0.5], std=[0.25], batch_size=3)
    assert preds.shape == (10,) and preds.dtype == torch.int64 and probs.shape == (10, 4)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(10))
    model.eval()
    with torch.no_grad():
        expected = torch.softmax(model((images.float() / 255 - 0.5) / 0.25), dim=-1)
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(preds, probs.argmax(dim=1))


def test_predict_restores_the_models_training_mode():
    model, images = tiny_model_and_images()
    model.train()
    predict(model, images, mean=[0.5], std=[0.25])
    assert model.training


def test_model_confusion_counts_every_image_once():
    model, images = tiny_model_and_images(n=13)
    dataset = SimpleNamespace(images=images, labels=torch.arange(13) % 4, mean=[0.5], std=[0.25], num_classes=4)
    cm = model_confusion(model, dataset, batch_size=5)
    assert cm.shape == (4, 4) and cm.sum() == 13
    np.testing.assert_array_equal(cm.sum(axis=1), [4, 3, 3, 3])


def test_confusion_graph_figure_draws_every_class_once_coloured_by_group():
    from analysis.superclasses import confusion_graph, confusion_graph_layout
    from pages.figures import confusion_graph_figure

    cm = np.array([[50, 8, 0, 0], [6, 40, 1, 0], [0, 2, 30, 9], [0, 0, 7, 45]])
    names = ["a", "b", "c", "d"]
    pos = confusion_graph_layout(cm, names, seed=0)
    assert pos == confusion_graph_layout(cm, names, seed=0) and set(pos) == {0, 1, 2, 3}
    fig = confusion_graph_figure(confusion_graph(cm, names), pos, groups=[0, 0, 1, 1], group_names=["ab", "cd"],
                                 selected=2)
    node_traces = [t for t in fig.data if t.customdata is not None]
    assert [list(t.customdata) for t in node_traces] == [[0, 1], [2, 3]]
    assert [t.name for t in node_traces] == ["0: ab", "1: cd"]
    assert sorted(sum((list(t.text) for t in node_traces), [])) == names
    # the selected class is outlined
    assert list(node_traces[1].marker.line.width) == [4, 1]


# ----------------------------------------------------------------------------- router-aware choice

from analysis.superclass_choice import (  # noqa: E402
    PAPER_METHOD,
    SuperclassChoiceError,
    choose_superclasses,
    router_input_features,
)
from workbench.data import load_dataset  # noqa: E402


@pytest.fixture(scope="module")
def synthetic_probe_data():
    """Synthetic test split (16 classes in 4 designed groups) with 4x4-pooled pixels as router features:
    the groups differ by a frame texture a linear probe reads easily; classes within a group do not."""
    ds = load_dataset("synthetic", "test")
    keep = slice(0, 800)   # 50 images per class: enough for a 3-fold probe, and fast
    feats = torch.nn.functional.avg_pool2d(ds.images[keep].float() / 255, 4).flatten(1).numpy()
    return feats, ds.labels[keep].numpy(), np.asarray(ds.reference_groups), list(ds.classes)


def _confusion_within(groups, labels, per_pair=12, correct=60):
    """A held-out confusion matrix whose off-diagonal mass lies only inside `groups`."""
    groups = np.asarray(groups)
    cm = per_pair * (groups[:, None] == groups[None, :]).astype(np.int64)
    np.fill_diagonal(cm, correct)
    return cm


def test_choice_picks_the_designed_grouping_over_a_bad_one_and_records_every_candidate(synthetic_probe_data):
    feats, labels, design, classes = synthetic_probe_data
    bad = np.arange(16) % 4  # one class of every pattern per group: the router must read the disks
    choice = choose_superclasses(_confusion_within(design, labels), 4, features=feats, labels=labels,
                                 class_names=classes, extra={"designed": design, "bad": bad}, folds=3)
    assert adjusted_rand_score(design, choice.assignment) == 1.0
    table = choice.candidates.set_index("candidate")
    assert table["chosen"].sum() == 1 and table.loc[choice.method, "chosen"]
    assert table.loc["bad", "probe_accuracy"] < table.loc[choice.method, "probe_accuracy"] - 0.15
    # identical partitions are merged, and every method's name is recorded with its partition
    assert sorted(sum(table["methods"].tolist(), [])) == sorted([*METHODS, "designed", "bad"])
    record = json.loads(json.dumps(choice.to_json()))
    assert record["method"] == choice.method and record["criterion"] == "router-probe"
    assert {c["candidate"] for c in record["candidates"]} == set(table.index)
    assert all("probe_accuracy" in c and "within_share" in c for c in record["candidates"])
    assert choice.method in record["reason"]


def test_the_probe_overrules_a_confusion_matrix_that_points_at_the_bad_grouping(synthetic_probe_data):
    feats, labels, design, classes = synthetic_probe_data
    bad = np.arange(16) % 4
    misleading = _confusion_within(bad, labels)  # confusion says "bad"; the features say "designed"
    by_confusion = choose_superclasses(misleading, 4, extra={"designed": design}, folds=3)
    assert adjusted_rand_score(bad, by_confusion.assignment) == 1.0
    assert by_confusion.criterion == "dense-group-accuracy"
    by_probe = choose_superclasses(misleading, 4, features=feats, labels=labels, extra={"designed": design},
                                   folds=3)
    assert by_probe.method == "designed"


def test_min_group_share_rules_out_a_grouping_that_starves_experts():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(8), 40)
    centre = np.zeros((8, 3))
    centre[5:, :] = 6 * np.eye(3)            # classes 0..4 look alike; 5, 6, 7 each stand out
    feats = centre[labels] + rng.normal(0, 0.5, (len(labels), 3))
    cm = np.full((8, 8), 1) + np.diag(np.full(8, 30))
    starving = [0, 0, 0, 0, 0, 1, 2, 3]      # easy to route, three experts get 1/8 of the images each
    balanced = [0, 0, 1, 1, 2, 2, 3, 3]
    loose = choose_superclasses(cm, 4, features=feats, labels=labels, extra={"starving": starving,
                                "balanced": balanced}, min_group_share=0.0, folds=4)
    assert sorted(np.bincount(loose.assignment)) == [1, 1, 1, 5]   # the starving partition (any name)
    strict = choose_superclasses(cm, 4, features=feats, labels=labels, extra={"starving": starving,
                                 "balanced": balanced}, min_group_share=0.2, folds=4)
    assert min(np.bincount(strict.assignment)) >= 2
    assert "did not" in strict.reason


def test_a_named_method_is_kept_and_every_candidate_still_scored():
    cm, blocks = block_confusion([5, 1, 3, 1], seed=3, within=20.0, noise=2)
    choice = choose_superclasses(cm, 4, method=PAPER_METHOD)
    np.testing.assert_array_equal(choice.assignment, cluster_superclasses(cm, 4, method=PAPER_METHOD))
    assert choice.method == PAPER_METHOD and choice.criterion == "named method"
    assert "dense_group_accuracy" in choice.candidates and len(choice.candidates) >= 1
    with pytest.raises(SuperclassChoiceError, match="unknown method 'louvain'"):
        choose_superclasses(cm, 4, method="louvain")
    with pytest.raises(SuperclassChoiceError, match="min_group_share"):
        choose_superclasses(cm, 4, min_group_share=0.5)


def test_router_input_features_read_the_stream_entering_the_first_moe_block():
    torch.manual_seed(0)
    dense = create_model("vit-4x32", num_classes=4, img_size=8, patch_size=4)
    images = torch.randint(0, 256, (7, 1, 8, 8), dtype=torch.uint8)
    ds = SimpleNamespace(images=images, mean=[0.5], std=[0.25])
    dense.train()
    feats = router_input_features(dense, ds, "mvmoe-4x32-e2k1", batch_size=3)   # MoE in blocks 2, 3
    assert dense.training and feats.shape == (7, 32)
    dense.eval()
    with torch.no_grad():
        x = dense.embed((images.float() / 255 - 0.5) / 0.25)
        for blk in dense.blocks[:2]:
            x, _, _ = blk(x)                                  # a block returns (tokens, routing, aux)
    np.testing.assert_allclose(feats, x[:, 1:].mean(1).numpy(), atol=1e-5)
    with pytest.raises(SuperclassChoiceError, match="router position"):
        router_input_features(dense, ds, "mvmoe-6x32-e2k1")
