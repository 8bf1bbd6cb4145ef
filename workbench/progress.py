"""A one-line progress bar on stderr (a plain line per update when stderr is not a terminal)."""
from __future__ import annotations

import sys
import time


def fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total, self.enabled = total, enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.last_draw = 0.0

    def update(self, step: int, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.time()
        if self.tty:
            if not force and now - self.last_draw < 0.1:
                return
            frac = step / max(1, self.total)
            bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
            self.stream.write(f"\r[{bar}] {step}/{self.total} {text}\033[K")
        elif force:
            self.stream.write(f"step {step}/{self.total} {text}\n")
        self.stream.flush()
        self.last_draw = now

    def line(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
            self.stream.flush()
