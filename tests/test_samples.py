"""Every shipped sample checkpoint loads, and re-evaluated on the shipped bundle it matches its card."""
import pytest

from workbench.checkpoint import list_checkpoints, load_checkpoint
from workbench.data import load_dataset
from workbench.paths import REPO_ROOT
from workbench.train import evaluate

SAMPLES = list_checkpoints(REPO_ROOT / "sample_checkpoints")
REQUIRED = {"preset", "config", "dataset", "classes", "superclasses", "metrics", "macs", "params"}


def test_samples_cover_every_family():
    families = set()
    for path in SAMPLES:
        _, card = load_checkpoint(path)
        families.add(card["config"]["family"])
    assert families == {"vit", "mvmoe", "vmoe"}


def test_sample_folder_stays_small():
    size = sum(p.stat().st_size for p in (REPO_ROOT / "sample_checkpoints").rglob("*") if p.is_file())
    assert size < 60 * 2 ** 20


@pytest.mark.parametrize("path", SAMPLES, ids=[p.name for p in SAMPLES])
def test_sample_accuracy_matches_its_card(path):
    model, card = load_checkpoint(path)
    assert REQUIRED <= set(card)
    test_set = load_dataset(card["dataset"], "test")
    precision = card.get("training", {}).get("precision", "fp32")
    accuracy = evaluate(model, test_set, batch_size=500, precision=precision)
    assert abs(accuracy - card["metrics"]["test_accuracy"]) <= 0.002
