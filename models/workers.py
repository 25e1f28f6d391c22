"""Worker heartbeats in the job database: who is alive, who is gone.

Every job worker process has a row it refreshes every few seconds (the
heartbeat thread, worker/heartbeat.py). A job's `waiter` names the worker
whose thread waits on it; when that worker stops heartbeating (or, on the
same host, its pid is gone) the reconciler hands the job to a live worker.
This does not depend on the broker's visibility timeout, which must stay
long for long jobs.
"""

from __future__ import annotations

import os
import socket
import uuid
from datetime import timedelta

from sqlalchemy import delete, select, update

from imgfarm.config.settings import get_settings
from imgfarm.models.db import session_scope
from imgfarm.models.tables import Worker, utcnow

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def worker_id() -> str:
    """This process's name in the workers table (and in a job's `waiter`)."""
    return WORKER_ID


def beat_once() -> None:
    """Register this process, or refresh its row."""
    with session_scope() as s:
        n = s.execute(update(Worker).where(Worker.id == WORKER_ID).values(seen_at=utcnow()))
        if n.rowcount == 0:  # type: ignore[attr-defined]
            s.add(Worker(id=WORKER_ID, hostname=socket.gethostname(), pid=os.getpid()))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dead_workers() -> set[str]:
    """Workers that stopped heartbeating, or whose process is gone on this host."""
    settings = get_settings()
    cutoff = utcnow() - timedelta(seconds=settings.worker_dead_after)
    host = socket.gethostname()
    dead: set[str] = set()
    with session_scope() as s:
        for w in s.scalars(select(Worker)):
            if w.id == WORKER_ID:
                continue
            if w.seen_at < cutoff or (w.hostname == host and not _pid_alive(w.pid)):
                dead.add(w.id)
    return dead


def live_workers() -> set[str]:
    with session_scope() as s:
        ids = set(s.scalars(select(Worker.id)))
    return ids - dead_workers()


def forget(ids: set[str]) -> None:
    if ids:
        with session_scope() as s:
            s.execute(delete(Worker).where(Worker.id.in_(ids)))
