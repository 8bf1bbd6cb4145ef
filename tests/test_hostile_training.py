"""Hostile and careless use of training and jobs: clear errors, nothing written outside the run's
folder, and the last good state always survives (issue 13, the training/jobs part)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from workbench import jobs, procs
from workbench.checkpoint import CheckpointError, load_checkpoint, load_train_state
from workbench.models import create_model
from workbench.train import main, param_sha256

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
TINY = ["--model", "vit-2x64", "--dataset", "synthetic", "--holdout", "0.9", "--batch-size", "32",
        "--precision", "fp32", "--threads", "1", "--quiet"]


def cli(out: Path, *extra: str) -> list[str]:
    return [*TINY, "--out", str(out), *extra]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_bytes().splitlines() if line.strip()]


def state_sha(run_dir: Path) -> str:
    model = create_model("vit-2x64", num_classes=16)
    load_train_state(run_dir, model)
    return param_sha256(model)


# ----------------------------------------------------------------------------- the jobs API writes only under the run
@pytest.mark.parametrize("field", ["out", "results", "export"])
def test_pipeline_options_cannot_move_output_outside_the_run(runs, tmp_path, field):
    from workbench.pipeline_config import PipelineConfig

    elsewhere = tmp_path / "elsewhere"
    with pytest.raises(ValueError, match="outside the run's folder"):
        jobs.start_pipeline(PipelineConfig(dataset="synthetic", epochs=1, **{field: str(elsewhere)}), root=runs,
                            limit=5)
    assert not elsewhere.exists()
    assert not runs.exists() or not [p for p in runs.iterdir() if not p.name.startswith(".")]


def test_the_pipeline_config_file_cannot_be_combined_with_flags(tmp_path, capsys):
    from workbench import pipeline

    pipeline.PipelineConfig(dataset="synthetic", out=str(tmp_path / "run")).save(tmp_path / "p.json")
    assert pipeline.main(["--config", str(tmp_path / "p.json"), "--out", str(tmp_path / "elsewhere")]) == 2
    assert "--config cannot be combined with ['--out']" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists()


# ----------------------------------------------------------------------------- every flag range-checked
@pytest.mark.parametrize("flags, message", [
    (["--label-smoothing", "1.5"], "--label-smoothing must be in [0, 1)"),
    (["--label-smoothing", "-0.1"], "--label-smoothing must be in [0, 1)"),
    (["--threads", "0"], "--threads must be between 1 and"),
    (["--threads", "-4"], "--threads must be between 1 and"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--device", "cuda:x"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--lr", "-1"], "--lr must be in (0, inf]"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--min-lr", "1"], "--min-lr must be in [0, 0.001]"),
    (["--weight-decay", "-0.1"], "--weight-decay must be in"),
    (["--clip-grad", "-1"], "--clip-grad must be in"),
    (["--holdout", "1.0"], "--holdout must be in [0, 1)"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--max-steps", "-3"], "--max-steps must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--eval-every", "0"], "--eval-every must be >= 1"),
    (["--log-every", "0"], "--log-every must be >= 1"),
    (["--save-every-steps", "-1"], "--save-every-steps must be >= 0"),
    (["--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
    (["--seed", "-1"], "--seed must be between 0"),
    (["--superclass-loss-weight", "-0.5"], "superclass_loss_weight must be a number >= 0"),
    (["--set", "num_classes=3"], "set from the dataset"),
    (["--set", "superclasses=reference"], "given with --superclasses FILE (or --superclasses reference)"),
])
def test_every_flag_is_range_checked_with_a_clear_message(tmp_path, capsys, flags, message):
    assert main(cli(tmp_path / "run", *flags)) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_an_override_that_makes_a_preset_valid_is_applied_before_any_check(tmp_path):
    """A per-token model of depth 2 has one odd block: its preset's default 'last-2' is invalid, and
    --set moe_layers=[1] is what makes it valid (the card's command rebuilds the same config)."""
    assert main(cli(tmp_path / "run", "--model", "vmoe-2x32-e4k2", "--set", "moe_layers=[1]", "--max-steps", "1")) == 0
    card = json.loads((tmp_path / "run" / "card.json").read_text())
    assert card["config"]["moe_layers"] == [1] and "moe_layers=[1]" in card["command"]


def test_out_pointing_at_a_file_or_below_one_is_a_clear_error(tmp_path, capsys):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    for out, message in ((afile, "is a file, not a folder"), (afile / "run", "is a file, so the folder cannot")):
        assert main([*TINY, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    assert afile.read_text() == "x"


def test_an_unwritable_out_is_a_clear_error_from_the_real_cli(tmp_path):
    proc = subprocess.run([PY, "-m", "workbench.train", *TINY, "--out", "/proc/no-such-run", "--max-steps", "1"],
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------- refused before a job starts
def test_a_model_that_cannot_fit_in_memory_is_refused_before_a_job_starts(runs):
    from workbench.train_config import TrainConfig, model_from_preset

    huge = TrainConfig(model=model_from_preset("vit-24x8192", {}), dataset="synthetic", epochs=1)
    with pytest.raises(ValueError, match=r"needs about \d+\.\d GiB .* only .* GiB of memory is free"):
        jobs.start_training(huge, root=runs)
    assert not runs.exists() or not [p for p in runs.iterdir() if not p.name.startswith(".")]


def test_a_dataset_without_its_training_split_is_refused_before_a_job_starts(runs, tmp_path, monkeypatch):
    # the repository ships fashion-mnist's test split only (the evaluation bundle): without the
    # dataset installed, the test split opens but training has nothing to train on
    from workbench import data
    from workbench.train_config import TrainConfig, model_from_preset

    monkeypatch.setattr(data, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "not-installed")
    monkeypatch.delenv("WORKBENCH_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    assert len(data.load_dataset("fashion-mnist", "test")) > 0
    cfg = TrainConfig(model=model_from_preset("vit-2x64", {}), dataset="fashion-mnist", epochs=1)
    with pytest.raises(ValueError, match="train"):
        jobs.start_training(cfg, root=runs)
    assert not runs.exists() or not [p for p in runs.iterdir() if not p.name.startswith(".")]


# ----------------------------------------------------------------------------- the last good state survives
def test_a_diverging_run_never_overwrites_the_last_good_state(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli(out, "--epochs", "1", "--lr", "3e-3")) == 0
    good_state, good_card = state_sha(out), load_checkpoint(out)[1]
    assert main(cli(out, "--resume", "--epochs", "2", "--lr", "1e30", "--save-every-steps", "1")) == 1
    assert "training diverged" in capsys.readouterr().err
    assert state_sha(out) == good_state                        # the resume state is the good one
    assert load_checkpoint(out)[1]["metrics"] == good_card["metrics"]
    assert main(cli(out, "--resume", "--epochs", "2", "--lr", "3e-3")) == 0   # and --resume recovers


def test_a_fresh_run_that_diverges_before_any_save_does_not_claim_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli(out, "--epochs", "1", "--lr", "1e30")) == 1
    err = capsys.readouterr().err
    assert "training diverged" in err and "No checkpoint was saved" in err and "is kept" not in err
    assert not (out / "card.json").exists() and not (out / "train_state.safetensors").exists()


def test_a_killed_writers_temp_files_are_removed_on_the_next_start(tmp_path):
    out = tmp_path / "run"
    assert main(cli(out, "--max-steps", "2")) == 0
    left = [out / ".train_state.safetensors.k1ll3d_x.tmp", out / ".model.safetensors.abc123de.tmp",
            out / ".status.json.q9w8e7r6.tmp"]
    for f in left:
        f.write_bytes(b"half a file")
    keep = out / "notes.tmp"   # not a temp file of ours
    keep.write_text("mine")
    assert main(cli(out, "--max-steps", "4", "--resume")) == 0
    assert [f.name for f in left if f.exists()] == [] and keep.exists()


def test_a_rerun_after_a_kill_before_the_first_save_does_not_duplicate_metrics(tmp_path):
    out = tmp_path / "run"
    args = [*TINY[:4], "--batch-size", "16", "--precision", "fp32", "--threads", "1", "--quiet", "--epochs", "1",
            "--log-every", "1", "--out", str(out)]   # 300 steps before the epoch's first save
    proc = subprocess.Popen([PY, "-m", "workbench.train", *args], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.time() + 90
        while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len(records(out)) >= 3):
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL and not (out / "train_state.safetensors").exists()
    assert main([*args, "--max-steps", "5"]) == 0   # the same command again (nothing to --resume)
    steps = [r["step"] for r in records(out) if r["type"] == "train"]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4, 5]


def test_a_non_utf8_byte_in_metrics_names_the_file_and_does_not_block_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(cli(out, "--max-steps", "2", "--log-every", "1")) == 0
    with open(out / "metrics.jsonl", "ab") as f:
        f.write(b'{"type": "train", "step": 1, "loss": "\xff\xfe"}\n')
    capsys.readouterr()
    assert main(cli(out, "--max-steps", "4", "--log-every", "1", "--resume")) == 0
    assert str(out / "metrics.jsonl") in capsys.readouterr().err
    assert [r["step"] for r in records(out) if r["type"] == "train"] == [1, 2, 3, 4]


def test_a_damaged_train_state_is_caught_by_its_checksum(tmp_path):
    out = tmp_path / "run"
    assert main(cli(out, "--max-steps", "2")) == 0
    path = out / "train_state.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01                     # one bit of the last tensor's bytes (the header is intact)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_train_state(out, create_model("vit-2x64", num_classes=16))


# ----------------------------------------------------------------------------- the job limit counts live trainers
def test_killing_a_jobs_supervisor_does_not_free_its_slot(runs):
    # written to a temporary name and renamed, so the file never exists empty (CI once read it between
    # open() and write())
    code = "import os, sys, time; tmp = os.path.join(sys.argv[1], 'trainer.pid.tmp'); " \
           "open(tmp, 'w').write(str(os.getpid())); os.replace(tmp, os.path.join(sys.argv[1], 'trainer.pid')); " \
           "time.sleep(60)"
    first = jobs.start_command([PY, "-c", code, "{run_dir}"], "first", root=runs)
    deadline = time.time() + 10
    while time.time() < deadline and not (first / "trainer.pid").exists():
        time.sleep(0.05)
    trainer = int((first / "trainer.pid").read_text())
    os.kill(json.loads((first / "job.json").read_text())["pid"], signal.SIGKILL)   # the supervisor only
    time.sleep(0.3)
    assert procs.pid_alive(trainer)
    assert jobs.list_jobs(runs)[0]["state"] == "running"          # the list shows the truth
    with pytest.raises(jobs.JobError, match="limit is 1"):
        jobs.start_command([PY, "-c", "pass"], "second", root=runs)
    assert jobs.cancel(first, runs) == "cancelled"
    assert not procs.pid_alive(trainer)
