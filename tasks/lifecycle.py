"""One job's life on the worker side: take the node, boot the agent, wait, finalize.

Plain functions, testable without a broker; tasks/jobs.py wraps them as the
Celery tasks `imgfarm.capture` and `imgfarm.restore`.

Waiting: a job thread blocks on its job's wake-up slot (tasks/wakeup.py)
until the agent reports, a cancel arrives, or the next deadline is due. It
never sleeps in a busy loop; with Redis, a quiet job costs nothing.

Idempotence: a task may be delivered twice (a killed worker, the broker's
visibility timeout, the reconciler). The queued -> booting step is a
conditional update, so only one delivery ever boots the node; any other
delivery finds the job past `queued` and just waits (and takes over the
waiting if the previous waiter died). Finalizing is guarded the same way.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import httpx
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from imgfarm.config.settings import get_settings
from imgfarm.errors import ImgfarmError
from imgfarm.models import states
from imgfarm.models.db import session_scope
from imgfarm.models.jobs import add_event, begin_finalizing
from imgfarm.models.tables import Job, utcnow
from imgfarm.models.workers import worker_id
from imgfarm.protocol import Orders, ProtocolError
from imgfarm.tasks import multicast
from imgfarm.tasks.finalize import finalize_job
from imgfarm.tasks.nodes import boot_agent
from imgfarm.tasks.starts import Start, claim_start
from imgfarm.tasks.wakeup import get_waker

log = logging.getLogger(__name__)

ProgressFn = Callable[[dict[str, Any]], None]


class JobEnded(Exception):
    """Raised by a job task whose job did not succeed: Flower shows the reason."""


@dataclass
class Summary:
    job_id: int
    state: str
    error: str
    result: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "state": self.state, "error": self.error, **self.result}


def _boot(job_id: int, start: Start) -> float | None:
    """Boot the agent and power-cycle the node this thread claimed (tasks/starts.py).

    No token goes to the node: the boot files are world-readable, so the agent
    takes its token from the API on its first call (api/agent_routes.py).

    Returns the seconds to the job's first deadline when this call booted the
    node, so the wait can skip its first read of the row; None otherwise (the
    job was no longer queued: another delivery, or a resumed job, and this
    worker has claimed it for waiting; or it ended before or during the boot).
    """
    info = start.info
    if info is None:
        return None
    try:
        orders = Orders(api_url=get_settings().api_url, job_id=job_id, disk=str(start.options.get("disk") or ""))
        boot_agent(info, orders)
        return start.first_deadline
    except (ImgfarmError, ProtocolError) as exc:  # ProtocolError: e.g. IMGFARM_API_URL is no URL
        with session_scope() as s:
            begin_finalizing(s, job_id, states.FAILED, f"could not boot {info.name}: {exc}")
    except Exception as exc:  # noqa: BLE001 - any driver bug ends the job, never the node
        log.exception("boot of job %s failed", job_id)
        with session_scope() as s:
            begin_finalizing(s, job_id, states.FAILED, f"could not boot {info.name}: {exc!r}")
    return None


def _start(job_id: int) -> tuple[float | None, Start]:
    """queued -> booting, once, in one transaction with the other jobs of this process starting now."""
    start = claim_start(job_id)
    return _boot(job_id, start), start


OVERALL_DEADLINE = "the job's overall deadline passed"


def _api_uptime() -> float | None:
    """How long the API the agents report to has been up; None if it does not answer."""
    try:
        r = httpx.get(f"{get_settings().api_url}/healthz", timeout=5)
        return float(r.json()["uptime"]) if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def _api_was_away(s: Any, job: Any) -> bool:
    """A silent agent is not late if the API it reports to was away: count again.

    An agent keeps its result and retries it for as long as the job may run, so
    while the API is down (or since it came back, for less than the allowed
    silence) the silence is measured from the API's return, not the last report.
    """
    uptime = _api_uptime()
    now = utcnow()
    if uptime is None:
        since = now
        add_event(s, job.id, "note", f"no word from the agent, but the API it reports to "
                  f"({get_settings().api_url}) does not answer: waiting for it")
    else:
        since = now - timedelta(seconds=uptime)
        last = job.last_report_at or job.started_at
        if last is not None and since <= last:
            return False  # the API was up all along: the agent is late
        limit = _silence_limit(job)
        if uptime >= limit:
            return False
    s.execute(update(Job).where(Job.id == job.id, Job.state == job.state).values(last_report_at=since))
    return True


DB_RETRY = 2.0  # seconds between two reads of a job row while the database does not answer


def _db_was_away(s: Any, job: Any, since: Any) -> None:
    """The agent could not report while the job database was away: its silence counts from now."""
    s.execute(update(Job).where(Job.id == job.id, Job.state == job.state).values(last_report_at=utcnow()))
    add_event(s, job.id, "note", f"the job database did not answer from {since:%H:%M:%S} UTC; "
              "the agent's silence counts from its return")


def _heartbeat_limit(job: Any) -> float:
    """Seconds a running job's agent may stay silent (its own setting, or the farm's)."""
    return float((job.options or {}).get("heartbeat_timeout") or get_settings().heartbeat_timeout)


def _silence_limit(job: Any) -> float:
    """Seconds of silence allowed now: the boot timeout while booting, else the heartbeat."""
    if job.state == states.BOOTING:
        return float((job.options or {}).get("boot_timeout") or get_settings().boot_timeout)
    return _heartbeat_limit(job)


def _check_deadlines(job: Any) -> tuple[str, str] | None:
    """(outcome, reason) if a deadline has passed, else None."""
    now = utcnow()
    if job.deadline_at and now >= job.deadline_at:
        return states.TIMED_OUT, OVERALL_DEADLINE
    last = job.last_report_at or job.started_at
    if last is None:
        return None
    if job.state == states.BOOTING:
        limit = _silence_limit(job)
        if (now - last).total_seconds() >= limit:
            return states.TIMED_OUT, f"the agent did not report within {limit:g}s of the power-cycle"
    elif job.state == states.RUNNING:
        limit = _silence_limit(job)
        if (now - last).total_seconds() >= limit:
            return states.TIMED_OUT, f"no report from the agent for {limit:g}s"
    return None


def _overall_deadline_in(job: Any) -> float:
    if not job.deadline_at:
        return float("inf")
    return max(0.05, (job.deadline_at - utcnow()).total_seconds() + 0.05)


def _next_deadline_in(job: Any) -> float:
    now = utcnow()
    candidates = []
    if job.deadline_at:
        candidates.append((job.deadline_at - now).total_seconds())
    last = job.last_report_at or job.started_at
    if last is not None:
        candidates.append((last - now).total_seconds() + _silence_limit(job))
    return max(0.05, min(candidates) if candidates else 5.0)


def run_job(job_id: int, on_progress: ProgressFn | None = None) -> Summary:
    """Drive one capture/restore job to its end; safe to call more than once."""
    waker = get_waker(get_settings().redis_url)
    slot = waker.register(job_id)  # before booting: the agent's first report must not be missed
    try:
        first_deadline, start = _start(job_id)
        try:
            multicast.join(job_id, start.options, start.image)
        except Exception:  # noqa: BLE001 - without a sender its agent restores by unicast
            log.exception("job %s: cannot start its multicast session", job_id)
        return wait_and_finish(job_id, on_progress, slot=slot, just_booted=first_deadline)
    finally:
        waker.unregister(job_id, slot)


_WATCH = (Job.id, Job.state, Job.waiter, Job.cancel_requested, Job.deadline_at, Job.last_report_at,
          Job.started_at, Job.options, Job.progress, Job.bytes_done, Job.bytes_total, Job.rate,
          Job.error, Job.result)
# A process's jobs finalize at most this many at a time; the others wait here, at a shallow
# point. When 5,000 jobs ended at once, every thread deep in a database call (or, on a real
# site, in ipmitool: a process each) took the worker from ~315 to ~600 MB; a wait here
# costs a job its turn only, its outcome is already decided.
FINALIZING_AT_ONCE = threading.BoundedSemaphore(100)
SAFETY_RECHECK = 60.0  # re-read the row at least this often, in case a wake-up was lost
SAFETY_READS_PER_S = 10.0  # ... but a process's waiting jobs make at most this many such reads


def safety_recheck(waiting: int) -> float:
    """Seconds between a waiting job's safety re-reads of its row.

    The re-read only catches a wake-up that was lost (the API could not publish it; the
    listener's own reconnect wakes every job). Deadlines are kept exactly whatever this is.
    At 60 s each, 5,000 waiting jobs made 83 reads a second, most of one worker's waiting
    CPU; spread to at most SAFETY_READS_PER_S, such a wake-up is noticed within 500 s.
    """
    return max(SAFETY_RECHECK, waiting / SAFETY_READS_PER_S)


def wait_and_finish(
    job_id: int, on_progress: ProgressFn | None = None, slot: Any = None, just_booted: float | None = None
) -> Summary:
    """Wait for the job's end, acting on deadlines and cancels if this worker holds it.

    A progress report wakes the thread with the report itself (from the API's
    pub/sub message), so it is passed on to Flower without touching the
    database; the row is read only when a deadline is due, a cancel or a
    result arrives, or every safety_recheck() seconds. Right after this thread
    booted the node the row's content is known (booting, held by us, its first
    deadline `just_booted` seconds ahead), so the first read is skipped: that matters when 500 jobs
    start at once.
    """
    settings = get_settings()
    waker = get_waker(settings.redis_url)
    own_slot = slot is None
    if own_slot:
        slot = waker.register(job_id)
    last_progress: tuple[Any, ...] = (states.BOOTING, 0.0, 0)  # Flower shows STARTED already
    heartbeat = float(settings.heartbeat_timeout)
    db_lost_at = None  # when the job database stopped answering this thread, if it did
    try:
        while True:
            if just_booted is not None:
                progress: dict[str, Any] = {"job_id": job_id, "state": states.BOOTING, "percent": 0.0,
                                            "bytes_done": 0, "bytes_total": 0, "rate": 0.0}
                fixed_at = time.monotonic() + safety_recheck(waker.waiting())
                wake_at = min(time.monotonic() + just_booted + 0.05, fixed_at)
                just_booted = None
            else:
                try:
                    finalize = False
                    with session_scope() as s:
                        job = s.execute(select(*_WATCH).where(Job.id == job_id)).one()
                        if job.state in states.FINAL:
                            return Summary(job.id, job.state, job.error, dict(job.result or {}))
                        mine = job.waiter == worker_id()
                        if db_lost_at is not None:
                            if mine and job.state in (states.BOOTING, states.RUNNING):
                                _db_was_away(s, job, db_lost_at)
                            db_lost_at = None
                            continue
                        if job.state == states.FINALIZING:
                            finalize = mine
                        elif mine and job.cancel_requested:
                            begin_finalizing(s, job_id, states.CANCELLED, "cancelled by operator")
                            continue
                        elif mine:
                            expired = _check_deadlines(job)
                            if expired and expired[1] != OVERALL_DEADLINE and _api_was_away(s, job):
                                continue
                            if expired:
                                begin_finalizing(s, job_id, expired[0], expired[1])
                                continue
                    if finalize:
                        with FINALIZING_AT_ONCE:
                            finalize_job(job_id)  # outside the session: it opens its own
                        continue
                except OperationalError as exc:  # the database restarts: wait for it, as the API does
                    if db_lost_at is None:
                        db_lost_at = utcnow()
                        log.warning("job %s: the job database does not answer (%s); retrying", job_id, exc)
                    time.sleep(DB_RETRY)
                    continue
                progress = {"job_id": job_id, "state": job.state, "percent": job.progress,
                            "bytes_done": job.bytes_done, "bytes_total": job.bytes_total, "rate": job.rate}
                heartbeat = _heartbeat_limit(job)
                # the deadlines a report does not move (the job's own, the safety re-read)...
                fixed_at = time.monotonic() + min(_overall_deadline_in(job), safety_recheck(waker.waiting()))
                wake_at = min(time.monotonic() + _next_deadline_in(job) + 0.05, fixed_at)
            while True:
                snapshot = (progress["state"], round(progress["percent"] or 0, 1), progress["bytes_done"])
                if on_progress and snapshot != last_progress:
                    last_progress = snapshot
                    on_progress(progress)
                payload = waker.wait(slot, wake_at - time.monotonic())
                if not payload or payload.get("kind") != "progress":
                    break  # a deadline, a result, a cancel: look at the row
                progress.update(state=states.RUNNING, percent=payload.get("percent", 0.0),
                                bytes_done=payload.get("bytes_done", 0),
                                bytes_total=payload.get("bytes_total", 0), rate=payload.get("rate", 0.0))
                # ... and the heartbeat, which this report starts again (the boot deadline is past)
                wake_at = min(fixed_at, time.monotonic() + heartbeat + 0.05)
    finally:
        if own_slot:
            waker.unregister(job_id, slot)

