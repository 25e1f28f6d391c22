"""The agent's endpoints: job spec, progress, result — each needs that job's token.

A call without the right token is refused with 401 and records nothing; a
report for a job that has already ended (or is finalizing) is refused with
409 and changes nothing. Unknown job ids also answer 401, so the endpoint
tells a stranger nothing about which jobs exist.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header
from pydantic import PlainValidator
from sqlalchemy import update

from imgfarm.api.auth import authorized_job
from imgfarm.config.settings import get_settings
from imgfarm.errors import Conflict
from imgfarm.models import states
from imgfarm.models.db import session_scope
from imgfarm.models.images import get_image
from imgfarm.models.jobs import add_progress_event, begin_finalizing, transition
from imgfarm.models.tables import Job, utcnow
from imgfarm.protocol import JobKind, ProgressReport, ProtocolError, ResultReport
from imgfarm.tasks.job_spec import job_spec
from imgfarm.worker.wakeup import notify

router = APIRouter(prefix="/agent/v1", tags=["agent"])


# Request bodies are the protocol's messages: pydantic reads each with the message's own
# from_json (one definition of every field and rule), and derives the OpenAPI schema from
# the same dataclass.
ProgressBody = Annotated[ProgressReport, PlainValidator(ProgressReport.from_json,
                                                        json_schema_input_type=ProgressReport)]
ResultBody = Annotated[ResultReport, PlainValidator(ResultReport.from_json,
                                                    json_schema_input_type=ResultReport)]


def _open_job(job: Job) -> None:
    if job.state not in (states.BOOTING, states.RUNNING):
        raise Conflict(f"job {job.id} is {job.state}; reports are no longer accepted")


@router.get("/jobs/{job_id}")
def get_spec(job_id: int, authorization: str | None = Header(None)) -> dict[str, Any]:
    with session_scope() as s:
        job = authorized_job(s, job_id, authorization)
        _open_job(job)
        image = get_image(s, job.image_name) if job.kind == JobKind.RESTORE else None
        try:
            return job_spec(job, image).to_json()
        except ProtocolError as exc:  # the farm's own settings: the job cannot run, say why now
            reason = f"the farm cannot describe this job to the agent: {exc}"
            begin_finalizing(s, job_id, states.FAILED, reason)
    notify(get_settings().redis_url, job_id, {"kind": "result", "ok": False})
    raise Conflict(reason, hint="check IMGFARM_IMAGE_STORE_NFS and IMGFARM_PROGRESS_INTERVAL")


@router.post("/jobs/{job_id}/progress")
def post_progress(job_id: int, report: ProgressBody, authorization: str | None = Header(None)) -> dict[str, str]:
    now = utcnow()
    with session_scope() as s:
        job = authorized_job(s, job_id, authorization)
        _open_job(job)
        if job.state == states.BOOTING:
            transition(s, job_id, states.BOOTING, states.RUNNING, "agent reported: running")
        s.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == states.RUNNING)
            .values(
                progress=report.percent,
                bytes_done=report.bytes_done,
                bytes_total=report.bytes_total or job.bytes_total,
                rate=report.rate,
                last_report_at=now,
                updated_at=now,
            )
        )
        add_progress_event(s, job_id, report.message or f"{report.percent:.0f}%", report.to_json(),
                           get_settings().progress_event_every)
    notify(get_settings().redis_url, job_id, {"kind": "progress", **report.to_json()})
    return {"status": "recorded"}


@router.post("/jobs/{job_id}/result")
def post_result(job_id: int, report: ResultBody, authorization: str | None = Header(None)) -> dict[str, str]:
    now = utcnow()
    with session_scope() as s:
        job = authorized_job(s, job_id, authorization)
        _open_job(job)
        if job.state == states.BOOTING:
            transition(s, job_id, states.BOOTING, states.RUNNING, "agent reported")
        result = report.to_json()
        res = s.execute(
            update(Job).where(Job.id == job_id, Job.state == states.RUNNING).values(
                result=result, last_report_at=now, bytes_done=report.bytes or job.bytes_done,
                progress=100.0 if report.ok else job.progress,
            )
        )
        if res.rowcount != 1:  # type: ignore[attr-defined]
            raise Conflict(f"job {job_id} ended while the report was on its way")
        if report.ok:
            begin_finalizing(s, job_id, states.SUCCEEDED, data={"files": report.files})
        else:
            reason = report.error + (f"\n{report.stderr_tail}" if report.stderr_tail else "")
            begin_finalizing(s, job_id, states.FAILED, reason.strip())
    notify(get_settings().redis_url, job_id, {"kind": "result", "ok": report.ok})
    return {"status": "recorded"}
