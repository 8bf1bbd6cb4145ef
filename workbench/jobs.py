"""Background jobs: training runs (and the pipeline) started from the app, followed from files.

Why a detached subprocess and files, not a thread:
- Streamlit code must not run from background threads, and a page script is
  re-run on every interaction. A job is `python -m workbench.train ...` in its
  own session (`start_new_session=True`), so a page reload, a closed browser
  tab or even a restarted app server does not stop it, and the UI stays
  responsive.
- Everything the app knows about a job is read from its run directory:
  `job.json`     written here: command, pid, start time, kind, options, cancel mark
  `exit.json`    written by the job's supervisor (`supervise`) when the command ends:
                 its exit code, readable by any later app process
  `status.json`  written by train.py: running / finished / failed / stopped + error
  `metrics.jsonl` appended by train.py (a pipeline: by each stage, in dense/, moe/, ...)
  `log.txt`      the job's stdout + stderr
  Any app process can list, follow and cancel any job.

State of a job (`job_state`), first match wins:
  finished   status.json says finished (or, without a status, the exit code is 0)
  cancelled  job.json carries the cancel mark (set by `cancel`), or status says stopped
  failed     status.json says failed (its error), or the process is gone without finishing:
             "process exited unexpectedly" + exit code/signal + the log's error line
  running    the supervisor is alive (same pid *and* same start time, so a reused pid is
             not mistaken for the job)

Options are validated before anything starts (`TrainOptions.validate`), so a bad
preset, epoch count, missing dataset or mismatched super-class map is a clear
`ValueError` in the form, not a crashed subprocess. At most `max_jobs()` jobs
run at once (env WORKBENCH_MAX_JOBS, default 1); the check and the start hold a
file lock, so two browser tabs cannot both slip under the limit.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from . import safejson
from .paths import REPO_ROOT, inside, runs_dir, safe_run_name

JOB_FILE = "job.json"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "log.txt"
EXIT_FILE = "exit.json"
SUPERCLASS_FILE = "superclasses.json"
LOCK_FILE = ".jobs.lock"

KINDS = ("train", "pipeline")
STATES = ("running", "finished", "failed", "cancelled")
DATASETS = ("synthetic", "fashion-mnist", "cifar10", "cifar100")  # + "imagefolder:PATH"
PRECISIONS = ("auto", "fp32", "bf16")
MAX_EPOCHS = 1000
MAX_STEPS = 10_000_000
MAX_BATCH = 4096
DEFAULT_MAX_JOBS = 1

PathLike = Union[str, os.PathLike]

# Popen objects of the jobs this process started: polling them reaps the exited
# child (otherwise it lingers as a zombie whose pid still "exists") and gives its exit code.
_CHILDREN: dict[int, subprocess.Popen] = {}


class JobError(ValueError):
    """A job cannot be started or acted on; the message says why in plain words."""


# ----------------------------------------------------------------------------- options
@dataclass
class TrainOptions:
    """Everything the Train form can choose; `command()` turns it into `workbench.train` flags."""

    model: str = "vit-6x96"                # preset name, e.g. vit-6x96, mvmoe-6x96-e4k1
    dataset: str = "synthetic"             # synthetic | fashion-mnist | cifar10 | cifar100 | imagefolder:PATH
    epochs: int = 1
    max_steps: Optional[int] = None        # stop after this many optimizer steps (None: run all epochs)
    batch_size: int = 128
    precision: str = "auto"                # auto | fp32 | bf16
    lr: Optional[float] = None             # None: train.py's default
    seed: Optional[int] = None
    log_every: Optional[int] = None        # metrics.jsonl train record interval in steps (None: train.py's)
    superclasses: Union[dict, str, None] = None  # a super-class map (docs/CONTRACTS.md format) or
    #                                              "reference" (the dataset's own hierarchy); mvmoe only
    overrides: dict = field(default_factory=dict)  # ModelConfig fields, passed as --set key=value
    name: Optional[str] = None             # run name; default "<model>-<dataset>-<time>"

    def validate(self, check_data: bool = True) -> None:
        """Raise ValueError with a message a user can act on; returns None when everything is valid.

        `check_data` also opens the dataset's test split (well under a second; not for image
        folders), so a missing dataset or a map for other classes is refused here, not in the job.
        """
        from .models.config import ModelConfig, parse_preset

        fields = parse_preset(self.model)  # ValueError names the accepted preset forms
        validate_dataset(self.dataset)
        _check_int("epochs", self.epochs, 1, MAX_EPOCHS)
        if self.max_steps is not None:
            _check_int("max steps", self.max_steps, 1, MAX_STEPS)
        _check_int("batch size", self.batch_size, 1, MAX_BATCH)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and 0 < self.lr < 10):
            raise ValueError(f"learning rate must be a number in (0, 10), got {self.lr!r}")
        if self.seed is not None:
            _check_int("seed", self.seed, 0, 2**31 - 1)
        if self.log_every is not None:
            _check_int("log interval", self.log_every, 1, MAX_STEPS)
        if not isinstance(self.overrides, dict):
            raise ValueError("overrides must be a mapping of model option -> value")
        known = set(ModelConfig.__dataclass_fields__)
        unknown = sorted(set(self.overrides) - known)
        if unknown:
            raise ValueError(f"unknown model option(s) {unknown}; valid options: {sorted(known)}")
        clash = sorted(k for k in fields if k in self.overrides and self.overrides[k] != fields[k])
        if clash:
            raise ValueError(f"{clash} contradict preset {self.model!r}; choose another preset instead")
        for key, value in self.overrides.items():
            _set_value(key, value)  # must be expressible as --set key=value
        try:
            ModelConfig(**{**fields, **self.overrides})
        except (TypeError, ValueError) as e:
            raise ValueError(f"invalid model options: {e}") from None
        if self.superclasses == "reference":
            _check_reference_groups(self.dataset, {**fields, **self.overrides})
        elif self.superclasses is not None:
            validate_superclass_map(self.superclasses, {**fields, **self.overrides})
            made_for = self.superclasses.get("dataset")
            if made_for and made_for != self.dataset:
                raise ValueError(f"the super-class map was made for {made_for!r} but the run uses {self.dataset!r}; "
                                 "choose that dataset or make a map for this one on the Super-classes page")
        if check_data and not self.dataset.startswith("imagefolder:"):
            test = _open_test_split(self.dataset)
            if isinstance(self.superclasses, dict):
                names, want = set(self.superclasses["classes"]), set(test.classes)
                if names != want:
                    raise ValueError(f"the super-class map does not fit {self.dataset}'s classes: missing "
                                     f"{sorted(want - names)}, unknown {sorted(names - want)}")
        if self.name is not None:
            safe_run_name(self.name)

    def default_name(self) -> str:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        return f"{self.model}-{self.dataset.split(':')[0]}-{stamp}"

    def command(self, run_dir: Path, superclass_file: Optional[Path] = None) -> list[str]:
        cmd = [sys.executable, "-m", "workbench.train", "--model", self.model, "--dataset", self.dataset,
               "--epochs", str(int(self.epochs)), "--batch-size", str(int(self.batch_size)),
               "--precision", self.precision, "--out", str(run_dir)]
        if self.max_steps is not None:
            cmd += ["--max-steps", str(int(self.max_steps))]
        if self.lr is not None:
            cmd += ["--lr", repr(float(self.lr))]
        if self.seed is not None:
            cmd += ["--seed", str(int(self.seed))]
        if self.log_every is not None:
            cmd += ["--log-every", str(int(self.log_every))]
        if self.superclasses == "reference":
            cmd += ["--superclasses", "reference"]
        elif superclass_file is not None:
            cmd += ["--superclasses", str(superclass_file)]
        for key, value in self.overrides.items():
            cmd += ["--set", f"{key}={_set_value(key, value)}"]
        return cmd


@dataclass
class PipelineOptions:
    """`python -m workbench.pipeline --dataset NAME --out DIR` (the paper's procedure end to end)."""

    dataset: str = "synthetic"
    name: Optional[str] = None
    extra_args: list = field(default_factory=list)  # further pipeline flags, passed through verbatim

    def validate(self) -> None:
        if not pipeline_available():
            raise ValueError("the pipeline is not available in this installation (workbench/pipeline.py is missing)")
        validate_dataset(self.dataset)
        if not all(isinstance(a, str) for a in self.extra_args):
            raise ValueError("pipeline arguments must be strings")
        if self.name is not None:
            safe_run_name(self.name)

    def default_name(self) -> str:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        return f"pipeline-{self.dataset.split(':')[0]}-{stamp}"

    def command(self, run_dir: Path) -> list[str]:
        return [sys.executable, "-m", "workbench.pipeline", "--dataset", self.dataset,
                "--out", str(run_dir), *self.extra_args]


def _check_int(label: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, float) and value.is_integer()):
        raise ValueError(f"{label} must be a whole number, got {value!r}")
    if not lo <= int(value) <= hi:
        raise ValueError(f"{label} must be between {lo} and {hi}, got {int(value)}")


def _set_value(key: str, value: Any) -> str:
    """The text of `--set key=value`: JSON for lists/bools/None, plain text for numbers and strings."""
    if isinstance(value, str):
        if "\n" in value:
            raise ValueError(f"option {key}: value must be one line")
        return value
    if value is None or isinstance(value, (bool, int, float, list, tuple)):
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    raise ValueError(f"option {key}: unsupported value {value!r}")


def validate_dataset(name: str) -> None:
    """Accept the dataset names training knows; `imagefolder:PATH` must point at a folder."""
    if not isinstance(name, str) or not name:
        raise ValueError("choose a dataset")
    if name.startswith("imagefolder:"):
        path = Path(name.split(":", 1)[1]).expanduser()
        if not path.is_dir():
            raise ValueError(f"image folder {str(path)!r} does not exist (imagefolder:PATH needs one sub-folder per class)")
        return
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: use one of {list(DATASETS)} or imagefolder:PATH")


def validate_superclass_map(mapping: dict, preset_fields: Optional[dict] = None) -> None:
    """Check a super-class map (docs/CONTRACTS.md format) and that it fits the chosen preset."""
    if not isinstance(mapping, dict):
        raise ValueError("a super-class map must be a JSON object")
    classes = mapping.get("classes")
    if not isinstance(classes, dict) or not classes:
        raise ValueError('a super-class map needs "classes": {class name: group index}')
    groups = list(classes.values())
    if not all(isinstance(g, int) and not isinstance(g, bool) and g >= 0 for g in groups):
        raise ValueError("super-class map: every group index must be a whole number >= 0")
    num_groups = mapping.get("num_groups", max(groups) + 1)
    if set(groups) != set(range(num_groups)):
        raise ValueError(f"super-class map: groups must be 0..{num_groups - 1}, each used at least once; "
                         f"got {sorted(set(groups))}")
    if preset_fields is not None:
        if preset_fields.get("family") != "mvmoe":
            raise ValueError("a super-class map only guides the per-image router: choose an mvmoe-… preset")
        if preset_fields.get("num_experts") != num_groups:
            raise ValueError(f"the super-class map has {num_groups} groups but the preset has "
                             f"E={preset_fields.get('num_experts')} experts; they must be equal")


def _open_test_split(dataset: str):
    """The dataset's test split; a missing dataset is a ValueError (DatasetError) saying how to get it."""
    from .data import load_dataset

    return load_dataset(dataset, "test")


def _check_reference_groups(dataset: str, fields: dict) -> None:
    """`--superclasses reference`: the dataset must have a hierarchy with E groups."""
    if fields.get("family") != "mvmoe":
        raise ValueError("a super-class map only guides the per-image router: choose an mvmoe-… preset")
    groups = _open_test_split(dataset).reference_groups
    if groups is None:
        raise ValueError(f"dataset {dataset!r} has no reference hierarchy; use a super-class map instead")
    n = len(set(int(g) for g in groups))
    if fields.get("num_experts") != n:
        raise ValueError(f"the reference hierarchy of {dataset!r} has {n} groups but the preset has "
                         f"E={fields.get('num_experts')} experts; they must be equal")


def read_superclass_file(data: Union[bytes, str]) -> dict:
    """Parse an uploaded super-class map file; ValueError in plain words when it is not one."""
    try:
        mapping = safejson.loads(data, "the super-class file", max_bytes=1 << 20)
    except ValueError as e:  # malformed, too large or too deeply nested
        raise ValueError(str(e)) from None
    validate_superclass_map(mapping)
    return mapping


def pipeline_available() -> bool:
    return (REPO_ROOT / "workbench" / "pipeline.py").is_file()


def max_jobs() -> int:
    """The concurrency limit: env WORKBENCH_MAX_JOBS, default 1."""
    raw = os.environ.get("WORKBENCH_MAX_JOBS", "")
    try:
        return max(1, int(raw)) if raw.strip() else DEFAULT_MAX_JOBS
    except ValueError:
        return DEFAULT_MAX_JOBS


# ----------------------------------------------------------------------------- starting
def start_training(options: TrainOptions, root: Optional[PathLike] = None,
                   limit: Optional[int] = None) -> Path:
    """Validate `options`, create a run directory and start training in the background; -> run dir."""
    options.validate()
    with _start_lock(root) as base:
        _check_capacity(base, limit)
        run_dir = _new_run_dir(base, options.name or options.default_name())
        sc_file = None
        if isinstance(options.superclasses, dict):
            sc_file = run_dir / SUPERCLASS_FILE
            sc_file.write_text(json.dumps(options.superclasses, indent=2) + "\n")
        return _launch(run_dir, options.command(run_dir, sc_file), "train", asdict(options))


def start_pipeline(options: PipelineOptions, root: Optional[PathLike] = None,
                   limit: Optional[int] = None) -> Path:
    """Validate and start `python -m workbench.pipeline` in the background; -> run dir."""
    options.validate()
    with _start_lock(root) as base:
        _check_capacity(base, limit)
        run_dir = _new_run_dir(base, options.name or options.default_name())
        return _launch(run_dir, options.command(run_dir), "pipeline", asdict(options))


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
    """A fresh folder under `base` named after `name`, with -2, -3, … when the name is taken."""
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
    _CHILDREN[proc.pid] = proc
    now = time.time()
    job = {"kind": kind, "name": run_dir.name, "command": cmd, "pid": proc.pid,
           "proc_start": _proc_start_time(proc.pid), "started_ts": now,
           "started": _iso(now), "options": options}
    _write_json(run_dir / JOB_FILE, job)
    return run_dir


# ----------------------------------------------------------------------------- processes
def _proc_stat(pid: int) -> Optional[list[str]]:
    """Fields of /proc/<pid>/stat after the command name, or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    except OSError:
        return None
    return raw[raw.rfind(")") + 2:].split()


def _proc_start_time(pid: int) -> Optional[int]:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None  # field 22 of stat: starttime


def pid_alive(pid: Optional[int], proc_start: Optional[int] = None) -> bool:
    """Is the process running (not a zombie, and not another process that reused the pid)?"""
    if not pid:
        return False
    child = _CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        return False  # exited (and now reaped)
    if Path("/proc").is_dir() and Path("/proc/self/stat").exists():
        fields = _proc_stat(pid)
        if fields is None or fields[0] in ("Z", "X"):
            return False
        return proc_start is None or _proc_start_time(pid) == proc_start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exit_code(pid: Optional[int]) -> Optional[int]:
    child = _CHILDREN.get(pid) if pid else None
    return child.poll() if child is not None else None


# ----------------------------------------------------------------------------- reading
def _read_json(path: Path) -> Optional[dict]:
    try:
        data = safejson.read(path, max_bytes=1 << 20)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def read_metrics(run_dir: PathLike) -> list[dict]:
    """All complete records of `metrics.jsonl`; a partially written or garbled line is skipped."""
    path = Path(run_dir) / METRICS_FILE
    try:
        data = path.read_bytes()
    except OSError:
        return []
    return _parse_jsonl(data)


def _parse_jsonl(data: bytes) -> list[dict]:
    records = []
    for line in data.split(b"\n"):
        line = line.strip()
        if not line:
            continue
        try:
            rec = safejson.loads(line, "metrics line", max_bytes=1 << 20)
        except ValueError:
            continue  # the writer is mid-line, or the line is damaged
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _tail_bytes(path: Path, size: int) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(0, end - size))
            data = f.read()
            if end > size:  # drop the first, probably cut, line
                data = data.split(b"\n", 1)[-1]
            return data
    except OSError:
        return b""


def metrics_dir(run_dir: PathLike) -> Path:
    """Where a job's live metrics are: the run folder, or for a pipeline its newest stage (dense/, moe/, ...)."""
    run_dir = Path(run_dir)
    if (run_dir / METRICS_FILE).is_file():
        return run_dir
    stages = []
    for sub in run_dir.iterdir() if run_dir.is_dir() else ():
        with contextlib.suppress(OSError):
            stages.append((sub.joinpath(METRICS_FILE).stat().st_mtime, sub))
    return max(stages)[1] if stages else run_dir


def last_metrics(run_dir: PathLike) -> dict:
    """The newest train and eval records (from the tail of metrics.jsonl, cheap for big files)."""
    records = _parse_jsonl(_tail_bytes(Path(run_dir) / METRICS_FILE, 64 * 1024))
    last: dict = {}
    for rec in records:
        kind = rec.get("type")
        if kind in ("train", "eval", "done"):
            last[kind] = rec
    return last


def metrics_frames(records: Iterable[dict]) -> dict:
    """metrics.jsonl records -> pandas DataFrames for the Train page's curves.

    `train`: one row per train record (step, epoch, loss, ce, aux_<name>, lr, img_per_s, ...);
    `eval`: one row per evaluation (epoch, step, test_accuracy, test_loss);
    `load`: one row per (evaluation, MoE layer, expert) with the expert's share of assignments.
    """
    import pandas as pd

    train, evals, load = [], [], []
    for rec in records:
        kind = rec.get("type")
        if kind == "train":
            row = {k: v for k, v in rec.items() if not isinstance(v, (dict, list))}
            for name, value in (rec.get("aux") or {}).items():
                row[f"aux_{name}"] = value
            train.append(row)
        elif kind == "eval":
            evals.append({k: v for k, v in rec.items() if not isinstance(v, (dict, list))})
            for layer in rec.get("expert_load") or []:
                for expert, share in enumerate(layer.get("fraction") or []):
                    load.append({"epoch": rec.get("epoch"), "step": rec.get("step"), "layer": layer.get("layer"),
                                 "kind": layer.get("kind"), "expert": expert, "share": share,
                                 "dropped": layer.get("dropped")})
    return {"train": pd.DataFrame(train), "eval": pd.DataFrame(evals), "load": pd.DataFrame(load)}


def preset_name(family: str, depth: int, width: int, num_experts: int = 0, top_k: int = 1) -> str:
    """The preset for a shape: vit-<L>x<D>, or <family>-<L>x<D>-e<E>k<K> for the MoE families."""
    if family == "vit":
        return f"vit-{int(depth)}x{int(width)}"
    return f"{family}-{int(depth)}x{int(width)}-e{int(num_experts)}k{int(top_k)}"


def log_tail(run_dir: PathLike, lines: int = 20) -> str:
    """The last lines of the job's log (stdout + stderr), progress-bar carriage returns resolved."""
    text = _tail_bytes(Path(run_dir) / LOG_FILE, 32 * 1024).decode("utf-8", errors="replace")
    out = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    out = [line for line in out if line.strip()]
    return "\n".join(out[-lines:])


_EXC_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*(?:Error|Exception|Interrupt)|SystemExit|error|Error)\b.*")


def plain_error(log: str) -> str:
    """The line of a log that says what went wrong (the exception line, or argparse's 'error:')."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        if _EXC_LINE.match(line) or ": error:" in line:
            return line
    return lines[-1] if lines else ""


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def job_state(run_dir: PathLike) -> tuple[str, str]:
    """-> (state, error in plain words; '' unless failed)."""
    run_dir = Path(run_dir)
    job = _read_json(run_dir / JOB_FILE) or {}
    status = _read_json(run_dir / STATUS_FILE) or {}
    ended = _read_json(run_dir / EXIT_FILE)
    reported = status.get("state")
    if reported == "finished":
        return "finished", ""
    if job.get("cancelled") or reported == "stopped":  # train.py writes "stopped" on SIGTERM / Ctrl-C
        return "cancelled", ""
    if reported == "failed":  # (the process may still be tearing down; it has said it failed)
        return "failed", _status_error(status, run_dir)
    pid = job.get("pid") or status.get("pid")
    if ended is None and pid_alive(pid, job.get("proc_start") if job.get("pid") else None):
        return "running", ""
    # The process is gone. Its exit code: from the supervisor's exit.json, or our own child handle.
    code = ended.get("returncode") if ended else _exit_code(job.get("pid"))
    if code == 0 and reported is None:
        return "finished", ""  # a job that reports only through its exit code (the pipeline)
    detail = plain_error(log_tail(run_dir))
    if reported is None and detail and code is not None and code > 0:
        # it stopped with a message before training began (bad dataset, bad map, ...)
        return "failed", _strip_prefix(detail)
    how = "process exited unexpectedly"
    if code is not None and code < 0:
        how += f" (killed by {_signal_name(code)}{', possibly out of memory' if code == -9 else ''})"
    elif code:
        how += f" (exit code {code})"
    return "failed", f"{how}: {detail}" if detail else how


def _strip_prefix(line: str) -> str:
    return line[len("error: "):] if line.startswith("error: ") else line


def _status_error(status: dict, run_dir: Path) -> str:
    err = status.get("error")
    if isinstance(err, dict):
        err = err.get("message") or json.dumps(err)
    if err:
        return _strip_prefix(str(err))
    detail = plain_error(log_tail(run_dir))
    return _strip_prefix(detail) if detail else "training failed (no error message was recorded)"


def _fmt_elapsed(seconds: Optional[float]) -> str:
    if seconds is None:
        return ""
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s" if m else f"{s}s"


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def _end_time(run_dir: Path, job: dict, status: dict) -> Optional[float]:
    for key in ("ended_ts", "finished_ts", "end_time", "ended", "finished", "updated"):
        value = status.get(key)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return datetime.datetime.fromisoformat(value).timestamp()
    if job.get("cancelled_ts"):
        return float(job["cancelled_ts"])
    ended = _read_json(run_dir / EXIT_FILE)
    if ended and isinstance(ended.get("ended_ts"), (int, float)):
        return float(ended["ended_ts"])
    times = []
    for name in (STATUS_FILE, METRICS_FILE, LOG_FILE):
        with contextlib.suppress(OSError):
            times.append((run_dir / name).stat().st_mtime)
    return max(times) if times else None


def job_info(run_dir: PathLike) -> dict:
    """One row of the jobs table: name, kind, state, started, elapsed, last metrics, error, …"""
    run_dir = Path(run_dir)
    job = _read_json(run_dir / JOB_FILE) or {}
    status = _read_json(run_dir / STATUS_FILE) or {}
    state, error = job_state(run_dir)
    started_ts = job.get("started_ts")
    if started_ts is None and isinstance(status.get("started"), str):  # a run started from the CLI
        with contextlib.suppress(ValueError):
            started_ts = datetime.datetime.fromisoformat(status["started"]).timestamp()
    if started_ts is None:
        with contextlib.suppress(OSError):
            started_ts = run_dir.stat().st_mtime
    end = time.time() if state == "running" else _end_time(run_dir, job, status)
    elapsed = max(0.0, end - started_ts) if (started_ts and end) else None
    source = metrics_dir(run_dir)
    last = last_metrics(source)
    train, ev = last.get("train", {}), last.get("eval", {})
    from .checkpoint import list_checkpoints
    ckpts = list_checkpoints(run_dir)
    return {
        "name": job.get("name", run_dir.name),
        "kind": job.get("kind", "train"),
        "state": state,
        "started": _iso(started_ts) if started_ts else "",
        "started_ts": started_ts,
        "elapsed_s": elapsed,
        "elapsed": _fmt_elapsed(elapsed),
        "step": train.get("step"),
        "epoch": ev.get("epoch", train.get("epoch")),
        "loss": train.get("loss"),
        "test_accuracy": ev.get("test_accuracy"),
        "img_per_s": train.get("img_per_s"),
        "error": error,
        "pid": job.get("pid"),
        "model": (job.get("options") or {}).get("model") or status.get("model"),
        "dataset": (job.get("options") or {}).get("dataset") or status.get("dataset"),
        "checkpoint": str(ckpts[-1]) if ckpts else None,
        "run_dir": str(run_dir),
        "metrics_dir": str(source),
        "stage": source.name if source != run_dir else None,
        "command": job.get("command", []),
    }


def list_jobs(root: Optional[PathLike] = None) -> list[dict]:
    """Every job under the runs folder (folders with job.json or status.json), newest first."""
    base = Path(root).resolve() if root is not None else runs_dir()
    if not base.is_dir():
        return []
    rows = []
    for d in base.iterdir():
        if d.is_dir() and not d.name.startswith(".") and ((d / JOB_FILE).is_file() or (d / STATUS_FILE).is_file()):
            rows.append(job_info(d))
    rows.sort(key=lambda r: r["started_ts"] or 0, reverse=True)
    return rows


def resolve_run(run: PathLike, root: Optional[PathLike] = None) -> Path:
    """A run name or path -> its folder, refusing anything outside the runs folder."""
    base = Path(root).resolve() if root is not None else runs_dir()
    path = inside(base, run)
    if path == base:
        raise ValueError(f"{run} is the runs folder itself, not a run")
    if not path.is_dir():
        raise JobError(f"run {str(run)!r} does not exist (was its folder deleted?)")
    return path


# ----------------------------------------------------------------------------- cancelling
def cancel(run: PathLike, root: Optional[PathLike] = None, timeout: float = 5.0) -> str:
    """Stop a running job: SIGTERM its process group, SIGKILL after `timeout` s; mark it cancelled.

    Returns the job's state afterwards ("cancelled", or "finished"/"failed" when it had already ended).
    """
    run_dir = resolve_run(run, root)
    state, _ = job_state(run_dir)
    if state != "running":
        return state
    job = _read_json(run_dir / JOB_FILE) or {}
    status = _read_json(run_dir / STATUS_FILE) or {}
    job.setdefault("pid", status.get("pid"))  # a run started from the CLI has only status.json
    job.setdefault("name", run_dir.name)
    job["cancelled"] = True
    job["cancelled_ts"] = time.time()
    _write_json(run_dir / JOB_FILE, job)  # first the mark, so a watcher never sees "failed"
    pid = job.get("pid")
    if pid and pid_alive(pid, job.get("proc_start")):
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and pid_alive(pid, job.get("proc_start")):
            time.sleep(0.05)
        if pid_alive(pid, job.get("proc_start")):
            _signal_group(pid, signal.SIGKILL)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and pid_alive(pid, job.get("proc_start")):
                time.sleep(0.05)
    return job_state(run_dir)[0]


def _signal_group(pid: int, sig: int) -> None:
    """Signal the job's whole process group (it leads its own session, so pgid == pid)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


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
    the job handles SIGTERM (train.py records "stopped"), and the supervisor,
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
    _write_json(Path(run_dir) / EXIT_FILE, {"returncode": code, "ended_ts": time.time(), "ended": _iso(time.time())})
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


__all__ = ["TrainOptions", "PipelineOptions", "JobError", "start_training", "start_pipeline", "start_command",
           "list_jobs", "job_info", "job_state", "read_metrics", "last_metrics", "log_tail", "plain_error",
           "cancel", "wait", "max_jobs", "validate_dataset", "validate_superclass_map", "read_superclass_file",
           "pipeline_available", "resolve_run", "pid_alive", "metrics_frames", "preset_name", "metrics_dir",
           "supervise", "DATASETS", "PRECISIONS", "STATES"]


if __name__ == "__main__":
    sys.exit(main())
