"""Training: a tiny run learns, logs and checkpoints; resume is exact; DDP ranks agree; failures are clean."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench import train as train_mod
from workbench.checkpoint import CARD_KEYS, load_checkpoint, load_train_state, read_card
from workbench.data import load_dataset
from workbench.models import create_model
from workbench.train import evaluate, lr_at, main, param_groups, param_sha256, resolve_precision, train
from workbench.train_config import TrainConfig, from_args, model_from_preset, parse_args

REPO = Path(__file__).resolve().parents[1]
# 10% of the synthetic training split (--holdout 0.9): short epochs, so runs cross epoch boundaries quickly
TINY = {"dataset": "synthetic", "holdout": 0.9, "batch_size": 32, "precision": "fp32", "quiet": True, "lr": 3e-3,
        "threads": 1}


def config(out: Path, model: str = "vit-2x64", **options) -> TrainConfig:
    return TrainConfig(model=model_from_preset(model, {}), **{**TINY, "out": str(out), **options})


def run(out: Path, **options) -> dict:
    return train(config(out, **options))


def records(run_dir: Path, kind: str = None) -> list:
    recs = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if kind is None or r["type"] == kind]


def status(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "status.json").read_text())


def cli(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "workbench.train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def synthetic():
    return load_dataset("synthetic", "train")


# ----------------------------------------------------------------------------- the pieces
def test_train_takes_a_train_config_only(tmp_path):
    with pytest.raises(TypeError, match="takes a TrainConfig"):
        train({"model": "vit-2x64", "out": str(tmp_path)})


def test_cli_flags_config_and_command_are_one_mapping():
    argv = ["--model", "mvmoe-2x64-e4k1", "--dataset", "synthetic", "--set", "router_input=cls",
            "--router-weight", "0.5", "--epochs", "2", "--save-every-steps", "3", "--quiet"]
    cfg = from_args(parse_args(argv))
    assert cfg.model.top_k == 1 and cfg.model.num_experts == 4 and cfg.model.superclass_loss_weight == 0.5
    assert from_args(parse_args(cfg.to_argv())) == cfg                      # the card's command rebuilds it
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg   # and so does its JSON file
    assert "--superclass-loss-weight 0.5" in cfg.command() and "--router-weight" not in cfg.command()


def test_help_is_fast_and_names_the_spec_options():
    t = time.time()
    out = cli("--help", timeout=30)
    assert out.returncode == 0
    assert time.time() - t < 10
    for opt in ("--model", "--dataset", "--epochs", "--out", "--resume", "--set", "--superclasses", "--holdout",
                "--precision", "--max-steps", "--save-every-steps"):
        assert opt in out.stdout


def test_lr_warms_up_linearly_then_decays_by_cosine():
    lrs = [lr_at(s, total_steps=110, warmup_steps=10, lr=1.0, min_lr=0.0) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.5) and lrs[-1] < 0.01
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_weight_decay_skips_norms_biases_position_embedding_and_class_token():
    model = create_model("mvmoe-2x64-e4k1")
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed", "cls_token", "norm.weight", "blocks.0.norm1.bias", "blocks.0.mlp.experts.fc1_bias",
            "head.bias"} <= skipped
    assert {names[id(p)] for p in decay["params"]} >= {"head.weight", "blocks.0.mlp.experts.fc1_weight",
                                                       "routers.0.router.proj.weight"}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05


def test_precision_choice():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    assert resolve_precision("auto", cpu) is (torch.bfloat16 if train_mod.cpu_has_native_bf16() else None)


# ----------------------------------------------------------------------------- a tiny run
@pytest.fixture(scope="module")
def tiny_moe_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "run"
    # 30 % of the training split (not TINY's 10 %): enough steps that learning shows at every seed tried
    # (0-3: last/first loss 0.58-0.74, accuracy 35-49 %), not only at a lucky one
    summary = run(out, model="mvmoe-2x64-e4k1", epochs=2, log_every=2, holdout=0.7)
    return out, summary


def test_a_tiny_run_learns(tiny_moe_run):
    out, summary = tiny_moe_run
    losses = [r["loss"] for r in records(out, "train")]
    assert len(losses) >= 5
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:2]) / 2
    chance = 1 / len(read_card(out)["classes"])
    assert summary["test_accuracy"] > 3 * chance


def test_the_run_directory_is_a_checkpoint_with_a_full_card(tiny_moe_run):
    out, summary = tiny_moe_run
    model, card = load_checkpoint(out)
    assert set(CARD_KEYS) <= set(card)
    assert card["preset"] == "mvmoe-2x64-e4k1" and card["dataset"] == "synthetic"
    assert card["config"]["family"] == "mvmoe" and card["superclasses"] is None
    assert 0 < card["metrics"]["test_accuracy"] <= 1
    assert card["macs"]["active"] > 0 and card["params"]["total"] >= card["params"]["active"] > 0
    assert [h["epoch"] for h in card["history"]] == [1, 2]
    assert card["command"].startswith("python -m workbench.train") and "--model mvmoe-2x64-e4k1" in card["command"]
    assert card["wall_time_s"] > 0 and card["version"] and card["created"]
    # the card's accuracy is what evaluating the saved weights gives
    test_set = load_dataset("synthetic", "test")
    assert evaluate(model, test_set) == pytest.approx(card["metrics"]["test_accuracy"], abs=1e-4)
    # and the card carries where each test image went, for the views that run without the images
    tables = card["routing_tables"]
    assert tables["split"] == "test" and tables["unit"] == "image" and tables["epoch"] == 2
    assert [t["layer"] for t in tables["layers"]] == model.cfg.moe_block_indices()
    for t in tables["layers"]:
        counts = np.asarray(t["counts"])
        assert counts.shape == (len(test_set.classes), 4) and counts.sum() == len(test_set)    # k = 1 per image
        assert counts.sum(1).tolist() == np.bincount(test_set.labels.numpy(), minlength=counts.shape[0]).tolist()


def test_metrics_and_status_files_follow_the_run(tiny_moe_run):
    out, _ = tiny_moe_run
    recs = records(out)
    train_recs = [r for r in recs if r["type"] == "train"]
    steps = [r["step"] for r in train_recs]
    assert steps == sorted(set(steps))
    for r in train_recs:
        assert {"step", "epoch", "loss", "ce", "aux", "lr", "img_per_s", "eta_s"} <= set(r)
        assert set(r["aux"]) == {"importance", "load"}        # the end-to-end router's balancing losses
    evals = [r for r in recs if r["type"] == "eval"]
    assert [e["epoch"] for e in evals] == [1, 2]
    for e in evals:
        assert 0 <= e["test_accuracy"] <= 1
        (layer0, layer1) = e["expert_load"]
        assert (layer0["layer"], layer1["layer"], layer0["kind"]) == (0, 1, "image")
        assert len(layer0["fraction"]) == 4 and sum(layer0["fraction"]) == pytest.approx(1, abs=1e-3)
    assert recs[-1]["type"] == "done"
    st = status(out)
    assert st["state"] == "finished" and st["step"] == steps[-1] and st["pid"] == os.getpid()
    assert st["last_eval"]["test_accuracy"] == evals[-1]["test_accuracy"]


def test_each_epoch_leaves_a_routing_snapshot_and_tensorboard_events(tiny_moe_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from workbench.snapshots import load_history

    out, _ = tiny_moe_run
    history = load_history(out)
    assert history.epochs == [1, 2] and history.layers == [0, 1]
    assert sum(p.stat().st_size for p in (out / "routing").iterdir()) < 8 * 1024     # a few KB per epoch
    routing = records(out, "routing")
    assert [r["epoch"] for r in routing] == [1, 2] and "churn" in routing[1] and "churn" not in routing[0]
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/aux/importance", "eval/test_accuracy", "load/block0/expert0", "routing/churn"} <= set(tags)
    assert [e.step for e in acc.Scalars("eval/test_accuracy")] == [r["step"] for r in records(out, "eval")]


# ----------------------------------------------------------------------------- resume
RESUME = {"epochs": 2, "save_every_steps": 1, "log_every": 1}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "full"
    run(out, **RESUME)
    return out


def _weights(run_dir):
    model = create_model("vit-2x64", num_classes=len(read_card(run_dir)["classes"]))
    load_train_state(run_dir, model)
    return model.state_dict()


def _assert_same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")


def test_interrupt_then_resume_equals_an_uninterrupted_run(tmp_path, uninterrupted, monkeypatch):
    steps = read_card(uninterrupted)["training"]["steps"]
    stop_at = steps // 2 + 3                       # 15 steps per epoch: a few steps into the second epoch
    out = tmp_path / "interrupted"
    real_lr_at = train_mod.lr_at

    def stop(step, *a):
        if step == stop_at:
            raise KeyboardInterrupt("simulated kill")
        return real_lr_at(step, *a)

    with monkeypatch.context() as m:
        m.setattr(train_mod, "lr_at", stop)
        with pytest.raises(KeyboardInterrupt):
            run(out, **RESUME)
    assert status(out)["state"] == "cancelled"
    run(out, resume=True, **RESUME)
    _assert_same_weights(out, uninterrupted)
    # the resumed run saw the same batches: the same loss at every step, logged once
    full = {r["step"]: r["loss"] for r in records(uninterrupted, "train")}
    resumed = records(out, "train")
    assert [r["step"] for r in resumed] == sorted(full)
    for r in resumed:
        assert r["loss"] == pytest.approx(full[r["step"]], abs=1e-4)
    assert [h["epoch"] for h in read_card(out)["history"]] == [1, 2]


def test_sigkill_at_any_moment_then_resume_equals_an_uninterrupted_run(tmp_path, uninterrupted):
    out = tmp_path / "killed"
    args = ["--model", "vit-2x64", "--dataset", "synthetic", "--holdout", "0.9", "--batch-size", "32",
            "--precision", "fp32", "--lr", "3e-3", "--threads", "1", "--epochs", "2", "--save-every-steps", "1",
            "--log-every", "1", "--quiet", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "workbench.train", *args], cwd=REPO, env=env)
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if status(out).get("step", 0) >= 3:
                    break
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert status(out)["state"] == "running"                   # it had no chance to say anything
    assert main([*args, "--resume"]) == 0
    _assert_same_weights(out, uninterrupted)
    load_checkpoint(out)


def test_resume_refuses_a_different_model(tmp_path):
    out = tmp_path / "run"
    run(out, max_steps=2)
    with pytest.raises(ValueError, match=r"different \['model'\]"):
        run(out, max_steps=4, model="vit-2x96", resume=True)
    with pytest.raises(ValueError, match="already holds a run; add --resume"):
        run(out, max_steps=4)


def test_a_folder_another_live_trainer_writes_is_refused_and_left_alone(tmp_path):
    from workbench import procs
    from workbench.runs import RunBusy

    out = tmp_path / "run"
    run(out, max_steps=2)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state = status(out)
        (out / "status.json").write_text(json.dumps({**state, "state": "running", "pid": other.pid,
                                                     "proc_start": procs.start_time(other.pid)}))
        before = (out / "model.safetensors").read_bytes()
        with pytest.raises(RunBusy, match=f"being trained by process {other.pid} right now"):
            run(out, max_steps=4, resume=True)
        assert (out / "model.safetensors").read_bytes() == before
    finally:
        other.kill()
        other.wait()
    run(out, max_steps=4, resume=True)        # that trainer is gone: the folder is free again


def test_a_run_saved_before_train_config_still_resumes(tmp_path):
    """Resume states written by the preset + overrides version are converted, not refused."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = tmp_path / "old"
    run(out, model="mvmoe-2x64-e4k1", max_steps=2)
    path = out / "train_state.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta["info"])
    info["spec"] = {"model": "mvmoe-2x64-e4k1", "overrides": {}, "dataset": "synthetic", "holdout": 0.9,
                    "superclasses": None, "seed": 0, "batch_size": 32}
    meta["info"] = json.dumps(info)
    save_file(tensors, str(path), metadata=meta)
    assert run(out, model="mvmoe-2x64-e4k1", max_steps=4, resume=True)["steps"] == 4
    with pytest.raises(ValueError, match=r"different \['model'\]"):
        run(out, model="mvmoe-2x64-e4k2", max_steps=6, resume=True)


# ----------------------------------------------------------------------------- failures
def test_a_diverging_run_stops_cleanly_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    run(out, epochs=1)
    good_model, good_card = load_checkpoint(out)
    args = ["--model", "vit-2x64", "--dataset", "synthetic", "--holdout", "0.9", "--batch-size", "32",
            "--precision", "fp32", "--threads", "1", "--quiet", "--out", str(out),
            "--resume", "--epochs", "2", "--lr", "1e30"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "training diverged" in err and "loss is" in err
    st = status(out)
    assert st["state"] == "failed" and "loss is" in st["error"]
    assert records(out)[-1]["type"] == "error"
    model, card = load_checkpoint(out)
    assert card["metrics"] == good_card["metrics"]
    assert param_sha256(model) == param_sha256(good_model)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_model_option_is_a_clear_error(tmp_path, capsys):
    assert main(["--dataset", "synthetic", "--model", "vit-2x64", "--set", "widht=3", "--out",
                 str(tmp_path / "r")]) == 2
    assert "unknown model option(s) ['widht']" in capsys.readouterr().err


# ----------------------------------------------------------------------------- super-classes
def _write_map(path: Path, classes: dict, groups: int) -> Path:
    path.write_text(json.dumps({"dataset": "synthetic", "method": "test", "num_groups": groups, "classes": classes,
                                "groups": [f"g{g}" for g in range(groups)]}))
    return path


def test_a_superclass_map_for_other_classes_is_a_clear_error(tmp_path, capsys):
    bad = _write_map(tmp_path / "map.json", {"T-shirt": 0, "Trouser": 1}, 2)
    code = main(["--dataset", "synthetic", "--model", "mvmoe-2x64-e2k1", "--superclasses", str(bad),
                 "--out", str(tmp_path / "r"), "--quiet"])
    assert code == 2
    assert "does not match the dataset's classes" in capsys.readouterr().err


def test_superclass_count_must_equal_the_expert_count(tmp_path, synthetic, capsys):
    groups = 2
    m = _write_map(tmp_path / "map.json", {c: i % groups for i, c in enumerate(synthetic.classes)}, groups)
    assert main(["--dataset", "synthetic", "--model", "mvmoe-2x64-e4k1", "--superclasses", str(m),
                 "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "super-class map must use groups 0..3 (one per expert), got [0, 1]" in capsys.readouterr().err


def test_a_superclass_guided_router_logs_its_loss(tmp_path, synthetic):
    groups = list(synthetic.reference_groups)
    E = max(groups) + 1
    m = _write_map(tmp_path / "map.json", {c: g for c, g in zip(synthetic.classes, groups)}, E)
    out = tmp_path / "run"
    run(out, model=f"mvmoe-2x64-e{E}k1", superclasses=str(m), max_steps=4, log_every=1)
    for r in records(out, "train"):
        assert set(r["aux"]) == {"superclass"} and r["aux"]["superclass"] > 0
    card = read_card(out)
    assert card["superclasses"] == {"assignment": groups, "names": [f"g{g}" for g in range(E)], "method": "test"}
    assert card["config"]["superclasses"] == groups


# ----------------------------------------------------------------------------- data parallel
def test_ddp_two_gloo_processes_end_with_identical_weights(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "workbench.train",
         "--model", "mvmoe-2x64-e4k1", "--dataset", "synthetic", "--holdout", "0.9", "--batch-size", "32",
         "--max-steps", "4", "--precision", "fp32", "--quiet", "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((out / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == 4
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"]
    model, card = load_checkpoint(out)                      # rank 0 wrote it
    assert param_sha256(model) == ranks[0]["param_sha256"]
    assert card["training"]["world_size"] == 2 and card["command"].startswith("torchrun --nproc_per_node=2")
    assert status(out)["state"] == "finished"


# ----------------------------------------------------------------------------- layering
def _imports(folder: str) -> list:
    """(file name, top-level module) of every import under REPO/folder, function-local ones too."""
    import ast

    found = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            found += [(path.name, n.split(".")[0]) for n in names]
    return found


def test_the_library_never_imports_analysis():
    """workbench/ is the library; only the orchestrator (the pipeline and its grid) may import analysis/."""
    assert [(f, m) for f, m in _imports("workbench") if m == "analysis" and f not in ("pipeline.py", "grid.py")] == []


def test_analysis_returns_tables_and_pages_draw_them():
    """analysis/ is statistics only: no plotly and no Streamlit (figures are pages/figures.py's)."""
    assert [(f, m) for f, m in _imports("analysis") if m in ("plotly", "streamlit", "pages")] == []
