"""Expert gallery: the statistics on hand-built routing, and the page on tiny checkpoints."""
from __future__ import annotations

import numpy as np
import pytest

from analysis.collect import RoutingSummary
from analysis.gallery import expert_classes, expert_gallery, expert_scores, highlight_patches, patch_mask
from conftest import save_tiny_checkpoint
from workbench.models import RoutingRecord


def _per_image_summary() -> RoutingSummary:
    """6 images, 2 classes, 3 experts, k=1; image 5's choice was dropped (disabled expert)."""
    experts = np.array([[0], [0], [1], [1], [0], [2]])
    kept = np.array([[True], [True], [True], [True], [True], [False]])
    gates = np.ones((6, 1), dtype=np.float32)                   # a trained router: every gate 1.00
    logits = np.array([[9, 0, 0], [2, 0, 0], [0, 8, 0], [0, 3, 0], [12, 0, 0], [0, 0, 1]], dtype=np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    lr = RoutingRecord(layer=4, kind="image", experts=experts, kept=kept, gates=gates, probs=probs, logits=logits)
    return RoutingSummary(family="mvmoe", layers=[lr], labels=np.array([0, 0, 1, 1, 1, 0]),
                          predictions=np.array([0, 1, 1, 1, 0, 0]), features=np.zeros((6, 2), np.float32),
                          router_inputs=None, num_classes=2, classes=["cat", "dog"], grid=2)


def _per_token_summary() -> RoutingSummary:
    """2 images of 1 + 4 tokens, 2 experts, k=1: image 0 sends 3 patches to expert 1, image 1 sends 1."""
    experts = np.array([[[1], [1], [1], [1], [0]], [[1], [0], [0], [0], [1]]])
    kept = np.ones_like(experts, dtype=bool)
    gates = np.full(experts.shape, 0.5, dtype=np.float32)
    lr = RoutingRecord(layer=1, kind="token", experts=experts, kept=kept, gates=gates,
                      probs=np.full((2, 5, 2), 0.5, dtype=np.float32))
    return RoutingSummary(family="vmoe", layers=[lr], labels=np.array([0, 1]), predictions=np.array([0, 1]),
                          features=np.zeros((2, 2), np.float32), router_inputs=None, num_classes=2, grid=2)


def test_per_image_gallery_ranks_received_images_by_the_routers_margin_and_lists_the_wrong_ones():
    g = expert_gallery(_per_image_summary(), expert=0)
    assert g["top"]["index"].tolist() == [4, 0, 1]          # margins 12, 9, 2 where every gate is 1.00
    assert g["top"]["score"].tolist() == [12, 9, 2]
    assert g["received"] == 3
    assert g["wrong"]["index"].tolist() == [4, 1]           # image 4 is a dog said cat, image 1 a cat said dog
    assert g["errors"] == 2


def test_a_dropped_choice_means_the_expert_did_not_receive_the_image():
    s = _per_image_summary()
    assert expert_scores(s, 2)[5] == 0
    assert expert_gallery(s, expert=2)["received"] == 0


def test_classes_are_owned_by_the_expert_taking_most_of_them():
    df = expert_classes(_per_image_summary(), expert=0).set_index("class")
    assert df.loc["cat", "images"] == 2 and df.loc["cat", "share of class"] == pytest.approx(2 / 3)
    assert bool(df.loc["cat", "owned"]) and not bool(df.loc["dog", "owned"])   # dogs go mostly to expert 1
    assert df["share of expert"].sum() == pytest.approx(1.0)


def test_per_token_classes_are_shared_by_patches_not_by_images():
    df = expert_classes(_per_token_summary(), expert=1).set_index("class")
    # expert 1 touches both images; what it holds of each class is its share of the class's patches
    assert df["share of class"].tolist() == pytest.approx([0.75, 0.25])


def test_per_token_scores_are_the_share_of_patches_and_the_mask_shows_them():
    s = _per_token_summary()
    np.testing.assert_allclose(expert_scores(s, 1), [0.75, 0.25])     # class token (position 0) not counted
    assert expert_gallery(s, 1)["top"]["index"].tolist() == [0, 1]
    np.testing.assert_array_equal(patch_mask(s, 0, 1), [[True, True], [True, False]])


def test_highlight_tints_only_the_masked_patches():
    image = np.full((1, 4, 4), 100, dtype=np.uint8)
    out = highlight_patches(image, np.array([[True, False], [False, False]]))
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
    assert out[0, 0, 0] > out[3, 3, 0] and (out[3, 3] == out[2, 2]).all()
    with pytest.raises(ValueError, match="patch grid"):
        highlight_patches(np.zeros((1, 5, 5), np.uint8), np.zeros((2, 2), bool))


def test_an_expert_out_of_range_is_a_clear_error():
    with pytest.raises(ValueError, match="expert must be in 0..2"):
        expert_gallery(_per_image_summary(), expert=3)


# ----------------------------------------------------------------------------- the page
@pytest.fixture(scope="module")
def gallery_samples(tmp_path_factory):
    from workbench.data import load_dataset

    ds = load_dataset("synthetic", "test")
    out = tmp_path_factory.mktemp("gallery")
    save_tiny_checkpoint(out / "mvmoe-2x32-e4k1", "mvmoe-2x32-e4k1", ds,
                         overrides={"superclasses": [i % 4 for i in range(ds.num_classes)]})
    save_tiny_checkpoint(out / "vmoe-2x32-e4k2", "vmoe-2x32-e4k2", ds, overrides={"moe_layers": [1]})
    save_tiny_checkpoint(out / "vit-2x32", "vit-2x32", ds)
    return out


@pytest.mark.parametrize("preset", ["mvmoe-2x32-e4k1", "vmoe-2x32-e4k2"])
def test_the_gallery_page_shows_images_and_the_class_table(gallery_samples, open_page, preset):
    at = open_page(gallery_samples, preset, "pages/experts.py")
    assert not at.exception, at.exception
    assert at.title[0].value == "Expert gallery"
    assert any("receives" in m.value for m in at.markdown)
    assert at.dataframe and "owned" in at.dataframe[0].value.columns


def test_the_gallery_page_explains_itself_for_a_dense_model(gallery_samples, open_page):
    at = open_page(gallery_samples, "vit-2x32", "pages/experts.py")
    assert not at.exception
    assert any("dense model" in i.value for i in at.info) or any("dense model" in w.value for w in at.warning)


def test_inspect_opens_the_image_in_the_image_inspector(gallery_samples, open_page):
    at = open_page(gallery_samples, "mvmoe-2x32-e4k1", "pages/experts.py")
    button = next(b for b in at.button if b.key.startswith("top_"))
    index = int(button.key.split("_")[1])
    button.click().run()
    assert not at.exception, at.exception
    assert at.title[0].value == "Image inspector"
    assert at.number_input[0].value == index
