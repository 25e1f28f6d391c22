"""Multicast restore sessions: one `udp-sender` per partition stream, for a whole range.

A `restore --multicast` gives all its jobs one session (tasks/submit.py): an id, a
range of ports of its own (partition i on PORTBASE+2i), and how many nodes to wait for.
The first job thread of the session on a worker takes the session's lock file under
DATA_DIR/multicast/ and runs the sender loop in a thread; the other jobs only wait for
their agents as usual. The loop sends the stored zstd partclone stream of each
partition in turn, on the named interface (IMGFARM_MULTICAST__INTERFACE):

- the first partition starts when every node of the session joined, or
  `max_wait` seconds after the first one did (`--min-receivers N --max-wait S`);
- each later partition waits for exactly the receivers that finished the one before
  (read from udp-sender's own "Disconnecting" lines), so nobody is dropped between
  partitions, and again at most `max_wait` seconds;
- a receiver that stops answering is dropped after `retries_until_drop` unanswered
  REQACKs (about 0.75 s each: 20 by default, about 15 s, inside 30 s even on a
  busy machine);
- the loop ends when a partition reached nobody, or the session has no open job.

The agents fall back to unicast on their own (agent/multicast.py). No udp-sender
outlives its session: each runs in its own process group, recorded in
DATA_DIR/multicast/SESSION.json; finalizing the session's last job kills it
(`end_if_done`), and the reconciler (`kill_strays`) kills any whose session has no
open job or whose owner died (its lock is free).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import subprocess
import threading
from collections import deque
from pathlib import Path
from typing import IO, Any

from sqlalchemy import select

from imgfarm.config.settings import get_settings
from imgfarm.models import states
from imgfarm.models.db import session_scope
from imgfarm.models.images import image_dir
from imgfarm.models.jobs import add_event
from imgfarm.models.tables import Job
from imgfarm.protocol import JobKind, Manifest

log = logging.getLogger(__name__)

SESSION_PORTS = 64  # ports a session owns: two per partition, so up to 32 partitions
DISCONNECT = re.compile(rb"Disconnecting #\d+ \(([0-9.]+)\)")
DROPPING = re.compile(rb"Dropping client #\d+")

_threads: dict[str, threading.Thread] = {}
_guard = threading.Lock()


def session_dir() -> Path:
    d = get_settings().data_dir / "multicast"
    d.mkdir(parents=True, exist_ok=True)
    return d


def session_of(options: dict[str, Any] | None) -> dict[str, Any] | None:
    mc = (options or {}).get("multicast")
    return mc if isinstance(mc, dict) and mc.get("session") else None


def open_jobs(session: str) -> list[int]:
    """The session's jobs that have not ended (nor begun to)."""
    with session_scope() as s:
        rows = s.execute(select(Job.id, Job.options).where(
            Job.kind == JobKind.RESTORE, Job.state.in_((states.QUEUED, states.BOOTING, states.RUNNING))))
        return [jid for jid, opts in rows if (session_of(opts) or {}).get("session") == session]


def join(job_id: int, options: dict[str, Any] | None, image: str) -> None:
    """Make sure the job's session has its sender running (somewhere); call after booting.

    The job's options and image come from its start (tasks/starts.py), which read them:
    a job without a session costs no database round trip here.
    """
    mc = session_of(options)
    if mc is None:
        return
    sid = str(mc["session"])
    with _guard:
        if sid in _threads and _threads[sid].is_alive():
            return
        lock = open(session_dir() / f"{sid}.lock", "a")  # noqa: SIM115 - held by the thread
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another worker process runs it
            lock.close()
            return
        t = threading.Thread(target=_serve, args=(sid, mc, image, lock, job_id),
                             name=f"udp-sender-{sid}", daemon=True)
        _threads[sid] = t
        t.start()


def _sender_args(mc: dict[str, Any], path: Path, portbase: int, receivers: int) -> list[str]:
    cfg = get_settings().multicast
    args = ["udp-sender", "--nokbd", "--file", str(path), "--interface", cfg.interface,
            "--portbase", str(portbase), "--min-receivers", str(max(1, receivers)),
            "--max-wait", str(int(float(mc.get("max_wait") or cfg.max_wait))),
            "--start-timeout", str(int(cfg.start_timeout)),
            "--retries-until-drop", str(cfg.retries_until_drop),
            # udp-sender checks whether enough receivers joined only when its wait loop
            # wakes: every 2 s unless it re-sends its hello more often. 100 ms: the session
            # starts within 0.1 s of its last receiver joining.
            "--rexmit-hello-interval", "100"]
    if cfg.blocksize:  # larger packets on a jumbo-frame network: fewer of them to handle
        args += ["--blocksize", str(cfg.blocksize)]
    rate = mc.get("max_bitrate") or cfg.max_bitrate
    if rate:
        args += ["--max-bitrate", str(rate)]
    return args


def _note(job_id: int, message: str) -> None:
    try:
        with session_scope() as s:
            add_event(s, job_id, "note", message[:1000])
    except Exception as exc:  # noqa: BLE001 - a note must not stop the session
        log.warning("multicast note for job %s: %s", job_id, exc)


def _serve(sid: str, mc: dict[str, Any], image: str, lock: IO[str], job_id: int) -> None:
    state = session_dir() / f"{sid}.json"
    try:
        imgdir = image_dir(image)
        manifest = Manifest.load(imgdir)
        receivers = int(mc.get("nodes") or 1)
        for index, part in enumerate(manifest.partitions):
            if not open_jobs(sid):
                break
            args = _sender_args(mc, imgdir / part.file, int(mc["portbase"]) + 2 * index, receivers)
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, start_new_session=True)
            state.write_text(json.dumps({"session": sid, "pid": proc.pid, "partition": part.file}))
            assert proc.stderr
            tail: deque[bytes] = deque(maxlen=400)
            for line in proc.stderr:
                tail.append(line[-400:])
            rc = proc.wait()
            text = b"".join(tail)
            done = text.split(b"Transfer complete", 1)
            finished = len(DISCONNECT.findall(done[1])) if len(done) == 2 else 0
            dropped = len(DROPPING.findall(text))
            _note(job_id, f"multicast session {sid}: {part.file} sent to {finished} node(s)"
                  + (f", {dropped} dropped" if dropped else "") + f" (udp-sender exit {rc})")
            if rc != 0 or finished == 0:
                break
            receivers = finished
    except Exception as exc:  # noqa: BLE001 - the agents fall back to unicast
        log.exception("multicast session %s failed", sid)
        _note(job_id, f"multicast session {sid} failed: {exc}; its nodes restore by unicast")
    finally:
        state.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (session_dir() / f"{sid}.lock").unlink()
        lock.close()
        with _guard:
            _threads.pop(sid, None)


def _kill(pid: int) -> bool:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _lock_free(sid: str) -> bool:
    path = session_dir() / f"{sid}.lock"
    if not path.exists():
        return True
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
        return True


def kill_strays(only: str = "") -> list[str]:
    """Kill every udp-sender whose session is over or whose owner died; the sessions killed."""
    killed = []
    for path in sorted(session_dir().glob("*.json")):
        try:
            info = json.loads(path.read_text())
            sid, pid = str(info["session"]), int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if only and sid != only:
            continue
        if open_jobs(sid) and not _lock_free(sid):
            continue
        if _kill(pid):
            killed.append(sid)
            log.warning("killed udp-sender %s of multicast session %s: the session is over", pid, sid)
        if _lock_free(sid):
            path.unlink(missing_ok=True)
    return killed


def end_if_done(job_id: int, options: dict[str, Any] | None) -> None:
    """After a job's finalize: the session's sender goes when no job of it is open."""
    mc = session_of(options)
    if mc is None:
        return
    sid = str(mc["session"])
    if not open_jobs(sid):
        for _ in kill_strays(only=sid):
            _note(job_id, f"multicast session {sid} ended: its udp-sender was stopped")
