"""Routing snapshots (written per epoch, read back safely) and the statistics over them."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.history import (load_over_time, matched_agreement, router_accuracy_over_time, routing_churn,
                              settling_epoch)
from conftest import save_tiny_checkpoint
from workbench.snapshots import (RoutingHistory, SnapshotError, epoch_summary, load_epoch, load_history,
                                 probe_indices, routing_snapshot, save_snapshot)


def _history(rows, labels=(0, 0, 1, 1)) -> RoutingHistory:
    e = np.asarray(rows)
    return RoutingHistory(epochs=list(range(1, len(e) + 1)), probe=np.arange(e.shape[1]),
                          labels=np.asarray(labels), experts={4: e})


def test_snapshots_round_trip_in_epoch_order(tmp_path):
    probe, labels = np.array([3, 7]), np.array([0, 1])
    for epoch, experts in ((2, [1, 1]), (1, [0, 1]), (10, [1, -1])):
        save_snapshot(tmp_path, epoch, probe, labels, {4: np.array(experts), 5: np.array(experts)})
    h = load_history(tmp_path)
    assert h.epochs == [1, 2, 10] and h.layers == [4, 5]
    np.testing.assert_array_equal(h.experts[4], [[0, 1], [1, 1], [1, -1]])
    np.testing.assert_array_equal(h.probe, probe)


def test_the_epoch_summary_has_churn_and_router_accuracy_for_a_guided_per_image_router(tmp_path):
    labels = np.array([0, 1, 2, 3])
    now = {4: np.array([0, 0, 1, 0])}
    assert epoch_summary(now, labels, superclasses=[0, 0, 1, 1]) == {"block": 4, "router_accuracy": 0.75}
    save_snapshot(tmp_path, 1, np.arange(4), labels, {4: np.array([0, 1, 1, 0])})
    s = epoch_summary(now, labels, previous=load_epoch(tmp_path, 1))
    assert s == {"block": 4, "churn": 0.25}
    assert load_epoch(tmp_path, 2) is None and load_epoch(tmp_path, 0) is None


def test_a_folder_without_snapshots_has_no_history(tmp_path):
    assert load_history(tmp_path) is None


def test_a_pickled_or_inconsistent_snapshot_is_refused_with_its_name(tmp_path):
    save_snapshot(tmp_path, 1, np.arange(2), np.zeros(2), {4: np.array([0, 1])})
    np.savez(tmp_path / "routing" / "epoch-0002.npz", probe=np.array([object()], dtype=object))
    with pytest.raises(SnapshotError, match="epoch-0002.npz"):
        load_history(tmp_path)
    save_snapshot(tmp_path, 2, np.arange(3), np.zeros(3), {4: np.array([0, 1, 1])})
    with pytest.raises(SnapshotError, match="probe images or MoE blocks differ"):
        load_history(tmp_path)


def test_a_small_file_that_would_inflate_to_a_gigabyte_is_refused_from_its_headers(tmp_path):
    import io
    import resource
    import time

    import zipfile

    save_snapshot(tmp_path, 1, np.arange(4), np.zeros(4), {4: np.array([0, 1, 1, 0])})
    header = io.BytesIO()                       # a header announcing 1 GiB of int16; a deflate of zeros is ~1 MB
    np.lib.format.write_array_header_1_0(header, {"descr": "<i2", "fortran_order": False, "shape": (1 << 29,)})
    with zipfile.ZipFile(tmp_path / "routing" / "epoch-0001.npz", "a", zipfile.ZIP_DEFLATED) as z:
        z.writestr("layer_5.npy", header.getvalue() + bytes(1 << 16))
    rss, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic()
    with pytest.raises(SnapshotError, match="epoch-0001.npz: its arrays would take more than 64 MB"):
        load_history(tmp_path)
    assert load_epoch(tmp_path, 1) is None
    assert time.monotonic() - t0 < 5 and resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 200_000  # KB


def test_a_snapshot_of_a_real_model_names_each_moe_block_and_restores_training_mode():
    from workbench.models import create_model

    torch.manual_seed(0)
    model = create_model("mvmoe-2x32-e4k1", num_classes=4, img_size=8, in_chans=1, patch_size=4).train()
    snap = routing_snapshot(model, torch.randn(5, 1, 8, 8), batch_size=2)
    assert model.training
    assert sorted(snap) == model.cfg.moe_block_indices()
    assert all(a.shape == (5,) and a.dtype == np.int16 and ((a >= 0) & (a < 4)).all() for a in snap.values())
    tok = create_model("vmoe-2x32-e4k2", num_classes=4, img_size=8, in_chans=1, patch_size=4, moe_layers=[1])
    assert routing_snapshot(tok, torch.randn(3, 1, 8, 8))[1].shape == (3, 5)     # 1 class token + 4 patches


def test_probe_is_fixed_sorted_and_bounded():
    a, b = probe_indices(1000, 16), probe_indices(1000, 16)
    np.testing.assert_array_equal(a, b)
    assert (np.diff(a) > 0).all() and len(probe_indices(5, 16)) == 5
    with pytest.raises(ValueError):
        probe_indices(0)


def test_churn_is_the_share_of_items_that_changed_and_settling_needs_it_to_stay_low():
    h = _history([[0, 0, 1, 1], [1, 0, 1, 1], [1, 0, 1, 1], [1, 0, 0, 1], [1, 0, 0, 1], [1, 0, 0, 1]])
    churn = routing_churn(h)
    np.testing.assert_allclose(churn["churn"], [0.25, 0, 0.25, 0, 0])
    assert churn["epoch"].tolist() == [2, 3, 4, 5, 6]
    assert settling_epoch(churn, threshold=0.0) == 5            # epoch 3 was calm, but epoch 4 changed again
    assert settling_epoch(churn, threshold=0.3) == 2
    assert settling_epoch(pd.DataFrame({"epoch": [2], "churn": [0.5]})) is None


def test_load_counts_dropped_items_apart_and_router_accuracy_uses_the_super_class_targets():
    h = _history([[0, 0, 1, -1], [0, 1, 1, 1]])
    load = load_over_time(h, num_experts=2)
    assert load.loc[1].tolist() == [0.5, 0.25, 0.25] and list(load.columns) == ["0", "1", "dropped"]
    acc = router_accuracy_over_time(h, superclasses=[0, 1])
    assert acc["router accuracy"].tolist() == [0.75, 0.75]


def test_matched_agreement_is_invariant_to_relabelling_experts():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, 500)
    perm = np.array([2, 0, 3, 1])
    agree, mapping = matched_agreement(a, perm[a], 4)
    assert agree == 1.0 and mapping.tolist() == perm.tolist()
    assert (a == perm[a]).mean() < 0.5                         # raw indices would say they disagree
    b = perm[a].copy()
    b[:50] = -1                                                # dropped only agrees with dropped
    assert matched_agreement(a, b, 4)[0] == pytest.approx(0.9)
    with pytest.raises(ValueError):
        matched_agreement(a, a[:10], 4)


# ----------------------------------------------------------------------------- the page
@pytest.fixture(scope="module")
def history_samples(tmp_path_factory):
    from workbench.data import load_dataset

    ds = load_dataset("synthetic", "test")
    out = tmp_path_factory.mktemp("history")
    sc = [i % 4 for i in range(ds.num_classes)]
    card = {"superclasses": {"assignment": sc, "names": [f"g{i}" for i in range(4)], "method": "test"}}
    for name, seed in (("mvmoe-a", 0), ("mvmoe-b", 1)):
        save_tiny_checkpoint(out / name, "mvmoe-2x32-e4k1", ds, seed=seed, overrides={"superclasses": sc}, **card)
    probe = probe_indices(len(ds), 32)
    rng = np.random.default_rng(0)
    for epoch in range(1, 5):
        save_snapshot(out / "mvmoe-a", epoch, probe, ds.labels[probe].numpy(), {1: rng.integers(0, 4, 32)})
    return out


def test_the_page_shows_epochs_and_the_matched_comparison(history_samples, open_page):
    at = open_page(history_samples, "mvmoe-a", "pages/history.py")
    assert not at.exception, at.exception
    assert at.metric[0].value == "4"
    table = at.dataframe[0].value
    assert (table["agreement after matching"] >= table["agreement of raw indices"]).all()


def test_the_page_explains_a_checkpoint_without_snapshots(history_samples, open_page):
    at = open_page(history_samples, "mvmoe-b", "pages/history.py")
    assert not at.exception, at.exception
    assert any("no routing snapshots" in i.value for i in at.info)
