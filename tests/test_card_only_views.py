"""A Tiny ImageNet checkpoint without its images (they may not be redistributed): the card-level
views work from the card, the image-level views say how to get the data."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("streamlit")

from tests.conftest import save_tiny_checkpoint  # noqa: E402

CARD_PAGES = ["overview", "confusion_graph", "superclasses", "hierarchy", "routing", "tradeoff"]
IMAGE_PAGES = ["inspector", "experts"]


class _NoImages:
    """What save_tiny_checkpoint needs of a dataset: Tiny ImageNet's classes and 32x32 RGB shape."""

    def __init__(self):
        from workbench.wordnet import read_table

        table = read_table()
        self.classes = [table[w]["name"].split(",")[0].strip() for w in sorted(table)]
        self.num_classes, self.image_shape = len(self.classes), (3, 32, 32)


@pytest.fixture(scope="module")
def tin_sample(tmp_path_factory):
    ds = _NoImages()
    rng = np.random.default_rng(0)
    n, E = ds.num_classes, 10
    groups = [c % E for c in range(n)]
    cm = rng.poisson(1.0, (n, n))
    np.fill_diagonal(cm, 30)
    counts = rng.multinomial(50, [0.1] * E, size=n)
    card = {"dataset": "tiny-imagenet", "confusion": {"split": "heldout", "matrix": cm.tolist()},
            "superclasses": {"assignment": groups, "names": [f"group {g}" for g in range(E)], "method": "spectral"},
            "routing_tables": {"split": "test", "epoch": 1, "unit": "image",
                               "layers": [{"layer": 1, "counts": counts.tolist(), "dropped": 0}]},
            "overrides": {"superclasses": groups}}
    root = tmp_path_factory.mktemp("samples")
    save_tiny_checkpoint(root / "tin-mvmoe", "mvmoe-2x32-e10k1", ds, **card)
    e2e = {**card, "overrides": {}, "metrics": {"test_accuracy": 0.1, "router_superclass_purity": 0.335}}
    save_tiny_checkpoint(root / "tin-mvmoe-e2e", "mvmoe-2x32-e10k1", ds, **e2e)
    return root


@pytest.fixture
def page_without_data(monkeypatch, tmp_path, tin_sample, open_page):
    """open_page (tests/conftest.py) on the Tiny ImageNet sample, with a data search path that has nothing."""
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "no-data-here"))
    return lambda page: open_page(tin_sample, "tin-mvmoe", f"pages/{page}.py")


@pytest.mark.parametrize("page", CARD_PAGES)
def test_card_level_views_work_without_the_images(page_without_data, page):
    at = page_without_data(page)
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    if page == "routing":
        assert any("stored in the card" in i.value for i in at.info)
    if page == "hierarchy":
        assert [m.label for m in at.metric][:2] == ["ARI", "NMI"]              # against WordNet, from the card


@pytest.mark.parametrize("page", IMAGE_PAGES)
def test_image_level_views_say_how_to_get_the_data(page_without_data, page):
    at = page_without_data(page)
    assert not at.exception
    text = " ".join(w.value for w in at.warning).replace("\\", "")   # (markdown escapes)
    assert "python -m workbench.data download tiny-imagenet" in text and "WORKBENCH_DATA" in text


def test_an_end_to_end_router_is_shown_by_its_purity(monkeypatch, tmp_path, tin_sample, open_page):
    """Its expert numbers are its own: 'accuracy against the super-classes' would mean nothing."""
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path / "no-data-here"))
    at = open_page(tin_sample, "tin-mvmoe-e2e", "pages/routing.py")
    assert not at.exception, [e.value for e in at.exception]
    shown = {m.label: m.value for m in at.metric}
    assert shown.get("Router purity vs super-classes") == "33.50%" and not any("accuracy vs" in k for k in shown)
