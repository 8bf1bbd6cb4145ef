"""Shared test setup: every test session gets its own disk cache, so tests never read a cache left
by an earlier run (or by the app) and never write into the repository's .cache."""
import pytest

from workbench import jobs


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
