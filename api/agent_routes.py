"""The agent's endpoints: its token (once), job spec, progress, result.

The boot files carry no credential: the agent's first call, POST .../token with
the job id and the node's MACs, receives the job's token exactly once; every
other call must present it. A second first call is refused and recorded on
the job, and the job fails, because someone other than the agent may now hold
its token (see docs/protocol.md).

A call without the right token is refused with 401 and records nothing; a
report for a job that has already ended (or is finalizing) is refused with
409 and changes nothing. Unknown job ids also answer 401, so the endpoint
tells a stranger nothing about which jobs exist.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from pydantic import BaseModel, Field, PlainValidator
from sqlalchemy import update
from sqlalchemy.orm import Session

from imgfarm.api.auth import authorized_job
from imgfarm.api.limits import JobIdPath
from imgfarm.config.settings import get_settings
from imgfarm.errors import Conflict, Unauthorized
from imgfarm.models import states
from imgfarm.models.db import session_scope
from imgfarm.models.images import get_image
from imgfarm.models.jobs import add_event, add_progress_event, begin_finalizing, hash_token, transition
from imgfarm.models.tables import Job, utcnow
from imgfarm.protocol import JobKind, ProgressReport, ProtocolError, ResultReport, normalize_mac
from imgfarm.tasks.job_spec import job_spec
from imgfarm.tasks.wakeup import notify

router = APIRouter(prefix="/agent/v1", tags=["agent"])


# Request bodies are the protocol's messages: pydantic reads each with the message's own
# from_json (one definition of every field and rule), and derives the OpenAPI schema from
# the same dataclass.
ProgressBody = Annotated[ProgressReport, PlainValidator(ProgressReport.from_json,
                                                        json_schema_input_type=ProgressReport)]
ResultBody = Annotated[ResultReport, PlainValidator(ResultReport.from_json,
                                                    json_schema_input_type=ResultReport)]


class TokenClaim(BaseModel):
    macs: list[str] = Field(default=[], max_length=64,
                            description="this machine's MAC addresses (BOOTIF first)")


def _macs(claimed: list[str]) -> set[str]:
    return {m for m in (normalize_mac(mac[:64]) for mac in claimed) if m}


@router.post("/jobs/{job_id}/token")
def claim_token(job_id: JobIdPath, body: TokenClaim, request: Request) -> dict[str, str]:
    """The job's token, to the first caller that names the job and its node's MAC; never again."""
    peer = request.client.host if request.client else "?"
    refused = Unauthorized("no job waits for its agent's first call here",
                           hint="the job id, or this machine's MAC, is not the job's")
    token = secrets.token_urlsafe(32)
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None or job.state not in (states.BOOTING, states.RUNNING):
            raise refused
        node_mac = job.node.mac if job.node else ""
        if node_mac and node_mac not in _macs(body.macs):
            raise refused
        res = s.execute(update(Job).where(Job.id == job_id, Job.token_hash == "",
                                          Job.state.in_((states.BOOTING, states.RUNNING)))
                        .values(token_hash=hash_token(token)))
        if res.rowcount == 1:  # type: ignore[attr-defined]
            add_event(s, job_id, "note", f"the agent took the job's token (from {peer})")
            return {"token": token}
        reason = (f"a second first call for the job's token came from {peer} and was refused: "
                  "someone may have raced the agent, so the job is not trusted")
        add_event(s, job_id, "security", reason, data={"peer": peer})
        begin_finalizing(s, job_id, states.FAILED, reason)
    notify(get_settings().redis_url, job_id, {"kind": "result", "ok": False})
    raise Conflict(f"job {job_id}: its token was handed out already",
                   hint="each job's token is given once; the job has failed, submit it again")


def open_job(s: Session, job_id: int, authorization: str | None) -> Job:
    """The job this agent's token is for, while it still takes reports (a finished job's
    token opens nothing)."""
    job = authorized_job(s, job_id, authorization)
    if job.state not in (states.BOOTING, states.RUNNING):
        raise Conflict(f"job {job.id} is {job.state}; reports are no longer accepted")
    return job


def _reporting_job(s: Session, job_id: int, authorization: str | None, why: str) -> Job:
    """An open job whose agent has reported: the first report is what moves it to running."""
    job = open_job(s, job_id, authorization)
    if job.state == states.BOOTING:
        transition(s, job_id, states.BOOTING, states.RUNNING, why)
    return job


@router.get("/jobs/{job_id}")
def get_spec(job_id: JobIdPath, authorization: str | None = Header(None)) -> dict[str, Any]:
    with session_scope() as s:
        job = open_job(s, job_id, authorization)
        image = get_image(s, job.image_name) if job.kind == JobKind.RESTORE else None
        try:
            return job_spec(job, image).to_json()
        except ProtocolError as exc:  # the farm's own settings: the job cannot run, say why now
            reason = f"the farm cannot describe this job to the agent: {exc}"
            begin_finalizing(s, job_id, states.FAILED, reason)
    notify(get_settings().redis_url, job_id, {"kind": "result", "ok": False})
    raise Conflict(reason, hint="check IMGFARM_IMAGE_STORE_NFS and IMGFARM_PROGRESS_INTERVAL")


@router.post("/jobs/{job_id}/progress")
def post_progress(job_id: JobIdPath, report: ProgressBody, authorization: str | None = Header(None)) -> dict[str, str]:
    now = utcnow()
    with session_scope() as s:
        job = _reporting_job(s, job_id, authorization, "agent reported: running")
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
def post_result(job_id: JobIdPath, report: ResultBody, authorization: str | None = Header(None)) -> dict[str, str]:
    now = utcnow()
    with session_scope() as s:
        job = _reporting_job(s, job_id, authorization, "agent reported")
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
