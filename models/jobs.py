"""Changing a job: the one place that moves a job between states.

Every change is a conditional UPDATE (`WHERE id=? AND state IN (...)`), so
two processes racing on one job (a redelivered task and the reconciler, the
API and a timeout) cannot both win; the winner writes the event.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from imgfarm.errors import InvalidInput
from imgfarm.models import states
from imgfarm.models.tables import Job, JobEvent, utcnow
from imgfarm.models.views import unknown_job
from imgfarm.protocol import MAX_ID

BITRATE = re.compile(r"^[0-9]{1,6}(?:\.[0-9]{1,3})?[kmg]?\Z")  # udp-sender's --max-bitrate: 600m, 1g
MAX_WAIT = 86400.0  # seconds a multicast session may wait for its nodes, at most


def check_multicast(max_wait: float, max_bitrate: str) -> str:
    """A multicast request's wait (seconds, 0: the farm's default) and rate cap; the cap, normalized.

    One rule for `restore --multicast` (tasks/submit.py) and a window's multicast setting
    (models/windows.py): both end up as udp-sender arguments.
    """
    if not (isinstance(max_wait, int | float) and math.isfinite(max_wait) and 0 <= max_wait <= MAX_WAIT):
        raise InvalidInput(f"--max-wait {max_wait!r} is out of range", hint=f"0 to {MAX_WAIT:.0f} seconds")
    rate = (max_bitrate or "").lower()
    if rate and not BITRATE.fullmatch(rate):
        raise InvalidInput(f"bad --max-bitrate {max_bitrate[:40]!r}", hint="bits per second, e.g. 600m or 1g")
    return rate


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def get_job(session: Session, job_id: int) -> Job:
    if not 1 <= job_id <= MAX_ID:  # no such row: ids are 32-bit on PostgreSQL
        raise unknown_job(job_id)
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise unknown_job(job_id)
    return job


def add_event(
    session: Session,
    job_id: int,
    kind: str,
    message: str = "",
    state: str = "",
    data: dict[str, Any] | None = None,
) -> None:
    # a Core insert: events are written on every state change of every job,
    # and the ORM's unit of work costs several times more for no benefit here
    session.execute(insert(JobEvent).values(job_id=job_id, at=utcnow(), kind=kind, state=state,
                                            message=message, data=data or {}))


def add_progress_event(session: Session, job_id: int, message: str, data: dict[str, Any],
                       every: float) -> None:
    """Record a progress report as an event, coalesced: the first, one every `every` s, the last.

    An agent reports every few seconds for hours; keeping each report would grow a job's
    history without bound. The newest event stands for every report since the one kept
    before it, and is overwritten until it is `every` seconds younger than that one.
    """
    now = utcnow()
    latest = list(session.execute(
        select(JobEvent.id, JobEvent.at).where(JobEvent.job_id == job_id, JobEvent.kind == "progress")
        .order_by(JobEvent.id.desc()).limit(2)))
    if len(latest) == 2 and (latest[0].at - latest[1].at).total_seconds() < every:
        session.execute(update(JobEvent).where(JobEvent.id == latest[0].id)
                        .values(at=now, message=message, data=data))
        return
    session.execute(insert(JobEvent).values(job_id=job_id, at=now, kind="progress",
                                            state=states.RUNNING, message=message, data=data))


def transition(
    session: Session,
    job_id: int,
    src: str | tuple[str, ...],
    dst: str,
    message: str = "",
    data: dict[str, Any] | None = None,
    **fields: Any,
) -> bool:
    """Move job `job_id` from one of `src` to `dst`; False if another actor got there first."""
    sources = (src,) if isinstance(src, str) else src
    for s in sources:
        if not states.allowed(s, dst):
            raise ValueError(f"transition {s} -> {dst} is not in the table")
    now = utcnow()
    values: dict[str, Any] = {"state": dst, "updated_at": now, **fields}
    if dst in states.FINAL:
        values.setdefault("finished_at", now)
    res = session.execute(
        update(Job).where(Job.id == job_id, Job.state.in_(sources)).values(**values)
    )
    if res.rowcount != 1:  # type: ignore[attr-defined]
        return False
    add_event(session, job_id, "state", message, state=dst, data=data)
    return True


def transition_many(
    session: Session,
    messages: dict[int, str],
    src: str,
    dst: str,
    **fields: Any,
) -> set[int]:
    """`transition` for many jobs that get the same fields: one UPDATE, one multi-row event INSERT.

    `messages` maps each job id to its event's message. Returns the ids that moved
    (the others were no longer in `src`). A batch of job starts (tasks/starts.py) used
    one UPDATE and one INSERT per job; compiling and running them one by one was most
    of the start transaction's time.
    """
    if not states.allowed(src, dst):
        raise ValueError(f"transition {src} -> {dst} is not in the table")
    if not messages:
        return set()
    now = utcnow()
    values: dict[str, Any] = {"state": dst, "updated_at": now, **fields}
    if dst in states.FINAL:
        values.setdefault("finished_at", now)
    moved = set(session.execute(
        update(Job).where(Job.id.in_(list(messages)), Job.state == src).values(**values).returning(Job.id),
        execution_options={"synchronize_session": False},
    ).scalars())
    if moved:
        session.execute(insert(JobEvent), [
            {"job_id": jid, "at": now, "kind": "state", "state": dst, "message": messages[jid], "data": {}}
            for jid in sorted(moved)
        ])
    return moved


def begin_finalizing(
    session: Session, job_id: int, outcome: str, error: str = "", data: dict[str, Any] | None = None
) -> bool:
    """Decide a job's outcome; the waiting task then resets the node and ends it."""
    fields: dict[str, Any] = {"outcome": outcome}
    if error:
        fields["error"] = error
    msg = f"outcome {outcome}" + (f": {error}" if error else "")
    return transition(
        session,
        job_id,
        (states.QUEUED, states.BOOTING, states.RUNNING),
        states.FINALIZING,
        msg,
        data=data,
        **fields,
    )
