"""Background jobs: training runs (and the pipeline) started from the app: launch, supervise, cancel.

Why a detached subprocess and files, not a thread:
- Streamlit code must not run from background threads, and a page script is
  re-run on every interaction. A job is `python -m workbench.train --config
  RUN/train_config.json` in its own session (`start_new_session=True`), so a
  page reload, a closed browser tab or even a restarted app server does not
  stop it, and the UI stays responsive.
- Everything the app knows about a job is read back from its run folder
  (`workbench.runs` owns that format), so any app process can list, follow and
  cancel any job.

A job is checked before anything starts (`check_training`): the config's ranges,
both dataset splits, the super-class map against the classes and E, and whether
the model fits in memory, so a bad choice is a clear `ValueError` in the form,
not a crashed subprocess. Output goes only under the run's folder. At most
`max_jobs()` jobs run at once (env WORKBENCH_MAX_JOBS, default 1); the check and
the start hold a file lock, and a job counts while any of its processes lives.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Union

from . import procs, superclass_map
from .paths import REPO_ROOT, data_folder, inside, runs_dir, safe_run_name
from .pipeline_config import OUTPUT_FIELDS, PipelineConfig
from .runs import (CONFIG_FILE, EXIT_FILE, JOB_FILE, LOCK_FILE, LOG_FILE, PIPELINE_CONFIG_FILE, STATES,  # noqa: F401
                   STATUS_FILE, SUPERCLASS_FILE, atomic_write_json, iso, job_alive, job_state, list_jobs, read_json,
                   resolve_run)
from .train_config import TrainConfig

KINDS = ("train", "pipeline")
DATASETS = ("synthetic", "fashion-mnist", "cifar10", "cifar100", "tiny-imagenet")  # + "imagefolder:PATH"
MAX_EPOCHS = 1000
MAX_STEPS = 10_000_000
MAX_BATCH = 4096
DEFAULT_MAX_JOBS = 1
TRAIN_BYTES_PER_PARAM = 16  # fp32 weights + gradients + two AdamW moments
MEMORY_HEADROOM = 0.8       # refuse a model whose training state needs more than this share of free memory

PathLike = Union[str, os.PathLike]


class JobError(ValueError):
    """A job cannot be started or acted on; the message says why in plain words."""


# ----------------------------------------------------------------------------- checks before a start
def validate_dataset(name: str) -> None:
    """Accept the dataset names training knows; `imagefolder:PATH` must be a folder inside a data root
    (`paths.data_folder`: the app reads data only there, and a card finds it there again)."""
    if not isinstance(name, str) or not name:
        raise ValueError("choose a dataset")
    if name.startswith("imagefolder:"):
        path = Path(name.split(":", 1)[1]).expanduser()
        if not path.is_dir():
            raise ValueError(f"image folder {str(path)!r} does not exist (imagefolder:PATH needs one sub-folder "
                             "per class)")
        data_folder(str(path.resolve()))   # inside a data root
        return
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: use one of {list(DATASETS)} or imagefolder:PATH")


def read_superclass_file(data: Union[bytes, str]) -> dict:
    """Parse an uploaded super-class map file; ValueError in plain words when it is not one."""
    return superclass_map.parse_map(data, "the super-class file")


def available_memory() -> Optional[int]:
    """Bytes of memory available to a new process (MemAvailable), or None where unknown."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def training_bytes(model_cfg) -> int:
    """Memory for the training state: parameters (counted on the meta device, nothing allocated) x 16 bytes."""
    import torch

    from .models import build_model

    with torch.device("meta"):
        params = sum(p.numel() for p in build_model(model_cfg).parameters())
    return params * TRAIN_BYTES_PER_PARAM


def check_memory(model_cfg, free: Optional[int] = None) -> None:
    free = available_memory() if free is None else free
    need = training_bytes(model_cfg)
    if free is not None and need > MEMORY_HEADROOM * free:
        raise ValueError(f"this model needs about {need / 2**30:.1f} GiB for its weights, gradients and AdamW "
                         f"state, but only {free / 2**30:.1f} GiB of memory is free; choose a smaller depth or width")


def check_training(cfg: TrainConfig, mapping: Optional[dict] = None) -> None:
    """Everything that can be known before a job starts; ValueError with a message a user can act on."""
    from .data import load_dataset
    from .train_config import fit_to_dataset

    if cfg.out is not None or cfg.resume:
        raise ValueError("the jobs API chooses the run folder: leave out and resume unset")
    cfg.validate()
    validate_dataset(cfg.dataset)
    if cfg.epochs is not None and cfg.epochs > MAX_EPOCHS or cfg.batch_size > MAX_BATCH:
        raise ValueError(f"at most {MAX_EPOCHS} epochs and batch size {MAX_BATCH} from the app")
    if mapping is not None and cfg.superclasses is not None:
        raise ValueError("give the super-class map once (a map or cfg.superclasses)")
    test = load_dataset(cfg.dataset, "test", root=cfg.data_root)   # DatasetError says where it looked
    train = load_dataset(cfg.dataset, "train", root=cfg.data_root)  # a missing training split is refused here
    if len(train) == 0:
        raise ValueError(f"{cfg.dataset}: the training split is empty")
    sc = superclass_map.for_training(mapping if mapping is not None else cfg.superclasses, test)
    fitted = fit_to_dataset(cfg.model, test, sc["assignment"] if sc else None)  # k <= E, E == groups
    if cfg.init_from:   # the parent's card, read now: a wrong shape is refused before the job starts
        from .checkpoint import read_card
        from .models.config import ModelConfig
        from .models.upcycle import check_parent

        try:
            parent = ModelConfig.from_dict(read_card(cfg.init_from)["config"])
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ValueError(f"--init-from {cfg.init_from}: not a readable checkpoint ({e})") from None
        check_parent(parent, fitted)
    check_memory(fitted)


def max_jobs() -> int:
    """The concurrency limit: env WORKBENCH_MAX_JOBS, default 1."""
    raw = os.environ.get("WORKBENCH_MAX_JOBS", "")
    try:
        return max(1, int(raw)) if raw.strip() else DEFAULT_MAX_JOBS
    except ValueError:
        return DEFAULT_MAX_JOBS


def pipeline_available() -> bool:
    return (REPO_ROOT / "workbench" / "pipeline.py").is_file()


# ----------------------------------------------------------------------------- starting
def _default_name(prefix: str, dataset: str) -> str:
    return f"{prefix}-{dataset.split(':')[0]}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def start_training(cfg: TrainConfig, name: Optional[str] = None, superclasses: Optional[dict] = None,
                   root: Optional[PathLike] = None, limit: Optional[int] = None) -> Path:
    """Check `cfg`, create a run folder and train in the background; -> run folder.

    `superclasses` is a super-class map (dict) to train the router with; it is written to
    the run folder. The config goes to the trainer as RUN/train_config.json.
    """
    check_training(cfg, superclasses)
    if name is not None:
        safe_run_name(name)
    with _start_lock(root) as base:
        _check_capacity(base, limit)
        run_dir = _new_run_dir(base, name or _default_name(cfg.preset, cfg.dataset))
        cfg = dataclasses.replace(cfg, out=str(run_dir))
        if superclasses is not None:
            superclass_map.save_superclass_map(run_dir / SUPERCLASS_FILE, superclasses)
            cfg.superclasses = str(run_dir / SUPERCLASS_FILE)
        cfg.save(run_dir / CONFIG_FILE)
        cmd = [sys.executable, "-m", "workbench.train", "--config", str(run_dir / CONFIG_FILE)]
        return _launch(run_dir, cmd, "train", {"model": cfg.preset, "dataset": cfg.dataset})


def check_pipeline(cfg: PipelineConfig) -> PipelineConfig:
    """Everything that can be known before a pipeline job starts; -> the config resolved for the
    dataset (shape, E, epochs filled in). ValueError with a message a user can act on."""
    from .data import load_dataset
    from .train_config import fit_to_dataset

    if not pipeline_available():
        raise ValueError("the pipeline is not available in this installation (workbench/pipeline.py is missing)")
    if not isinstance(cfg, PipelineConfig):
        raise ValueError("start_pipeline takes a PipelineConfig")
    moved = [f"--{name}" for name in OUTPUT_FIELDS if getattr(cfg, name) is not None] + \
        (["--grid"] if cfg.grid is not None else [])
    if moved:
        raise ValueError(f"{moved} would write outside the run's folder; a job writes only there (leave them unset)")
    cfg.validate()
    validate_dataset(cfg.dataset)
    if cfg.epochs is not None and cfg.epochs > MAX_EPOCHS or (cfg.batch_size or 0) > MAX_BATCH:
        raise ValueError(f"at most {MAX_EPOCHS} epochs and batch size {MAX_BATCH} from the app")
    test = load_dataset(cfg.dataset, "test", root=cfg.data_root)   # DatasetError says where it looked
    train = load_dataset(cfg.dataset, "train", root=cfg.data_root)
    if len(train) == 0:
        raise ValueError(f"{cfg.dataset}: the training split is empty")
    resolved = cfg.resolved(train.num_classes)                    # E in 2..classes, k <= E, lambda >= 0
    check_memory(fit_to_dataset(resolved.moe_model(), test))
    return resolved


def start_pipeline(cfg: PipelineConfig, name: Optional[str] = None, root: Optional[PathLike] = None,
                   limit: Optional[int] = None) -> Path:
    """Check `cfg`, create a run folder and run the whole pipeline in the background; -> run folder.

    The config, resolved for the dataset, goes to the pipeline as RUN/pipeline_config.json.
    """
    cfg = check_pipeline(cfg)
    if name is not None:
        safe_run_name(name)
    with _start_lock(root) as base:
        _check_capacity(base, limit)
        run_dir = _new_run_dir(base, name or _default_name("pipeline", cfg.dataset))
        cfg = dataclasses.replace(cfg, out=str(run_dir))
        cfg.save(run_dir / PIPELINE_CONFIG_FILE)
        cmd = [sys.executable, "-m", "workbench.pipeline", "--config", str(run_dir / PIPELINE_CONFIG_FILE)]
        return _launch(run_dir, cmd, "pipeline", {"model": f"{cfg.dense_preset} → {cfg.moe_preset}",
                                                  "dataset": cfg.dataset})


def start_command(command: list[str], name: str, kind: str = "train", root: Optional[PathLike] = None,
                  limit: Optional[int] = None) -> Path:
    """Start an already-built command as a job (tests and tools); `{run_dir}` in it is filled in."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    with _start_lock(root) as base:
        _check_capacity(base, limit)
        run_dir = _new_run_dir(base, name)
        cmd = [str(c).replace("{run_dir}", str(run_dir)) for c in command]
        return _launch(run_dir, cmd, kind, {})


@contextlib.contextmanager
def _start_lock(root: Optional[PathLike]):
    """Serialise count-then-start across app sessions and processes (fcntl lock in the runs folder)."""
    base = Path(root).resolve() if root is not None else runs_dir()
    base.mkdir(parents=True, exist_ok=True)
    with open(base / LOCK_FILE, "a+") as lock:
        try:
            import fcntl
            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: the limit is then best effort
            pass
        yield base


def _check_capacity(base: Path, limit: Optional[int]) -> None:
    limit = max_jobs() if limit is None else int(limit)
    running = [j for j in list_jobs(base) if j["state"] == "running"]
    if len(running) >= limit:
        names = ", ".join(j["name"] for j in running)
        raise JobError(f"{len(running)} job(s) already running ({names}); the limit is {limit} at a time. "
                       f"Wait for it to finish or cancel it (set WORKBENCH_MAX_JOBS to allow more).")


def _new_run_dir(base: Path, name: str) -> Path:
    """A fresh folder under `base` named after `name`, with -2, -3, ... when the name is taken."""
    stem = safe_run_name(name)
    for i in range(1, 10_000):
        candidate = inside(base, stem if i == 1 else f"{stem}-{i}")
        try:
            candidate.mkdir(parents=True, exist_ok=False)  # atomic: two starters never share a folder
            return candidate
        except FileExistsError:
            continue
    raise JobError(f"too many runs named {stem!r}")


def _launch(run_dir: Path, cmd: list[str], kind: str, options: dict) -> Path:
    """Start `cmd` under a small supervisor (`python -m workbench.jobs supervise`) that records
    its exit code in exit.json, so any later app process knows how it ended."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    supervised = [sys.executable, "-m", "workbench.jobs", "supervise", str(run_dir), "--", *cmd]
    with open(run_dir / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(supervised, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    procs.CHILDREN[proc.pid] = proc
    now = time.time()
    atomic_write_json(run_dir / JOB_FILE, {
        "kind": kind, "name": run_dir.name, "command": cmd, "pid": proc.pid,
        "proc_start": procs.start_time(proc.pid), "started_ts": now, "started": iso(now), "options": options})
    return run_dir


pid_alive = procs.pid_alive  # (public: tests and tools ask it)


# ----------------------------------------------------------------------------- cancelling
def cancel(run: PathLike, root: Optional[PathLike] = None, timeout: float = 5.0) -> str:
    """Stop a running job: SIGTERM its process group, SIGKILL after `timeout` s; mark it cancelled.

    Returns the job's state afterwards ("cancelled", or "finished"/"failed" when it had already ended).
    """
    run_dir = resolve_run(run, root)
    state, _ = job_state(run_dir)
    if state != "running":
        return state
    job = read_json(run_dir / JOB_FILE) or {}
    status = read_json(run_dir / STATUS_FILE) or {}
    pid = job.get("pid") or status.get("pid")  # a run started from the CLI has only status.json
    job.setdefault("name", run_dir.name)
    job.update(cancelled=True, cancelled_ts=time.time())
    if not (run_dir / JOB_FILE).exists():
        job.update(pid=None, cli_pid=pid)  # (so liveness keeps reading status.json's pid)
    atomic_write_json(run_dir / JOB_FILE, job)  # first the mark, so a watcher never sees "failed"
    for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, 2.0)):
        if not job_alive(run_dir):
            break
        procs.signal_group(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and job_alive(run_dir):
            time.sleep(0.05)
    return job_state(run_dir)[0]


def wait(run: PathLike, timeout: float = 60.0, root: Optional[PathLike] = None, poll: float = 0.2) -> str:
    """Block until the job is no longer running (tests, scripts); -> final state."""
    run_dir = resolve_run(run, root)
    deadline = time.monotonic() + timeout
    state = job_state(run_dir)[0]
    while state == "running" and time.monotonic() < deadline:
        time.sleep(poll)
        state = job_state(run_dir)[0]
    return state


# ----------------------------------------------------------------------------- supervisor
def supervise(run_dir: PathLike, cmd: list[str]) -> int:
    """Run `cmd`, then write exit.json {returncode, ended_ts}; the job's exit code outlives the app.

    The supervisor leads the job's process group: `cancel` signals the group,
    the job handles SIGTERM (train.py records "cancelled"), and the supervisor,
    which ignores SIGTERM/SIGINT, stays to record how it ended.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        child = subprocess.Popen(cmd, preexec_fn=_default_signals)
    except OSError as e:
        print(f"error: cannot start {cmd[0]}: {e}", flush=True)
        code = 127
    else:
        code = child.wait()
    atomic_write_json(Path(run_dir) / EXIT_FILE, {"returncode": code, "ended_ts": time.time(), "ended": iso(time.time())})
    return code


def _default_signals() -> None:  # in the job (child), undo the supervisor's ignored signals
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 4 and argv[0] == "supervise" and argv[2] == "--":
        return supervise(argv[1], argv[3:])
    print("usage: python -m workbench.jobs supervise RUN_DIR -- COMMAND...  (used by the Train page)", file=sys.stderr)
    return 2


__all__ = ["PipelineConfig", "JobError", "start_training", "start_pipeline", "check_pipeline", "start_command",
           "check_training",
           "cancel", "wait", "max_jobs", "validate_dataset", "read_superclass_file", "pipeline_available",
           "supervise", "list_jobs", "job_state", "resolve_run", "pid_alive", "DATASETS", "STATES"]


if __name__ == "__main__":
    sys.exit(main())
