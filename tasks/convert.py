"""`imgfarm.convert`: legacy partimage -> partimage-ng, on the CPU queue.

Needs no node. The job row tracks it like any job (queued -> running ->
finalizing -> succeeded/failed) and the new image is registered with its
origin only after the converter verified every CRC and renamed the result
into place. Restores submitted with --convert wait as `queued` jobs that
name this job in options.after_job; they are enqueued when it succeeds, and
failed with its reason when it does not: one conversion, however many nodes.
"""

from __future__ import annotations

import logging
import shutil
import time
from typing import Any

from celery import Task, shared_task
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from imgfarm.errors import Conflict, ImgfarmError, InvalidInput
from imgfarm.imageformats.convert import convert_legacy
from imgfarm.imageformats.partimage import legacy_first_volume
from imgfarm.models import states
from imgfarm.models.db import session_scope
from imgfarm.models.images import (
    find_image,
    get_image,
    register_converted,
    store_root,
)
from imgfarm.models.jobs import add_event, begin_finalizing, get_job, transition
from imgfarm.models.names import check_image_name, converted_name
from imgfarm.models.tables import Job, utcnow
from imgfarm.models.workers import worker_id
from imgfarm.protocol import ImageFormat, JobKind, Manifest
from imgfarm.tasks.broker import check_broker, send
from imgfarm.tasks.enqueue import enqueue_jobs, fail_unqueued
from imgfarm.tasks.finalize import finalize_job
from imgfarm.tasks.lifecycle import JobEnded

log = logging.getLogger(__name__)

CONVERT_TASK = "imgfarm.convert"


def create_convert_job(s: Session, source: str, target: str, submitted_by: str = "") -> int:
    """A queued convert job row (committed by the caller's session)."""
    check_image_name(target)
    img = get_image(s, source)
    if img.format != ImageFormat.PARTIMAGE:
        raise InvalidInput(f"image {source!r} is {img.format}; only partimage images convert")
    if find_image(s, target) is not None:
        raise Conflict(f"image {target!r} exists already", hint="choose another --name")
    other = s.scalar(
        select(Job.id).where(Job.kind == JobKind.CONVERT, Job.image_name == target,
                             Job.state.in_(states.ACTIVE))
    )
    if other:
        raise Conflict(f"job {other} is already converting to {target!r}")
    job = Job(kind=JobKind.CONVERT, image_name=target, format=ImageFormat.NG, submitted_by=submitted_by,
              options={"source": source})
    s.add(job)
    s.flush()
    add_event(s, job.id, "state", f"conversion of {source} to {target} submitted", state=states.QUEUED)
    return job.id


def enqueue_convert(job_id: int) -> None:
    with session_scope() as s:
        job = get_job(s, job_id)
        args = (job.id, job.options.get("source", ""), job.image_name)
    try:
        res = send(CONVERT_TASK, args, ignore_result=True)
    except Exception as exc:
        try:
            fail_unqueued([job_id], exc)
        finally:
            release_dependents(job_id)  # the restores waiting on it end with its reason
    with session_scope() as s:
        get_job(s, job_id).celery_task_id = res.id


def submit_convert(source: str, target: str | None = None, submitted_by: str = "", enqueue: bool = True) -> int:
    if enqueue:
        check_broker()
    with session_scope() as s:
        job_id = create_convert_job(s, source, target or converted_name(source), submitted_by)
    if enqueue:
        enqueue_convert(job_id)
    return job_id


def run_convert(job_id: int, progress: Any = None) -> str:
    """Convert, register and release the waiting restores; returns the final state."""
    with session_scope() as s:
        job = get_job(s, job_id)
        if job.state in states.FINAL:
            return job.state
        source_name = job.options.get("source", "")
        target = job.image_name
        src = get_image(s, source_name)
        src_dir = store_root() / src.location
        if job.state == states.QUEUED or job.state == states.RUNNING:
            # A redelivered conversion starts again from the legacy image.
            s.execute(update(Job).where(Job.id == job_id).values(waiter=worker_id()))
            if job.state == states.QUEUED:
                transition(s, job_id, states.QUEUED, states.RUNNING, f"converting {source_name} -> {target}",
                           started_at=utcnow())
    error = ""
    manifest: Manifest | None = None
    with session_scope() as s:
        state = get_job(s, job_id).state
    if state == states.RUNNING:
        try:
            first = legacy_first_volume(src_dir)

            def _progress(done: int, total: int) -> None:
                if progress:
                    progress(done, total)
                with session_scope() as s2:
                    j = get_job(s2, job_id)
                    j.bytes_done, j.bytes_total = done, total
                    j.progress = round(100.0 * done / total, 1) if total else 0.0
                    j.updated_at = utcnow()
                    if j.cancel_requested:
                        raise ImgfarmError("cancelled by operator")

            manifest = convert_legacy(first, store_root(), name=target, progress=_progress)
        except (ImgfarmError, OSError) as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - record any converter bug as the reason
            log.exception("conversion %s failed", job_id)
            error = f"{type(exc).__name__}: {exc}"
        with session_scope() as s:
            if error:
                outcome = states.CANCELLED if "cancelled by operator" in error else states.FAILED
                begin_finalizing(s, job_id, outcome, error)
            else:
                try:
                    assert manifest is not None  # convert_legacy returned it
                    register_converted(s, target, manifest, source_job_id=job_id,
                                       origin={"kind": JobKind.CONVERT, "source_image": source_name,
                                               "job": job_id})
                    begin_finalizing(s, job_id, states.SUCCEEDED)
                except ImgfarmError as exc:
                    error = str(exc)
                    begin_finalizing(s, job_id, states.FAILED, error)
                    # convert_legacy made that directory (it refuses an existing one): an
                    # unregistered image must not be left to look like one
                    shutil.rmtree(store_root() / target, ignore_errors=True)
    with session_scope() as s:
        job = get_job(s, job_id)
        final = job.outcome or states.FAILED
        transition(s, job_id, states.FINALIZING, final, job.error or f"convert {final}",
                   progress=100.0 if final == states.SUCCEEDED else job.progress)
    release_dependents(job_id)
    with session_scope() as s:
        return get_job(s, job_id).state


def release_dependents(convert_job_id: int) -> list[int]:
    """Enqueue the restores that waited on this conversion, or fail them with its reason."""
    with session_scope() as s:
        conv = get_job(s, convert_job_id)
        if conv.state not in states.FINAL:
            return []
        waiting = [
            j.id
            for j in s.scalars(select(Job).where(Job.state == states.QUEUED, Job.kind == JobKind.RESTORE))
            if (j.options or {}).get("after_job") == convert_job_id and not j.celery_task_id
        ]
        ok, reason = conv.state == states.SUCCEEDED, conv.error
    if ok:
        enqueue_jobs(waiting)
        return waiting
    for jid in waiting:
        with session_scope() as s:
            begin_finalizing(s, jid, states.FAILED, f"conversion job {convert_job_id} did not succeed: {reason}")
        finalize_job(jid)
    return waiting


@shared_task(name=CONVERT_TASK, bind=True, acks_late=True, reject_on_worker_lost=True, throws=(JobEnded,))
def convert(self: Task, job_id: int, source: str = "", image: str = "") -> dict[str, Any]:
    last = [0.0]

    def progress(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 1.0:
            last[0] = now
            pct = round(100.0 * done / total, 1) if total else 0.0
            try:
                self.send_event("task-progress", job_id=job_id, percent=pct, bytes_done=done, bytes_total=total)
            except Exception:  # noqa: BLE001
                pass

    state = run_convert(int(job_id), progress)
    with session_scope() as s:
        job = get_job(s, int(job_id))
        if state != states.SUCCEEDED:
            raise JobEnded(f"job {job_id} {state}: {job.error}")
        return {"job_id": job.id, "state": state, "image": job.image_name}
