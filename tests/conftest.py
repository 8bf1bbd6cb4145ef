"""Shared test setup: every test session gets its own disk cache, so tests never read a cache left
by an earlier run (or by the app) and never write into the repository's .cache.

The suite runs in two pytest-xdist workers, one test file per worker at a time (pyproject's
addopts): most tests are single-threaded Python (app renders, subprocess waits), so two workers
fill both cores. Each worker is pinned to its share of the cores, and so is everything it starts
(training sizes its threads by the affinity mask): without that, two workers training at once ran
four threads on two cores, and the slowest file took four times as long.
"""
import os

import pytest
import torch

from workbench import jobs

_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")          # "gw0", "gw1", ... under xdist
if _WORKER.startswith("gw") and hasattr(os, "sched_setaffinity"):
    _cores = sorted(os.sched_getaffinity(0))
    _mine = _cores[int(_WORKER[2:])::int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))] or _cores
    os.sched_setaffinity(0, _mine)
    torch.set_num_threads(len(_mine))


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory):
    """WORKBENCH_CACHE -> a fresh folder for the session (tests may still point it elsewhere)."""
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("workbench-cache")
        mp.setenv("WORKBENCH_CACHE", str(cache))
        yield cache


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """An empty runs folder for job tests (WORKBENCH_RUNS) and the default concurrency limit; no process outlives the test."""
    root = tmp_path / "runs"
    monkeypatch.setenv("WORKBENCH_RUNS", str(root))
    monkeypatch.delenv("WORKBENCH_MAX_JOBS", raising=False)
    yield root
    for row in jobs.list_jobs(root):  # never leave a process behind
        if row["state"] == "running":
            jobs.cancel(row["run_dir"], root, timeout=2)


# ----------------------------------------------------------------------------- app pages on tiny checkpoints
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def save_tiny_checkpoint(folder, preset: str, ds, seed: int = 0, **card):
    """An untrained `preset` for dataset `ds` saved with a minimal valid card (extra card keys in `card`)."""
    import torch

    from workbench.checkpoint import save_checkpoint
    from workbench.flops import count_macs
    from workbench.models import create_model

    overrides = card.pop("overrides", {})
    torch.manual_seed(seed)
    c, h, _ = ds.image_shape
    model = create_model(preset, num_classes=ds.num_classes, img_size=h, in_chans=c, patch_size=4, **overrides)
    macs = count_macs(model, ds.image_shape)
    save_checkpoint(folder, model.eval(), {
        "preset": preset, "dataset": "synthetic", "classes": list(ds.classes), "superclasses": None,
        "metrics": {"test_accuracy": 0.1}, "macs": macs,
        "params": {"total": macs["params_total"], "active": macs["params_active"]}, **card})
    return folder


@pytest.fixture
def open_page(monkeypatch, tmp_path):
    """open_page(samples_folder, checkpoint_name, "pages/x.py") -> an AppTest showing that page."""
    def run(samples, ckpt: str, page: str):
        from streamlit.testing.v1 import AppTest

        monkeypatch.setenv("WORKBENCH_SAMPLES", str(samples))
        monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
        at = AppTest.from_file(str(REPO / "workbench" / "app.py"), default_timeout=90)
        at.query_params["ckpt"] = f"samples/{ckpt}"
        at.run()
        return at.switch_page(f"../{page}").run()
    return run
