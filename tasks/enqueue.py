"""Sending the Celery tasks of committed capture and restore jobs.

Submits (tasks/submit.py), released conversions (tasks/convert.py) and the
reconciler send jobs the same way: the job rows are committed first (a
worker must find the row it is given), and a job whose task could not be
sent is ended at once instead of staying queued forever.
"""

from __future__ import annotations

import uuid

from sqlalchemy import select, update

from imgfarm.errors import ServiceUnavailable
from imgfarm.models import states
from imgfarm.models.db import session_scope
from imgfarm.models.jobs import begin_finalizing
from imgfarm.models.tables import Job, Node
from imgfarm.tasks.broker import farm_app, send
from imgfarm.tasks.finalize import finalize_job
from imgfarm.tasks.jobs import JOB_TASKS

PUBLISH_BATCH = 500  # jobs whose task messages go to the broker in one round trip


def enqueue_jobs(job_ids: list[int]) -> None:
    """Send the tasks of committed job rows; their task ids were set at creation.

    A chunk whose publication failed counts as not sent, even if the broker took some
    of it: its jobs are ended, and a task that arrives for an ended job finds it so
    and returns (tasks/lifecycle.py), so nothing runs twice.
    """
    with session_scope() as s:  # Core columns: ORM rows with their nodes and groups cost 0.7 s at 5,000
        rows = [(jid, kind, node or "", image, tid) for jid, kind, node, image, tid in s.execute(
            select(Job.id, Job.kind, Node.name, Job.image_name, Job.celery_task_id)
            .outerjoin(Node, Job.node_id == Node.id).where(Job.id.in_(job_ids)).order_by(Job.id))]
    missing = [r[0] for r in rows if not r[4]]
    if missing:
        ids = {jid: uuid.uuid4().hex for jid in missing}
        with session_scope() as s:
            for jid, tid in ids.items():
                s.execute(update(Job).where(Job.id == jid).values(celery_task_id=tid))
        rows = [(r[0], r[1], r[2], r[3], r[4] or ids[r[0]]) for r in rows]
    sent: set[int] = set()
    try:
        with farm_app().producer_or_acquire() as producer:  # one connection for the whole batch
            for start in range(0, len(rows), PUBLISH_BATCH):
                chunk = rows[start:start + PUBLISH_BATCH]
                # One pipelined round trip for the chunk's task messages and their
                # task-sent events (kombu's Redis publish batch; other transports
                # publish at once). 5,000 jobs were 10,000 round trips, 9 s of a submit.
                with producer.batch(max_size=4 * PUBLISH_BATCH):
                    for job_id, kind, node, image, task_id in chunk:
                        # ignore_result: the job row is the result; without it Celery would
                        # also SUBSCRIBE to a result channel per job here, and store a result
                        # per job in Redis for a week, for a .get() nobody calls.
                        send(JOB_TASKS[kind], (job_id, node, image), task_id=task_id, producer=producer,
                             ignore_result=True)
                sent.update(r[0] for r in chunk)  # flushed: the batch's exit raised nothing
    except Exception as exc:
        fail_unqueued([r[0] for r in rows if r[0] not in sent], exc)


def fail_unqueued(job_ids: list[int], exc: BaseException) -> None:
    """End jobs whose task could not be sent (the broker went away mid-submit), then raise.

    Why not leave them queued: nothing would ever run them, and their nodes
    would stay reserved.  They never booted anything, so ending them touches
    no node (finalize_job skips the drivers for such jobs).
    """
    reason = f"could not be queued: {exc}"
    for jid in job_ids:
        with session_scope() as s:
            begin_finalizing(s, jid, states.FAILED, reason)
        finalize_job(jid)
    ids = ", ".join(map(str, job_ids))
    raise ServiceUnavailable(f"the broker failed while queueing: {exc}; job(s) {ids} ended as "
                             "failed", hint="check IMGFARM_BROKER_URL and that Redis runs, "
                             "then submit again") from exc
