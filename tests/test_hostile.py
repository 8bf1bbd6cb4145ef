"""Hostile and careless input through the app's public surfaces: a clear message, never a traceback,
nothing read outside the app's folders, and a server that stays on this machine.

Surfaces: a real `streamlit run` started from another directory; the checkpoint loader
(`read_card`, `load_checkpoint`); the app in AppTest with broken checkpoints, URL query
parameters, card datasets and uploads; the JSON the Train page reads (maps, metrics, status).
Checkpoints are tiny and synthetic so that the file stays fast.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.checkpoint import CheckpointError, load_checkpoint, read_card, save_checkpoint
from workbench.models import create_model

streamlit = pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "workbench" / "app.py"
PAGES = ["overview", "confusion_graph", "superclasses", "routing", "inspector", "tradeoff", "learn", "train"]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def synthetic():
    from workbench.data import load_dataset

    return load_dataset("synthetic", "test")


def _save(out: Path, preset: str, ds, dataset: str = "synthetic", **card) -> Path:
    torch.manual_seed(0)
    c, h, _ = ds.image_shape
    model = create_model(preset, num_classes=ds.num_classes, img_size=h, in_chans=c, patch_size=4)
    full = {"preset": preset, "dataset": dataset, "classes": list(ds.classes), "superclasses": None,
            "metrics": {"test_accuracy": 0.5}, "macs": None, "params": None, **card}
    save_checkpoint(out, model, full)
    return out


@pytest.fixture(scope="module")
def good(tmp_path_factory, synthetic) -> Path:
    """A samples folder with one dense and one per-image checkpoint."""
    root = tmp_path_factory.mktemp("samples")
    _save(root / "dense", "vit-2x32", synthetic)
    _save(root / "moe", "mvmoe-2x32-e4k1", synthetic)
    return root


@pytest.fixture
def env(monkeypatch, tmp_path, good):
    monkeypatch.setenv("WORKBENCH_SAMPLES", str(good))
    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("WORKBENCH_DATA", raising=False)
    monkeypatch.delenv("WORKBENCH_DATA_ROOTS", raising=False)
    (tmp_path / "runs").mkdir()
    return tmp_path


def _copy(src: Path, dst: Path, **card_changes) -> Path:
    import shutil

    shutil.copytree(src, dst)
    card = json.loads((dst / "card.json").read_text())
    card.update(card_changes)
    (dst / "card.json").write_text(json.dumps(card))
    return dst


def _app(page: str = "overview", **query) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.session_state["cfg_max_images"] = 100
    for key, value in query.items():
        at.query_params[key] = value
    at.run()
    if page != "overview":
        at.switch_page(f"../pages/{page}.py").run()
    return at


def _ok(at: AppTest, where: str) -> None:
    assert not at.exception, f"{where}: {[e.value for e in at.exception][:1]}"


def _texts(at: AppTest) -> str:
    items = [*at.markdown, *at.info, *at.warning, *at.error, *at.caption, *at.sidebar.warning]
    return "\n".join(str(e.value) for e in items)


# ----------------------------------------------------------------------------- the server
def _listening(port: int) -> list[str]:
    """Addresses with a TCP socket listening on `port` (from /proc/net/tcp and tcp6)."""
    found = []
    for name in ("tcp", "tcp6"):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            host, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A = LISTEN
                continue
            raw = bytes.fromhex(host)
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # little-endian words
            found.append(socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw))
    return found


def _is_loopback(address: str) -> bool:
    return address.startswith("127.") or address in ("::1", "::ffff:127.0.0.1")


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp")
def test_server_started_from_another_directory_listens_on_loopback_only(tmp_path):
    # the working directory even carries a config that asks for every interface
    (tmp_path / ".streamlit").mkdir()
    (tmp_path / ".streamlit" / "config.toml").write_text(
        '[server]\naddress = "0.0.0.0"\nmaxUploadSize = 1000\n[browser]\ngatherUsageStats = true\n')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}
    env.update(WORKBENCH_RUNS=str(tmp_path / "runs"), WORKBENCH_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(APP), "--server.port", str(port),
                             "--server.headless", "true"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, addresses = time.monotonic() + 60, []
        while not addresses and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.3)
            addresses = _listening(port)
        assert addresses, "the server did not listen within 60 s"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=10) as r:
            assert r.read().decode().strip() == "ok"
        assert all(_is_loopback(a) for a in addresses), addresses
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_server_settings_are_the_apps_whatever_the_directory(tmp_path):
    (tmp_path / ".streamlit").mkdir()
    (tmp_path / ".streamlit" / "config.toml").write_text(
        '[server]\naddress = "0.0.0.0"\nmaxUploadSize = 1000\n[browser]\ngatherUsageStats = true\n')
    code = textwrap.dedent(f"""
        import json
        from streamlit import config
        config._main_script_path = {str(APP)!r}   # what `streamlit run <path>` sets
        config.get_config_options(force_reparse=True)
        print(json.dumps({{k: config.get_option(k) for k in
                          ("server.address", "server.maxUploadSize", "browser.gatherUsageStats")}}))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMLIT_")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == {
        "server.address": "localhost", "server.maxUploadSize": 2, "browser.gatherUsageStats": False}


@pytest.fixture
def server_config():
    """streamlit.config with the options this test changes restored afterwards."""
    from streamlit import config

    keys = ("server.address", "browser.gatherUsageStats", "server.maxUploadSize", "global.appTest")
    saved = {k: (config.get_option(k), config.get_where_defined(k)) for k in keys}
    yield config
    for key, (value, where) in saved.items():
        config.set_option(key, value, where)


def test_app_refuses_to_serve_when_its_settings_were_lost_but_respects_explicit_flags(server_config):
    from workbench.serving import unsafe_server_settings

    server_config.set_option("global.appTest", False)
    server_config.set_option("server.address", "localhost", "app config")
    server_config.set_option("browser.gatherUsageStats", False, "app config")
    server_config.set_option("server.maxUploadSize", 2, "app config")
    assert unsafe_server_settings() == []
    server_config.set_option("server.address", None, "<default>")       # config file lost: all interfaces
    server_config.set_option("browser.gatherUsageStats", True, "<default>")
    assert [p.split(" ")[0] for p in unsafe_server_settings()] == ["server.address", "browser.gatherUsageStats"]
    flag = "command-line argument or environment variable"
    server_config.set_option("server.address", "0.0.0.0", flag)          # --server.address 0.0.0.0
    server_config.set_option("browser.gatherUsageStats", True, flag)
    assert unsafe_server_settings() == []


# ----------------------------------------------------------------------------- cards and weights
def _deep(n: int = 100_000) -> str:
    return "[" * n + "]" * n


CARD_CASES = {  # name -> change to a valid card (dict update) or the card's whole text
    "100,000 nested [": _deep(),
    "deep value in a valid card": {"preset": json.loads("[" * 900 + "]" * 900)},
    "not an object": "[1, 2]",
    "malformed": '{"preset": ',
    "not UTF-8": b"\xff\xfe{}",
    "over 16 MB": '{"pad": "' + "x" * (17 << 20) + '"}',
    "negative mlp_ratio": {"config": {"mlp_ratio": -4.0}},
    "depth 1,000,000": {"config": {"depth": 1_000_000}},
    "width 8192": {"config": {"width": 8192}},
    "num_classes not a number": {"config": {"num_classes": "ten"}},
    "unknown config field": {"config": {"exec": "rm -rf /"}},
    "wrong number of classes": {"classes": ["a", "b"]},
    "classes not a list": {"classes": 16},
    "super-class group out of range": {"superclasses": {"assignment": [99] * 16, "names": ["x"]}},
    "super-class map on a dense model": {"config": {"superclasses": [0] * 8 + [1] * 8}},
    "confusion of the wrong shape": {"confusion": {"matrix": [[1, 2], [3, 4]]}},
    "accuracy of 5": {"metrics": {"test_accuracy": 5}},
    "MACs as text": {"macs": {"active": "lots", "dense": 1}},
    "history not a list": {"history": "yes"},
    "dataset of 1 MB": {"dataset": "imagefolder:" + "a" * (1 << 20)},
}


@pytest.mark.parametrize("case", list(CARD_CASES))
def test_a_hostile_card_is_a_checkpoint_error(tmp_path, good, case):
    path = _copy(good / "dense", tmp_path / "ckpt")
    change = CARD_CASES[case]
    if isinstance(change, dict):
        card = json.loads((path / "card.json").read_text())
        for key, value in change.items():
            card[key] = {**card[key], **value} if key == "config" else value
        (path / "card.json").write_text(json.dumps(card))
    else:
        (path / "card.json").write_bytes(change if isinstance(change, bytes) else change.encode())
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match="card.json|model.safetensors"):
        load_checkpoint(path)
    assert time.monotonic() - t0 < 20


def test_a_huge_config_is_refused_before_any_memory_is_allocated(tmp_path, good):
    """width 8192 would allocate ~6 GB: with 1 GB of headroom the loader must refuse from the header alone."""
    path = _copy(good / "dense", tmp_path / "ckpt")
    card = json.loads((path / "card.json").read_text())
    card["config"]["width"] = 8192
    (path / "card.json").write_text(json.dumps(card))
    code = textwrap.dedent(f"""
        import resource, sys
        import torch
        from workbench.checkpoint import CheckpointError, load_checkpoint
        vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
        try:
            load_checkpoint({str(path)!r})
        except CheckpointError as e:
            print("refused:", str(e)[:300])
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "refused:" in out.stdout and "shape mismatch" in out.stdout, out.stdout + out.stderr[-2000:]


def test_weights_that_do_not_match_the_card_are_refused_by_their_header(tmp_path, good):
    card = json.loads((good / "dense" / "card.json").read_text())
    path = _copy(good / "dense", tmp_path / "ckpt", config={**card["config"], "depth": 3})
    with pytest.raises(CheckpointError, match="missing: blocks.2"):
        load_checkpoint(path)


def test_new_cards_name_their_data_relative_to_its_data_root(tmp_path, monkeypatch, synthetic):
    monkeypatch.setenv("WORKBENCH_DATA_ROOTS", str(tmp_path / "data"))
    (tmp_path / "data" / "flowers").mkdir(parents=True)
    (tmp_path / "elsewhere" / "cars").mkdir(parents=True)
    inside = _save(tmp_path / "a", "vit-2x32", synthetic, dataset=f"imagefolder:{tmp_path / 'data' / 'flowers'}")
    outside = _save(tmp_path / "b", "vit-2x32", synthetic, dataset=f"imagefolder:{tmp_path / 'elsewhere' / 'cars'}")
    assert read_card(inside)["dataset"] == "imagefolder:flowers"
    assert read_card(outside)["dataset"] == "imagefolder:cars"
    assert read_card(_save(tmp_path / "c", "vit-2x32", synthetic))["dataset"] == "synthetic"


# ----------------------------------------------------------------------------- broken checkpoints in the app
def test_a_broken_checkpoint_is_named_in_the_picker_and_every_page_still_works(env, good):
    runs = env / "runs"
    (runs / "deep").mkdir()
    (runs / "deep" / "model.safetensors").write_bytes((good / "dense" / "model.safetensors").read_bytes())
    (runs / "deep" / "card.json").write_text(_deep())
    card = json.loads((good / "dense" / "card.json").read_text())
    _copy(good / "dense", runs / "wide", config={**card["config"], "width": 8192})
    for page in PAGES:
        at = _app(page)
        _ok(at, page)
        picker = at.sidebar.selectbox(key="w_ckpt")
        labels = [picker.format_func(o) for o in picker.options]
        assert sum("cannot be opened" in label for label in labels) == 2, labels
        assert at.session_state["sel_ckpt"].startswith("samples/")  # a good one is shown first
    at = _app("overview")
    for ref, why in (("runs/deep", "nested more than"), ("runs/wide", "shape mismatch")):
        at.sidebar.selectbox(key="w_ckpt").set_value(ref).run()
        _ok(at, ref)
        assert any(why in w.value for w in at.sidebar.warning), [w.value for w in at.sidebar.warning]
        assert any("cannot be opened" in w.value for w in at.warning)
    at.sidebar.selectbox(key="w_ckpt").set_value("samples/moe").run()
    _ok(at, "back to a good one")
    assert any("| mvmoe |" in m.value for m in at.markdown)          # the facts row (Family first)


def test_a_card_linking_files_outside_its_folder_is_not_read(env, good, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "card.json").write_text((good / "dense" / "card.json").read_text())
    run = env / "runs" / "linked"
    run.mkdir()
    (run / "model.safetensors").write_bytes((good / "dense" / "model.safetensors").read_bytes())
    (run / "card.json").symlink_to(outside / "card.json")
    at = _app("overview", ckpt="runs/linked")
    _ok(at, "linked card")
    assert any("is outside" in w.value for w in at.sidebar.warning)


# ----------------------------------------------------------------------------- URL query parameters
CKPT_URLS = {
    "10,000 characters": "samples/" + "a" * 10_000,
    "a 300-character folder name": "samples/" + "b" * 300,
    "NUL byte": "samples/dense\x00",
    "parent folders": "samples/../../../etc",
    "absolute path": "/etc/passwd",
    "unknown root": "home/user",
    "a root itself": "samples",
    "only a slash": "/",
    "markdown": "samples/[click](http://example.com)",
}


@pytest.mark.parametrize("case", list(CKPT_URLS))
def test_any_checkpoint_in_the_url_gives_a_message(env, case):
    at = _app("overview", ckpt=CKPT_URLS[case])
    _ok(at, case)
    assert any("from the link is not available" in w.value for w in at.sidebar.warning)
    assert at.session_state["sel_ckpt"] in ("samples/dense", "samples/moe")
    assert all(len(w.value) < 500 for w in at.sidebar.warning)


INDEX_URLS = ["-5", "10000000000000000000000000000000", "abc", "1e400", "nan", "9" * 5000, "", "3.5"]


@pytest.mark.parametrize("value", INDEX_URLS, ids=lambda v: v[:12] or "empty")
def test_any_image_index_in_the_url_gives_a_message(env, value):
    at = _app("inspector", ckpt="samples/moe", image=value)
    _ok(at, f"image={value[:20]}")
    assert any("The link's" in w.value and "image" in w.value for w in at.sidebar.warning)
    assert at.number_input[0].value == 0


@pytest.mark.parametrize("key, page", [("class", "confusion_graph"), ("expert", "routing"), ("layer", "routing")])
@pytest.mark.parametrize("value", ["-1", "99999999999999", "x"])
def test_any_selection_in_the_url_gives_a_message(env, key, page, value):
    at = _app(page, ckpt="samples/moe", **{key: value})
    _ok(at, f"{key}={value}")
    assert any(f"The link's `{key}" in w.value for w in at.sidebar.warning)


# ----------------------------------------------------------------------------- data named by a card
def _image_folder(root: Path, classes=("secret_a", "secret_b"), n: int = 3) -> Path:
    from PIL import Image

    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (28, 28), 40 * i).save(root / c / f"{i}.png")
    return root


def test_a_card_cannot_make_the_app_read_data_outside_its_folders(env, good, tmp_path):
    folder = _image_folder(tmp_path / "private")
    for name, ref in (("abs", f"imagefolder:{folder}"), ("escape", "imagefolder:../../../" + str(folder)),
                      ("etc", "imagefolder:/etc")):
        _copy(good / "moe", env / "runs" / f"card-{name}", dataset=ref, classes=["secret_a", "secret_b"] + ["x"] * 14)
    for name in ("abs", "escape", "etc"):
        for page in ("inspector", "routing"):
            at = _app(page, ckpt=f"runs/card-{name}")
            _ok(at, f"{name} on {page}")
            text = _texts(at)
            assert "not in a data folder" in text, text
            assert "secret_b" not in text and "ssl" not in text   # no folder listing, of ours or /etc's
            if page == "inspector":
                assert "Test image" not in at.radio[0].options


def test_data_under_a_configured_root_loads_and_can_be_moved(env, good, tmp_path, monkeypatch):
    classes = [f"c{i:02d}" for i in range(16)]
    data = _image_folder(tmp_path / "data" / "shapes", classes, n=5)
    monkeypatch.setenv("WORKBENCH_DATA_ROOTS", str(tmp_path / "data"))
    _copy(good / "dense", env / "runs" / "relative", dataset="imagefolder:shapes", classes=classes)
    _copy(good / "dense", env / "runs" / "old", dataset=f"imagefolder:{tmp_path / 'gone' / 'shapes'}", classes=classes)
    for name in ("relative", "old"):   # an old card's absolute path that moved: found by its folder name
        at = _app("inspector", ckpt=f"runs/{name}")
        _ok(at, name)
        assert "Test image" in at.radio[0].options, _texts(at)
    assert data.is_dir()


# ----------------------------------------------------------------------------- uploads
def _encode(img, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _uploads():
    from PIL import Image

    grey16 = np.full((28, 28), 1000, np.uint16)
    grey16[0, 0] = 65535
    return {
        "bomb (20000x20000 PNG)": (_encode(Image.new("L", (20000, 20000))), "error", "decompression bomb"),
        "bomb (1-bit 15000x15000)": (_encode(Image.new("1", (15000, 15000))), "error", "decompression bomb"),
        "garbage": (b"GIF89a not an image", "error", "not a PNG or JPEG"),
        "truncated": (_encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)))[:600],
                      "error", "truncated"),
        "BMP": (_encode(Image.new("L", (28, 28)), "BMP"), "error", "expected a PNG or JPEG"),
        "16-bit grey": (_encode(Image.fromarray(grey16)), "caption", "Scaled the I;16"),
        "JPEG 640x480 RGB": (_encode(Image.new("RGB", (640, 480), (9, 99, 199)), "JPEG"), "caption",
                             "Resized from 640×480"),
        "RGBA": (_encode(Image.new("RGBA", (28, 28), (0, 0, 0, 0))), "caption", "white background"),
    }


def _upload(data: bytes) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.session_state["w_image_source"] = "Upload an image"   # skip the test image's analysis
    at.query_params["ckpt"] = "samples/moe"
    at.run()
    at.switch_page("../pages/inspector.py").run()
    at.file_uploader[0].set_value(("upload.png", data, "image/png")).run()
    return at


@pytest.mark.parametrize("case", list(_uploads()))
def test_uploads_give_a_result_with_a_note_or_a_clear_message(env, case):
    data, kind, text = _uploads()[case]
    at = _upload(data)
    _ok(at, case)
    if kind == "error":
        assert any(text in e.value for e in at.error), [e.value for e in at.error]
    else:
        assert any(text in c.value for c in at.caption), [c.value for c in at.caption]
        assert {m.label for m in at.metric} >= {"Prediction", "Confidence"}


@pytest.mark.parametrize("mode, fmt, shape, note", [
    ("P", "PNG", (1, 28, 28), "Converted from mode P to grey"),
    ("CMYK", "JPEG", (3, 32, 32), "Converted from mode CMYK to RGB"),
    ("1", "PNG", (1, 28, 28), "Converted from mode 1 to grey"),
    ("L", "JPEG", (3, 28, 28), "Converted from mode L to RGB"),
    ("RGB", "PNG", (1, 28, 28), "Converted from mode RGB to grey"),
])
def test_any_mode_is_converted_with_a_note(mode, fmt, shape, note):
    from PIL import Image

    from pages.common import read_uploaded_image

    image, notes = read_uploaded_image(_encode(Image.new(mode, (50, 40)), fmt), shape)
    assert image.shape == shape and image.dtype == np.uint8
    assert any(note in n for n in notes) and any("Resized from 50×40" in n for n in notes), notes


def test_16_bit_images_are_scaled_not_clipped():
    from PIL import Image

    from pages.common import read_uploaded_image

    a = np.array([[0, 1000, 32896, 65535]], np.uint16).repeat(4, 0)
    image, notes = read_uploaded_image(_encode(Image.fromarray(a)), (1, 4, 4))
    assert image[0, 0].tolist() == [0, 4, 128, 255]      # clipping would give [0, 255, 255, 255]
    assert notes


# ----------------------------------------------------------------------------- JSON the Train page reads
def test_deep_json_in_maps_metrics_and_job_files_is_refused_not_a_recursion_error(tmp_path):
    from workbench import runs, superclass_map

    with pytest.raises(ValueError, match="nested more than"):
        superclass_map.parse_map(_deep(), "the super-class file")
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n' + _deep() + "\n")
    (run / "status.json").write_text(_deep())
    (run / "job.json").write_text(_deep())
    assert runs.read_metrics(run) == [{"step": 1, "loss": 2.0}]
    runs.list_jobs(tmp_path / "runs")   # no RecursionError


def test_a_deep_superclasses_json_beside_an_image_folder_is_a_dataset_error(tmp_path):
    from workbench.data import DatasetError, load_dataset

    folder = _image_folder(tmp_path / "shapes", ("a", "b"), n=5)
    (folder / "superclasses.json").write_text(_deep())
    with pytest.raises(DatasetError, match="nested more than"):
        load_dataset(f"imagefolder:{folder}", "test")
