"""Changing a job: the one place that moves a job between states.

Every change is a conditional UPDATE (`WHERE id=? AND state IN (...)`), so
two processes racing on one job (a redelivered task and the reconciler, the
API and a timeout) cannot both win; the winner writes the event.
"""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from imgfarm.errors import InvalidInput, NotFound
from imgfarm.models import states
from imgfarm.models.nodes import get_node
from imgfarm.models.tables import Job, JobEvent, utcnow


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def get_job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise NotFound(f"job {job_id} not found", hint="list jobs with `imgfarm jobs`")
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


def query_jobs(
    session: Session, state: str = "", node: str = "", kind: str = "", limit: int = 200
) -> list[Job]:
    """Jobs newest first, filtered; one query for the CLI and the API alike."""
    if state and state not in states.ALL:
        raise InvalidInput(f"unknown state {state!r}", hint=f"one of {', '.join(states.ALL)}")
    if kind and kind not in states.KINDS:
        raise InvalidInput(f"unknown job kind {kind!r}", hint=f"one of {', '.join(states.KINDS)}")
    q = select(Job).order_by(Job.id.desc()).limit(limit)
    if state:
        q = q.where(Job.state == state)
    if kind:
        q = q.where(Job.kind == kind)
    if node:
        q = q.where(Job.node_id == get_node(session, node).id)
    return list(session.scalars(q))
