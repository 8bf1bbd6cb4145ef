"""Shared test setup: every test session gets its own disk cache, so tests never read a cache left
by an earlier run (or by the app) and never write into the repository's .cache."""
import pytest


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory):
    """WORKBENCH_CACHE -> a fresh folder for the session (tests may still point it elsewhere)."""
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("workbench-cache")
        mp.setenv("WORKBENCH_CACHE", str(cache))
        yield cache
