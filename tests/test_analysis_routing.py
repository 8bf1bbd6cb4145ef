"""Routing statistics on hand-built routing arrays whose answers are known by hand."""
import math

import numpy as np
import pytest

from analysis.collect import RoutingSummary
from analysis.routing import (
    capacity_drops, class_expert_counts, cv_squared, drop_summary, expert_load, expert_specialisation, gini,
    image_expert_counts, imbalance_flag, layer_agreement, load_balance, mapped_agreement, mutual_information,
    normalized_mutual_info, router_superclass_accuracy, routing_entropy, routing_report, spatial_expert_maps,
)
from workbench.models import RoutingRecord


def image_layer(experts, E=4, layer=0, probs=None):
    """Per-image routing: experts (N,) or (N, k); probs default one-hot at the first choice."""
    ex = np.asarray(experts).reshape(len(experts), -1)
    if probs is None:
        probs = np.eye(E, dtype=np.float32)[ex[:, 0]]
    return RoutingRecord(layer=layer, kind="image", experts=ex, kept=np.ones(ex.shape, bool),
                        gates=np.take_along_axis(np.asarray(probs), ex, 1).astype(np.float32),
                        probs=np.asarray(probs, dtype=np.float32))


def token_layer(experts, kept=None, E=4, layer=1, gates=None):
    """Per-token routing: experts (N, T, k)."""
    ex = np.asarray(experts)
    kept = np.ones(ex.shape, bool) if kept is None else np.asarray(kept)
    gates = np.full(ex.shape, 0.5, np.float32) if gates is None else np.asarray(gates, np.float32)
    probs = np.full(ex.shape[:2] + (E,), 1.0 / E, np.float32)
    return RoutingRecord(layer=layer, kind="token", experts=ex, kept=kept, gates=gates, probs=probs, capacity=2)


def summary(layers, labels, num_classes=4, family="mvmoe", superclasses=None, grid=0, disabled=()):
    labels = np.asarray(labels)
    return RoutingSummary(family=family, layers=layers, labels=labels, predictions=labels.copy(),
                          features=np.zeros((len(labels), 2), np.float32), router_inputs=None,
                          num_classes=num_classes, superclasses=None if superclasses is None else np.asarray(superclasses),
                          grid=grid, settings={"disabled_experts": list(disabled)})


# ---------------------------------------------------------------- who goes where
def test_per_image_counts_one_assignment_per_chosen_expert():
    lr = image_layer([[0, 2], [1, 2], [0, 3]])
    assert image_expert_counts(lr).tolist() == [[1, 0, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1]]
    assert image_expert_counts(lr, ranks=[0]).sum(0).tolist() == [2, 1, 0, 0]


def test_per_token_counts_add_up_an_images_tokens_and_skip_dropped_ones():
    # 2 images x 3 tokens, k = 1; image 0's last token was dropped by capacity
    lr = token_layer([[[1], [1], [2]], [[0], [0], [0]]], kept=[[[1], [1], [0]], [[1], [1], [1]]])
    assert image_expert_counts(lr).tolist() == [[0, 2, 0, 0], [3, 0, 0, 0]]
    assert image_expert_counts(lr, after_capacity=False)[0].tolist() == [0, 2, 1, 0]
    assert image_expert_counts(lr, tokens="patches")[1].tolist() == [2, 0, 0, 0]   # class token left out


def test_class_table_sums_the_images_of_each_class():
    s = summary([image_layer([0, 0, 1, 3])], labels=[2, 2, 2, 0])
    t = class_expert_counts(s)
    assert t.loc["2"].tolist() == [2, 1, 0, 0]
    assert t.loc["0"].tolist() == [0, 0, 0, 1]
    assert t.loc["1"].sum() == 0


def test_row_normalisation_gives_where_a_class_goes_and_column_where_an_expert_gets_its_images():
    s = summary([image_layer([0, 0, 1, 0])], labels=[0, 0, 0, 1], num_classes=2)
    rows = class_expert_counts(s, normalize="row")
    cols = class_expert_counts(s, normalize="column")
    assert rows.loc["0", 0] == pytest.approx(2 / 3) and rows.loc["1", 0] == 1.0
    assert cols.loc["0", 0] == pytest.approx(2 / 3) and cols.loc["0", 1] == 1.0
    assert cols[3].sum() == 0                                      # unused expert: zeros, not NaN


def test_per_image_weighting_makes_every_image_count_once_in_per_token_tables():
    lr = token_layer([[[1], [1], [1], [2]], [[0], [0], [0], [0]]])
    s = summary([lr], labels=[0, 0], num_classes=1, family="vmoe")
    assert class_expert_counts(s, lr.layer, per_image=True).loc["0"].tolist() == [1.0, 0.75, 0.25, 0.0]


def test_superclass_table_merges_the_classes_of_a_group():
    s = summary([image_layer([0, 1, 1, 2])], labels=[0, 1, 2, 3], superclasses=[0, 0, 1, 1])
    t = class_expert_counts(s, by="superclass")
    assert t.to_numpy().tolist() == [[1, 1, 0, 0], [0, 1, 1, 0]]


# ---------------------------------------------------------------- balance
def test_gini_and_cv2_are_zero_when_balanced_and_maximal_for_one_expert():
    assert gini([5, 5, 5, 5]) == 0 and cv_squared([5, 5, 5, 5]) == 0
    assert gini([4, 0, 0, 0]) == pytest.approx(3 / 4)              # (E - 1) / E
    assert cv_squared([4, 0, 0, 0]) == pytest.approx(3.0)          # var 3 / mean^2 1


def test_expert_load_counts_and_shares():
    s = summary([image_layer([0, 0, 0, 1, 2, 2, 3, 3])], labels=[0] * 8)
    load = expert_load(s)
    assert load["count"].tolist() == [3, 1, 2, 2]
    assert load["share"].tolist() == [3 / 8, 1 / 8, 2 / 8, 2 / 8]


@pytest.mark.parametrize("shares,expected", [
    ([0.25, 0.25, 0.25, 0.25], "ok"),
    ([0.95, 0.05, 0.0, 0.0], "collapsed"),
    ([0.55, 0.15, 0.15, 0.15], "imbalanced"),      # above 2/E = 50%
    ([0.34, 0.33, 0.32, 0.01], "imbalanced"),      # a nearly dead expert, below 0.25/E
])
def test_imbalance_flag_with_default_thresholds(shares, expected):
    assert imbalance_flag(shares)[0] == expected


def test_imbalance_threshold_is_the_users_choice():
    shares = [0.55, 0.15, 0.15, 0.15]
    assert imbalance_flag(shares, max_share=0.6)[0] == "ok"
    assert imbalance_flag(shares, max_share=0.5)[0] == "imbalanced"
    assert "expert 0" in imbalance_flag(shares, max_share=0.5)[1]


def test_load_balance_flags_the_collapsed_block_and_reports_it_in_the_all_row():
    balanced = image_layer([0, 1, 2, 3] * 5, layer=0)
    collapsed = image_layer([2] * 19 + [1], layer=1)
    bal = load_balance(summary([balanced, collapsed], labels=[0] * 20)).set_index("layer")
    assert bal.loc["0", "flag"] == "ok" and bal.loc["0", "max_share"] == 0.25
    assert bal.loc["1", "flag"] == "collapsed" and bal.loc["1", "max_share"] == 0.95
    assert bal.loc["all", "flag"] == "collapsed" and "block 1" in bal.loc["all", "reason"]
    assert bal.loc["1", "gini"] == pytest.approx(gini([0, 1, 19, 0]))


def test_the_balance_table_shows_the_limits_its_flag_used():
    bal = load_balance(summary([image_layer([0, 1, 2, 3] * 5, layer=0)], labels=[0] * 20), max_share=0.4)
    row = bal.set_index("layer").loc["all"]
    assert row["highest_allowed"] == 0.4 and row["lowest_allowed"] == pytest.approx(0.25 / 4)


def test_heatmaps_use_categorical_axes():
    import pandas as pd

    from pages.figures import heatmap_figure

    fig = heatmap_figure(pd.DataFrame([[1.0, 0.5], [0.5, 1.0]], index=[4, 5], columns=[4, 5]))
    assert fig.layout.xaxis.type == "category" and fig.layout.yaxis.type == "category"


def test_disabled_experts_are_left_out_of_the_balance():
    lr = image_layer([0, 1, 2] * 4)                                   # expert 3 disabled, so unused
    bal = load_balance(summary([lr], labels=[0] * 12, disabled=[3])).set_index("layer")
    assert bal.loc["0", "flag"] == "ok" and bal.loc["0", "cv2"] == 0


# ---------------------------------------------------------------- entropy
def test_entropy_of_uniform_routers_is_log2_E_and_of_confident_routers_zero():
    uniform = image_layer([0, 1], probs=np.full((2, 4), 0.25), layer=0)
    confident = image_layer([0, 1, 2, 3], layer=1)                     # one-hot, experts used evenly
    e = routing_entropy(summary([uniform, confident], labels=[0, 0])).set_index("layer")
    assert e.loc[0, "mean_entropy"] == pytest.approx(2.0) and e.loc[0, "mean_entropy_norm"] == pytest.approx(1.0)
    assert e.loc[1, "mean_entropy"] == pytest.approx(0.0)
    assert e.loc[1, "marginal_entropy"] == pytest.approx(2.0)        # but the marginal is uniform


def test_entropy_is_normalised_by_the_enabled_experts():
    probs = np.array([[0.5, 0.5, 0.0, 0.0]])                          # experts 2, 3 disabled
    e = routing_entropy(summary([image_layer([0], probs=probs)], labels=[0]))
    assert e.loc[0, "enabled_experts"] == 2 and e.loc[0, "mean_entropy_norm"] == pytest.approx(1.0)


# ---------------------------------------------------------------- capacity
def test_drops_are_counted_per_expert_and_per_choice_rank():
    # one image, 4 tokens, k = 2: first choices all kept but one; second choices half dropped
    experts = [[[0, 1], [0, 1], [0, 2], [1, 2]]]
    kept = [[[1, 1], [1, 0], [0, 0], [1, 1]]]
    gates = [[[0.6, 0.3], [0.5, 0.4], [0.9, 0.1], [0.7, 0.2]]]
    s = summary([token_layer(experts, kept, gates=gates)], labels=[0], family="vmoe")
    d = capacity_drops(s).set_index(["rank", "expert"])
    assert d.loc[(1, 0), ["assigned", "kept", "dropped"]].tolist() == [3, 2, 1]
    assert d.loc[(1, 0), "drop_rate"] == pytest.approx(1 / 3)
    assert d.loc[(1, 0), "dropped_gate"] == pytest.approx(0.9)
    assert d.loc[(2, 1), ["assigned", "dropped"]].tolist() == [2, 1]
    assert d.loc[(2, 2), ["assigned", "dropped"]].tolist() == [2, 1]
    assert d["dropped"].sum() == 3


def test_drop_summary_counts_items_that_lost_every_choice():
    experts = [[[0, 1], [0, 1], [0, 2], [1, 2]]]
    kept = [[[1, 1], [1, 0], [0, 0], [1, 1]]]
    row = drop_summary(summary([token_layer(experts, kept)], labels=[0], family="vmoe")).iloc[0]
    assert row["assignments"] == 8 and row["dropped"] == 3
    assert row["drop_rate_rank1"] == 0.25 and row["drop_rate_rank2"] == 0.5
    assert row["items_dropped"] == 1                                   # token 2 skips the block


# ---------------------------------------------------------------- spatial maps
def test_spatial_map_puts_patches_on_the_grid_marks_drops_and_keeps_the_class_token_apart():
    # 1 image, class token + 2x2 patches, k = 1; patch 3 dropped
    lr = token_layer([[[3], [0], [1], [2], [1]]], kept=[[[1], [1], [1], [1], [0]]])
    maps, cls = spatial_expert_maps(summary([lr], labels=[0], family="vmoe", grid=2))
    assert maps.tolist() == [[[0, 1], [2, -1]]]
    assert cls.tolist() == [3]


def test_spatial_map_of_per_image_routing_is_constant():
    maps, cls = spatial_expert_maps(summary([image_layer([2, 1])], labels=[0, 0], grid=3))
    assert (maps[0] == 2).all() and (maps[1] == 1).all() and cls.tolist() == [2, 1]


# ---------------------------------------------------------------- agreement
def test_mapped_agreement_is_one_for_a_relabelling():
    a = np.array([0, 1, 2, 3, 0, 1])
    assert mapped_agreement(a, (a + 1) % 4) == 1.0


def test_mapped_agreement_is_asymmetric_for_a_many_to_one_map():
    fine = np.array([0, 1, 2, 3])
    coarse = np.array([0, 0, 1, 1])
    assert mapped_agreement(fine, coarse) == 1.0                       # fine predicts coarse
    assert mapped_agreement(coarse, fine) == 0.5                       # coarse guesses one of two


def test_nmi_is_one_for_identical_partitions_and_zero_for_independent_ones():
    a = np.array([0, 0, 1, 1])
    assert normalized_mutual_info(a, 1 - a) == pytest.approx(1.0)
    assert normalized_mutual_info(a, np.array([0, 1, 0, 1])) == pytest.approx(0.0)
    assert normalized_mutual_info(np.zeros(4, int), np.zeros(4, int)) == 1.0


def test_layers_of_a_shared_per_image_router_agree_fully():
    ex = [0, 3, 1, 1, 2]
    s = summary([image_layer(ex, layer=10), image_layer(ex, layer=11)], labels=[0] * 5)
    for method in ("mapped", "nmi"):
        assert (layer_agreement(s, method).to_numpy() == 1).all()


def test_layer_agreement_matrix_reads_row_predicts_column():
    fine = image_layer([0, 1, 2, 3], layer=0)
    coarse = image_layer([0, 0, 1, 1], layer=1)
    m = layer_agreement(summary([fine, coarse], labels=[0] * 4))
    assert m.loc[0, 1] == 1.0 and m.loc[1, 0] == 0.5


# ---------------------------------------------------------------- super-classes and specialisation
def test_router_accuracy_against_the_superclass_map():
    # classes 0,1 -> group 0; 2,3 -> group 1; the router gets 3 of 4 right; k = 2 recovers the 4th
    lr = image_layer([[0, 1], [0, 1], [1, 0], [0, 1]], E=2)
    acc = router_superclass_accuracy(summary([lr], labels=[0, 1, 2, 3], superclasses=[0, 0, 1, 1])).iloc[0]
    assert acc["accuracy"] == 0.75 and acc["topk_hit"] == 1.0


def test_router_purity_forgives_swapped_expert_indices():
    lr = image_layer([1, 1, 0, 0], E=2)                                # learned the groups, other labels
    acc = router_superclass_accuracy(summary([lr], labels=[0, 1, 2, 3], superclasses=[0, 0, 1, 1])).iloc[0]
    assert acc["accuracy"] == 0.0 and acc["purity"] == 1.0


def test_mutual_information_of_a_one_to_one_map_is_log2_E_and_of_independence_zero():
    mi, h_rows, h_cols = mutual_information(np.eye(4) * 10)
    assert mi == pytest.approx(2.0) and h_rows == pytest.approx(2.0) and h_cols == pytest.approx(2.0)
    assert mutual_information(np.ones((4, 4)))[0] == pytest.approx(0.0)


def test_an_expert_that_sees_a_single_class_is_fully_specialised():
    # 4 balanced classes; expert 0 gets class 0 only, expert 1 gets the other three evenly
    s = summary([image_layer([0, 0, 1, 1, 1, 1, 1, 1], E=2)], labels=[0, 0, 1, 1, 2, 2, 3, 3])
    spec = expert_specialisation(s).set_index("expert")
    assert spec.loc[0, "specialisation"] == pytest.approx(1.0)        # KL = log2 4 = H(class)
    assert spec.loc[0, "top_group_share"] == 1.0
    assert spec.loc[1, "kl_bits"] == pytest.approx(math.log2(4 / 3))
    # I(expert; class) = H(expert) here, since the expert is a function of the class
    assert spec.attrs["mi_over_expert_entropy"] == pytest.approx(1.0)


def test_routing_that_ignores_the_class_has_no_mutual_information():
    s = summary([image_layer([0, 1, 0, 1], E=2)], labels=[0, 0, 1, 1], num_classes=2)
    assert expert_specialisation(s).attrs["mutual_information"] == pytest.approx(0.0)


def test_routing_report_holds_every_statistic():
    s = summary([image_layer([0, 1, 2, 3], layer=4), image_layer([0, 1, 2, 3], layer=5)], labels=[0, 1, 2, 3],
                superclasses=[0, 1, 2, 3])
    rep = routing_report(s)
    for key in ("load", "balance", "entropy", "drops", "drop_summary", "agreement", "agreement_nmi",
                "class_expert_4", "superclass_expert_5", "specialisation", "router_accuracy"):
        assert key in rep
    assert rep["router_accuracy"]["accuracy"].tolist() == [1.0, 1.0]
