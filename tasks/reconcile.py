"""`imgfarm.reconcile`: the periodic sweep that keeps the database honest.

Celery has no recovery of orphaned work of its own. Every reconcile pass
(celery beat, every `reconcile_interval` seconds, and once when a job
worker starts):
- re-enqueues every active job whose waiting worker died (no heartbeat, or
  its pid gone on this host); the task resumes waiting and never boots the
  node a second time;
- ends jobs whose overall deadline passed long ago (their waiter is stuck),
  resetting the node to local boot;
- releases restores that waited on a conversion that has ended.
Every action is a conditional update, so two reconcilers (or a reconciler
and a live task) cannot both act on one job.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta
from typing import Any

from celery import shared_task
from sqlalchemy import select, update

from imgfarm.models import states
from imgfarm.models.db import session_scope
from imgfarm.models.jobs import add_event, begin_finalizing
from imgfarm.models.tables import Job, utcnow
from imgfarm.models.workers import dead_workers, forget, live_workers
from imgfarm.protocol import JobKind
from imgfarm.tasks import multicast
from imgfarm.tasks.broker import send
from imgfarm.tasks.convert import enqueue_convert, release_dependents
from imgfarm.tasks.finalize import finalize_job
from imgfarm.tasks.jobs import JOB_TASKS

log = logging.getLogger(__name__)

STUCK_GRACE = timedelta(minutes=5)
ORPHAN_AFTER = timedelta(minutes=2)


def reconcile_once() -> dict[str, Any]:
    dead = dead_workers()
    live = live_workers()
    resumed: list[int] = []
    ended: list[int] = []
    with session_scope() as s:
        jobs = list(s.scalars(select(Job).where(Job.state.in_(states.ACTIVE))))
        orphans = []
        for job in jobs:
            unheld = (
                not job.waiter
                and job.state != states.QUEUED
                and utcnow() - job.updated_at > ORPHAN_AFTER
            )
            if (job.waiter and job.waiter not in live) or unheld:
                orphans.append((job.id, job.kind, job.node_name, job.image_name, job.waiter))
        stuck = [
            j.id for j in jobs
            if j.deadline_at and utcnow() > j.deadline_at + STUCK_GRACE and j.state != states.FINALIZING
        ]
        conv_done = {
            int(j.options["after_job"]) for j in jobs
            if j.state == states.QUEUED and (j.options or {}).get("after_job") and not j.celery_task_id
        }
    for job_id, kind, node, image, waiter in orphans:
        task_id = uuid.uuid4().hex
        with session_scope() as s:
            res = s.execute(
                update(Job).where(Job.id == job_id, Job.waiter == waiter)
                .values(waiter="", celery_task_id=task_id, attempt=Job.attempt + 1)
            )
            if res.rowcount != 1:  # type: ignore[attr-defined]
                continue
            why = f"worker {waiter} is gone" if waiter else "no worker holds it"
            add_event(s, job_id, "note", f"{why}; job handed to another worker (task {task_id})")
        if kind == JobKind.CONVERT:
            enqueue_convert(job_id)
        else:
            send(JOB_TASKS[kind], (job_id, node, image), task_id=task_id, ignore_result=True)
        resumed.append(job_id)
    for job_id in stuck:
        with session_scope() as s:
            begin_finalizing(s, job_id, states.TIMED_OUT, "the job's overall deadline passed (reconciler)")
        finalize_job(job_id)
        ended.append(job_id)
    for conv_id in conv_done:
        release_dependents(conv_id)
    forget(dead)
    strays = multicast.kill_strays()
    if resumed or ended:
        log.info("reconcile: resumed %s, ended %s", resumed, ended)
    return {"resumed": resumed, "ended": ended, "dead_workers": sorted(dead), "udp_senders_killed": strays}


@shared_task(name="imgfarm.reconcile", ignore_result=True)
def reconcile() -> dict[str, Any]:
    return reconcile_once()
