"""The run folder: its file names, its state vocabulary, its writer and its readers.

This module is the one owner of the format. A run folder (`runs/<name>/`) holds:

  train_config.json  the TrainConfig of the run (written by the jobs API; the trainer reads it)
  pipeline_config.json  the same for a pipeline job: its PipelineConfig (workbench/pipeline_config.py)
  job.json           written by the jobs API: kind, command, pid, start time, options, cancel mark
  exit.json          written by the job's supervisor when its command ends: the exit code
  status.json        written by the trainer: state, pid, progress, last metrics, error
  metrics.jsonl      appended by the trainer, one JSON object per line:
                     {"type": "train" | "eval" | "done" | "error", ...}
  log.txt            the job's stdout + stderr
  superclasses.json  a super-class map handed to the run (workbench.superclass_map format)
  + the checkpoint files (workbench/checkpoint.py) and, for a pipeline, one sub-folder per stage.

State of a run (`job_state`), first match wins:
  finished   status.json says finished (or, without a status, the exit code is 0)
  cancelled  job.json carries the cancel mark, or status.json says cancelled (SIGTERM / Ctrl-C)
  failed     status.json says failed (its error), or every process of the job is gone
             without finishing: "process exited unexpectedly" + exit code/signal + log line
  running    a process of the job is alive: its supervisor (same pid and start time), or,
             when the supervisor was killed, any process left in the job's process group

Every file the workbench writes goes through `atomic_write_bytes` (temp file in the
same folder, fsync, rename, fsync the folder), so a reader sees the old file or the
new one, never half of one; `clean_temp_files` removes what a killed writer left.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Optional, Union

from . import procs, safejson
from .paths import inside, runs_dir
from .tblog import TensorBoardMirror

PathLike = Union[str, os.PathLike]

CONFIG_FILE = "train_config.json"
PIPELINE_CONFIG_FILE = "pipeline_config.json"
JOB_FILE = "job.json"
EXIT_FILE = "exit.json"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "log.txt"
SUPERCLASS_FILE = "superclasses.json"
LOCK_FILE = ".jobs.lock"

STATES = ("running", "finished", "failed", "cancelled")
RECORD_TYPES = ("train", "eval", "done", "error")
TEMP_SUFFIX = ".tmp"


# ----------------------------------------------------------------------------- atomic files
def fsync_dir(directory: PathLike) -> None:
    """Make a rename in `directory` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_json(path: PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def atomic_copy(src: PathLike, dest: PathLike) -> None:
    """Copy `src` to `dest` atomically (creating dest's folder)."""
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dest, Path(src).read_bytes())


_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{6,}" + re.escape(TEMP_SUFFIX) + "$")


def clean_temp_files(directory: PathLike) -> list[str]:
    """Remove the temp files a killed `atomic_write_bytes` left in `directory`; -> their names."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if entry.is_file(follow_symlinks=False) and _TEMP_NAME.match(entry.name):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(entry.name)
    return removed


# ----------------------------------------------------------------------------- the writer
def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class RunLog:
    """The trainer's side of the run folder: metrics.jsonl (append, flushed per record) and
    status.json (rewritten atomically). Only the writing rank (`enabled`) touches files."""

    def __init__(self, run_dir: PathLike, enabled: bool, base_status: dict, resumed_step: Optional[int] = None):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.status = {"proc_start": procs.start_time(os.getpid()), **base_status}
        self.f = open(self.run_dir / METRICS_FILE, "a", buffering=1, encoding="utf-8") if enabled else None
        # the same records as TensorBoard scalars (tensorboard --logdir runs/); a resume hides later events
        self.tensorboard = TensorBoardMirror(self.run_dir, purge_step=resumed_step) if enabled else None

    def write(self, record: dict) -> None:
        if self.f:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()
            self.tensorboard.write(record)

    def set_status(self, **fields) -> None:
        if fields.get("state", "running") not in STATES:
            raise ValueError(f"run state must be one of {STATES}, got {fields['state']!r}")
        if self.enabled:
            self.status.update(fields, updated=now_iso())
            atomic_write_json(self.run_dir / STATUS_FILE, self.status)

    def close(self) -> None:
        if self.f:
            self.f.close()
            self.f = None
            self.tensorboard.close()


def truncate_metrics(run_dir: PathLike, step: int) -> int:
    """Keep the records up to `step` (a resume logs the rest again; a fresh start passes 0).

    Lines that are cut, not JSON or not UTF-8 are dropped; -> how many such damaged lines.
    """
    path = Path(run_dir) / METRICS_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    keep, damaged = [], 0
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            rec = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            damaged += 1
            continue
        if not isinstance(rec, dict) or rec.get("type") in ("done", "error") or (rec.get("step") or 0) > step:
            continue
        keep.append(json.dumps(rec))
    atomic_write_bytes(path, ("\n".join(keep) + "\n" if keep else "").encode("utf-8"))
    return damaged


# ----------------------------------------------------------------------------- readers
def read_json(path: PathLike) -> Optional[dict]:
    """A JSON object file, or None when it is missing, damaged or not an object."""
    try:
        data = safejson.read(path, max_bytes=1 << 20)        # bounded: a run folder may hold anything
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class RunBusy(ValueError):
    """Another live process is training into this run folder."""


def is_finished(run_dir: PathLike) -> bool:
    """Whether a training run in this folder finished (its status.json says so)."""
    return (read_json(Path(run_dir) / STATUS_FILE) or {}).get("state") == "finished"


def training_pid(run_dir: PathLike) -> Optional[int]:
    """The pid of a live trainer writing this run folder now (status.json says running and
    that very process is alive), else None: two trainers must never share a folder."""
    status = read_json(Path(run_dir) / STATUS_FILE) or {}
    pid = status.get("pid")
    if status.get("state") != "running" or not isinstance(pid, int) or pid == os.getpid():
        return None
    return pid if procs.pid_alive(pid, status.get("proc_start")) else None


def parse_jsonl(data: bytes) -> list[dict]:
    """Complete JSON-object lines of `data`; a cut, garbled or non-UTF-8 line is skipped."""
    records = []
    for line in data.split(b"\n"):
        line = line.strip()
        if not line:
            continue
        try:
            rec = safejson.loads(line, "metrics line", max_bytes=1 << 20)
        except ValueError:
            continue  # the writer is mid-line, or the line is damaged (or too big or deep)
        if isinstance(rec, dict):
            records.append(rec)
    return records


def read_metrics(run_dir: PathLike) -> list[dict]:
    """All complete records of metrics.jsonl ([] when there is none)."""
    try:
        return parse_jsonl((Path(run_dir) / METRICS_FILE).read_bytes())
    except OSError:
        return []


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


def last_metrics(run_dir: PathLike) -> dict:
    """The newest train, eval and done records (from the tail of metrics.jsonl, cheap for big files)."""
    last: dict = {}
    for rec in parse_jsonl(_tail_bytes(Path(run_dir) / METRICS_FILE, 64 * 1024)):
        if rec.get("type") in ("train", "eval", "done"):
            last[rec["type"]] = rec
    return last


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


# A pipeline run folder (workbench/pipeline.py writes it), stage by stage in the order it runs them:
# (stage, what it is, the artefact that marks it done: a training sub-folder or a file).
PIPELINE_STAGES = (
    ("dense", "Dense baseline", "dense"),
    ("confusion", "Held-out confusion matrix", "confusion.json"),
    ("superclasses", "Super-classes", "clustering.json"),
    ("moe", "Mobile V-MoE", "moe"),
    ("report", "Evaluation and report", "report.json"),
)


def _training_stage(folder: Path) -> tuple[str, str]:
    """(state, detail) of a pipeline training stage from its status.json."""
    status = read_json(folder / STATUS_FILE) or {}
    state = status.get("state")
    if state is None:
        return "waiting", ""
    epoch, epochs = status.get("epoch"), status.get("epochs")
    acc = (status.get("last_eval") or {}).get("test_accuracy")
    detail = ", ".join(part for part in (
        f"{status.get('model', '')}".strip(),
        f"epoch {epoch}/{epochs}" if epoch is not None and epochs else "",
        f"test accuracy {100 * acc:.2f}%" if isinstance(acc, (int, float)) else "") if part)
    return ("done" if state == "finished" else state), detail


def _file_stage(stage: str, path: Path) -> str:
    """The detail line of a finished file stage (its headline number)."""
    data = read_json(path) or {}
    if stage == "confusion" and isinstance(data.get("accuracy"), (int, float)):
        return f"dense accuracy on the held-out images {100 * data['accuracy']:.2f}%"
    if stage == "superclasses":
        return f"E = {data.get('num_groups')} by {data.get('method')}"
    if stage == "report":
        rows = data.get("rows") if isinstance(data.get("rows"), list) else []
        return ", ".join(f"{r.get('model')} {100 * r['test_accuracy']:.2f}%" for r in rows
                         if isinstance(r, dict) and isinstance(r.get("test_accuracy"), (int, float)))
    return ""


def pipeline_progress(run_dir: PathLike, running: bool) -> list[dict]:
    """One row per pipeline stage: {stage, label, state, detail}; state is done, running, waiting,
    failed or cancelled, or "stopped" for the stage a pipeline that no longer runs was in."""
    run_dir, rows, current_found = Path(run_dir), [], False
    for stage, label, artefact in PIPELINE_STAGES:
        path = run_dir / artefact
        if stage in ("dense", "moe"):
            state, detail = _training_stage(path)
        else:
            state, detail = ("done", _file_stage(stage, path)) if path.is_file() else ("waiting", "")
        if state != "done" and not current_found:   # the first stage not done is the one at work
            current_found = True
            if state in ("waiting", "running"):
                state = "running" if running else "stopped"
        elif state == "running" and not running:
            state = "stopped"
        rows.append({"stage": stage, "label": label, "state": state, "detail": detail})
    return rows


def pipeline_report(run_dir: PathLike, max_bytes: int = 1 << 20) -> Optional[str]:
    """The pipeline's report.md (None until the last stage wrote it, or when it is larger than max_bytes)."""
    path = Path(run_dir) / "report.md"
    with contextlib.suppress(OSError):
        if path.stat().st_size <= max_bytes:
            return path.read_bytes().decode("utf-8", errors="replace")
    return None


def pipeline_checkpoints(run_dir: PathLike) -> dict[str, Path]:
    """{model name (its sub-folder: dense, moe, ...): checkpoint folder} of a pipeline run."""
    from .checkpoint import list_checkpoints

    run_dir = Path(run_dir)
    return {p.relative_to(run_dir).as_posix(): p for p in list_checkpoints(run_dir) if p != run_dir}


def log_tail(run_dir: PathLike, lines: int = 20) -> str:
    """The last lines of the job's log (stdout + stderr), progress-bar carriage returns resolved."""
    text = _tail_bytes(Path(run_dir) / LOG_FILE, 32 * 1024).decode("utf-8", errors="replace")
    out = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join([line for line in out if line.strip()][-lines:])


_EXC_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*(?:Error|Exception|Interrupt)|SystemExit|error|Error)\b.*")


def plain_error(log: str) -> str:
    """The line of a log that says what went wrong (the exception line, or argparse's 'error:')."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        if _EXC_LINE.match(line) or ": error:" in line:
            return line
    return lines[-1] if lines else ""


def _strip_prefix(line: str) -> str:
    return line[len("error: "):] if line.startswith("error: ") else line


def job_alive(run_dir: PathLike, job: Optional[dict] = None, status: Optional[dict] = None) -> bool:
    """Is any process of the run still alive (its supervisor, or what it left in its process group)?"""
    run_dir = Path(run_dir)
    job = read_json(run_dir / JOB_FILE) or {} if job is None else job
    status = read_json(run_dir / STATUS_FILE) or {} if status is None else status
    if job.get("pid"):
        if read_json(run_dir / EXIT_FILE) is None and procs.pid_alive(job["pid"], job.get("proc_start")):
            return True
        # the supervisor is gone (it may have been killed): its trainer keeps the group alive
        return procs.group_alive(job["pid"], job.get("proc_start"))
    return procs.pid_alive(status.get("pid"), status.get("proc_start"))


def job_state(run_dir: PathLike) -> tuple[str, str]:
    """-> (state, error in plain words; '' unless failed)."""
    run_dir = Path(run_dir)
    job = read_json(run_dir / JOB_FILE) or {}
    status = read_json(run_dir / STATUS_FILE) or {}
    reported = status.get("state")
    if reported == "finished":
        return "finished", ""
    if job.get("cancelled") or reported == "cancelled":
        return "cancelled", ""
    if reported == "failed":  # (the process may still be tearing down; it has said it failed)
        return "failed", _status_error(status, run_dir)
    if job_alive(run_dir, job, status):
        return "running", ""
    if reported is not None and reported not in STATES:
        return "failed", (f"{run_dir / STATUS_FILE} has the unknown state {reported!r} (written by an older "
                          f"version?); the run is not running")
    ended = read_json(run_dir / EXIT_FILE)
    code = ended.get("returncode") if ended else procs.exit_code(job.get("pid"))
    if code == 0 and reported is None:
        return "finished", ""  # a job that reports only through its exit code (the pipeline)
    return "failed", _exit_error(run_dir, code, reported)


def _exit_error(run_dir: Path, code: Optional[int], reported: Optional[str]) -> str:
    detail = plain_error(log_tail(run_dir))
    if reported is None and detail and code is not None and code > 0:
        return _strip_prefix(detail)  # it stopped with a message before training began
    how = "process exited unexpectedly"
    if code is not None and code < 0:
        how += f" (killed by {procs.signal_name(code)}{', possibly out of memory' if code == -9 else ''})"
    elif code:
        how += f" (exit code {code})"
    return f"{how}: {detail}" if detail else how


def _status_error(status: dict, run_dir: Path) -> str:
    err = status.get("error")
    if isinstance(err, dict):
        err = err.get("message") or json.dumps(err)
    if err:
        return _strip_prefix(str(err))
    detail = plain_error(log_tail(run_dir))
    return _strip_prefix(detail) if detail else "training failed (no error message was recorded)"


# ----------------------------------------------------------------------------- the jobs table
def _fmt_elapsed(seconds: Optional[float]) -> str:
    if seconds is None:
        return ""
    h, rem = divmod(int(round(seconds)), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s" if m else f"{s}s"


def iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds")


def _timestamp(value) -> Optional[float]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return datetime.datetime.fromisoformat(value).timestamp()
    return None


def _end_time(run_dir: Path, job: dict, status: dict) -> Optional[float]:
    for value in (status.get("updated"), job.get("cancelled_ts"), (read_json(run_dir / EXIT_FILE) or {}).get("ended_ts")):
        if _timestamp(value) is not None:
            return _timestamp(value)
    times = []
    for name in (STATUS_FILE, METRICS_FILE, LOG_FILE):
        with contextlib.suppress(OSError):
            times.append((run_dir / name).stat().st_mtime)
    return max(times) if times else None


def _started(run_dir: Path, job: dict, status: dict) -> Optional[float]:
    started = _timestamp(job.get("started_ts")) or _timestamp(status.get("started"))  # a CLI run: status only
    if started is None:
        with contextlib.suppress(OSError):
            started = run_dir.stat().st_mtime
    return started


def job_info(run_dir: PathLike) -> dict:
    """One row of the jobs table: name, kind, state, started, elapsed, last metrics, error, ..."""
    from .checkpoint import list_checkpoints

    run_dir = Path(run_dir)
    job = read_json(run_dir / JOB_FILE) or {}
    status = read_json(run_dir / STATUS_FILE) or {}
    state, error = job_state(run_dir)
    started = _started(run_dir, job, status)
    end = time.time() if state == "running" else _end_time(run_dir, job, status)
    elapsed = max(0.0, end - started) if (started and end) else None
    source = metrics_dir(run_dir)
    last = last_metrics(source)
    train, ev = last.get("train", {}), last.get("eval", {})
    ckpts = list_checkpoints(run_dir)
    options = job.get("options") if isinstance(job.get("options"), dict) else {}
    return {
        "name": job.get("name", run_dir.name), "kind": job.get("kind", "train"), "state": state,
        "started": iso(started) if started else "", "started_ts": started,
        "elapsed_s": elapsed, "elapsed": _fmt_elapsed(elapsed),
        "step": train.get("step"), "epoch": ev.get("epoch", train.get("epoch")), "loss": train.get("loss"),
        "test_accuracy": ev.get("test_accuracy"), "img_per_s": train.get("img_per_s"), "error": error,
        "pid": job.get("pid"),
        "model": options.get("model") or status.get("model"),
        "dataset": options.get("dataset") or status.get("dataset"),
        "checkpoint": str(ckpts[-1]) if ckpts else None,
        "run_dir": str(run_dir), "metrics_dir": str(source),
        "stage": source.name if source != run_dir else None,
        "command": job.get("command", []),
    }


def list_jobs(root: Optional[PathLike] = None) -> list[dict]:
    """Every run under the runs folder (folders with job.json or status.json), newest first."""
    base = Path(root).resolve() if root is not None else runs_dir()
    if not base.is_dir():
        return []
    rows = [job_info(d) for d in base.iterdir()
            if d.is_dir() and not d.name.startswith(".") and ((d / JOB_FILE).is_file() or (d / STATUS_FILE).is_file())]
    rows.sort(key=lambda r: r["started_ts"] or 0, reverse=True)
    return rows


def resolve_run(run: PathLike, root: Optional[PathLike] = None) -> Path:
    """A run name or path -> its folder, refusing anything outside the runs folder."""
    base = Path(root).resolve() if root is not None else runs_dir()
    path = inside(base, run)
    if path == base:
        raise ValueError(f"{run} is the runs folder itself, not a run")
    if not path.is_dir():
        raise RunNotFound(f"run {str(run)!r} does not exist (was its folder deleted?)")
    return path


class RunNotFound(ValueError):
    """A run folder named by the user is not there."""
