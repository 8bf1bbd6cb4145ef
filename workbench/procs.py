"""Is a job's process still alive? (Linux /proc, with a POSIX fallback.)

A job runs in its own session, so its process group id is the supervisor's
pid; the group outlives the supervisor when that one is killed (`kill -9`),
which is why liveness is asked of the whole group, not of one pid.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path
from typing import Optional

# Popen objects of the jobs this process started: polling them reaps the exited
# child (otherwise it lingers as a zombie whose pid still "exists") and gives its exit code.
CHILDREN: dict[int, subprocess.Popen] = {}


def _stat(pid: int) -> Optional[list[str]]:
    """Fields of /proc/<pid>/stat after the command name, or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2:].split()


def start_time(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat)."""
    fields = _stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None


def _has_proc() -> bool:
    return Path("/proc/self/stat").exists()


def pid_alive(pid: Optional[int], proc_start: Optional[int] = None) -> bool:
    """Is the process running (not a zombie, and not another process that reused the pid)?"""
    if not pid:
        return False
    child = CHILDREN.get(pid)
    if child is not None and child.poll() is not None:
        return False  # exited (and now reaped)
    if _has_proc():
        fields = _stat(pid)
        if fields is None or fields[0] in ("Z", "X"):
            return False
        return proc_start is None or start_time(pid) == proc_start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_alive(pgid: Optional[int], not_before: Optional[int] = None) -> bool:
    """Does any live (non-zombie) process of process group `pgid` remain, started at or after `not_before`?

    When the leader's pid now belongs to a newer process (pid reuse), only members started
    before that process count: they cannot be the newcomer's.
    """
    if not pgid:
        return False
    if not _has_proc():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    leader_now = start_time(pgid)
    before = leader_now if leader_now is not None and not_before is not None and leader_now != not_before else None
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat(int(entry.name))
        if not fields or len(fields) < 20 or fields[0] in ("Z", "X") or int(fields[2]) != pgid:
            continue
        started = int(fields[19])
        if (not_before is None or started >= not_before) and (before is None or started < before):
            return True
    return False


def exit_code(pid: Optional[int]) -> Optional[int]:
    """The exit code of a job this process started (None if unknown or still running)."""
    child = CHILDREN.get(pid) if pid else None
    return child.poll() if child is not None else None


def signal_group(pid: int, sig: int) -> None:
    """Signal the job's whole process group (it leads its own session, so pgid == pid)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def signal_name(code: int) -> str:
    """-9 -> 'SIGKILL' (a negative return code is the signal that ended the process)."""
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"
