"""The Streamlit app, driven headless with streamlit.testing.v1.AppTest.

Every page renders without an exception for every checkpoint family (tiny
checkpoints built here on the synthetic dataset, and the shipped samples when
there are any); widgets change what is shown; missing inputs give a message,
not a traceback. Charts are opaque to AppTest, so the checks read tables,
metrics and text.
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

streamlit = pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP = str(ROOT / "workbench" / "app.py")
PAGES = ["overview", "confusion_graph", "superclasses", "routing", "inspector", "tradeoff", "learn"]
FAMILIES = {  # preset -> overrides; tiny so that the whole file stays fast
    "vit-2x32": {},
    "mvmoe-2x32-e4k1": {"superclasses": True},
    "vmoe-4x32-e4k2": {},
}
MAX_IMAGES = 200  # test images the analyses use (the sidebar setting)


# ----------------------------------------------------------------------------- fixtures
def _make_checkpoint(out: Path, preset: str, ds, superclasses=None, dataset_name: str = "synthetic"):
    import torch

    from analysis.confusion import model_confusion
    from analysis.superclasses import group_names
    from workbench.checkpoint import save_checkpoint
    from workbench.flops import count_macs
    from workbench.models import create_model

    torch.manual_seed(0)
    c, h, _ = ds.image_shape
    overrides = {"superclasses": list(superclasses)} if superclasses is not None else {}
    model = create_model(preset, num_classes=ds.num_classes, img_size=h, in_chans=c, patch_size=4, **overrides).eval()
    sub = ds.subset(range(min(300, len(ds))))
    cm = model_confusion(model, sub)
    macs = count_macs(model, ds.image_shape)
    card = {
        "preset": preset, "dataset": dataset_name, "classes": list(ds.classes),
        "superclasses": None if superclasses is None else {
            "assignment": list(superclasses), "names": group_names(superclasses, ds.classes), "method": "spectral"},
        "metrics": {"test_accuracy": float(np.trace(cm) / cm.sum())}, "macs": macs,
        "params": {"total": macs["params_total"], "active": macs["params_active"]},
        "confusion": {"split": "test", "matrix": cm.tolist()},
        "history": [{"epoch": 1, "train_loss": 2.0, "test_accuracy": float(np.trace(cm) / cm.sum())}],
    }
    save_checkpoint(out / preset, model, card)
    return out / preset


@pytest.fixture(scope="session")
def synthetic():
    from workbench.data import load_dataset

    return load_dataset("synthetic", "test")


@pytest.fixture(scope="session")
def tiny_samples(tmp_path_factory, synthetic):
    """One tiny checkpoint per family on the synthetic dataset (the mvmoe one with super-classes)."""
    from analysis.superclasses import cluster_superclasses

    out = tmp_path_factory.mktemp("samples")
    dense = _make_checkpoint(out, "vit-2x32", synthetic)
    cm = json.loads((dense / "card.json").read_text())["confusion"]["matrix"]
    groups = cluster_superclasses(np.asarray(cm), 4, method="spectral").tolist()
    _make_checkpoint(out, "mvmoe-2x32-e4k1", synthetic, superclasses=groups)
    _make_checkpoint(out, "vmoe-4x32-e4k2", synthetic)
    return out


@pytest.fixture
def app_env(monkeypatch, tmp_path, tiny_samples):
    """Point the app at the tiny samples, an empty runs folder and a private cache."""
    monkeypatch.setenv("WORKBENCH_SAMPLES", str(tiny_samples))
    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    return tiny_samples


def _refs(root: Path) -> list[str]:
    from workbench.checkpoint import list_checkpoints

    return [f"samples/{p.relative_to(root).as_posix()}" for p in list_checkpoints(root)]


def _app(page: str = "overview", ckpt: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["cfg_max_images"] = MAX_IMAGES
    if ckpt is not None:
        at.query_params["ckpt"] = ckpt
    at.run()
    if page != "overview":
        at.switch_page(f"../pages/{page}.py").run()
    return at


def _select(at: AppTest, ref: str) -> AppTest:
    at.sidebar.selectbox(key="w_ckpt").set_value(ref).run()
    return at


def _no_exception(at: AppTest, where: str) -> None:
    assert not at.exception, f"{where}: {[e.value for e in at.exception]}"
    assert not at.error, f"{where}: {[e.value for e in at.error]}"


def _table_with(at: AppTest, column: str):
    """The first table shown that has `column`."""
    for df in at.dataframe:
        if column in df.value.columns:
            return df.value
    raise AssertionError(f"no table with a {column!r} column")


def _texts(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [m.value for m in at.info] + [m.value for m in at.warning]
    parts += [m.value for m in at.caption]
    return "\n".join(str(p) for p in parts)


# ----------------------------------------------------------------------------- every page, every family
@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_for_every_family(app_env, page):
    at = _app(page)
    refs = _refs(app_env)
    assert len(refs) == len(FAMILIES)
    for ref in refs:
        _select(at, ref)
        _no_exception(at, f"{page} on {ref}")
        assert at.session_state["sel_ckpt"] == ref
        assert at.query_params["ckpt"] == [ref] or at.query_params["ckpt"] == ref


def _shipped() -> list[str]:
    """One shipped sample per kind (family, with/without super-classes): the smallest, to keep the file fast."""
    from workbench.checkpoint import list_checkpoints, read_card

    root = ROOT / "sample_checkpoints"
    best: dict = {}
    for path in list_checkpoints(root) if root.is_dir() else []:
        try:
            card = read_card(path)
        except ValueError:
            continue
        kind = (card["config"].get("family"), bool(card.get("superclasses")))
        size = (path / "model.safetensors").stat().st_size
        if kind not in best or size < best[kind][0]:
            best[kind] = (size, f"samples/{path.relative_to(root).as_posix()}")
    return sorted(ref for _, ref in best.values())


@pytest.mark.skipif(not _shipped(), reason="no shipped sample checkpoints yet")
@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_for_the_shipped_samples(monkeypatch, tmp_path, page):
    monkeypatch.setenv("WORKBENCH_SAMPLES", str(ROOT / "sample_checkpoints"))
    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    at = _app(page)
    for ref in _shipped():
        _select(at, ref)
        _no_exception(at, f"{page} on {ref}")


# ----------------------------------------------------------------------------- what the pages show
def test_overview_shows_the_card(app_env):
    at = _select(_app("overview"), "samples/mvmoe-2x32-e4k1")
    facts = next(m.value for m in at.markdown if m.value.startswith("| Family | Preset |")).replace("\\", "")
    assert "| mvmoe | mvmoe-2x32-e4k1 | 4 / 1 | synthetic |" in facts      # long names wrap, never cut off
    assert "MACs per image (active)" in {m.label for m in at.metric}
    groups = at.dataframe[0].value
    assert len(groups) == 4 and list(groups["super-class"]) == [0, 1, 2, 3]


def test_e_slider_changes_the_number_of_groups(app_env):
    at = _select(_app("superclasses"), "samples/vit-2x32")
    for e in (2, 3, 5):
        at.slider(key="w_num_groups").set_value(e).run()
        _no_exception(at, f"E={e}")
        table = at.dataframe[0].value
        assert len(table) == e
        assert sorted(table["group"]) == list(range(e))
        assert at.session_state["superclass_map"]["num_groups"] == e  # offered to the Train page


def test_superclass_map_is_offered_for_download_and_training(app_env):
    at = _select(_app("superclasses"), "samples/vit-2x32")
    mapping = at.session_state["superclass_map"]
    assert set(mapping) >= {"dataset", "method", "num_groups", "classes", "groups"}
    assert mapping["dataset"] == "synthetic"
    assert len(at.get("download_button")) == 1


def test_disabling_an_expert_changes_the_routing_table(app_env):
    at = _select(_app("routing"), "samples/mvmoe-2x32-e4k1")
    before = at.dataframe[0].value.copy()
    used = int(before.sum(axis=0).to_numpy().argmax())  # disable the busiest expert: its column must empty
    at.multiselect(key="w_disabled").set_value([used]).run()
    _no_exception(at, "disabled expert")
    after = at.dataframe[0].value
    assert not before.equals(after)
    assert after[used].sum() == 0


def test_routing_knobs_recompute_for_per_token_models(app_env):
    at = _select(_app("routing"), "samples/vmoe-4x32-e4k2")
    drops = lambda: _table_with(at, "items_dropped")  # noqa: E731  (the pre/post-capacity summary)
    at.slider(key="w_capacity").set_value(4.0).run()
    loose = drops()["dropped"].sum()
    at.slider(key="w_capacity").set_value(0.25).run()
    _no_exception(at, "tight capacity")
    assert drops()["dropped"].sum() > loose


def _toggle(at: AppTest, label_start: str) -> AppTest:
    next(t for t in at.toggle if t.label.startswith(label_start)).set_value(True).run()
    return at


def test_optional_routing_sections_render(app_env):
    at = _select(_app("routing"), "samples/vmoe-4x32-e4k2")
    _toggle(at, "Disable each expert")
    _toggle(at, "Compare BPR")
    _no_exception(at, "ablation + BPR comparison")
    assert "ablated_accuracy" in _table_with(at, "ablated_accuracy").columns
    assert set(_table_with(at, "priority")["priority"]) == {"BPR", "vanilla"}
    at = _select(at, "samples/mvmoe-2x32-e4k1")
    _toggle(at, "Compute UMAP")
    _no_exception(at, "UMAP")


def test_tradeoff_sweep_and_method_comparison_render(app_env):
    at = _select(_app("tradeoff"), "samples/vmoe-4x32-e4k2")
    assert len(_table_with(at, "pareto")) == len(FAMILIES)
    shape = next(s for s in at.selectbox if s.label == "Shape")      # the routers of one shape side by side
    assert shape.options == ["synthetic, 2x32"]
    _toggle(at, "Run the sweep")
    _no_exception(at, "sweep")
    sweep = _table_with(at, "drop_rate")
    assert set(sweep["k"]) == {1, 2, 3, 4}
    at = _select(_app("superclasses"), "samples/vit-2x32")
    _toggle(at, "Compare all methods")
    _no_exception(at, "method comparison")
    assert len(_table_with(at, "within_share")) >= 3


def test_inspector_attribution_methods(app_env):
    at = _select(_app("inspector"), "samples/mvmoe-2x32-e4k1")
    for method in ("saliency", "occlusion"):
        next(s for s in at.selectbox if s.label == "Method").set_value(method).run()
        _no_exception(at, method)
    assert {m.label for m in at.metric} >= {"Prediction", "Confidence"}


def test_learn_page_shows_fewer_drops_with_more_capacity(app_env):
    at = _select(_app("learn"), "samples/vmoe-4x32-e4k2")
    slider = next(s for s in at.slider if s.label.startswith("Capacity ratio"))
    dropped = {}
    for c in (0.2, 2.0):
        slider.set_value(c).run()
        _no_exception(at, f"C={c}")
        dropped[c] = [int(m.value.split(" of ")[0]) for m in at.metric if "tokens dropped" in m.label]
    assert all(tight >= loose for tight, loose in zip(dropped[0.2], dropped[2.0]))
    assert sum(dropped[0.2]) > sum(dropped[2.0])


def test_linked_class_selection_is_shared_across_pages_and_the_url(app_env):
    at = _select(_app("confusion_graph"), "samples/vit-2x32")
    at.sidebar.selectbox(key="w_class").set_value(3).run()
    assert at.query_params["class"] in ("3", ["3"])
    at.switch_page("../pages/routing.py").run()
    at = _select(at, "samples/mvmoe-2x32-e4k1")
    assert at.selectbox(key="w_class").value == 3


def test_a_shared_url_opens_the_same_checkpoint(app_env):
    at = _app("overview", ckpt="samples/vmoe-4x32-e4k2")
    _no_exception(at, "url")
    assert any("| vmoe |" in m.value for m in at.markdown)          # the facts row (Family first)


def test_a_url_outside_the_checkpoint_folders_is_refused(app_env):
    at = _app("overview", ckpt="samples/../../etc")
    _no_exception(at, "bad url")
    assert any("not available" in w.value for w in at.sidebar.warning)
    assert at.session_state["sel_ckpt"] in _refs(app_env)


# ----------------------------------------------------------------------------- missing inputs
def test_dense_model_on_routing_page_says_why(app_env):
    at = _select(_app("routing"), "samples/vit-2x32")
    _no_exception(at, "dense routing")
    assert any("dense model" in i.value for i in at.info)


def test_no_checkpoints_shows_how_to_get_one(monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_SAMPLES", str(tmp_path / "empty"))
    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    for page in PAGES:
        at = _app(page)
        _no_exception(at, f"{page} without checkpoints")
        assert any("No checkpoints" in i.value for i in at.info)


def test_a_deleted_run_folder_gives_a_message(monkeypatch, tmp_path, tiny_samples):
    runs = tmp_path / "runs"
    for name in ("first", "second"):
        shutil.copytree(tiny_samples / "vit-2x32", runs / name)
    monkeypatch.setenv("WORKBENCH_SAMPLES", str(tmp_path / "no-samples"))
    monkeypatch.setenv("WORKBENCH_RUNS", str(runs))
    at = _select(_app("overview"), "runs/second")
    _no_exception(at, "run")
    shutil.rmtree(runs / "second")
    at.run()
    _no_exception(at, "deleted run")
    assert any("is gone" in w.value for w in at.sidebar.warning)
    assert at.session_state["sel_ckpt"] == "runs/first"
    shutil.rmtree(runs / "first")
    at.run()
    _no_exception(at, "every run deleted")
    assert any("No checkpoints" in i.value for i in at.info)


def test_a_dataset_that_is_not_available_gives_a_warning(monkeypatch, tmp_path, synthetic):
    root = tmp_path / "samples"
    path = _make_checkpoint(root, "mvmoe-2x32-e4k1", synthetic)
    card = json.loads((path / "card.json").read_text())
    card["dataset"] = "imagefolder:" + str(tmp_path / "nowhere")
    (path / "card.json").write_text(json.dumps(card))
    monkeypatch.setenv("WORKBENCH_SAMPLES", str(root))
    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    for page in ("routing", "inspector", "superclasses", "overview", "confusion_graph"):
        at = _app(page)
        _no_exception(at, f"{page} without data")
    at = _app("routing")
    assert any("not available" in w.value for w in at.warning)


def test_without_the_images_the_routing_page_shows_the_cards_tables(monkeypatch, tmp_path, synthetic):
    """A shipped checkpoint whose data may not be redistributed (Tiny ImageNet) is explorable from its card."""
    from workbench.checkpoint import load_checkpoint
    from workbench.evaluate import eval_stats, routing_tables

    root = tmp_path / "samples"
    groups = [g % 4 for g in range(synthetic.num_classes)]
    path = _make_checkpoint(root, "mvmoe-2x32-e4k1", synthetic, superclasses=groups)
    model, card = load_checkpoint(path)
    card["routing_tables"] = routing_tables(eval_stats(model, synthetic))
    card["dataset"] = "imagefolder:" + str(tmp_path / "nowhere")
    (path / "card.json").write_text(json.dumps(card))
    monkeypatch.setenv("WORKBENCH_SAMPLES", str(root))
    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    at = _app("routing")
    _no_exception(at, "routing from the card")
    # one message: what is missing (the images) and what the page shows instead; no "cannot be computed"
    assert not at.warning, [w.value for w in at.warning]
    message = [i.value for i in at.info if "stored in the card" in i.value]
    assert len(message) == 1 and "are not here" in message[0] and "Shown instead" in message[0]
    table = next(df.value for df in at.dataframe if df.value.index.name == "class")
    counts = np.asarray(card["routing_tables"]["layers"][0]["counts"], dtype=float)
    np.testing.assert_allclose(table.to_numpy(), counts / counts.sum(1, keepdims=True), atol=1e-4)   # rows: P(expert | class)
    at.radio[0].set_value("superclass").run()
    _no_exception(at, "by super-class")
    assert _table_with(at, "purity")["accuracy"].between(0, 1).all()


def test_data_that_does_not_fit_the_checkpoint_gives_a_warning(monkeypatch, tmp_path, synthetic):
    root = tmp_path / "samples"
    path = _make_checkpoint(root, "vmoe-4x32-e4k2", synthetic)
    card = json.loads((path / "card.json").read_text())
    card["classes"] = [f"other-{i}" for i in range(len(card["classes"]))]  # e.g. a re-generated dataset
    (path / "card.json").write_text(json.dumps(card))
    monkeypatch.setenv("WORKBENCH_SAMPLES", str(root))
    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    for page in PAGES:
        at = _app(page)
        _no_exception(at, f"{page} with mismatched data")
    at = _app("routing")
    assert any("does not match" in w.value for w in at.warning)


# ----------------------------------------------------------------------------- uploads
def _png(size, mode="L") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format="PNG")
    return buf.getvalue()


def test_upload_accepts_a_png_of_the_dataset_size():
    from pages.common import read_uploaded_image

    image, notes = read_uploaded_image(_png((28, 28)), (1, 28, 28))
    assert image.shape == (1, 28, 28) and image.dtype == np.uint8 and notes == []
    rgb, _ = read_uploaded_image(_png((32, 32), "RGB"), (3, 32, 32))
    assert rgb.shape == (3, 32, 32)


def test_upload_of_another_size_is_resized_with_a_note():
    from pages.common import read_uploaded_image

    image, notes = read_uploaded_image(_png((64, 64)), (1, 28, 28))
    assert image.shape == (1, 28, 28) and notes == ["Resized from 64×64 to the model's 28×28 pixels."]


@pytest.mark.parametrize("data, why", [
    (b"GIF89a not an image", "PNG or JPEG"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "PNG or JPEG"),
    (b"\x00" * (3 * 1024 * 1024), "KB"),
])
def test_upload_refuses_wrong_files(data, why):
    from pages.common import read_uploaded_image

    with pytest.raises(ValueError, match=why):
        read_uploaded_image(data, (1, 28, 28))


def test_routing_and_learn_pages_show_the_capacity_rule_in_use(app_env):
    # the tiny per-token sample is a new model: the reference rule, C rounded up to a multiple of 4
    at = _select(_app("routing"), "samples/vmoe-4x32-e4k2")
    assert "rounded up to a multiple of 4" in _texts(at)
    # the Learn page teaches with the paper's formula, so every step of the slider can change the capacity;
    # the reference's rounding is one toggle away
    at = _select(_app("learn"), "samples/vmoe-4x32-e4k2")
    assert "rounded up to a multiple of 4" not in _texts(at) and at.latex
    capacities = set()
    for ratio in (0.1, 0.3, 0.6):
        at.slider[0].set_value(ratio).run()
        capacities.add(next(m for m in _texts(at).split("**") if m.startswith("capacity ")))
    assert len(capacities) == 3, capacities
    at.toggle(key="learn_rounded").set_value(True).run()
    assert "rounded up to a multiple of 4" in _texts(at)


def test_with_k_1_the_learn_page_says_why_both_orders_drop_as_many(app_env):
    at = _select(_app("learn"), "samples/vmoe-4x32-e4k2")
    at.radio[0].set_value(1).run()
    at.slider[0].set_value(0.2).run()
    assert any("always drop the same **number** of tokens" in i.value for i in at.info)


# ----------------------------------------------------------------------------- the Train page's pipeline panel
def _finished_pipeline(run: Path, ds) -> None:
    """A pipeline run folder as workbench.pipeline leaves it (tiny untrained models, files as written)."""
    from conftest import save_tiny_checkpoint

    save_tiny_checkpoint(run / "dense", "vit-2x32", ds)
    save_tiny_checkpoint(run / "moe", "mvmoe-2x32-e4k1", ds)
    for stage, preset in (("dense", "vit-2x32"), ("moe", "mvmoe-2x32-e4k1")):
        (run / stage / "status.json").write_text(json.dumps({"state": "finished", "model": preset, "epoch": 1,
                                                             "epochs": 1, "last_eval": {"test_accuracy": 0.5}}))
    (run / "confusion.json").write_text(json.dumps({"accuracy": 0.25}))
    (run / "clustering.json").write_text(json.dumps({"method": "spectral", "num_groups": 4}))
    (run / "report.json").write_text(json.dumps({"rows": [{"model": "moe", "test_accuracy": 0.5}]}))
    (run / "report.md").write_text("# Pipeline report: synthetic\n\nthe report's own words\n")
    (run / "job.json").write_text(json.dumps({"kind": "pipeline", "name": run.name, "started_ts": 1.0,
                                              "options": {"model": "vit-2x32 → mvmoe-2x32-e4k1"}}))
    (run / "exit.json").write_text(json.dumps({"returncode": 0, "ended_ts": 2.0}))


def test_the_pipeline_panel_offers_every_choice_and_a_finished_run_opens_its_models(open_page, tmp_path):
    from conftest import save_tiny_checkpoint
    from workbench.data import load_dataset

    ds = load_dataset("synthetic", "test")
    save_tiny_checkpoint(tmp_path / "samples" / "vit-2x32", "vit-2x32", ds)
    _finished_pipeline(tmp_path / "runs" / "pipe", ds)
    at = open_page(tmp_path / "samples", "vit-2x32", "pages/train.py")
    assert not at.exception
    keys = {w.key for kind in ("selectbox", "number_input", "text_input") for w in at.get(kind)}
    assert keys >= {"tr_pipe_ds", "tr_pipe_depth", "tr_pipe_width", "tr_pipe_E", "tr_pipe_k", "tr_pipe_method",
                    "tr_pipe_lambda", "tr_pipe_epochs", "tr_pipe_seed"}
    assert "tiny-imagenet" in at.selectbox(key="tr_pipe_ds").options
    assert "auto" in at.selectbox(key="tr_pipe_method").value
    at.selectbox(key="tr_pipe_ds").set_value("imagefolder").run()
    at.button(key="tr_pipe_start").click().run()        # no folder typed: said plainly, nothing started
    assert any("enter the image folder" in e.value for e in at.error), [e.value for e in at.error]

    stages = next(m.value for m in at.markdown if "Dense baseline" in m.value).replace("\\", "")  # (markdown escapes)
    assert stages.count(": done") == 5 and "E = 4 by spectral" in stages and "moe 50.00%" in stages
    assert any("the report's own words" in m.value for m in at.markdown)
    at.button(key="tr_open_moe").click().run()
    assert not at.exception
    assert at.session_state["sel_ckpt"] == "runs/pipe/moe"
    labels = at.sidebar.selectbox(key="w_ckpt").options
    assert any(label.startswith("pipe/moe (mvmoe-2x32-e4k1)") for label in labels), labels


def test_a_pipeline_model_shows_its_run_report_on_the_overview(open_page, tmp_path):
    from conftest import save_tiny_checkpoint
    from workbench.data import load_dataset

    ds = load_dataset("synthetic", "test")
    save_tiny_checkpoint(tmp_path / "samples" / "vit-2x32", "vit-2x32", ds)
    _finished_pipeline(tmp_path / "runs" / "pipe", ds)
    at = open_page(tmp_path / "samples", "vit-2x32", "pages/overview.py")
    assert not [e for e in at.expander if "pipeline run" in e.label]     # a sample: no pipeline report
    at.sidebar.selectbox(key="w_ckpt").set_value("runs/pipe/moe").run()
    assert not at.exception
    assert any("pipeline run `pipe`" in e.label for e in at.expander)
    assert any("the report's own words" in m.value for m in at.markdown)


def test_a_new_session_opens_on_the_showcase_sample_not_on_a_run(monkeypatch, tmp_path, tiny_samples):
    """runs/ sorts before samples/: a run trained from the UI must not become everyone's first view."""
    monkeypatch.setenv("WORKBENCH_SAMPLES", str(ROOT / "sample_checkpoints"))
    runs = tmp_path / "runs"
    shutil.copytree(tiny_samples / "vit-2x32", runs / "a-toy-run")
    monkeypatch.setenv("WORKBENCH_RUNS", str(runs))
    at = _app("overview")
    _no_exception(at, "overview")
    assert at.session_state["w_ckpt"] == "samples/fmnist-mvmoe-6x64-e4k1"
    at = _app("overview", ckpt="runs/a-toy-run")                   # a link still opens the run
    assert at.session_state["w_ckpt"] == "runs/a-toy-run"


@pytest.mark.parametrize("page", PAGES)
def test_a_card_that_fails_validation_gives_a_warning_on_every_page(monkeypatch, tmp_path, tiny_samples, page):
    root = tmp_path / "samples"
    shutil.copytree(tiny_samples / "vit-2x32", root / "broken")
    card = json.loads((root / "broken" / "card.json").read_text())
    card["metrics"]["test_accuracy"] = 7.5                      # not a fraction: validate_card refuses it
    (root / "broken" / "card.json").write_text(json.dumps(card))
    monkeypatch.setenv("WORKBENCH_SAMPLES", str(root))
    monkeypatch.setenv("WORKBENCH_RUNS", str(tmp_path / "runs"))
    at = _app(page, ckpt="samples/broken")
    _no_exception(at, page)
    assert any("cannot be opened" in w.value and "must be a fraction" in w.value for w in at.warning), page


def test_the_routing_pages_patch_maps_name_images_by_their_test_split_number(app_env):
    from pages.common import subset_indices

    at = _select(_app("routing"), "samples/vmoe-4x32-e4k2")
    _no_exception(at, "routing")
    titles = " ".join(str(getattr(e, "proto", "")) for e in at.main)
    from workbench.data import load_dataset

    expected = subset_indices(MAX_IMAGES, len(load_dataset("synthetic", "test")))[:4]
    for number in expected:
        assert f"#{int(number)} " in titles, number
