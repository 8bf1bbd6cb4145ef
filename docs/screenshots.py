"""Screenshots of the real app for the README: `python docs/screenshots.py` (needs Debian's chromium and
playwright, as the browser test does). Starts the app on the shipped samples, opens each page in headless
Chromium, waits until it is idle and saves docs/img/<name>.png. Run it again after a change to a page."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "img"
CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]
# (file name, page path and query): the showcase MoE unless another checkpoint tells the page's story better
SHOTS = [
    ("overview", "?ckpt=samples/fmnist-mvmoe-6x64-e4k1"),
    ("confusion-graph", "confusion_graph?ckpt=samples/fmnist-mvmoe-6x64-e4k1"),
    ("routing", "routing?ckpt=samples/fmnist-mvmoe-6x64-e4k1"),
    ("accuracy-vs-macs", "tradeoff?ckpt=samples/fmnist-mvmoe-6x64-e4k1"),
    ("learn", "learn?ckpt=samples/fmnist-vmoe-6x64-e8k2"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_idle(page, timeout: float = 180) -> None:
    page.wait_for_selector('[data-testid="stApp"][data-test-connection-state="CONNECTED"]', timeout=timeout * 1000)
    deadline, calm = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        busy = (page.locator('[data-testid="stApp"][data-test-script-state="notRunning"]').count() == 0
                or page.locator('[data-testid="stSpinner"]').count())
        calm = None if busy else (calm or time.monotonic())
        if calm and time.monotonic() - calm > 2:
            return
        time.sleep(0.2)
    raise TimeoutError(f"the page was still running after {timeout} s")


def main() -> int:
    from playwright.sync_api import sync_playwright

    port = _free_port()
    env = {**os.environ, "WORKBENCH_RUNS": str(ROOT / ".cache" / "screenshot-runs")}   # the samples only
    app = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "workbench" / "app.py"),
                            "--server.headless", "true", "--server.port", str(port)], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"http://localhost:{port}/_stcore/health", timeout=2).read() == b"ok":
                    break
            except OSError:
                time.sleep(1)
        OUT.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            for name, path in SHOTS:
                page.goto(f"http://localhost:{port}/{path}")
                _wait_idle(page)
                page.wait_for_timeout(1500)                    # charts finish their layout
                page.screenshot(path=str(OUT / f"{name}.png"))
                print(f"wrote {OUT / name}.png")
            browser.close()
    finally:
        app.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
