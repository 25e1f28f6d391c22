"""Progress the agent reports: honest numbers from the tool or from /proc.

partclone prints "Completed: 42.17%"; partimage's batch mode draws a
terminal UI instead, so for it the agent counts the bytes the tool has
read (/proc/PID/io rchar) against the size it must read.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import IO

from imgfarm.protocol import ProgressReport

COMPLETED_RE = re.compile(rb"Completed:\s*([0-9.]+)%")


class Progress:
    def __init__(self, bytes_total: int = 0) -> None:
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.bytes_total = bytes_total
        self.bytes_done = 0
        self.percent = 0.0
        self.stage = ""

    def update(self, *, percent: float | None = None, bytes_done: int | None = None) -> None:
        with self.lock:
            if bytes_done is not None:
                self.bytes_done = bytes_done
                if percent is None and self.bytes_total:
                    percent = 100.0 * bytes_done / self.bytes_total
            if percent is not None:
                self.percent = max(0.0, min(100.0, percent))

    def snapshot(self) -> ProgressReport:
        with self.lock:
            elapsed = max(1e-6, time.monotonic() - self.started)
            return ProgressReport(percent=round(self.percent, 2), bytes_done=self.bytes_done,
                                  bytes_total=self.bytes_total, rate=round(self.bytes_done / elapsed, 1),
                                  message=self.stage)


def rchar(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/io") as fh:
            for line in fh:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def watch_stderr(stream: IO[bytes], on_percent: Callable[[float], None], tail: deque[bytes]) -> None:
    """Read a tool's stderr: keep its tail for errors, pass on percentages."""
    buf = b""
    while True:
        chunk = stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096)
        if not chunk:
            break
        buf += chunk
        parts = re.split(rb"[\r\n]", buf)
        buf = parts.pop()
        for line in parts:
            line = line.strip()
            if not line:
                continue
            tail.append(line)
            m = COMPLETED_RE.search(line)
            if m:
                on_percent(float(m.group(1)))
    if buf.strip():
        tail.append(buf.strip())


class Reporter(threading.Thread):
    """Posts progress every `interval` seconds, jittered so nodes do not sync up."""

    def __init__(self, post: Callable[[ProgressReport], None], progress: Progress, interval: float) -> None:
        super().__init__(name="progress-reporter", daemon=True)
        self.post = post
        self.progress = progress
        self.interval = max(0.2, interval)
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval * random.uniform(0.8, 1.2)):
            try:
                self.post(self.progress.snapshot())
            except Exception:  # noqa: BLE001 - the next report may get through
                pass
