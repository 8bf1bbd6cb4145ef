"""Background jobs (workbench/jobs.py): how the Train page starts, follows and stops runs.

Most tests start a tiny stand-in process (a few lines of Python) instead of
training, so they are fast; one test runs real training on `synthetic`.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from pages.figures import metrics_frames
from workbench import jobs, runs as run_folder
from workbench.checkpoint import load_checkpoint
from workbench.pipeline_config import PipelineConfig
from workbench.train_config import TrainConfig, model_from_preset

PY = sys.executable


def train_config(model: str = "vit-2x64", overrides: dict = None, **options) -> TrainConfig:
    """What the Train form builds: a TrainConfig (synthetic data, one epoch by default)."""
    return TrainConfig(model=model_from_preset(model, overrides or {}), **{"dataset": "synthetic", "epochs": 1,
                                                                          **options})


def start(model: str = "vit-2x64", overrides: dict = None, name=None, superclasses=None, root=None, **options):
    return jobs.start_training(train_config(model, overrides, **options), name=name, superclasses=superclasses,
                               root=root)


def sleeper(seconds: float = 60, status: bool = True) -> list[str]:
    """A stand-in job: writes status.json like train.py, then sleeps."""
    code = (
        "import json, os, sys, time\n"
        "d = sys.argv[1]\n"
        + ("json.dump({'state': 'running', 'pid': os.getpid()}, open(os.path.join(d, 'status.json'), 'w'))\n"
           if status else "")
        + f"time.sleep({seconds})\n"
    )
    return [PY, "-c", code, "{run_dir}"]


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# ----------------------------------------------------------------------------- names and paths
def test_run_names_are_sanitised_and_made_unique(runs):
    a = jobs.start_command([PY, "-c", "pass"], "../../etc/my run!", root=runs, limit=5)
    b = jobs.start_command([PY, "-c", "pass"], "../../etc/my run!", root=runs, limit=5)
    assert a.parent == runs and b.parent == runs
    assert a.name == "etc-my-run" and b.name == "etc-my-run-2"
    job = json.loads((a / "job.json").read_text())
    assert job["kind"] == "train" and job["pid"] > 0 and job["command"][0] == PY and job["started"]


def test_run_paths_outside_the_runs_folder_are_refused(runs, tmp_path):
    runs.mkdir()
    (tmp_path / "elsewhere").mkdir()
    for bad in ("../elsewhere", str(tmp_path / "elsewhere"), "a/../../elsewhere"):
        with pytest.raises(ValueError, match="outside"):
            jobs.resolve_run(bad, runs)
    with pytest.raises(ValueError, match="outside"):
        jobs.cancel("../elsewhere", runs)
    with pytest.raises(ValueError, match="no usable characters"):
        jobs.start_command([PY, "-c", "pass"], "../..", root=runs)


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("options, message", [
    (dict(model="vit-2x64x"), "unknown preset"),
    (dict(model="mvmoe-2x64-e2k3"), "num_experts >= top_k"),
    (dict(epochs=0), "--epochs must be >= 1"),
    (dict(epochs=2.5), "--epochs must be a whole number"),
    (dict(batch_size=0), "--batch-size must be >= 1"),
    (dict(batch_size=10**6), "batch size 4096 from the app"),
    (dict(max_steps=-1), "--max-steps must be >= 1"),
    (dict(dataset="mnist"), "unknown dataset 'mnist'"),
    (dict(dataset="imagefolder:/no/such/folder"), "does not exist"),
    (dict(precision="fp8"), "--precision must be one of"),
    (dict(overrides={"experts": 4}), "unknown model option"),
    (dict(overrides={"depth": 3}), "contradict preset"),
    (dict(model="vit-2x64", superclasses="two groups"), "only guides the per-image"),
    (dict(model="mvmoe-2x64-e3k1", superclasses={"classes": {"a": 0, "b": 1}}), "does not match the dataset's classes"),
    (dict(model="mvmoe-2x64-e2k1", superclasses={"classes": {"a": 0, "b": 2}}), "must be 0..E-1"),
    (dict(model="mvmoe-2x64-e2k1", superclasses={"dataset": "cifar10", "classes": {"a": 0, "b": 1}}),
     "made for 'cifar10'"),
    (dict(name="///"), "no usable characters"),
    (dict(out="/tmp/elsewhere"), "chooses the run folder"),
])
def test_bad_options_are_refused_before_anything_starts(runs, options, message):
    if options.get("superclasses") == "two groups":  # a valid map for the synthetic classes
        from workbench.data import load_dataset

        classes = load_dataset("synthetic", "test").classes
        options["superclasses"] = {"dataset": "synthetic", "classes": {c: i % 2 for i, c in enumerate(classes)}}
    with pytest.raises(ValueError, match=message):
        start(**options)
    assert not runs.exists() or not [p for p in runs.iterdir() if not p.name.startswith(".")]


def test_the_map_must_have_one_group_per_expert(runs):
    from workbench.data import load_dataset

    classes = load_dataset("synthetic", "test").classes
    two_groups = {"dataset": "synthetic", "classes": {c: i % 2 for i, c in enumerate(classes)}}
    with pytest.raises(ValueError, match=r"must use groups 0..2 \(one per expert\), got \[0, 1\]"):
        start("mvmoe-2x64-e3k1", superclasses=two_groups)


def test_an_uploaded_map_that_is_not_json_is_a_plain_error():
    with pytest.raises(ValueError, match="not valid JSON"):
        jobs.read_superclass_file(b"{classes: ")
    good = jobs.read_superclass_file(json.dumps({"classes": {"a": 0, "b": 1, "c": 1}, "num_groups": 2}))
    assert good["num_groups"] == 2


# ----------------------------------------------------------------------------- concurrency
def test_one_job_at_a_time_by_default(runs, monkeypatch):
    first = jobs.start_command(sleeper(), "first", root=runs)
    assert jobs.job_state(first)[0] == "running"
    with pytest.raises(jobs.JobError, match="already running.*first.*limit is 1"):
        jobs.start_command(sleeper(), "second", root=runs)
    with pytest.raises(jobs.JobError, match="limit is 1"):
        start(root=runs)
    monkeypatch.setenv("WORKBENCH_MAX_JOBS", "2")
    second = jobs.start_command(sleeper(), "second", root=runs)
    assert [r["state"] for r in jobs.list_jobs(runs)] == ["running", "running"]
    with pytest.raises(jobs.JobError, match="limit is 2"):
        jobs.start_command(sleeper(), "third", root=runs)
    jobs.cancel(first, runs)
    jobs.cancel(second, runs)
    jobs.start_command(sleeper(), "third", root=runs, limit=1)  # room again once they stopped


# ----------------------------------------------------------------------------- cancel / failure
def test_cancel_stops_the_whole_process_group_and_marks_cancelled(runs):
    # the job starts a grandchild (like DataLoader workers or torchrun ranks): both must stop
    code = ("import os, subprocess, sys, time\n"
            "d = sys.argv[1]\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "open(os.path.join(d, 'child.pid'), 'w').write(str(child.pid))\n"
            "time.sleep(60)\n")
    run = jobs.start_command([PY, "-c", code, "{run_dir}"], "to-cancel", root=runs)
    assert wait_for(lambda: (run / "child.pid").exists())
    grandchild = int((run / "child.pid").read_text())
    pid = json.loads((run / "job.json").read_text())["pid"]
    assert jobs.cancel("to-cancel", runs) == "cancelled"
    assert not jobs.pid_alive(pid)
    assert wait_for(lambda: not jobs.pid_alive(grandchild), 5)
    row = jobs.list_jobs(runs)[0]
    assert row["state"] == "cancelled" and row["error"] == "" and row["elapsed"]
    assert jobs.cancel("to-cancel", runs) == "cancelled"  # cancelling twice is harmless


def test_a_job_whose_process_dies_is_reported_failed_with_its_error(runs):
    code = ("import json, os, sys\n"
            "d = sys.argv[1]\n"
            "json.dump({'state': 'running', 'pid': os.getpid()}, open(os.path.join(d, 'status.json'), 'w'))\n"
            "print('loading data...', flush=True)\n"
            "print('RuntimeError: the GPU fell off the bus', file=sys.stderr, flush=True)\n"
            "os._exit(3)\n")
    run = jobs.start_command([PY, "-c", code, "{run_dir}"], "dies", root=runs)
    assert jobs.wait(run, 10, runs) == "failed"
    state, error = jobs.job_state(run)
    assert "process exited unexpectedly (exit code 3)" in error
    assert "RuntimeError: the GPU fell off the bus" in error
    # another app process (no Popen handle, e.g. after a server restart) reaches the same verdict
    jobs.procs.CHILDREN.clear()
    assert jobs.job_state(run) == (state, error)


def test_a_job_without_status_is_judged_by_its_exit_code(runs):
    # the pipeline reports through its exit code only (its stages have their own status.json)
    ok = jobs.start_command([PY, "-c", "print('all stages done')"], "ok", root=runs, limit=5)
    bad = jobs.start_command([PY, "-c", "import sys; sys.exit('error: no data for fashion-mnist')"], "bad",
                             root=runs, limit=5)
    assert jobs.wait(ok, 10, runs) == "finished"
    assert jobs.wait(bad, 10, runs) == "failed"
    assert jobs.job_state(bad)[1] == "no data for fashion-mnist"
    assert json.loads((ok / "exit.json").read_text())["returncode"] == 0


def test_a_killed_job_says_which_signal(runs):
    run = jobs.start_command(sleeper(), "killed", root=runs)
    assert wait_for(lambda: (run / "status.json").exists())
    os.kill(json.loads((run / "status.json").read_text())["pid"], 9)  # what the kernel's OOM killer does
    assert jobs.wait(run, 10, runs) == "failed"
    assert "killed by SIGKILL, possibly out of memory" in jobs.job_state(run)[1]


def test_the_status_error_is_shown_as_written(runs):
    run = runs / "crashed"
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "failed", "pid": 0, "error": "loss is nan at step 3"}))
    row = jobs.list_jobs(runs)[0]
    assert row["state"] == "failed" and row["error"] == "loss is nan at step 3"


def test_a_stale_running_status_with_a_reused_pid_is_not_running(runs):
    run = runs / "stale"
    run.mkdir(parents=True)
    # our own pid is alive, but its start time does not match the one recorded for the job
    (run / "job.json").write_text(json.dumps({"pid": os.getpid(), "proc_start": 1, "started_ts": time.time() - 5}))
    (run / "status.json").write_text(json.dumps({"state": "running", "pid": os.getpid()}))
    assert jobs.job_state(run) == ("failed", "process exited unexpectedly")


# ----------------------------------------------------------------------------- metrics
def test_a_partially_written_metrics_line_is_ignored(tmp_path):
    lines = [{"type": "train", "step": 1, "loss": 2.5, "aux": {"superclass": 0.4}},
             {"type": "eval", "epoch": 1, "step": 2, "test_accuracy": 0.5,
              "expert_load": [{"layer": 1, "kind": "image", "fraction": [0.75, 0.25], "dropped": 0.0}]}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"type": "train", "st')
    assert run_folder.read_metrics(tmp_path) == lines
    assert run_folder.last_metrics(tmp_path)["eval"]["test_accuracy"] == 0.5
    frames = metrics_frames(run_folder.read_metrics(tmp_path))
    assert frames["train"]["aux_superclass"].tolist() == [0.4]
    assert frames["load"]["share"].tolist() == [0.75, 0.25]
    assert run_folder.read_metrics(tmp_path / "missing") == []


def test_no_runs_folder_means_no_jobs(tmp_path):
    assert jobs.list_jobs(tmp_path / "nothing-here") == []


# ----------------------------------------------------------------------------- real training
@pytest.mark.slow
def test_a_tiny_real_training_job_finishes_with_a_loadable_checkpoint(runs):
    run = start("mvmoe-2x64-e2k1", {"moe_layers": [1]}, name="tiny run", max_steps=2, batch_size=16,
                precision="fp32", log_every=1, root=runs)
    assert run.name == "tiny-run"
    state = jobs.wait(run, 120, runs)
    assert state == "finished", jobs.job_state(run)[1] + "\n" + jobs.log_tail(run)
    row = jobs.list_jobs(runs)[0]
    assert row["step"] == 2 and 0.0 <= row["test_accuracy"] <= 1.0 and row["checkpoint"] == str(run)
    records = run_folder.read_metrics(run)
    assert [r["type"] for r in records][-3:] == ["eval", "routing", "done"]   # routing: the epoch's snapshot
    assert not metrics_frames(records)["load"].empty  # per-expert load for the curves
    model, card = load_checkpoint(run)
    assert card["preset"] == "mvmoe-2x64-e2k1" and card["config"]["moe_layers"] == [1]


def test_an_image_folder_to_train_on_must_lie_in_a_data_folder(tmp_path, monkeypatch):
    from workbench import paths

    data = tmp_path / "data"
    (data / "flowers").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.setenv("WORKBENCH_DATA_ROOTS", str(data))
    assert paths.data_folder("flowers") == paths.data_folder(str(data / "flowers")) == (data / "flowers").resolve()
    jobs.validate_dataset(f"imagefolder:{data / 'flowers'}")
    for bad in (str(tmp_path / "elsewhere"), "../elsewhere", str(data), "no-such-folder"):
        with pytest.raises(paths.DataLocationError, match="is not a folder inside a data folder"):
            paths.data_folder(bad)
    with pytest.raises(ValueError, match="inside a data folder"):
        jobs.validate_dataset(f"imagefolder:{tmp_path / 'elsewhere'}")


# ----------------------------------------------------------------------------- the whole pipeline as a job
TINY_PIPELINE = dict(dataset="synthetic", depth=2, width=32, epochs=1, holdout=0.9, batch_size=512,
                     precision="fp32", method="spectral")


@pytest.mark.parametrize("options, message", [
    (dict(num_groups=40), r"--num-groups must be in 2..16 for 16 classes"),
    (dict(num_groups=4, top_k=5), "num_experts >= top_k"),
    (dict(superclass_loss_weight=-0.5), "superclass_loss_weight must be a number >= 0"),
    (dict(method="louvain"), "--method must be one of .*'auto'.*'spectral'"),
    (dict(epochs=0), "--epochs must be >= 1"),
    (dict(epochs=10**6), "at most 1000 epochs"),
    (dict(depth=1), "only 1 blocks"),                     # the MoE blocks (last-2) need depth >= 2
    (dict(holdout=0.0), r"--holdout must be in \(0, 1\)"),
    (dict(dataset="mnist"), "unknown dataset 'mnist'"),
    (dict(dataset="imagefolder:/etc"), "not a folder inside a data folder"),
    (dict(out="ELSEWHERE"), "outside the run's folder"),
    (dict(export="ELSEWHERE"), "outside the run's folder"),
])
def test_bad_pipeline_options_are_refused_before_anything_starts(runs, tmp_path, options, message):
    options = {k: str(tmp_path / "elsewhere") if v == "ELSEWHERE" else v for k, v in options.items()}
    with pytest.raises(ValueError, match=message):
        jobs.start_pipeline(PipelineConfig(**{**TINY_PIPELINE, **options}), root=runs)
    assert not runs.exists() or not [p for p in runs.iterdir() if not p.name.startswith(".")]
    assert not (tmp_path / "elsewhere").exists()


def test_a_pipeline_config_file_round_trips_and_refuses_unknown_fields(tmp_path):
    cfg = PipelineConfig(**TINY_PIPELINE, num_groups=4, superclass_loss_weight=0.5)
    cfg.save(tmp_path / "p.json")
    assert PipelineConfig.load(tmp_path / "p.json") == cfg
    (tmp_path / "bad.json").write_text(json.dumps({**cfg.to_dict(), "dense": "vit-2x32"}))
    with pytest.raises(ValueError, match=r"unknown pipeline config field\(s\) \['dense'\]"):
        PipelineConfig.load(tmp_path / "bad.json")


@pytest.mark.slow
def test_a_pipeline_started_from_the_jobs_api_runs_every_stage(runs):
    run = jobs.start_pipeline(PipelineConfig(**TINY_PIPELINE), name="tiny pipeline", root=runs)
    assert jobs.wait(run, 180, runs) == "finished", jobs.job_state(run)[1] + "\n" + run_folder.log_tail(run)
    stages = run_folder.pipeline_progress(run, running=False)
    assert [s["state"] for s in stages] == ["done"] * 5, stages
    assert stages[2]["detail"] == "E = 4 by spectral"
    models = run_folder.pipeline_checkpoints(run)
    assert sorted(models) == ["dense", "moe"]
    assert load_checkpoint(models["moe"])[1]["preset"] == "mvmoe-2x32-e4k1"
    assert "# Pipeline report: synthetic" in run_folder.pipeline_report(run)
    report = json.loads((run / "report.json").read_text())
    assert report["command"] == PipelineConfig.load(run / "pipeline_config.json").command()


def test_pipeline_stages_say_which_one_is_at_work(tmp_path):
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "status.json").write_text(json.dumps({"state": "finished", "model": "vit-2x32"}))
    (tmp_path / "confusion.json").write_text(json.dumps({"accuracy": 0.5}))
    states = lambda running: [s["state"] for s in run_folder.pipeline_progress(tmp_path, running)]  # noqa: E731
    assert states(True) == ["done", "done", "running", "waiting", "waiting"]
    assert states(False) == ["done", "done", "stopped", "waiting", "waiting"]   # killed while clustering


def test_a_map_for_other_classes_or_a_missing_dataset_is_refused_up_front(runs):
    wrong = {"dataset": "synthetic", "classes": {"not-a-class": 0, "neither": 1}, "num_groups": 2}
    with pytest.raises(ValueError, match=r"does not match the dataset's classes: missing \[.*extra \['not-a-class', 'neither'"):
        start("mvmoe-2x64-e2k1", superclasses=wrong, root=runs)
    from workbench.data import load_dataset

    try:
        load_dataset("cifar100", "test")
    except ValueError as e:  # not installed here: the form says so, with the loader's how-to
        with pytest.raises(ValueError) as refused:
            start(dataset="cifar100", root=runs)
        assert str(refused.value) == str(e)
    assert not runs.exists() or not [p for p in runs.iterdir() if not p.name.startswith(".")]


@pytest.mark.slow
def test_a_training_error_reaches_the_jobs_table_in_plain_words(runs, tmp_path):
    # an image folder without class sub-folders: training refuses it with a message, not a traceback
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "stray.txt").write_text("not an image")
    run = jobs.start_command([PY, "-m", "workbench.train", "--dataset", f"imagefolder:{tmp_path / 'photos'}",
                              "--model", "vit-2x64", "--max-steps", "1", "--out", "{run_dir}"], "bad-data", root=runs)
    assert jobs.wait(run, 60, runs) == "failed"
    error = jobs.list_jobs(runs)[0]["error"]
    assert str(tmp_path / "photos") in error and "Traceback" not in error, error


# ----------------------------------------------------------------------------- the Train page (AppTest)
def train_page(runs, samples=None):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "workbench" / "app.py"), default_timeout=60)
    at.switch_page("../pages/train.py")
    return at.run()


@pytest.fixture
def no_samples(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_SAMPLES", str(tmp_path / "no-samples"))


def finished_run(runs: Path, name: str) -> Path:
    """A run folder as train.py leaves it: a checkpoint, metrics and status 'finished'."""
    from workbench.checkpoint import save_checkpoint
    from workbench.models import create_model

    run = runs / name
    model = create_model("mvmoe-2x64-e2k1", num_classes=4, moe_layers=[1])
    save_checkpoint(run, model, {"preset": "mvmoe-2x64-e2k1", "dataset": "synthetic", "classes": list("abcd"),
                                 "metrics": {"test_accuracy": 0.75}, "macs": {}, "params": {}})
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"type": "train", "step": 1, "epoch": 1, "loss": 1.4, "ce": 1.3, "aux": {"importance": 0.01},
         "train_accuracy": 0.25},
        {"type": "eval", "epoch": 1, "step": 2, "test_accuracy": 0.75,
         "expert_load": [{"layer": 1, "kind": "image", "fraction": [0.5, 0.5], "dropped": 0.0}]},
        {"type": "done", "step": 2, "test_accuracy": 0.75}]) + "\n")
    (run / "job.json").write_text(json.dumps({"kind": "train", "name": name, "pid": 0, "started_ts": time.time() - 9,
                                              "options": {"model": "mvmoe-2x64-e2k1", "dataset": "synthetic"}}))
    (run / "status.json").write_text(json.dumps({"state": "finished", "pid": 0}))
    return run


def test_train_page_with_no_runs_says_how_to_start(runs, no_samples):
    at = train_page(runs)
    assert not at.exception
    assert any("No runs yet" in i.value for i in at.info)


def test_train_page_refuses_bad_input_in_plain_words(runs, no_samples):
    at = train_page(runs)
    at.text_area(key="tr_overrides").input("experts=3")
    at.button(key="tr_start").click().run()
    assert not at.exception
    assert any("Not started: unknown model option(s) ['experts']" in e.value for e in at.error)
    assert not runs.exists() or not [p for p in runs.iterdir() if not p.name.startswith(".")]


def test_train_page_refuses_a_second_job_over_the_limit(runs, no_samples):
    jobs.start_command(sleeper(), "busy", root=runs)
    at = train_page(runs)
    at.button(key="tr_start").click().run()
    assert any("already running (busy)" in e.value for e in at.error)
    assert any("busy" in i.value and "running" in i.value for i in at.info)  # the live view of the running job


def test_train_page_shows_a_failed_runs_error(runs, no_samples):
    run = runs / "broken"
    run.mkdir(parents=True)
    (run / "status.json").write_text(json.dumps({"state": "failed", "pid": 0,
                                                 "error": "loss is nan at step 3: lower --lr"}))
    at = train_page(runs)
    assert not at.exception
    assert [e.value for e in at.error] == ["**broken** failed: loss is nan at step 3: lower --lr"]


def test_a_finished_run_is_offered_in_the_checkpoint_picker(runs, no_samples):
    finished_run(runs, "done-run")
    at = train_page(runs)
    assert not at.exception and not at.error
    assert any("done-run" in s.value and "75.00%" in s.value for s in at.success)
    picker = at.sidebar.selectbox(key="w_ckpt")
    assert any("done-run" in o for o in picker.options), picker.options


def test_the_super_class_map_from_the_super_classes_page_sets_E_and_goes_to_the_run(runs, no_samples):
    from streamlit.testing.v1 import AppTest

    from workbench.data import load_dataset

    ds = load_dataset("synthetic", "test")
    groups = [int(g) for g in ds.reference_groups]
    mapping = {"dataset": "synthetic", "method": "spectral", "num_groups": max(groups) + 1,
               "classes": dict(zip(ds.classes, groups)), "groups": [f"g{i}" for i in range(max(groups) + 1)]}
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "workbench" / "app.py"), default_timeout=60)
    at.session_state["superclass_map"] = mapping
    at.switch_page("../pages/train.py")
    at.run()
    at.radio(key="tr_sc").set_value("The map from the Super-classes page").run()
    experts = at.number_input(key="tr_experts")
    assert experts.value == mapping["num_groups"] and experts.disabled
    at.number_input(key="tr_depth").set_value(2).run()
    at.button(key="tr_start").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    run = next(p for p in runs.iterdir() if p.is_dir())
    assert json.loads((run / "superclasses.json").read_text()) == mapping
    command = json.loads((run / "job.json").read_text())["command"]
    assert command[-2:] == ["--config", str(run / "train_config.json")]
    cfg = TrainConfig.load(run / "train_config.json")
    assert (cfg.model.family, cfg.model.depth, cfg.model.num_experts) == ("mvmoe", 2, mapping["num_groups"])
    assert cfg.superclasses == str(run / "superclasses.json") and cfg.out == str(run)
    jobs.cancel(run, runs)


def test_the_k_widget_is_the_k_the_run_trains_with(runs, no_samples):
    at = train_page(runs)
    assert not [t for t in at.text_input if t.key == "tr_preset"]   # no free-text preset to override the widgets
    at.selectbox(key="tr_family").set_value("mvmoe").run()
    at.number_input(key="tr_depth").set_value(2).run()
    at.number_input(key="tr_experts").set_value(4).run()
    at.number_input(key="tr_k").set_value(3).run()
    at.text_area(key="tr_overrides").input("top_k=1").run()    # the shape is set by the widgets only
    at.button(key="tr_start").click().run()
    assert any("contradict the shape chosen above" in e.value for e in at.error)
    at.text_area(key="tr_overrides").input("").run()
    at.button(key="tr_start").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    run = next(p for p in runs.iterdir() if p.is_dir())
    cfg = TrainConfig.load(run / "train_config.json")
    assert (cfg.model.family, cfg.model.num_experts, cfg.model.top_k) == ("mvmoe", 4, 3)
    jobs.cancel(run, runs)


def test_the_pipeline_form_hands_every_choice_to_the_job_as_one_config(runs, no_samples, tmp_path, monkeypatch):
    if not jobs.pipeline_available():
        pytest.skip("workbench/pipeline.py is not there")
    at = train_page(runs)
    at.selectbox(key="tr_pipe_ds").set_value("imagefolder").run()
    at.text_input(key="tr_pipe_folder").input(str(tmp_path)).run()   # outside every data folder
    at.button(key="tr_pipe_start").click().run()
    assert any("not a folder inside a data folder" in e.value for e in at.error), [e.value for e in at.error]
    at.selectbox(key="tr_pipe_ds").set_value("synthetic").run()
    at.number_input(key="tr_pipe_E").set_value(4).run()
    at.number_input(key="tr_pipe_k").set_value(5).run()              # k > E: the MoE's own rule says no
    at.button(key="tr_pipe_start").click().run()
    assert any("num_experts >= top_k" in e.value for e in at.error), [e.value for e in at.error]
    assert not runs.exists() or not [p for p in runs.iterdir() if not p.name.startswith(".")]
    for key, value in (("tr_pipe_k", 2), ("tr_pipe_depth", 2), ("tr_pipe_width", 64), ("tr_pipe_E", 8),
                       ("tr_pipe_method", "spectral"), ("tr_pipe_lambda", 0.5), ("tr_pipe_epochs", 1),
                       ("tr_pipe_seed", 3)):
        widget = at.selectbox(key=key) if key in ("tr_pipe_width", "tr_pipe_method") else at.number_input(key=key)
        widget.set_value(value).run()
    at.button(key="tr_pipe_start").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    row = jobs.list_jobs(runs)[0]
    assert row["kind"] == "pipeline" and row["model"] == "vit-2x64 → mvmoe-2x64-e8k2"
    cfg = PipelineConfig.load(Path(row["run_dir"]) / "pipeline_config.json")
    assert (cfg.dataset, cfg.depth, cfg.width, cfg.num_groups, cfg.top_k, cfg.method, cfg.superclass_loss_weight,
            cfg.epochs, cfg.seed, cfg.out) == ("synthetic", 2, 64, 8, 2, "spectral", 0.5, 1, 3, row["run_dir"])
    assert row["command"][2:] == ["workbench.pipeline", "--config", str(Path(row["run_dir"]) / "pipeline_config.json")]
    jobs.cancel(row["run_dir"], runs)
    assert jobs.job_state(row["run_dir"])[0] in ("cancelled", "finished")


def test_the_cancel_button_stops_the_selected_run(runs, no_samples):
    run = jobs.start_command(sleeper(), "long", root=runs)
    at = train_page(runs)
    at.button(key="tr_cancel").click().run()
    assert not at.exception
    assert jobs.job_state(run)[0] == "cancelled"
    assert any("long" in w.value and "cancelled" in w.value for w in at.warning)


@pytest.mark.parametrize("family, depth, blocks", [("mvmoe", 1, [0]), ("vmoe", 1, [0]), ("vmoe", 3, [1])])
def test_the_form_offers_only_moe_blocks_the_depth_has(runs, no_samples, family, depth, blocks):
    """Depth 1, the smallest the form allows, trains: 'last-2' is not offered where it cannot exist."""
    at = train_page(runs)
    at.selectbox(key="tr_family").set_value(family).run()
    at.number_input(key="tr_depth").set_value(depth).run()
    widget = at.multiselect(key=f"tr_moe_blocks_{depth}")
    assert widget.options == [str(i) for i in range(depth)] and widget.value == blocks
    at.button(key="tr_start").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    run = next(p for p in runs.iterdir() if p.is_dir())
    assert TrainConfig.load(run / "train_config.json").model.moe_block_indices() == blocks
    jobs.cancel(run, runs)
