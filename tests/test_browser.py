"""The app in a real browser: `streamlit run workbench/app.py` driven by Playwright + Debian's Chromium.

Visits every page from the sidebar navigation and checks that none shows an
error box or an exception; saves a full-page screenshot of each into
test-artifacts/screenshots/; then starts a tiny `synthetic` run from the Train
page, waits for it to finish and finds it in the sidebar checkpoint picker.

Without Chromium or the playwright package the test is skipped, except under
CI=true, where it fails (CI installs both; see .ci/run).
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
SHOTS = ARTIFACTS / "screenshots"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run"]
RUN_NAME = "browser-run"
ERROR_SELECTORS = '[data-testid="stAlertContentError"], [data-testid="stException"]'


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (required under CI=true: .ci/run installs chromium and playwright)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def sync_playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        _unavailable(f"{CHROMIUM} is missing (apt-get install chromium)")
    return sync_playwright


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Path:
    """The shipped sample checkpoints, or (while none are shipped) one tiny checkpoint per family on
    `synthetic`, with a confusion matrix and super-classes so that every view has something to draw."""
    from workbench.checkpoint import list_checkpoints
    from workbench.paths import samples_dir

    if list_checkpoints(samples_dir()):
        return samples_dir()
    import numpy as np
    import torch

    from analysis.confusion import model_confusion
    from analysis.superclasses import cluster_superclasses, group_names
    from workbench.checkpoint import save_checkpoint
    from workbench.data import load_dataset
    from workbench.flops import count_macs
    from workbench.models import create_model

    root = tmp_path_factory.mktemp("samples")
    ds = load_dataset("synthetic", "test")
    sub = ds.subset(range(min(300, len(ds))))
    c, h, _ = ds.image_shape
    groups = None
    for preset in ("vit-2x32", "mvmoe-2x32-e4k1", "vmoe-4x32-e4k2"):
        torch.manual_seed(0)
        extra = {"superclasses": groups} if preset.startswith("mvmoe") else {}
        model = create_model(preset, num_classes=ds.num_classes, img_size=h, in_chans=c, **extra).eval()
        cm = model_confusion(model, sub)
        if groups is None:
            groups = [int(g) for g in cluster_superclasses(cm, 4)]
        macs = count_macs(model, ds.image_shape)
        save_checkpoint(root / preset, model, {
            "preset": preset, "dataset": "synthetic", "classes": list(ds.classes),
            "superclasses": {"assignment": groups, "names": group_names(groups, ds.classes), "method": "spectral"}
            if extra else None,
            "metrics": {"test_accuracy": float(np.trace(cm) / cm.sum())}, "macs": macs,
            "params": {"total": macs["params_total"], "active": macs["params_active"]},
            "confusion": {"split": "heldout", "matrix": cm.tolist()}})
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(samples, tmp_path_factory, sync_playwright):
    """A running `streamlit run workbench/app.py` on a free localhost port (always stopped afterwards)."""
    tmp = tmp_path_factory.mktemp("app")
    port = _free_port()
    env = dict(os.environ, WORKBENCH_SAMPLES=str(samples), WORKBENCH_RUNS=str(tmp / "runs"),
               WORKBENCH_CACHE=str(tmp / "cache"), WORKBENCH_MAX_JOBS="1", PYTHONUNBUFFERED="1")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = open(ARTIFACTS / "streamlit.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "workbench/app.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "localhost", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://localhost:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"streamlit exited with code {proc.returncode}; see {ARTIFACTS / 'streamlit.log'}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().decode().strip() == "ok":
                        break
            if time.monotonic() > deadline:
                pytest.fail("streamlit did not answer /_stcore/health within 60 s")
            time.sleep(0.3)
        yield url
    finally:
        # stop the server and anything it started (a training job leads its own session: stop it too)
        from workbench import jobs

        for row in jobs.list_jobs(tmp / "runs"):
            if row["state"] == "running":
                jobs.cancel(row["run_dir"], tmp / "runs", timeout=2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        log.close()


@pytest.fixture(scope="module")
def page(app_url, sync_playwright):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            pg = context.new_page()
            pg.set_default_timeout(30_000)
            pg.page_errors = []
            pg.on("pageerror", lambda e: pg.page_errors.append(str(e)))
            pg.goto(app_url)
            wait_idle(pg, 90)
            yield pg
        finally:
            browser.close()


def wait_idle(page, timeout: float = 60, quiet: float = 0.8) -> None:
    """Wait until the app is connected and no script (or fragment) run is in progress for `quiet` seconds."""
    page.wait_for_selector('[data-testid="stApp"][data-test-connection-state="CONNECTED"]', timeout=timeout * 1000)
    idle = ('[data-testid="stApp"][data-test-script-state="notRunning"]')
    deadline = time.monotonic() + timeout
    calm_since = None
    while time.monotonic() < deadline:
        busy = (page.locator(idle).count() == 0
                or page.locator('[data-testid="stStatusWidget"] [data-testid="stStatusWidgetRunningIcon"]').count()
                or page.locator('[data-testid="stSpinner"]').count())
        if busy:
            calm_since = None
        elif calm_since is None:
            calm_since = time.monotonic()
        elif time.monotonic() - calm_since >= quiet:
            return
        time.sleep(0.1)
    raise AssertionError(f"the app was still running after {timeout} s")


def assert_no_errors(page, where: str) -> None:
    boxes = page.locator(ERROR_SELECTORS)
    texts = [boxes.nth(i).inner_text()[:500] for i in range(boxes.count())]
    assert not texts, f"{where} shows an error: {texts}"
    assert not page.page_errors, f"{where}: JavaScript errors: {page.page_errors}"


def screenshot(page, name: str) -> None:
    """A full-page screenshot. Streamlit scrolls inside its main container, not the document, so the
    window is made as tall as the content for the shot."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    size = page.viewport_size
    height = page.evaluate("""() => Math.max(...['stMain', 'stAppViewContainer', 'stSidebarContent'].map(
        id => { const el = document.querySelector(`[data-testid="${id}"]`); return el ? el.scrollHeight : 0; }))""")
    tall = min(max(size["height"], int(height) + 40), 12000)
    if tall > size["height"]:
        page.set_viewport_size({"width": size["width"], "height": tall})
        page.wait_for_timeout(400)  # let charts re-layout
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    if tall > size["height"]:
        page.set_viewport_size(size)


def nav_links(page) -> list[tuple[str, str]]:
    links = page.locator('[data-testid="stSidebarNav"] a')
    page.wait_for_selector('[data-testid="stSidebarNav"] a')
    out = []
    for i in range(links.count()):
        a = links.nth(i)
        title = a.inner_text().strip().splitlines()[-1].strip()  # the text after the icon's ligature name
        out.append((title, a.get_attribute("href")))
    return out


def goto_page(page, href: str) -> None:
    """Click the sidebar link to `href` (a click keeps the session, like a user; a new URL would not)."""
    page.locator(f'[data-testid="stSidebarNav"] a[href="{href}"]').click()
    wait_idle(page)


def job_row(page, name: str) -> dict:
    """The jobs table's row for run `name` as {column: text} ({} if absent). st.dataframe draws on a
    canvas; its accessible table (role=grid) carries the same cells."""
    grid = page.locator('[data-testid="stDataFrame"] table[role="grid"]').first
    if not grid.count():
        return {}
    header = [h.strip() for h in grid.locator("thead th").all_text_contents()]
    for row in grid.locator("tbody tr").all():
        cells = [c.strip() for c in row.locator("td").all_text_contents()]
        if cells and cells[0] == name:
            return dict(zip(header, cells))
    return {}


def test_every_page_renders_without_errors_and_a_run_started_in_the_ui_finishes(page, app_url):
    links = nav_links(page)
    titles = [t for t, _ in links]
    assert "Train" in titles and "Expert gallery" in titles and len(titles) >= 9, titles
    for i, (title, href) in enumerate(links):
        goto_page(page, href)
        page.wait_for_selector("h1")
        screenshot(page, f"{i + 1:02d}-{re.sub(r'[^a-z0-9]+', '-', title.lower()).strip('-')}")
        assert_no_errors(page, f"page {title!r}")

    # ---- the Train page: a tiny synthetic run started from the form
    goto_page(page, dict(links)["Train"])
    form = page.locator('[data-testid="stMain"]')
    assert form.get_by_label("Dataset").count(), "no dataset selector on the Train page"
    for label, value in (("Depth L (blocks)", "2"), ("Max steps (0 = all)", "3"), ("Batch size", "32")):
        box = form.get_by_label(label, exact=True)
        box.fill(value)
        box.press("Enter")
        wait_idle(page)
    page.get_by_text("Advanced", exact=True).click()
    name_box = form.get_by_label("Run name (optional)", exact=True)
    name_box.fill(RUN_NAME)
    name_box.press("Enter")
    wait_idle(page)
    page.get_by_role("button", name="Start training").click()
    page.get_by_text(f"Started {RUN_NAME}").wait_for(timeout=30_000)
    assert_no_errors(page, "the Train page after starting a run")
    page.reload()  # a new browser session: the run goes on, and the page finds it again
    wait_idle(page, 60)
    assert "/train" in page.url

    deadline = time.monotonic() + 120
    while (state := job_row(page, RUN_NAME).get("state")) != "finished":
        failed = page.locator('[data-testid="stAlertContentError"]')
        if failed.count():
            raise AssertionError(f"the run failed in the UI: {failed.first.inner_text()}")
        assert time.monotonic() < deadline, f"the run did not finish within 2 minutes (state {state!r})"
        time.sleep(0.5)
    wait_idle(page)
    page.locator('[data-testid="stAlertContentSuccess"]').filter(has_text=f"{RUN_NAME} finished in").wait_for()
    screenshot(page, "99-train-finished")
    assert_no_errors(page, "the Train page after the run finished")

    # ---- the finished run is in the sidebar checkpoint picker
    picker = page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').filter(has_text="Checkpoint")
    picker.first.click()
    options = page.locator('[role="option"]')
    options.first.wait_for()
    labels = [options.nth(i).inner_text() for i in range(options.count())]
    page.keyboard.press("Escape")
    assert any(RUN_NAME in label for label in labels), f"{RUN_NAME} is not in the checkpoint picker: {labels}"
